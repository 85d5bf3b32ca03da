"""Logs the training loss of every data domain, once per batch."""

from __future__ import annotations

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

__all__ = ["DomainLossMonitor"]


class DomainLossMonitor(Callback):
    """Reduces the per-domain loss sums that :class:`~llmshearing.models.ComposerCausalLM` accumulates.

    The sums come from the training forward itself (no extra pass) and cover every microbatch of
    the batch on every rank. A domain absent from a batch is not logged for that batch.

    | Key | Logged |
    | --- | --- |
    | ``metrics/train/LanguageCrossEntropy_<domain>`` | token-averaged training loss of the domain this batch |
    | ``metrics/train/tokens_<domain>`` | tokens of the domain in this global batch |
    | ``metrics/train/KD_<domain>`` | token-averaged KL(teacher || student) of the domain (distillation runs) |
    """

    @staticmethod
    def _model(state: State):
        """The model that accumulates the sums (inside a DDP wrapper when there is one)."""
        model = state.model
        return model.module if not hasattr(model, "pop_train_domain_sums") and hasattr(model, "module") else model

    def before_train_batch(self, state: State, logger: Logger) -> None:
        # a batch Composer retries after a CUDA out-of-memory error (device_train_microbatch_size: auto) starts
        # again from here: the failed attempt's partial sums are dropped, not counted twice
        self._model(state).pop_train_domain_sums()

    def batch_end(self, state: State, logger: Logger) -> None:
        model = self._model(state)
        parts = model.pop_train_domain_sums()
        if parts[0].numel() == 0:
            return
        both = torch.stack(parts)  # on the model's device, as all_reduce needs
        dist.all_reduce(both)
        sums, counts, *kd = both.cpu()
        metrics = {}
        for i, name in enumerate(model.domains):
            if counts[i] > 0:
                metrics[f"metrics/train/LanguageCrossEntropy_{name}"] = float(sums[i] / counts[i])
                metrics[f"metrics/train/tokens_{name}"] = int(counts[i])
                if kd:
                    metrics[f"metrics/train/KD_{name}"] = float(kd[0][i] / counts[i])
        logger.log_metrics(metrics)
