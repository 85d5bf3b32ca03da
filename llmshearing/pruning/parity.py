"""Check that pruning preserves the function: the masked model vs its materialisation vs the export reloaded by
plain transformers, on random, partly fractional masks (what the parity tests and benchmarks run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from llmshearing.config import TargetShape
from llmshearing.models.adapters import adapter_for
from llmshearing.models.families import describe_shape

__all__ = ["masked_export_parity"]


def masked_export_parity(model: PreTrainedModel, target: TargetShape, structures: list[str], out_dir: str | Path,
                         seed: int = 0, loc: float = 3.0, scale: float = 1.5, seq_len: int = 24
                         ) -> tuple[dict[str, Any], PreTrainedModel]:
    """Attach masks with ``log_alpha ~ N(loc, scale)`` (seeded) to ``model``, compare its logits on random tokens
    with the materialised model's and with the export saved to ``out_dir`` and reloaded by
    ``AutoModelForCausalLM``; the hooks are removed afterwards.

    Returns:
        (``materialised`` and ``exported``: max abs logit differences; ``logit_scale``; ``exact_shape``; ``tied``;
        ``parameters``; ``source_parameters``; ``expected_parameters`` (of the masks' expected sizes); ``family``;
        ``fractional``: kept units with a mask value strictly between 0 and 0.99, per structure), and the
        materialised model.

    Raises:
        UnsupportedModel / ConfigError: the family refuses the target (its check runs first).
    """
    from llmshearing.pruning import ShearingMasks, attach_masks, materialize, resolve_target

    model.eval()
    src = describe_shape(model.config)
    full = resolve_target(src, target, structures)
    adapter_for(model.config).check_target(model.config, src, full, structures)
    masks = ShearingMasks(src, full, structures, config=model.config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in masks.gates.values():
            g.log_alpha.copy_(torch.randn(g.shape, generator=gen) * scale + loc)
    det = masks.deterministic()
    hooks = attach_masks(model, masks)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=gen)
    try:
        with torch.no_grad():
            masked = model(input_ids=ids).logits
            small = materialize(model, det)
            dense = small(input_ids=ids).logits
    finally:
        hooks.remove()
    small.save_pretrained(out_dir)
    plain = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        exported = plain(input_ids=ids).logits
    shape = describe_shape(plain.config)
    return {"family": model.config.model_type, "materialised": float((masked - dense).abs().max()),
            "exported": float((masked - exported).abs().max()), "logit_scale": float(masked.abs().max()),
            "exact_shape": {k: shape[k] for k in full} == full, "tied": bool(plain.config.tie_word_embeddings),
            "parameters": plain.num_parameters(), "source_parameters": model.num_parameters(),
            "expected_parameters": masks.expected_params(),
            "fractional": {k: int(((v > 0) & (v < 0.99)).sum()) for k, v in
                           (("hidden", det.hidden), ("intermediate", det.intermediate), ("head", det.head))}}, small
