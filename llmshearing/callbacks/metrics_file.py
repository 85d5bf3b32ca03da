"""A Composer logger destination that appends every logged metric to a JSON-lines file.

One line per ``log_metrics`` call: ``{"step": <batch>, "<metric>": value, ...}``. Rank 0 writes; the
file is appended to, so a resumed run continues it (readers keep the last value per step and key,
see :func:`read_metrics`). ``python -m llmshearing.plots`` turns it into figures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from composer.loggers import LoggerDestination
from composer.utils import dist

__all__ = ["MetricsFile", "read_metrics"]


def _plain(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class MetricsFile(LoggerDestination):
    """Appends metrics to ``path`` (JSON lines).

    Args:
        path: the file; its folder is created.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._fh = None

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if dist.get_global_rank() != 0:
            return
        row = {k: _plain(v) for k, v in metrics.items()}
        row = {k: v for k, v in row.items() if v is not None}
        if not row:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps({"step": step, **row}) + "\n")
        self._fh.flush()

    def close(self, state: Any = None, logger: Any = None) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: str | Path) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` from a metrics file (the last value wins, as after a resume)."""
    out: dict[str, dict[int, float]] = {}
    for row in _rows(Path(path)):
        step = row.pop("step", None)
        if step is None:
            continue
        for k, v in row.items():
            out.setdefault(k, {})[int(step)] = v
    return out


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash: skip it
                    continue
