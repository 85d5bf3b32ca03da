"""Activation importance (Minitron, Muralidharan et al. 2024): which units a source model uses on real text.

From ``N`` calibration sequences, one forward pass of the unmodified source model (hooks read activations; the
weights are not touched):

| structure | activation | score |
| --- | --- | --- |
| query head ``h`` of layer ``i`` | its attention output, the input of the layer's ``q``-column residual writer (``o_proj``) | ``||a_h||_2`` per token |
| FFN channel ``c`` of layer ``i`` | the input of the ``ffn``-column residual writer (``down_proj``) | ``|a_c|`` per token |
| hidden channel ``j`` | the output of every norm of the hidden size (each layer's and the final one), summed | ``|a_j|`` per token |
| layer ``i`` | its input ``x`` and output ``y`` (the residual stream) | ``1 - cos(x, y)`` per token |
| KV group | the sum of its query heads' scores | |

Width scores aggregate as Minitron's best variant: the mean over a sequence's tokens, then the L2 norm over
sequences. A layer's score is the mean over all tokens: a layer that barely turns its input is the one to drop.
Higher is more important everywhere. Where things are comes from the family's adapter, so every supported
family is scored the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmshearing.models.adapters import adapter_for
from llmshearing.models.families import head_dim

__all__ = ["activation_scores", "gate_scores", "scores_in_bf16", "scoring_autocast"]


def scores_in_bf16(model: nn.Module, device: torch.device) -> bool:
    """Whether scoring autocasts to bf16: for flash-attn on a GPU only (flash-attn takes fp16 / bf16, and the source
    is scored in its fp32 weights outside the trainer's precision context); SDPA and eager attention score in the
    weights' own precision."""
    flash = str(getattr(model.config, "_attn_implementation", "")).startswith("flash_attention")
    return flash and device.type == "cuda"


def scoring_autocast(model: nn.Module, device: torch.device) -> torch.autocast:
    """The autocast context of a scoring forward (:func:`scores_in_bf16`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=scores_in_bf16(model, device))


@torch.no_grad()
def activation_scores(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Importance of every unit of ``model`` from the calibration sequences ``input_ids`` (N, S).

    Returns:
        ``hidden`` (d,), ``layer`` (L,), ``head`` (L, H), ``kv_group`` (L, G), ``intermediate`` (L, m), float32 on
        the CPU.
    """
    cfg = model.config
    adapter = adapter_for(cfg)
    L, d, m, H = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    G = getattr(cfg, "num_key_value_heads", None) or H
    hd = head_dim(cfg)
    dev = next(model.parameters()).device
    sq = {"hidden": torch.zeros(d, device=dev), "head": torch.zeros(L, H, device=dev),
          "intermediate": torch.zeros(L, m, device=dev)}
    turn = torch.zeros(L, device=dev, dtype=torch.float64)
    tokens = 0
    handles = []

    def width(key: str, i: int, per_token):  # mean over tokens of a sequence, squared, summed over sequences
        def hook(module: nn.Module, args: tuple) -> None:
            a = per_token(args[0].float())  # (B, S, units)
            sq[key][i] += a.mean(1).pow(2).sum(0)

        return hook

    def norm_out(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        sq["hidden"] += output.float().abs().mean(1).pow(2).sum(0)

    def layer_turn(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            turn[i] += (1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum()

        return hook

    per_head = lambda a: a.view(*a.shape[:-1], H, hd).norm(dim=-1)  # noqa: E731
    for i, layer in adapter.decoder_layers(model):
        for proj in adapter.projections:
            if proj.writes_residual and proj.cols == "q":
                handles.append(adapter.get(layer, proj.path).register_forward_pre_hook(width("head", i, per_head)))
            elif proj.writes_residual and proj.cols == "ffn":
                handles.append(adapter.get(layer, proj.path).register_forward_pre_hook(width("intermediate", i, torch.abs)))
        for n in adapter.all_norms:
            handles.append(adapter.get(layer, n).register_forward_hook(norm_out))
        handles.append(layer.register_forward_hook(layer_turn(i), with_kwargs=True))
    handles.append(adapter.get(model, adapter.final_norm).register_forward_hook(norm_out))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(input_ids), batch_size):
            ids = input_ids[start : start + batch_size].to(dev)
            with scoring_autocast(model, dev):
                try:  # no logits over the sequence: only the activations inside are needed
                    model(input_ids=ids, logits_to_keep=1, use_cache=False)
                except TypeError:  # a family whose forward has no logits_to_keep
                    model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    head = sq["head"].sqrt().cpu()
    return {
        "hidden": sq["hidden"].sqrt().cpu(),
        "layer": (turn / max(tokens, 1)).float().cpu(),
        "head": head,
        "kv_group": head.view(L, G, H // G).sum(-1),
        "intermediate": sq["intermediate"].sqrt().cpu(),
    }


def gate_scores(scores: dict[str, torch.Tensor], gate_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """``scores`` of :func:`activation_scores` in the shapes of a :class:`ShearingMasks`' gates (a GQA ``head``
    gate is (L, G, q): heads within their group)."""
    out = {}
    for name, shape in gate_shapes.items():
        out[name] = scores[name].reshape(shape)
    return out
