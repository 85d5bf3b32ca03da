"""Per-domain reference losses for dynamic batch loading.

Two ways, as in the paper:

``fit``: fit ``L(N) = E + A / N**alpha`` per domain to the eval losses of several models of one family
and predict the loss at the target size. Input: a CSV with a header ``params,<domain>,<domain>,...``
and one row per model (at least 3 sizes)::

    python -m llmshearing.reference_losses fit --csv family_losses.csv --target-params 1.3e9

``measure``: use a model's own per-domain loss on the validation split (e.g. the source model's) as the
reference (validation, not test: dynamic loading tunes the data mixture with it)::

    python -m llmshearing.reference_losses measure --model source_hf --data prepared_data

Both print the ``dynamic_loading.reference_losses`` line to put in a YAML or pass as an override.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["ScalingLaw", "fit_scaling_law", "read_losses_csv"]


@dataclass(frozen=True)
class ScalingLaw:
    """``L(N) = E + A / N**alpha``."""

    E: float
    A: float
    alpha: float
    rmse: float

    def __call__(self, n_params: float) -> float:
        return self.E + self.A / n_params**self.alpha


def _solve(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """Least squares for (E, A) at a fixed alpha (the model is linear in them); returns (E, A, sse)."""
    design = np.stack([np.ones_like(x), x**-alpha], axis=1)
    (e, a), *_ = np.linalg.lstsq(design, y, rcond=None)
    if a < 0:  # loss must fall with size: the best non-negative A is 0 then
        e, a = float(y.mean()), 0.0
    sse = float(((e + a * x**-alpha - y) ** 2).sum())
    return float(e), float(a), sse


def fit_scaling_law(n_params: Sequence[float], losses: Sequence[float]) -> ScalingLaw:
    """Fit ``E + A / N**alpha`` to (size, loss) points.

    alpha is searched on a log grid over [1e-3, 3] and refined by golden-section search; E and A
    are solved exactly for each alpha (A >= 0). With three points the fit is exact for any
    consistent data.

    Raises:
        ValueError: fewer than 3 distinct sizes, non-positive sizes or non-finite losses.
    """
    x = np.asarray(n_params, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need one loss per model size, got {x.size} sizes and {y.size} losses")
    if len(np.unique(x)) < 3:
        raise ValueError(f"a 3-parameter scaling law needs at least 3 distinct model sizes, got {sorted(set(x.tolist()))}")
    if (x <= 0).any() or not np.isfinite(y).all():
        raise ValueError("model sizes must be > 0 and losses finite")
    scale = float(np.exp(np.log(x).mean()))  # fit in N / scale: keeps N**-alpha well conditioned
    xs = x / scale
    grid = np.exp(np.linspace(math.log(1e-3), math.log(3.0), 400))
    errs = [_solve(xs, y, a)[2] for a in grid]
    i = int(np.argmin(errs))
    lo, hi = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if _solve(xs, y, math.exp(m1))[2] < _solve(xs, y, math.exp(m2))[2]:
            hi = m2
        else:
            lo = m1
    alpha = math.exp((lo + hi) / 2)
    e, a, sse = _solve(xs, y, alpha)
    return ScalingLaw(E=e, A=a * scale**alpha, alpha=alpha, rmse=math.sqrt(sse / len(x)))


def read_losses_csv(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``params,<domain>,...`` rows -> (domains, sizes (M,), losses (M, K))."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    if not rows or rows[0][0].strip() != "params" or len(rows[0]) < 2:
        raise ValueError(f"{path}: the first row must be a header 'params,<domain>,<domain>,...'")
    domains = [d.strip() for d in rows[0][1:]]
    try:
        table = np.array([[float(v) for v in r] for r in rows[1:]], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: every value after the header must be a number ({e})") from None
    if table.ndim != 2 or table.shape[1] != len(domains) + 1:
        raise ValueError(f"{path}: every row needs params and {len(domains)} losses")
    return domains, table[:, 0], table[:, 1:]


def _print_reference(domains: Sequence[str], values: Sequence[float]) -> None:
    print(f"# domains: {', '.join(domains)}")
    print("dynamic_loading.reference_losses=[" + ",".join(f"{v:.4f}" for v in values) + "]")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from llmshearing.cli import run

    return run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from llmshearing.cli import HelpFormatter, parser

    p = parser(__doc__, prog="python -m llmshearing.reference_losses")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="scaling-law fit per domain, predicted at --target-params",
                       formatter_class=HelpFormatter)
    f.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    f.add_argument("--csv", required=True)
    f.add_argument("--target-params", type=float, required=True)
    f.add_argument("--json", help="also write fits and predictions here")
    m = sub.add_parser("measure", help="a model's per-domain eval loss", formatter_class=HelpFormatter)
    m.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    m.add_argument("--model", required=True, help="model folder, Hub id or .gguf")
    m.add_argument("--data", required=True, help="prepared dataset (data_prep/prepare_data.py --output)")
    m.add_argument("--domains", nargs="*")
    m.add_argument("--seq-len", type=int)
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--max-sequences-per-domain", type=int)
    m.add_argument("--json")
    args = p.parse_args(argv)

    if args.cmd == "fit":
        domains, sizes, losses = read_losses_csv(args.csv)
        fits = {d: fit_scaling_law(sizes, losses[:, k]) for k, d in enumerate(domains)}
        pred = [fits[d](args.target_params) for d in domains]
        print(f"| domain | E | A | alpha | rmse | L({args.target_params:.3g}) |\n|---|---|---|---|---|---|")
        for d, v in zip(domains, pred):
            s = fits[d]
            print(f"| {d} | {s.E:.4f} | {s.A:.4g} | {s.alpha:.4f} | {s.rmse:.2e} | {v:.4f} |")
        _print_reference(domains, pred)
        out = {"target_params": args.target_params, "fits": {d: asdict(s) for d, s in fits.items()},
               "reference_losses": dict(zip(domains, pred))}
    else:
        from llmshearing.evaluate import domain_losses, load_model

        res = domain_losses(load_model(args.model), args.data, args.domains, args.seq_len, args.batch_size,
                            args.max_sequences_per_domain, split="val")
        domains = [d for d in res if d != "all"]
        print("| domain | loss |\n|---|---|")
        for d in domains:
            print(f"| {d} | {res[d]:.4f} |")
        _print_reference(domains, [res[d] for d in domains])
        out = {"model": args.model, "reference_losses": {d: res[d] for d in domains}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
