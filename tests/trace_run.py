"""Runs a training YAML (``composer -n K tests/trace_run.py OUT.pt CONFIG.yaml key=value ...``) and writes a
trace of what it saw: the global sample indices of every batch (gathered over ranks, in rank order), the
global loss per batch, the global gradient norm before clipping per batch, the domain proportions per batch,
and at the end the model, mask and lambda tensors (gathered whole under FSDP); with ``TRACE_EVERY_STEP=1`` the
tensors after every batch too. Under FSDP it also records what the ``fsdp:`` block became and every warning the
trainer's construction raised. Tests compare traces of runs that must be identical (1 vs 2 processes, FSDP vs
none, killed vs uninterrupted).

Fault injection: ``KILL_AT=<where>:<batch>`` sends SIGKILL to the process at that point, where is
``mid`` (inside training batch <batch>: after its backward pass, before the optimizer step), ``step`` (after
batch <batch> finished, before its checkpoint), ``eval`` (in the middle of the evaluation
at batch <batch>) or ``save`` (half-way through writing the checkpoint of batch <batch>: a full checkpoint's file,
or a sharded checkpoint's shard of that rank). ``KILL_RANK=<r>`` kills only that rank (the launcher then stops
the others, as a node's would); by default every rank dies at the same point.
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
    kill_rank = os.environ.get("KILL_RANK")
    if kill_rank is not None and int(kill_rank) != dist.get_global_rank():
        return
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

    # a sharded checkpoint: each rank writes its own shard files through the DCP filesystem writer
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    original_write_data = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if f"ba{batch}" not in str(self.path):
            return original_write_data(self, plan, planner)
        kill_rank = os.environ.get("KILL_RANK")
        if kill_rank is None or int(kill_rank) == dist.get_global_rank():
            partial = Path(self.path) / f"__{dist.get_global_rank()}_0.distcp"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(b"\0" * 4096)  # what a crash mid-write leaves behind: part of a shard
        _die()
        return original_write_data(self, plan, planner)

    FileSystemWriter.write_data = write_data


def _full_state(state: State) -> dict[str, torch.Tensor]:
    """The model's tensors, whole, on the CPU (a collective under FSDP: every rank must call it)."""
    if state.fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(state.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        model = state.model.module if hasattr(state.model, "module") else state.model
        sd = model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


class Trace(Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.batches: list[list[int]] = []
        self.losses: list[dict[str, float]] = []
        self.proportions: list[list[float]] = []
        self.grad_norms: list[float] = []
        self.step_tensors: list[dict[str, torch.Tensor]] = []
        self.first_batch: int | None = None
        self.every_step = os.environ.get("TRACE_EVERY_STEP") == "1"
        self.extra: dict = {}

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
        self.losses.append({k: float(v) for k, v in state.total_loss_dict.items()})
        from llmshearing.algorithms import GlobalGradNorm

        norms = [a.last_norm for a in state.algorithms if isinstance(a, GlobalGradNorm)]
        self.grad_norms.append(norms[0] if norms else float("nan"))
        if self.every_step:
            tensors = _full_state(state)
            if dist.get_global_rank() == 0:
                self.step_tensors.append(tensors)
        if self.kill_where == "step" and int(state.timestamp.batch) == self.kill_at:
            _die()

    def fit_end(self, state: State, logger: Logger) -> None:
        tensors = _full_state(state)
        if dist.get_global_rank() != 0:
            return
        torch.save(
            {
                "first_batch": self.first_batch,
                "batches": self.batches,
                "losses": self.losses,
                "grad_norms": self.grad_norms,
                "proportions": self.proportions,
                "tensors": tensors,
                "step_tensors": self.step_tensors,
                **self.extra,
            },
            self.out,
        )


def _record_forward_dtypes(model: torch.nn.Module, extra: dict) -> None:
    """The dtypes the first training forward sees: a decoder layer's FFN weight as the layer uses it (under FSDP, the
    gathered parameter), that layer's input, and the masks' parameters."""
    up = next((m for n, m in model.named_modules() if ".layers.0." in n and n.endswith("mlp.up_proj")), None)
    if up is None:  # a family without an up_proj (GPT-NeoX, Phi-3): not recorded
        return

    def hook(module, args):
        if "forward_dtypes" not in extra and module.training:
            extra["forward_dtypes"] = {
                "ffn_weight": str(module.weight.dtype), "ffn_input": str(args[0].dtype),
                "masks": sorted({str(p.dtype) for n, p in model.named_parameters() if n.startswith("masks.")})}

    up.register_forward_pre_hook(hook)


def main() -> None:
    import warnings

    out, yaml, *overrides = sys.argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    trace = Trace(out)
    cfg = load_config(yaml, overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(cfg, extra_callbacks=[trace])
    trace.extra["build_warnings"] = [str(w.message) for w in caught]
    plan = trainer.fsdp_plan
    if plan is not None:
        from composer.utils.parallelism import FSDP2Config

        fc = trainer.state.fsdp_config
        trace.extra["fsdp"] = {
            "block": dict(cfg.fsdp),
            "translation": plan.translation,
            "mesh_shape": tuple(fc.device_mesh.shape),
            "config": {k: getattr(fc, k) for k in FSDP2Config.settable_attrs() if k != "device_mesh"},
            "rank0_loads": plan.rank0_loads,
            "dtensor_params": sorted(n for n, p in trainer.state.model.named_parameters()
                                     if type(p.data).__name__ == "DTensor"),
            "plain_params": sorted(n for n, p in trainer.state.model.named_parameters()
                                   if type(p.data).__name__ != "DTensor"),
        }
    _record_forward_dtypes(trainer.state.model, trace.extra)
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main()
