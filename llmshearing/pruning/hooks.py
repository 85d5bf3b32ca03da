"""Apply :class:`~llmshearing.pruning.masks.ShearingMasks` to an unmodified transformers model.

The model's code is untouched; where things are comes from the family's
:class:`~llmshearing.models.adapters.FamilyAdapter`. A pre-forward hook on the ``*ForCausalLM`` computes this
forward's masks once; then, for each layer ``i`` (LLaMA names):

| where | how | effect |
| --- | --- | --- |
| output of the embedding | forward hook | ``* z_hidden`` |
| each residual writer (``self_attn.o_proj``, input unit ``q``) | forward replaced: ``x @ (W * z_head[i] * (z_layer[i] * z_hidden))^T`` | each head's output ``* z_head[i]``, the write into the residual ``* z_layer[i] * z_hidden`` |
| each residual writer (``mlp.down_proj``, input unit ``ffn``) | forward replaced: ``x @ (W * z_int[i] * (z_layer[i] * z_hidden))^T`` | each channel ``* z_int[i]``, the residual write likewise |
| every RMSNorm of the layer and the final norm | forward replaced | RMS over the kept hidden dims only |

The masks scale the *weights* of ``o_proj`` and ``down_proj`` (d x k elements per matrix) rather than
their activations (tokens x d): the same function and gradients, with far less elementwise work for
any batch of more than k tokens. The scaled weight lives only for the forward and backward of its layer
(activation checkpointing recomputes it).

Pruned hidden dims of the residual stream are exactly zero (every write into it is scaled by
``z_hidden``), so the RMS over kept dims is ``sqrt(sum(x^2) / n_kept)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from llmshearing.models.adapters import adapter_for
from llmshearing.models.families import head_dim
from llmshearing.pruning.masks import ShearingMasks

__all__ = ["MaskHooks", "attach_masks"]


@dataclass
class MaskHooks:
    """Hooks and replaced forwards of :func:`attach_masks` (``remove()`` restores the model)."""

    handles: dict[str, RemovableHandle] = field(default_factory=dict)
    patched: dict[str, nn.Module] = field(default_factory=dict)

    def remove(self) -> None:
        for h in self.handles.values():
            h.remove()
        self.handles.clear()
        for module in self.patched.values():
            del module.forward  # back to the class's forward
        self.patched.clear()


def _scale_output(masks: ShearingMasks):
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        z = masks.z
        return output * z["hidden"].to(output.dtype) if "hidden" in z else output

    return hook


def _out_scale(z: dict[str, torch.Tensor], layer: int) -> torch.Tensor | None:
    """The mask of a layer's write into the residual stream: ``z_layer[layer] * z_hidden`` (None: no mask)."""
    s_out = z["layer"][layer] if "layer" in z else None
    if "hidden" in z:
        s_out = z["hidden"] if s_out is None else s_out * z["hidden"]
    return s_out


