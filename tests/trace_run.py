"""Runs a training YAML (``composer -n K tests/trace_run.py OUT.pt CONFIG.yaml key=value ...``) and writes a
trace of what it saw: the global sample indices of every batch (gathered over ranks, in rank order), the
global loss per batch, the domain proportions per batch, and at the end the model, mask and lambda
tensors. Tests compare traces of runs that must be identical (1 vs 2 processes, killed vs uninterrupted).

Fault injection: ``KILL_AT=<where>:<batch>`` sends SIGKILL to the process at that point, where is
``mid`` (inside training batch <batch>: after its backward pass, before the optimizer step), ``step`` (after
batch <batch> finished, before its checkpoint), ``eval`` (in the middle of the evaluation
at batch <batch>) or ``save`` (half-way through writing the checkpoint of batch <batch>).
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmshearing.config import load_config  # noqa: E402
from llmshearing.trainer import build_trainer  # noqa: E402


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_during_save(batch: int) -> None:
    from composer.utils import checkpoint

    original = checkpoint._write_checkpoint_file

    def write(state_dict, filename):
        if f"ba{batch}" not in os.path.basename(filename):
            return original(state_dict, filename)
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        with open(filename, "wb") as fh:  # what a crash mid-write leaves behind: half a file
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        _die()

    checkpoint._write_checkpoint_file = write


class Trace(Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.batches: list[list[int]] = []
        self.losses: list[dict[str, float]] = []
        self.proportions: list[list[float]] = []
        self.first_batch: int | None = None

        where, _, at = os.environ.get("KILL_AT", "").partition(":")
        self.kill_where, self.kill_at = where, int(at or -1)
        if where == "save":
            _kill_during_save(self.kill_at)

    def fit_start(self, state: State, logger: Logger) -> None:
        self.first_batch = int(state.timestamp.batch)

    def after_backward(self, state: State, logger: Logger) -> None:
        if self.kill_where == "mid" and int(state.timestamp.batch) + 1 == self.kill_at:
            _die()

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        if self.kill_where == "eval" and int(state.timestamp.batch) == self.kill_at:
            _die()

    def after_dataloader(self, state: State, logger: Logger) -> None:
        ids = state.batch["sample_index"].tolist()
        self.batches.append([i for part in dist.all_gather_object(ids) for i in part])
        sampler = state.train_dataloader.batch_sampler
        self.proportions.append([float(p) for p in sampler.proportions])

    def batch_end(self, state: State, logger: Logger) -> None:
        # Composer's mean over ranks of the loss terms (loss/train/total, lm_loss, lagrangian).
        self.losses.append(dict(state.total_loss_dict))
        if self.kill_where == "step" and int(state.timestamp.batch) == self.kill_at:
            _die()

    def fit_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        model = state.model.module if hasattr(state.model, "module") else state.model
        tensors = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(
            {
                "first_batch": self.first_batch,
                "batches": self.batches,
                "losses": self.losses,
                "proportions": self.proportions,
                "tensors": tensors,
            },
            self.out,
        )


def main() -> None:
    out, yaml, *overrides = sys.argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    trainer = build_trainer(load_config(yaml, overrides), extra_callbacks=[Trace(out)])
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main()
