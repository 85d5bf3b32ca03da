"""Learned L0 masks against one-shot structure selection (weight magnitude, random) at the same target
shape, from the same trained source, before any continued pre-training (issue #3).

    python -m benchmarks.prune_selection --out runs/benchmarks/prune_selection.json

The learned masks come from a real pruning run (``yamls/prune/small_cpu.yaml``: 400 steps of 32 x 128
tokens, which also update the weights at lr 1e-4). The one-shot baselines spend no tokens, so the
benchmark also fine-tunes each baseline for the same 400 steps at the same lr ("equal tokens") to
separate what the masks chose from what the pruning run's weight updates bought.
Writes JSON and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import REPO, write_json  # noqa: E402
from benchmarks.small_scale import common_overrides, ensure_data, ensure_source, eval_losses  # noqa: E402

TARGET = dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=3, intermediate_size=224)


def _finetune(cache: Path, model_dir: Path, work: Path, steps: int) -> Path:
    """``steps`` batches of plain training (lr 1e-4, constant proportions) from ``model_dir``."""
    from llmshearing.export import export_checkpoint
    from llmshearing.trainer import train_from_yaml

    run = work / f"{model_dir.name}_ft"
    trainer = train_from_yaml(str(REPO / "yamls/continue_pretrain/tiny_cpu.yaml"), common_overrides(cache) + [
        f"variables.run_dir={run}", f"variables.source={model_dir}", "variables.reference_losses=null",
        "dynamic_loading=null", "global_train_batch_size=32", "device_train_microbatch_size=32",
        f"max_duration={steps}ba", f"eval_interval={steps}ba", f"save_interval={steps}ba", "autoresume=false",
        "optimizer.lr=1.0e-4", "scheduler.t_warmup=0ba"])
    trainer.close()
    out = work / f"{model_dir.name}_ft_hf"
    export_checkpoint(run / "checkpoints" / "latest-rank0.pt", out, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/prune_selection.json")
    p.add_argument("--cache", default="runs/benchmarks/cache")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--random-seeds", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.export import export_checkpoint
    from llmshearing.pruning import materialize
    from llmshearing.pruning.baselines import select_masks
    from llmshearing.trainer import train_from_yaml

    cache = Path(args.cache).resolve()
    data = ensure_data(cache)
    source = ensure_source(cache)
    work = Path(args.out).resolve().with_suffix("")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rows: dict[str, dict] = {}
    src_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    rows["source"] = {"params": src_model.num_parameters(), "losses": eval_losses(source, data), "tokens": 0}

    # learned masks: a real pruning run
    run = work / "learned_run"
    trainer = train_from_yaml(str(REPO / "yamls/prune/small_cpu.yaml"), common_overrides(cache) + [
        f"variables.run_dir={run}", f"variables.source={source}", f"max_duration={args.steps}ba",
        f"eval_interval={args.steps // 4}ba", f"save_interval={args.steps}ba", "autoresume=false"])
    algo = next(a for a in trainer.state.algorithms if type(a).__name__ == "L0Pruning")
    expected = {k: round(float(v), 3) for k, v in algo.masks.expected_shape().items()}
    trainer.close()
    learned = export_checkpoint(run / "checkpoints" / "latest-rank0.pt", work / "learned_hf", overwrite=True)
    tokens = args.steps * 32 * 128
    rows["learned masks (pruning run)"] = {"params": AutoModelForCausalLM.from_pretrained(learned).num_parameters(),
                                           "losses": eval_losses(learned, data), "tokens": tokens,
                                           "expected_shape_at_end": expected}

    # one-shot baselines, then the same tokens of plain training
    baselines = {"magnitude": [0]} | {"random": list(range(args.random_seeds))}
    for method, seeds in baselines.items():
        for seed in seeds:
            small = materialize(src_model, select_masks(src_model, TARGET, method, seed=seed))
            name = f"{method}_s{seed}" if method == "random" else method
            small.save_pretrained(work / name)
            shutil.copytree(source, work / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json"))
            rows[f"{name} one-shot"] = {"params": small.num_parameters(), "losses": eval_losses(work / name, data), "tokens": 0}
            if seed == 0:
                ft = _finetune(cache, work / name, work, args.steps)
                rows[f"{name} + {args.steps} steps"] = {"params": small.num_parameters(), "losses": eval_losses(ft, data),
                                                        "tokens": tokens}
    domains = [d for d in rows["source"]["losses"] if d != "all"]
    lines = [f"| model | params | tokens after selection | eval loss | {' | '.join(domains)} |",
             "|---|---|---|---|" + "---|" * len(domains)]
    for name, r in rows.items():
        l = r["losses"]
        lines.append(f"| {name} | {r['params'] / 1e6:.3f}M | {r['tokens'] / 1e6:.2f}M | {l['all']:.3f} | "
                     + " | ".join(f"{l[d]:.3f}" for d in domains) + " |")
    table = "\n".join(lines)
    write_json(args.out, {"target": TARGET, "steps": args.steps, "rows": rows, "table": table})
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    print(json.dumps({"expected_shape_at_end": expected, "target": TARGET}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
