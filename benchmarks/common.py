"""Shared bits of the benchmarks: JSON results written atomically, medians, machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REDPAJAMA = SHARED / "data" / "redpajama_sample"
LLAMA2_TOKENIZER = SHARED / "data" / "llama2_tokenizer" / "tokenizer.model"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


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
