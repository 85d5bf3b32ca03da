"""Dynamic batch loading (Sheared-LLaMA Algorithm 1): re-weight domains from eval loss after every evaluation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from composer.core import Callback, State
from composer.loggers import Logger

from llmshearing.data.sampler import DomainBatchSampler

__all__ = ["DynamicLoading", "doremi_update"]

log = logging.getLogger(__name__)


def doremi_update(
    weights: Sequence[float], eval_losses: Sequence[float], reference_losses: Sequence[float], smoothing: float = 1e-4
) -> np.ndarray:
    """One update of the domain weights.

    ``delta = max(l_eval - l_ref, 0)``, ``w = softmax(log w_prev + delta)``, then
    ``(1 - c) * w + c / k``: domains whose loss is furthest above their reference get more weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    delta = np.maximum(np.asarray(eval_losses, dtype=np.float64) - np.asarray(reference_losses, dtype=np.float64), 0.0)
    logits = np.log(np.maximum(w, 1e-300)) + delta
    new = np.exp(logits - logits.max())
    new /= new.sum()
    new = (1.0 - smoothing) * new + smoothing / len(new)
    return new / new.sum()


class DynamicLoading(Callback):
    """Updates the training batch sampler's domain proportions after each evaluation.

    Args:
        sampler: the training :class:`~llmshearing.data.sampler.DomainBatchSampler`.
        domains: domain names, in sampler order.
        update: ``doremi`` or ``constant`` (log only).
        reference_losses: per-domain reference losses (required for ``doremi``).
        smoothing: uniform smoothing constant c.
        eval_label: the evaluator whose ``LanguageCrossEntropy_<domain>`` metrics are read.

    | Key | Logged |
    | --- | --- |
    | ``dynamic_loading/weight_<domain>`` | proportion in force from the next batches on |
    | ``dynamic_loading/excess_loss_<domain>`` | eval loss minus reference (when references are given) |
    | ``dynamic_loading/effective_batch`` | first batch drawn with the new proportions |
    """

    def __init__(
        self,
        sampler: DomainBatchSampler,
        domains: Sequence[str],
        update: str = "doremi",
        reference_losses: Optional[Sequence[float]] = None,
        smoothing: float = 1e-4,
        eval_label: str = "eval",
    ) -> None:
        if update not in ("doremi", "constant"):
            raise ValueError(f"update={update!r}: use 'doremi' or 'constant'")
        if reference_losses is not None and len(reference_losses) != len(domains):
            raise ValueError(
                f"{len(reference_losses)} reference losses for {len(domains)} domains {list(domains)}; "
                "give one per domain, in the same order"
            )
        if update == "doremi" and reference_losses is None:
            raise ValueError("update='doremi' needs reference_losses")
        self.sampler = sampler
        self.domains = list(domains)
        self.update = update
        self.reference_losses = None if reference_losses is None else np.asarray(reference_losses, dtype=np.float64)
        self.smoothing = smoothing
        self.eval_label = eval_label
        self.history: list[dict[str, Any]] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        logger.log_metrics({f"dynamic_loading/weight_{d}": float(w) for d, w in zip(self.domains, self.sampler.proportions)})

    def eval_end(self, state: State, logger: Logger) -> None:
        if state.dataloader_label != self.eval_label:  # another evaluator (e.g. pruning's eval_target) just ran
            return
        losses = np.array([float(state.eval_metric_values[f"LanguageCrossEntropy_{d}"]) for d in self.domains])
        if not np.isfinite(losses).all():
            bad = [d for d, l in zip(self.domains, losses) if not np.isfinite(l)]
            log.warning("no finite eval loss for domains %s; proportions unchanged", bad)
            return
        batch = int(state.timestamp.batch)
        if batch == 0:  # the evaluation before training (eval_first): the starting point, nothing to re-weight
            if self.reference_losses is not None:
                logger.log_metrics({f"dynamic_loading/excess_loss_{d}": float(l - r)
                                    for d, l, r in zip(self.domains, losses, self.reference_losses)})
            return
        new = self.sampler.proportions
        if self.update == "doremi":
            new = doremi_update(self.sampler.proportions, losses, self.reference_losses, self.smoothing)
        effective = self.sampler.set_proportions(new, consumed_batches=batch)
        record: dict[str, Any] = {"batch": batch, "effective_batch": effective}
        out = {"dynamic_loading/effective_batch": effective}
        for i, d in enumerate(self.domains):
            out[f"dynamic_loading/weight_{d}"] = float(new[i])
            record[f"weight_{d}"] = float(new[i])
            record[f"loss_{d}"] = float(losses[i])
            if self.reference_losses is not None:
                out[f"dynamic_loading/excess_loss_{d}"] = float(losses[i] - self.reference_losses[i])
        self.history.append(record)
        logger.log_metrics(out)
