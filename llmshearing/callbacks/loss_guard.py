"""Stop a run at the first non-finite training loss, naming the step and the last good checkpoint.

Composer all-reduces the batch's loss terms before ``BATCH_END`` (``state.total_loss_dict``), so every
rank sees the same values and stops together; the check happens before ``BATCH_CHECKPOINT``, so the
bad step is never saved and the last checkpoint is still good to resume from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger

__all__ = ["LossGuard", "NonFiniteLoss"]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class LossGuard(Callback):
    """Raises :class:`NonFiniteLoss` at the first batch whose loss (any term) is NaN or infinite.

    Args:
        save_folder: the run's checkpoint folder, to name the last good checkpoint.
    """

    def __init__(self, save_folder: Optional[str] = None) -> None:
        self.save_folder = save_folder

    def _last_checkpoint(self, state: State) -> str:
        for cb in state.callbacks:
            saved = getattr(cb, "saved_checkpoints", None)
            if saved:
                return str(saved[-1])
        if self.save_folder:
            latest = Path(self.save_folder) / "latest-rank0.pt"
            if latest.exists():
                return str(latest.resolve())
        return "none (no checkpoint was saved in this run)"

    def batch_end(self, state: State, logger: Logger) -> None:
        losses = dict(getattr(state, "total_loss_dict", None) or {})
        bad = {k: v for k, v in losses.items() if not math.isfinite(float(v))}
        if not bad:
            return
        step = int(state.timestamp.batch)
        raise NonFiniteLoss(
            f"non-finite training loss at batch {step}: {bad}. The run stopped before saving this step; the last "
            f"good checkpoint is {self._last_checkpoint(state)}. Restart from it (autoresume=true, or load_path) with "
            "a lower learning rate or tighter grad_clip_norm, and check the data of this batch"
        )
