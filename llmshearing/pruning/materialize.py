"""Physical pruning: (source weights, deterministic masks) -> a dense model of exactly the target shape.

A pure function of its inputs. Kept units are selected along each weight's rows and columns by the units
the family's adapter gives them, and the surviving mask values are folded into the adjacent weights, so the
result computes what the masked model computes (LLaMA names):

| mask | folded into |
| --- | --- |
| z_hidden (d) | columns of the embedding; rows (and bias) of every residual writer (``o_proj``, ``down_proj``) |
| z_layer (L) | rows of the layer's residual writers |
| z_head (L, H) | the head's input columns of ``o_proj`` |
| z_int (L, m) | input columns of ``down_proj`` |

Tied embeddings stay tied. The masked model computes ``logits = E (norm(x) * w)`` with the residual stream
(and so ``x``) scaled by ``z_hidden``; folding ``z_hidden`` into the embedding (``E' = E * z``) and ``1 / z``
into the final norm's weight (``w' = w / z``; ``(o + w') = (o + w) / z`` for a norm that multiplies by
``o + w``) gives ``E' (norm(x) * w') = E (norm(x) * w)`` exactly, with one matrix for both. A kept channel with
``z = 0`` is zero in the embedding and gets a zero norm weight: never a division by zero.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import no_init_weights

from llmshearing.models.adapters import adapter_for
from llmshearing.models.families import head_dim
from llmshearing.pruning.masks import DeterministicMasks

__all__ = ["pruned_config", "prune_state_dict", "materialize"]

log = logging.getLogger(__name__)


def _idx(keep: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(keep.cpu(), as_tuple=False).flatten()


def _with(config: PretrainedConfig, **fields) -> PretrainedConfig:
    """A shallow copy of ``config`` with ``fields`` changed (for constants derived from the shape)."""
    new = copy.copy(config)
    for k, v in fields.items():
        setattr(new, k, v)
    return new


def pruned_config(config: PretrainedConfig, masks: DeterministicMasks) -> PretrainedConfig:
    """The target config: the source config with the kept sizes (and an explicit head_dim)."""
    d = config.to_dict()
    layers = _idx(masks.layer_keep).tolist()
    n_heads = int(masks.head_keep[layers[0]].sum())
    n_kv = int(masks.kv_keep[layers[0]].sum())
    d.update(
        num_hidden_layers=len(layers),
        hidden_size=int(masks.hidden_keep.sum()),
        intermediate_size=int(masks.intermediate_keep[layers[0]].sum()),
        num_attention_heads=n_heads,
        head_dim=head_dim(config),
    )
    if "num_key_value_heads" in d:  # GPT-NeoX has no such field (and no GQA)
        d["num_key_value_heads"] = n_kv
    if d.get("layer_types") is not None:
        d["layer_types"] = [d["layer_types"][i] for i in layers]
    if d.get("max_window_layers") is not None:
        # Qwen2: the first max_window_layers layers attend fully; keep it true of the kept layers
        if d.get("layer_types") is not None:
            types = d["layer_types"]
            d["max_window_layers"] = next((j for j, t in enumerate(types) if t != "full_attention"), len(types))
        else:
            d["max_window_layers"] = sum(1 for i in layers if i < d["max_window_layers"])
    for k in ("_name_or_path", "transformers_version", "architectures"):
        d.pop(k, None)
    config_cls = adapter_for(config).config_cls
    d.pop("model_type", None)
    return config_cls(**d)


def prune_state_dict(
    get: Callable[[str], torch.Tensor], config: PretrainedConfig, masks: DeterministicMasks, tied: bool
) -> dict[str, torch.Tensor]:
    """Pruned tensors by Hugging Face name, reading the source tensors one at a time through ``get``.

    Args:
        get: returns the source tensor of a Hugging Face parameter name (``model.layers.0.mlp.up_proj.weight``).
        config: the source config.
        masks: deterministic masks of the source shape.
        tied: whether the source ties ``lm_head`` to ``embed_tokens``.
    """
    adapter = adapter_for(config)
    weak = {k: n for k, n in masks.weak_kept().items() if n}
    if weak:
        log.warning(
            "kept units whose mask value is below 0.1 (nearly dead capacity in the pruned model): %s. Either the "
            "expected sizes ended below the target (the Lagrange multipliers overshot and had not settled: compare "
            "pruning/expected_* with the target in the run's metrics, and prune longer), or the target was met with "
            "fewer live units than kept slots because a unit at the lower clamp counts P(z != 0) = 0.047 "
            "(pruning.log_alpha_min=-9.2 makes such units count ~0; README, configuration reference)", weak,
        )
    hd = head_dim(config)
    H, G = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d, m = config.hidden_size, config.intermediate_size
    full = {"hidden": d, "q": H * hd, "kv": G * hd, "ffn": m, "qkv3": 3 * H * hd}  # rows of each unit
    hid = _idx(masks.hidden_keep)
    z_hid = masks.hidden.cpu()[hid].float()
    out: dict[str, torch.Tensor] = {}
    norm_tensors = adapter.norm_tensors()
    o = adapter.norm_weight_offset

    def rows_of(units: torch.Tensor, size: int) -> torch.Tensor:  # head/group indices -> weight rows
        return (units[:, None] * size + torch.arange(size)[None, :]).flatten()

    def scaled_norm(name: str, scale: torch.Tensor) -> None:
        """The norm ``name`` (already cut to the kept dims) followed by a per-dim ``scale``: folded into its
        weight (``o + w' = (o + w) * scale``) and bias."""
        out[f"{name}.weight"] = (o + out[f"{name}.weight"]) * scale - o
        if f"{name}.bias" in out:
            out[f"{name}.bias"] = out[f"{name}.bias"] * scale

    embed, lm_head, final = f"{adapter.embed}.weight", f"{adapter.lm_head}.weight", adapter.final_norm
    # an embedding scaled by a function of hidden_size (Gemma: sqrt(d)) is multiplied by the new model's
    # constant; fold the ratio in so that the output is unchanged
    c = 1.0
    if adapter.embed_scale is not None:
        c = adapter.embed_scale(config) / adapter.embed_scale(_with(config, hidden_size=len(hid)))
    out[embed] = get(embed)[:, hid] * (z_hid * c)  # (V, d_t)
    for t in norm_tensors:
        out[f"{final}.{t}"] = get(f"{final}.{t}")[hid]
    if tied and config.tie_word_embeddings:  # the head is E * z * c too: undo it in the final norm
        g = z_hid * c
        alive = g > 0
        scaled_norm(final, torch.where(alive, 1.0 / torch.where(alive, g, 1.0), 0.0))
        out[f"{final}.weight"] = torch.where(alive, out[f"{final}.weight"], -o)  # o + w' = 0: a dead channel
    else:
        out[lm_head] = get(lm_head)[:, hid]

    layers = _idx(masks.layer_keep).tolist()
    for new, old in enumerate(layers):
        src, dst = adapter.layer_prefix(old), adapter.layer_prefix(new)
        z_layer = masks.layer.cpu()[old].float()
        heads = _idx(masks.head_keep[old])  # (H_t,) in group order
        groups = _idx(masks.kv_keep[old])  # (G_t,)
        ch = _idx(masks.intermediate_keep[old])  # (m_t,)
        if len(heads) != int(masks.head_keep[layers[0]].sum()):
            raise ValueError("masks keep a different number of heads in different layers; the target must be uniform")
        if H != G and len(heads) % max(len(groups), 1):
            raise ValueError(f"layer {old}: {len(heads)} query heads do not split evenly over {len(groups)} KV groups")
        index = {"hidden": hid, "q": rows_of(heads, hd), "kv": rows_of(groups, hd), "ffn": ch,
                 "qkv3": rows_of(heads, 3 * hd)}
        # a residual writer's inputs carry their unit's mask, its outputs the layer and hidden masks
        in_scale = {"q": masks.head.cpu()[old][heads].float().repeat_interleave(hd),
                    "ffn": masks.intermediate.cpu()[old][ch].float()}
        out_scale = z_hid * z_layer
        for norm in adapter.all_norms:
            for t in norm_tensors:
                out[f"{dst}{norm}.{t}"] = get(f"{src}{norm}.{t}")[hid]
        for proj in adapter.projections:
            name = proj.path
            rows, offset = [], 0
            for unit in proj.segments:  # a fused projection: each segment cut by its unit
                rows.append(index[unit] + offset)
                offset += full[unit]
            rows = torch.cat(rows)
            w = get(f"{src}{name}.weight")[rows][:, index[proj.cols]]  # (rows_t, cols_t)
            b = get(f"{src}{name}.bias")[rows] if proj.bias(config) else None
            if proj.writes_residual:
                if proj.cols in in_scale:
                    w = w * in_scale[proj.cols][None, :]
                if proj.post_norm:  # the write's masks come after its norm
                    scaled_norm(f"{dst}{proj.post_norm}", out_scale)
                else:
                    w = w * out_scale[:, None]
                    b = None if b is None else b * out_scale
            out[f"{dst}{name}.weight"] = w
            if b is not None:
                out[f"{dst}{name}.bias"] = b
        for vec in adapter.vectors:
            v = get(f"{src}{vec.path}.weight")
            out[f"{dst}{vec.path}.weight"] = v if vec.unit is None else v[index[vec.unit]]
    return {k: v.contiguous() for k, v in out.items()}


def materialize(model: PreTrainedModel, masks: DeterministicMasks) -> PreTrainedModel:
    """The dense target-shape model equivalent to ``model`` under ``masks`` (source model untouched)."""
    config = pruned_config(model.config, masks)
    sd = model.state_dict()
    pruned = prune_state_dict(lambda k: sd[k].detach().cpu().float(), model.config, masks, tied=True)
    model_cls = adapter_for(model.config).model_cls
    with no_init_weights():
        small = model_cls(config)
    missing, unexpected = small.load_state_dict(pruned, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"materialisation produced a state dict that does not fit: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        small.tie_weights()
    return small.eval()
