"""Shared bits of the benchmarks: JSON results written atomically, medians, machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from composer.core import Callback

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REDPAJAMA = SHARED / "data" / "redpajama_sample"
LLAMA2_TOKENIZER = SHARED / "data" / "llama2_tokenizer" / "tokenizer.model"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def raise_open_file_limit(want: int = 65536) -> None:
    """Every StreamingDataset keeps shared-memory handles open for the process's life: a benchmark that builds
    dozens of trainers and evaluations in one process exceeds a 1024 soft limit. Raise it up to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, want)), hard))


raise_open_file_limit()


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


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
