"""Physical pruning: (source weights, deterministic masks) -> a dense model of exactly the target shape.

A pure function of its inputs. Kept units are selected, and the surviving mask values are folded
into the adjacent weights, so the result computes what the masked model computes:

| mask | folded into |
| --- | --- |
| z_hidden (d) | columns of ``embed_tokens``; rows of every ``o_proj`` and ``down_proj`` |
| z_layer (L) | rows of the layer's ``o_proj`` and ``down_proj`` |
| z_head (L, H) | the head's input columns of ``o_proj`` |
| z_int (L, m) | input columns of ``down_proj`` |

With tied embeddings and hidden-mask values other than 1, the embedding and the LM head differ
after folding, so the result is untied (and says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import no_init_weights

from llmshearing.models.families import FAMILIES, head_dim
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
    if config.tie_word_embeddings and not torch.all(masks.hidden[masks.hidden_keep] == 1):
        log.warning("untying word embeddings: the hidden mask folded into embed_tokens must not scale lm_head")
        d["tie_word_embeddings"] = False
    for k in ("_name_or_path", "transformers_version", "architectures"):
        d.pop(k, None)
    config_cls, _ = FAMILIES[config.model_type]
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
    hd = head_dim(config)
    H, G = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hid = _idx(masks.hidden_keep)
    z_hid = masks.hidden.cpu()[hid].float()
    out: dict[str, torch.Tensor] = {}

    def rows_of(units: torch.Tensor, size: int) -> torch.Tensor:  # head/group indices -> weight rows
        return (units[:, None] * size + torch.arange(size)[None, :]).flatten()

    out["model.embed_tokens.weight"] = get("model.embed_tokens.weight")[:, hid] * z_hid  # (V, d_t)
    out["model.norm.weight"] = get("model.norm.weight")[hid]
    if not tied or not config.tie_word_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")[:, hid]
    elif not torch.all(z_hid == 1):
        out["lm_head.weight"] = get("model.embed_tokens.weight")[:, hid]

    for new, old in enumerate(_idx(masks.layer_keep).tolist()):
        src, dst = f"model.layers.{old}.", f"model.layers.{new}."
        z_layer = masks.layer.cpu()[old].float()
        heads = _idx(masks.head_keep[old])  # (H_t,) in group order
        groups = _idx(masks.kv_keep[old])  # (G_t,)
        z_head = masks.head.cpu()[old][heads].float()
        q_rows, kv_rows = rows_of(heads, hd), rows_of(groups, hd)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            out[dst + f"self_attn.{name}.weight"] = get(src + f"self_attn.{name}.weight")[rows][:, hid]
            if getattr(config, "attention_bias", False) or config.model_type == "qwen2":
                out[dst + f"self_attn.{name}.bias"] = get(src + f"self_attn.{name}.bias")[rows]
        o = get(src + "self_attn.o_proj.weight")[hid][:, q_rows]  # (d_t, H_t * hd)
        out[dst + "self_attn.o_proj.weight"] = o * z_head.repeat_interleave(hd)[None, :] * (z_hid * z_layer)[:, None]
        if getattr(config, "attention_bias", False):
            out[dst + "self_attn.o_proj.bias"] = get(src + "self_attn.o_proj.bias")[hid] * z_hid * z_layer
        ch = _idx(masks.intermediate_keep[old])
        z_ch = masks.intermediate.cpu()[old][ch].float()
        out[dst + "mlp.gate_proj.weight"] = get(src + "mlp.gate_proj.weight")[ch][:, hid]
        out[dst + "mlp.up_proj.weight"] = get(src + "mlp.up_proj.weight")[ch][:, hid]
        down = get(src + "mlp.down_proj.weight")[hid][:, ch]  # (d_t, m_t)
        out[dst + "mlp.down_proj.weight"] = down * z_ch[None, :] * (z_hid * z_layer)[:, None]
        out[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight")[hid]
        out[dst + "post_attention_layernorm.weight"] = get(src + "post_attention_layernorm.weight")[hid]
        if len(heads) != int(masks.head_keep[_idx(masks.layer_keep)[0]].sum()):
            raise ValueError("masks keep a different number of heads in different layers; the target must be uniform")
        if H != G and len(heads) % max(len(groups), 1):
            raise ValueError(f"layer {old}: {len(heads)} query heads do not split evenly over {len(groups)} KV groups")
    return {k: v.contiguous() for k, v in out.items()}


def materialize(model: PreTrainedModel, masks: DeterministicMasks) -> PreTrainedModel:
    """The dense target-shape model equivalent to ``model`` under ``masks`` (source model untouched)."""
    config = pruned_config(model.config, masks)
    sd = model.state_dict()
    pruned = prune_state_dict(lambda k: sd[k].detach().cpu().float(), model.config, masks, tied=True)
    _, model_cls = FAMILIES[model.config.model_type]
    with no_init_weights():
        small = model_cls(config)
    missing, unexpected = small.load_state_dict(pruned, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"materialisation produced a state dict that does not fit: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        small.tie_weights()
    return small.eval()
