"""Shared bits of the benchmarks: JSON results written atomically, medians, machine facts."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from composer.core import Callback

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REDPAJAMA = SHARED / "data" / "redpajama_sample"
LLAMA2_TOKENIZER = SHARED / "data" / "llama2_tokenizer" / "tokenizer.model"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# CPU features that select different bf16 / fp32 kernels (oneDNN, MKL): two machines that differ in these can train
# the same run to different numbers
NUMERIC_ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_identity() -> tuple[str | None, tuple[str, ...] | None]:
    """(model, ISA features): fixed for the process, read once (a report names the machine of every record)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None, None
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name"), tuple(f for f in NUMERIC_ISA if f in flags)


def cpu_identity() -> dict[str, Any]:
    """The CPU's model name and which of :data:`NUMERIC_ISA` it has (Linux's /proc/cpuinfo; ``None`` elsewhere)."""
    model, isa = _cpu_identity()
    return {"model": model, "isa": None if isa is None else list(isa)}


@functools.lru_cache(maxsize=None)
def _package_versions() -> tuple[tuple[str, str | None], ...]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return tuple((p, ver(p)) for p in ("transformers", "mosaicml", "mosaicml-streaming", "numpy"))


def machine() -> dict[str, Any]:
    """What a benchmark ran on: versions of the stack and the CPU (its numerics-relevant features)."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "packages": dict(_package_versions()),
        "cpu": cpu_identity(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def record_machine() -> dict[str, Any]:
    """:func:`machine` as a record keeps it: the stack and the CPU of the process writing the record (normally the
    one that ran its stages; a later ``--report-only --record`` names its own), without the thread count, which is
    the writer's and not the training's."""
    return {k: v for k, v in machine().items() if k != "torch_threads"}


def numerics_of(m: dict[str, Any] | None) -> tuple | None:
    """What of a :func:`machine` entry can change a CPU run's numbers: torch, the other packages' versions and the
    CPU's :data:`NUMERIC_ISA` features. ``None`` when the entry does not say (made before machines were recorded)."""
    if not isinstance(m, dict) or not isinstance(m.get("cpu"), dict):
        return None
    return m.get("torch"), tuple(sorted((m.get("packages") or {}).items())), tuple(m["cpu"].get("isa") or ())


def same_numerics(a: dict[str, Any] | None, b: dict[str, Any]) -> bool | None:
    """Whether two :func:`machine` entries would compute a CPU run to the same numbers as far as is known
    (:func:`numerics_of` equal); ``None`` when either is unknown."""
    na, nb = numerics_of(a), numerics_of(b)
    return None if na is None or nb is None else na == nb


class StepTimer(Callback):
    """Wall time of every training step, BATCH_START to BATCH_END, in ``times`` (seconds).

    Args:
        cuda_sync: synchronise the GPU at both ends so queued kernels count in their own step.
    """

    def __init__(self, cuda_sync: bool = False) -> None:
        self.cuda_sync = cuda_sync
        self.times: list[float] = []
        self._t = 0.0

    def _now(self) -> float:
        if self.cuda_sync:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def batch_start(self, state, logger) -> None:
        self._t = self._now()

    def batch_end(self, state, logger) -> None:
        self.times.append(self._now() - self._t)


class RunSeconds(Callback):
    """Wall seconds of a run (the trainer's build and ``fit``) over every attempt: a resumed run (``autoresume``)
    gets the seconds its earlier attempts had spent up to their last checkpoint from that checkpoint (Composer saves
    a callback's state); the work an attempt did after its last checkpoint, lost and redone, is not counted."""

    def __init__(self) -> None:
        self.earlier = 0.0
        self._start = time.time()  # made just before the trainer: its build and first evaluation count

    def total(self) -> float:
        return self.earlier + time.time() - self._start

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.total()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.earlier = float(state.get("seconds", 0.0))


