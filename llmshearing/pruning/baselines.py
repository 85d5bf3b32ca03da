"""One-shot structure selection baselines for the learned masks: weight magnitude, activations and random.

Both return :class:`~llmshearing.pruning.masks.DeterministicMasks` of the source shape with value 1
on every kept unit, so :func:`~llmshearing.pruning.materialize.materialize` builds the same target
architecture as learned masks would, uniform in every layer (GQA: whole KV groups, then an equal
number of query heads in each kept group).

Magnitude importance is the squared L2 norm of every weight a unit owns:

| unit | weights |
| --- | --- |
| hidden dim j | column j of ``embed_tokens``, ``lm_head`` and every q/k/v/gate/up; row j of every o/down |
|  | (LLaMA names; other families through their adapter, fused projections split by segment) |
| layer | every weight of the layer |
| query head | its rows of ``q_proj`` and columns of ``o_proj`` |
| KV group | its rows of ``k_proj``/``v_proj`` plus its query heads |
| FFN channel | its rows of ``gate_proj``/``up_proj`` and column of ``down_proj`` |

Activation importance (``activation``) is Minitron's, from calibration sequences: see
:mod:`llmshearing.pruning.importance`.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import PreTrainedModel

from llmshearing.models.adapters import adapter_for
from llmshearing.models.families import head_dim
from llmshearing.pruning.importance import activation_scores
from llmshearing.pruning.masks import DeterministicMasks, descending_order

__all__ = ["select_masks"]


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask of the ``k`` largest entries along the last dim, ties in index order."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter(-1, descending_order(scores)[..., :k], True)


@torch.no_grad()
def _importance(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Magnitude importance of every unit, from the family's adapter (fused projections split by segment)."""
    cfg = model.config
    adapter = adapter_for(cfg)
    L, H, d, m = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size
    G = getattr(cfg, "num_key_value_heads", None) or H
    hd = head_dim(cfg)
    size = {"hidden": d, "q": H * hd, "kv": G * hd, "ffn": m, "qkv3": 3 * H * hd}
    sq = lambda w: w.detach().float() ** 2  # noqa: E731
    hidden = sq(model.get_input_embeddings().weight).sum(0)
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is not model.get_input_embeddings().weight:
        hidden += sq(out_emb.weight).sum(0)
    layer, heads, groups, channels = torch.zeros(L), torch.zeros(L, H), torch.zeros(L, G), torch.zeros(L, m)

    def credit(i: int, unit: str, v: torch.Tensor) -> None:  # per-row (or per-column) sums of a unit
        nonlocal hidden
        if unit == "hidden":
            hidden += v
        elif unit == "q":
            heads[i] += v.view(H, hd).sum(1)
        elif unit == "qkv3":
            heads[i] += v.view(H, 3 * hd).sum(1)
        elif unit == "kv":
            groups[i] += v.view(G, hd).sum(1)
        else:
            channels[i] += v

    for i, blk in adapter.decoder_layers(model):
        for proj in adapter.projections:
            w = sq(adapter.get(blk, proj.path).weight)
            rows = w.sum(1)
            for unit, seg in zip(proj.segments, rows.split([size[u] for u in proj.segments])):
                credit(i, unit, seg)
            credit(i, proj.cols, w.sum(0))
        layer[i] = sum(float(p.detach().float().pow(2).sum()) for p in blk.parameters())
        groups[i] += heads[i].view(G, H // G).sum(1)
    return {"hidden": hidden, "layer": layer, "head": heads, "kv_group": groups, "intermediate": channels}


METHODS = ("magnitude", "activation", "random")


def select_masks(model: PreTrainedModel, target: dict[str, int], method: str = "magnitude", seed: int = 0,
                 calibration: Optional[torch.Tensor] = None) -> DeterministicMasks:
    """Kept units of ``model`` for ``target`` (the ``TargetShape`` fields), chosen by ``method``.

    Args:
        model: the source transformers model.
        target: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``
            (optional, default: heads for MHA, the source's for GQA), ``intermediate_size``.
        method: ``magnitude``, ``activation`` or ``random``.
        seed: seed of ``random``.
        calibration: token ids (N, S) for ``activation`` (the training split's: see ``calibration_batch``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {list(METHODS)}")
    if method == "activation" and calibration is None:
        raise ValueError("method='activation' needs calibration token ids (llmshearing.data.calibration_batch)")
    cfg = model.config
    L, d, m, H = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    G = getattr(cfg, "num_key_value_heads", None) or H
    gqa = G != H
    L_t, d_t, m_t, H_t = (target[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"))
    G_t = target.get("num_key_value_heads") or (G if gqa else H_t)
    if gqa and H_t % G_t:
        raise ValueError(f"{H_t} query heads do not split evenly over {G_t} KV groups")
    if method == "magnitude":
        imp = _importance(model)
    elif method == "activation":
        imp = activation_scores(model, calibration)
    else:
        gen = torch.Generator().manual_seed(seed)
        shapes = {"hidden": (d,), "layer": (L,), "head": (L, H), "kv_group": (L, G), "intermediate": (L, m)}
        imp = {k: torch.rand(s, generator=gen) for k, s in shapes.items()}
    layer_keep = _top(imp["layer"], L_t)
    hidden_keep = _top(imp["hidden"], d_t)
    inter_keep = _top(imp["intermediate"], m_t)
    if gqa:
        kv_keep = _top(imp["kv_group"], G_t)  # (L, G)
        per_group = _top(imp["head"].view(L, G, H // G), H_t // G_t)  # (L, G, q)
        head_keep = (kv_keep[..., None] & per_group).reshape(L, H)
    else:
        head_keep = _top(imp["head"], H_t)
        kv_keep = head_keep
    ones = lambda keep: keep.float()  # noqa: E731  kept units keep their weights unscaled
    return DeterministicMasks(
        layer=ones(layer_keep), layer_keep=layer_keep, hidden=ones(hidden_keep), hidden_keep=hidden_keep,
        intermediate=ones(inter_keep), intermediate_keep=inter_keep, head=ones(head_keep), head_keep=head_keep,
        kv_keep=kv_keep,
    )
