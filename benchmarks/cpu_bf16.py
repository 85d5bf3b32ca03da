"""bf16 autocast on the CPU (``device=cpu precision=amp_bf16``) against fp32, side by side in one process, on the
real-model benchmark's stages: SmolLM2-135M pruning (``yamls/prune/smollm2_cpu.yaml``) and recovery of the 78.8M
target (``yamls/continue_pretrain/smollm2_cpu.yaml``), 4 x 256 tokens a step.

Each repetition runs both precisions in a seeded random order, ``--steps`` steps each (the first ``--warmup``
dropped); a step's time is BATCH_START to BATCH_END. The ratio fp32 / bf16 is taken within a repetition (paired) and
reported as the median over repetitions, with every repetition's. Both precisions read the same batches, so the
training losses are compared step by step too (bf16's error, not a different run). The recovery stage trains a random
selection of the target shape (its cost is any selection's; its loss, ~11-12, is a broken model's).

    python -m benchmarks.cpu_bf16 --out runs/benchmarks/cpu_bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import REDPAJAMA, StepTimer, machine, train_counted, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/cpu_bf16.json")
    p.add_argument("--work", default="runs/benchmarks/real_model",
                   help="where its prepared copy of the sample is (or goes; the prep's default splits: timing only)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stages", nargs="*", default=["pruning", "recovery"], choices=["pruning", "recovery"])
    p.add_argument("--prune-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more overrides of the pruning stage (--improved: benchmarks/real_model.py's IMPROVED)")
    p.add_argument("--improved", action="store_true", help="the pruning stage with real_model's improved levers")
    args = p.parse_args(argv)

    import torch
    from composer.core import Callback

    from llmshearing.data.prepare import MANIFEST, prepare_dataset
    from llmshearing.models.gguf import resolve_pretrained
    from llmshearing.pruning import materialize
    from llmshearing.pruning.baselines import select_masks
    from llmshearing.quickstart import KNOWN_TARGETS

    if args.threads:
        torch.set_num_threads(args.threads)
    source = Path(resolve_pretrained("smollm2"))
    data = Path(args.work).resolve() / "data"
    if not (data / MANIFEST).is_file():
        prepare_dataset(str(REDPAJAMA), data, str(source), 256, workers=2, overwrite=True, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="cpu_bf16_"))
    from transformers import AutoModelForCausalLM

    target = KNOWN_TARGETS["smollm2"]
    small = tmp / "target"  # any selection has the target's shape and cost: a random one is enough for timing
    src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    materialize(src, select_masks(src, target, "random", seed=0)).save_pretrained(small)
    del src
    common = [f"variables.data={data}", f"tokenizer={source}", "global_train_batch_size=4",
              "device_train_microbatch_size=4", "data.max_seq_len=256", "autoresume=false", "device=cpu",
              "progress_bar=false", "console_log_interval=1000ba", "eval_first=false", "metrics_file=null",
              "variables.reference_losses=[3,3,3,3,3,3,3]", "dynamic_loading.reference_losses=[3,3,3,3,3,3,3]",
              "eval_subset_num_batches=1"]  # Composer still evaluates at the end of fit: one batch, outside the steps
    more = list(args.prune_overrides)
    if args.improved:
        from benchmarks.real_model import IMPROVED

        more += [o for ov in IMPROVED.values() for o in ov]
    stages = {
        "pruning (SmolLM2-135M, masked)": ("yamls/prune/smollm2_cpu.yaml", [f"variables.source={source}", *(
            f"pruning.target.{k}={v}" for k, v in target.items()), *more]),
        "recovery (78.8M target)": ("yamls/continue_pretrain/smollm2_cpu.yaml", [f"variables.source={small}"]),
    }

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def batch_end(self, state, logger) -> None:
            loss = state.loss["total"] if isinstance(state.loss, dict) else state.loss
            self.values.append(float(loss))

    rng = random.Random(0)
    results: dict[str, dict] = {}
    n = args.steps + args.warmup
    for stage, (yaml, ov) in stages.items():
        if stage.split()[0] not in args.stages:
            continue
        reps = []
        for r in range(args.reps):
            order = ["fp32", "amp_bf16"]
            rng.shuffle(order)
            rep = {}
            for precision in order:
                timer, losses = StepTimer(), Losses()
                train_counted(yaml, common + ov + [f"precision={precision}", f"max_duration={n}ba",
                                                   f"eval_interval={10 * n}ba", f"save_interval={10 * n}ba",
                                                   f"variables.run_dir={tmp / f'{r}_{precision}'}",
                                                   "save_folder=null"], callbacks=[timer, losses])
                rep[precision] = {"step_s": statistics.median(timer.times[args.warmup:]), "losses": losses.values}
            rep["ratio"] = rep["fp32"]["step_s"] / rep["amp_bf16"]["step_s"]
            reps.append(rep)
            print(f"{stage} rep {r}: fp32 {rep['fp32']['step_s']:.2f} s, bf16 {rep['amp_bf16']['step_s']:.2f} s, "
                  f"x{rep['ratio']:.2f}", flush=True)
        gaps = [abs(a - b) for rep in reps for a, b in zip(rep["fp32"]["losses"], rep["amp_bf16"]["losses"])]
        results[stage] = {"median_ratio": statistics.median(x["ratio"] for x in reps),
                          "ratios": [x["ratio"] for x in reps],
                          "fp32_step_s": statistics.median(x["fp32"]["step_s"] for x in reps),
                          "bf16_step_s": statistics.median(x["amp_bf16"]["step_s"] for x in reps),
                          "max_loss_gap": max(gaps), "reps": reps}
        print(json.dumps({k: v for k, v in results[stage].items() if k != "reps"}), flush=True)
    write_json(args.out, {"machine": machine(), "args": vars(args), "prune_overrides": more, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