def train_counted(yaml: str, overrides: list[str], callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train ``yaml`` (relative to the repository) with ``overrides``; return what the trainer counted: batches,
    samples, tokens, samples drawn per domain and each domain's training sequences, and the run's wall time
    (``seconds``, earlier attempts included when the run resumed; ``earlier_seconds`` of them)."""
    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer, finished

    clock = RunSeconds()
    trainer = build_trainer(load_config(str(REPO / yaml), overrides), extra_callbacks=[*callbacks, clock])
    if not finished(trainer):  # an attempt that was stopped after its final checkpoint has nothing left to train
        trainer.fit()
    seconds = clock.total()
    ts = trainer.state.timestamp
    sampler = trainer.state.train_dataloader.dataset.batch_sampler
    st = sampler.state_dict(int(ts.sample))
    per_domain = {d: int(e * n + p) for d, e, n, p in zip(sampler.domains, st["epochs"], st["sizes"], st["positions"])}
    out = {"batches": int(ts.batch), "samples": int(ts.sample), "tokens": int(ts.token), "seconds": seconds,
           "earlier_seconds": clock.earlier,
           "samples_per_domain": per_domain, "train_sequences_per_domain": dict(zip(sampler.domains, st["sizes"]))}
    trainer.close()
    return out


def matmul_params_of(path: str | Path) -> tuple[int, Any]:
    """(weights a token multiplies, config) of a model folder, counted as training's FLOPs count them
    (``ComposerCausalLM.flops_per_batch``: every weight but the embedding lookup, a tied LM head once more)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmshearing.models.composer_causal_lm import _matmul_params

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return _matmul_params(model), model.config


def step_flops(n_params: int, config, tokens: int, seq: int, weight_grads: bool = True, teacher: int = 0,
               teacher_config=None) -> float:
    """FLOPs of one training step over ``tokens``: 6 N per token (4 N without weight gradients) plus attention, and
    with a teacher its forward, 2 N_teacher plus its attention."""
    from llmshearing.models.composer_causal_lm import _attention_flops

    per_token = (6 if weight_grads else 4) * n_params + 3 * _attention_flops(config, seq)
    flops = float(per_token * tokens)
    return flops + forward_flops(teacher, teacher_config, tokens, seq) if teacher else flops


def forward_flops(n_params: int, config, tokens: int, seq: int) -> float:
    """FLOPs of a forward pass over ``tokens`` (a calibration, a teacher): 2 N per token plus attention."""
    from llmshearing.models.composer_causal_lm import _attention_flops

    return float((2 * n_params + _attention_flops(config, seq)) * tokens)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` (plus machine facts) to ``path`` via a temporary file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), **result}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


# -- records: finished benchmark stages kept in the repository (their models are not) ------------------------------


def dir_identity(path: Path, skip: tuple[str, ...] = ()) -> str:
    """What identifies a model or data folder on any machine: its files' contents by relative path (not where it
    lies, when it was written or what its provenance notes say), so records made on one machine match on another."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name not in skip:
            h.update(str(p.relative_to(path)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def data_identity(data: Path, omit: tuple[str, ...] = ()) -> str:
    """A prepared dataset's identity: its shards' contents and its manifest's settings and counts, less what names
    this machine (input and tokenizer paths, the inputs' time stamps) and the manifest's top-level fields ``omit``
    (notes on how the tokens were made, which the shards' contents already pin down: a benchmark whose records
    predate such a note omits it, so the same tokens keep their identity)."""
    from llmshearing.data.prepare import MANIFEST

    m = json.loads((data / MANIFEST).read_text())
    for k in omit:
        m.pop(k, None)
    m["tokenizer"].pop("path", None)
    m["inputs"] = {k: v for k, v in m["inputs"].items() if k not in ("path", "files_sha256")}
    blob = json.dumps({"manifest": m, "shards": dir_identity(data, skip=(MANIFEST,))}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def git_commit() -> str | None:
    """The checkout's commit (short; ``-dirty`` when tracked files have uncommitted changes), or None outside a git
    checkout."""
    out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO, capture_output=True,
                         text=True)
    return out.stdout.strip() or None


def record_provenance(record: dict, code: list[str]) -> str:
    """When and at which commit a record was made, and whether the code that computes it (``code``: paths in the
    repository) changed since: a change that alters results must bump the benchmark's stage version; this lets a
    reader check."""
    commit = str(record.get("commit"))
    out = f"recorded {record.get('recorded')} at {commit}"
    if commit.endswith("-dirty"):
        commit = commit[: -len("-dirty")]
        out += " (with uncommitted changes: the stage code it ran may differ from the commit's)"
    diff = subprocess.run(["git", "diff", "--name-only", commit, "HEAD", "--", *code],
                          cwd=REPO, capture_output=True, text=True)
    if diff.returncode != 0:
        out += "; its commit is not in this checkout"
    else:
        changed = diff.stdout.split()
        out += f"; {len(changed)} file(s) of the stage code changed since" if changed else "; same stage code"
    same = same_numerics(record.get("machine"), machine())
    if same is None:
        return out + "; machine not recorded"
    cpu = record["machine"]["cpu"]
    return out + f"; on {cpu.get('model')} ({'/'.join(cpu.get('isa') or []) or 'no listed ISA'})" + (
        "" if same else ", which differs from this machine in its packages or CPU features: its figures may not "
        "reproduce here bit for bit")
