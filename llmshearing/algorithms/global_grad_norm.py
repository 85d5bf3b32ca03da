"""One gradient norm for the whole model, however it is sharded, and clipping by it.

Composer's ``GradientClipping`` calls ``torch.nn.utils.clip_grad_norm_`` over the model's parameters; under FSDP2
those are a mix of DTensors (the sharded weights) and plain tensors (the replicated masks and multipliers), which it
cannot combine, and the replicated gradients are not yet averaged over the ranks at that point. This algorithm
replaces it for every run (with or without FSDP), at ``Event.AFTER_TRAIN_BATCH`` (after the last micro-batch's
backward, before the optimizer step):

1. under FSDP, average the gradients of the parameters FSDP left whole over all ranks
   (:func:`~llmshearing.parallel.sync_replicated_grads`; DDP and a single process need nothing);
2. take the global L2 norm over weights and masks together (:func:`~llmshearing.parallel.grad_norm`), equal to the
   single-process norm of the same batch up to float rounding;
3. scale every gradient by ``min(1, max_norm / (norm + 1e-6))`` (none with ``max_norm`` None or 0).

| Key | Logged (every batch) |
| --- | --- |
| ``grad_norm/total`` | the global gradient norm before clipping |
| ``grad_norm/clipped`` | 1 when the gradients were scaled down, else 0 |
"""

from __future__ import annotations

from typing import Optional

from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from llmshearing.parallel import clip_grad_norm_, replicated_params, sync_replicated_grads

__all__ = ["GlobalGradNorm"]


class GlobalGradNorm(Algorithm):
    """Averages replicated gradients under FSDP, then clips all gradients by one global norm.

    Args:
        max_norm: the largest gradient norm allowed (``grad_clip_norm``); None or 0 measures without clipping.
    """

    def __init__(self, max_norm: Optional[float] = None) -> None:
        self.max_norm = max_norm if max_norm and max_norm > 0 else None
        self.last_norm = float("nan")  # of the latest batch (tests and callbacks read it)

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_TRAIN_BATCH

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = state.model
        if state.fsdp_enabled:
            sync_replicated_grads(replicated_params(model))
        norm = clip_grad_norm_(model.parameters(), self.max_norm)
        self.last_norm = float(norm)
        clipped = self.max_norm is not None and float(norm) > self.max_norm
        logger.log_metrics({"grad_norm/total": float(norm), "grad_norm/clipped": int(clipped)})
