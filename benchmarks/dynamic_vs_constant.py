"""Dynamic vs constant batch loading over several seeds: is the difference bigger than seed noise?

Continued pre-training of one pruned model (by default the one ``benchmarks/replication.py`` made) with
``doremi`` and with ``constant`` proportions, for each seed (the seed changes the data order and the
domain draws). Reports mean loss and the worst domain's excess over the reference (the source's losses).

    python -m benchmarks.dynamic_vs_constant --seeds 1 2 3 --out runs/benchmarks/dynamic_vs_constant.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.replication import _cpt
from benchmarks.small_scale import ensure_data, ensure_source, eval_losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/dynamic_vs_constant.json")
    p.add_argument("--cache", default="runs/benchmarks/cache")
    p.add_argument("--pruned", default="runs/benchmarks/replication/pruned_hf")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cache = Path(args.cache).resolve()
    data, source = ensure_data(cache), ensure_source(cache)
    pruned = Path(args.pruned).resolve()
    if not (pruned / "config.json").is_file():
        raise SystemExit(f"{pruned} is not a pruned model; run python -m benchmarks.replication first or pass --pruned")
    domains = list(json.loads((data / "manifest.json").read_text())["domains"])
    src = eval_losses(source, data)
    ref = "variables.reference_losses=[" + ",".join(f"{src[d]:.4f}" for d in domains) + "]"
    work = Path(args.out).resolve().with_suffix("")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    for seed in args.seeds:
        for mode in ("dynamic", "constant"):
            out = _cpt(cache, work, f"{mode}_s{seed}", pruned, args.steps, ref, mode == "dynamic", [f"seed={seed}"])
            losses = eval_losses(out, data)
            excess = {d: losses[d] - src[d] for d in domains}
            rows.append({"seed": seed, "mode": mode, "mean_loss": losses["all"], "worst_excess": max(excess.values()),
                         "worst_domain": max(excess, key=excess.get), "losses": losses})
            print(rows[-1], flush=True)
    summary = {}
    for mode in ("dynamic", "constant"):
        r = [x for x in rows if x["mode"] == mode]
        summary[mode] = {k: (statistics.mean(x[k] for x in r), statistics.stdev(x[k] for x in r) if len(r) > 1 else 0.0)
                         for k in ("mean_loss", "worst_excess")}
    diffs = [next(x for x in rows if x["seed"] == s and x["mode"] == "constant")["worst_excess"]
             - next(x for x in rows if x["seed"] == s and x["mode"] == "dynamic")["worst_excess"] for s in args.seeds]
    summary["worst_excess_reduction_per_seed"] = diffs
    write_json(args.out, {"rows": rows, "summary": summary, "args": vars(args)})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
