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
        num_key_value_heads=n_kv,
        head_dim=head_dim(config),
    )
    if d.get("layer_types") is not None:
        d["layer_types"] = [d["layer_types"][i] for i in layers]
    if d.get("max_window_layers") is not None and d.get("max_window_layers", 0) > len(layers):
        d["max_window_layers"] = len(layers)
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
            "kept units whose mask value is below 0.1 (nearly dead capacity in the pruned model): %s; the masks had "
            "not converged to the target -- prune longer or with a larger lambda_lr", weak,
        )
    hd = head_dim(config)
    H, G = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hid = _idx(masks.hidden_keep)
    z_hid = masks.hidden.cpu()[hid].float()
    out: dict[str, torch.Tensor] = {}

    def rows_of(units: torch.Tensor, size: int) -> torch.Tensor:  # head/group indices -> weight rows
        return (units[:, None] * size + torch.arange(size)[None, :]).flatten()

    embed, lm_head, final = f"{adapter.embed}.weight", f"{adapter.lm_head}.weight", f"{adapter.final_norm}.weight"
    out[embed] = get(embed)[:, hid] * z_hid  # (V, d_t)
    out[final] = get(final)[hid]
    if tied and config.tie_word_embeddings:  # the head is E * z too: undo z in the final norm (module docstring)
        o = adapter.norm_weight_offset
        alive = z_hid > 0
        out[final] = torch.where(alive, (o + out[final]) / torch.where(alive, z_hid, 1.0) - o, -o * torch.ones_like(z_hid))
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
        index = {"hidden": hid, "q": rows_of(heads, hd), "kv": rows_of(groups, hd), "ffn": ch}
        # a residual writer's inputs carry their unit's mask, its outputs the layer and hidden masks
        in_scale = {"q": masks.head.cpu()[old][heads].float().repeat_interleave(hd),
                    "ffn": masks.intermediate.cpu()[old][ch].float()}
        out_scale = z_hid * z_layer
        for proj in adapter.projections:
            name = proj.path
            w = get(f"{src}{name}.weight")[index[proj.rows]][:, index[proj.cols]]  # (rows_t, cols_t)
            if proj.writes_residual:
                if proj.cols in in_scale:
                    w = w * in_scale[proj.cols][None, :]
                w = w * out_scale[:, None]
            out[f"{dst}{name}.weight"] = w
            if proj.bias(config):
                b = get(f"{src}{name}.bias")[index[proj.rows]]
                out[f"{dst}{name}.bias"] = b * out_scale if proj.writes_residual else b
        for norm in adapter.norms:
            out[f"{dst}{norm}.weight"] = get(f"{src}{norm}.weight")[hid]
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
