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


def _masked_linear(module: nn.Linear, masks: ShearingMasks, layer: int, in_key: str, repeat: int):
    """``forward`` of ``o_proj`` / ``down_proj``: the input units scaled by ``z[in_key][layer]`` (each repeated
    ``repeat`` times: a head's ``head_dim`` inputs) and the output by ``z_layer[layer] * z_hidden``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = masks.z
        weight, bias = module.weight, module.bias
        if in_key in z:
            s_in = z[in_key][layer]
            s_in = s_in.repeat_interleave(repeat) if repeat > 1 else s_in
            weight = weight * s_in.to(weight.dtype)[None, :]
        s_out = None
        if "layer" in z:
            s_out = z["layer"][layer]
        if "hidden" in z:
            s_out = z["hidden"] if s_out is None else s_out * z["hidden"]
        if s_out is not None:
            s_out = s_out.to(weight.dtype)
            weight = weight * (s_out[:, None] if s_out.dim() else s_out)
            bias = None if bias is None else bias * s_out
        return F.linear(x, weight, bias)

    return forward


def _masked_rmsnorm(module: nn.Module, masks: ShearingMasks, eps_attr: str):
    original = module.forward
    eps = getattr(module, eps_attr)

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = masks.z
        if "hidden_count" not in z:
            return original(x)
        xf = x.to(torch.float32)
        var = xf.pow(2).sum(-1, keepdim=True) / z["hidden_count"]  # mean over kept dims (pruned ones are 0)
        return module.weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)

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
    repeat = {"q": head_dim(model.config), "ffn": 1}
    for i, layer in adapter.decoder_layers(model):
        for proj in adapter.projections:
            if proj.writes_residual:
                module = adapter.get(layer, proj.path)
                forward = _masked_linear(module, masks, i, _INPUT_MASK[proj.cols], repeat[proj.cols])
                _replace_forward(hooks, f"{proj.path}[{i}]", module, forward)
        for norm_name in adapter.norms:
            norm = adapter.get(layer, norm_name)
            _replace_forward(hooks, f"{norm_name}[{i}]", norm, _masked_rmsnorm(norm, masks, adapter.norm_eps))
    final = adapter.get(model, adapter.final_norm)
    _replace_forward(hooks, "final_norm", final, _masked_rmsnorm(final, masks, adapter.norm_eps))
    return hooks
