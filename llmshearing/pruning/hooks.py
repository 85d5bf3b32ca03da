"""Apply :class:`~llmshearing.pruning.masks.ShearingMasks` to an unmodified transformers model with hooks.

The model's ``forward`` is untouched; named hooks scale, for each layer ``i``:

| hook | where | effect |
| --- | --- | --- |
| ``refresh`` | pre-forward of the ``*ForCausalLM`` | computes this forward's masks once |
| ``embed`` | output of ``embed_tokens`` | ``* z_hidden`` |
| ``heads[i]`` | input of ``self_attn.o_proj`` | each head's output ``* z_head[i]`` |
| ``attn_out[i]`` | output of ``self_attn.o_proj`` | ``* z_layer[i] * z_hidden`` |
| ``channels[i]`` | input of ``mlp.down_proj`` | ``* z_int[i]`` |
| ``mlp_out[i]`` | output of ``mlp.down_proj`` | ``* z_layer[i] * z_hidden`` |
| ``norm`` | output of every RMSNorm | RMS over the kept hidden dims only |

Pruned hidden dims of the residual stream are exactly zero (every write into it is scaled by
``z_hidden``), so the RMS over kept dims is ``sqrt(sum(x^2) / n_kept)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from llmshearing.pruning.masks import ShearingMasks

__all__ = ["MaskHooks", "attach_masks"]


@dataclass
class MaskHooks:
    """Handles of the hooks :func:`attach_masks` registered (``remove()`` detaches them all)."""

    handles: dict[str, RemovableHandle] = field(default_factory=dict)

    def remove(self) -> None:
        for h in self.handles.values():
            h.remove()
        self.handles.clear()


def _scale_output(masks: ShearingMasks, layer: int | None):
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        z = masks.z
        scale = None
        if layer is not None and "layer" in z:
            scale = z["layer"][layer]
        if "hidden" in z:
            scale = z["hidden"] if scale is None else scale * z["hidden"]
        return output if scale is None else output * scale.to(output.dtype)

    return hook


def _scale_heads(masks: ShearingMasks, layer: int, num_heads: int):
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        z = masks.z
        if "head" not in z:
            return None
        x = args[0]  # (B, T, H * hd)
        shape = x.shape
        x = x.view(*shape[:-1], num_heads, -1) * z["head"][layer].to(x.dtype)[:, None]  # (B, T, H, hd)
        return (x.reshape(shape), *args[1:])

    return hook


def _scale_channels(masks: ShearingMasks, layer: int):
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        z = masks.z
        if "intermediate" not in z:
            return None
        return (args[0] * z["intermediate"][layer].to(args[0].dtype), *args[1:])  # (B, T, m)

    return hook


def _masked_rmsnorm(masks: ShearingMasks):
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        z = masks.z
        if "hidden_count" not in z:
            return output
        x = args[0]
        xf = x.to(torch.float32)
        var = xf.pow(2).sum(-1, keepdim=True) / z["hidden_count"]  # mean over kept dims (pruned ones are 0)
        return module.weight * (xf * torch.rsqrt(var + module.variance_epsilon)).to(x.dtype)

    return hook


def attach_masks(model: nn.Module, masks: ShearingMasks) -> MaskHooks:
    """Register the masking hooks on a LLaMA-family ``*ForCausalLM`` (see the module docstring)."""
    hooks = MaskHooks()
    h = hooks.handles
    def refresh(module: nn.Module, args: Any) -> None:
        masks.refresh(training=module.training)  # sampled when the model trains, top-k when it evaluates

    h["refresh"] = model.register_forward_pre_hook(refresh)
    base = model.model
    h["embed"] = base.embed_tokens.register_forward_hook(_scale_output(masks, None))
    num_heads = model.config.num_attention_heads
    for i, layer in enumerate(base.layers):
        h[f"heads[{i}]"] = layer.self_attn.o_proj.register_forward_pre_hook(_scale_heads(masks, i, num_heads))
        h[f"attn_out[{i}]"] = layer.self_attn.o_proj.register_forward_hook(_scale_output(masks, i))
        h[f"channels[{i}]"] = layer.mlp.down_proj.register_forward_pre_hook(_scale_channels(masks, i))
        h[f"mlp_out[{i}]"] = layer.mlp.down_proj.register_forward_hook(_scale_output(masks, i))
        h[f"input_norm[{i}]"] = layer.input_layernorm.register_forward_hook(_masked_rmsnorm(masks))
        h[f"post_attn_norm[{i}]"] = layer.post_attention_layernorm.register_forward_hook(_masked_rmsnorm(masks))
    h["final_norm"] = base.norm.register_forward_hook(_masked_rmsnorm(masks))
    return hooks