def _masked_linear(module: nn.Linear, masks: ShearingMasks, layer: int, in_key: str, repeat: int, scale_out: bool):
    """``forward`` of ``o_proj`` / ``down_proj``: the input units scaled by ``z[in_key][layer]`` (each repeated
    ``repeat`` times: a head's ``head_dim`` inputs) and, unless a post-norm carries it (``scale_out`` False), the
    output by ``z_layer[layer] * z_hidden``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = masks.z
        weight, bias = module.weight, module.bias
        if in_key in z:
            s_in = z[in_key][layer]
            s_in = s_in.repeat_interleave(repeat) if repeat > 1 else s_in
            weight = weight * s_in.to(weight.dtype)[None, :]
        s_out = _out_scale(z, layer) if scale_out else None
        if s_out is not None:
            s_out = s_out.to(weight.dtype)
            weight = weight * (s_out[:, None] if s_out.dim() else s_out)
            bias = None if bias is None else bias * s_out
        return F.linear(x, weight, bias)

    return forward


def _masked_norm(module: nn.Module, masks: ShearingMasks, kind: str, eps_attr: str, offset: float,
                 layer: int | None = None):
    """``forward`` of a norm of the hidden size with statistics over the kept hidden dims only.

    A pre-norm (``layer`` None) reads the residual stream, where pruned dims are exactly zero; a post-norm reads a
    writer's output, where they are not, so they are zeroed first, and its output carries the write's masks
    (``z_layer[layer] * z_hidden``). LayerNorm's mean is over the kept dims too, and its bias is masked.
    """
    original = module.forward
    eps = getattr(module, eps_attr)
    post = layer is not None

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = masks.z
        s_out = _out_scale(z, layer) if post else None
        if "hidden_count" not in z and s_out is None:
            return original(x)
        xf = x.to(torch.float32)
        keep = None
        if "hidden_count" in z:
            n = z["hidden_count"]
            keep = (z["hidden"] != 0).to(torch.float32)
            if post or kind == "layer":
                xf = xf * keep
            if kind == "layer":
                xf = (xf - xf.sum(-1, keepdim=True) / n) * keep
            y = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / n + eps)
        elif kind == "layer":
            y = F.layer_norm(xf, xf.shape[-1:], eps=eps)
        else:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if kind == "rms" and offset == 0.0:
            y = module.weight * y.to(x.dtype)  # LLaMA: normalise in fp32, scale in the input dtype
        else:
            y = y * (offset + module.weight.float())
            if kind == "layer":
                y = (y + module.bias.float()) * (keep if keep is not None else 1.0)
            y = y.to(x.dtype)
        if s_out is not None:
            y = y * s_out.to(y.dtype)
        return y

    return forward


def _masked_head_norm(module: nn.Module, masks: ShearingMasks, eps_attr: str, layer: int, unit: str, hd: int, q: int):
    """``forward`` of a q/k RMSNorm over all heads together (OLMo 2): statistics over the kept heads only (the
    materialised model has only those); ``q`` query heads per KV group."""
    original = module.forward
    eps = getattr(module, eps_attr)

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = masks.z
        if "head" not in z:
            return original(x)
        alive = z["head"][layer] != 0  # (H,)
        if unit == "kv":
            alive = alive.view(-1, q).any(-1)  # a KV group is used while any of its heads is
        keep = alive.to(torch.float32).repeat_interleave(hd)
        xf = x.to(torch.float32) * keep
        y = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / keep.sum().clamp(min=1) + eps)
        return module.weight * y.to(x.dtype)

    return forward


def _replace_forward(hooks: MaskHooks, name: str, module: nn.Module, forward: Any) -> None:
    module.forward = forward  # an instance attribute: nn.Module.__call__ uses it, state_dict is unchanged
    hooks.patched[name] = module


# the mask that scales each input unit of a residual writer
_INPUT_MASK = {"q": "head", "ffn": "intermediate"}


def attach_masks(model: nn.Module, masks: ShearingMasks) -> MaskHooks:
    """Hook the masks into a supported ``*ForCausalLM`` (see the module docstring).

    Raises:
        UnsupportedModel: the family or one of its features cannot be pruned (names what is supported).
    """
    adapter = adapter_for(model.config)
    hooks = MaskHooks()
    h = hooks.handles

    def refresh(module: nn.Module, args: Any) -> None:
        masks.refresh(training=module.training)  # sampled when the model trains, top-k when it evaluates

    h["refresh"] = model.register_forward_pre_hook(refresh)
    h["embed"] = adapter.get(model, adapter.embed).register_forward_hook(_scale_output(masks))
    hd = head_dim(model.config)
    H = model.config.num_attention_heads
    q_per_group = H // (getattr(model.config, "num_key_value_heads", None) or H)
    repeat = {"q": hd, "ffn": 1}
    kind, eps, offset = adapter.norm_kind, adapter.norm_eps, adapter.norm_weight_offset
    for i, layer in adapter.decoder_layers(model):
        for proj in adapter.projections:
            if proj.writes_residual:
                module = adapter.get(layer, proj.path)
                forward = _masked_linear(module, masks, i, _INPUT_MASK[proj.cols], repeat[proj.cols],
                                         scale_out=proj.post_norm is None)
                _replace_forward(hooks, f"{proj.path}[{i}]", module, forward)
                if proj.post_norm:
                    norm = adapter.get(layer, proj.post_norm)
                    _replace_forward(hooks, f"{proj.post_norm}[{i}]", norm,
                                     _masked_norm(norm, masks, kind, eps, offset, layer=i))
        for norm_name in adapter.norms:
            norm = adapter.get(layer, norm_name)
            _replace_forward(hooks, f"{norm_name}[{i}]", norm, _masked_norm(norm, masks, kind, eps, offset))
        for vec in adapter.vectors:
            if vec.unit is not None:  # a norm over all heads: only the kept heads count
                norm = adapter.get(layer, vec.path)
                _replace_forward(hooks, f"{vec.path}[{i}]", norm,
                                 _masked_head_norm(norm, masks, eps, i, vec.unit, hd, q_per_group))
    final = adapter.get(model, adapter.final_norm)
    _replace_forward(hooks, "final_norm", final, _masked_norm(final, masks, kind, eps, offset))
    return hooks
