"""CPU step-time overheads, measured side by side in one process (issues #3 and #7).

    python -m benchmarks.overhead --out runs/benchmarks/overhead.json

- pruning step / plain step: the real Composer Trainer on the same model, data and batch, with and
  without the L0Pruning algorithm (mask sampling, masked forward/backward, Lagrangian, mask and lambda
  optimizer groups); time from BATCH_START to BATCH_END.
- masked eval forward / plain forward: deterministic masks attached vs the bare model, ``torch.no_grad``.
- project step / bare PyTorch step: the Trainer's continued-pre-training step vs a hand-written loop over
  the same transformers model, batch, DecoupledAdamW and norm clipping.

Each variant runs ``--steps`` steps per repetition (the first ``--warmup`` discarded) and gives the median
of its steps. Within each of ``--reps`` repetitions the variants run in a random order (seeded), so drift of
the machine does not favour a variant that always runs first. A ratio is taken within each repetition (paired),
and reported as the geometric mean over repetitions with a 95% bootstrap confidence interval (and the median).
A goal counts as met only when the interval's upper end is below it.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import REPO, StepTimer, median, write_json  # noqa: E402
from benchmarks.small_scale import ensure_data  # noqa: E402

SHAPES = {
    # the benchmark source (yamls/pretrain/small_cpu.yaml) and a wider one where matmuls dominate more
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4),
    "medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
}
TARGETS = {
    "small": dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=3, intermediate_size=224),
    "medium": dict(num_hidden_layers=3, hidden_size=384, num_attention_heads=6, intermediate_size=1024),
}


def _overrides(data: Path, run_dir: Path, shape: str, steps: int, batch: int) -> list[str]:
    fields = SHAPES[shape]
    out = [f"variables.data={data}", f"variables.run_dir={run_dir}", "variables.vocab_size=2048",
           f"max_duration={steps}ba", f"global_train_batch_size={batch}", f"device_train_microbatch_size={batch}",
           "eval_interval=100000ba", "save_interval=100000ba", "save_folder=null", "autoresume=false",
           "console_log_interval=100000ba", "progress_bar=false", "seed=3"]
    out += [f"model.config.{k}={v}" for k, v in fields.items()]
    out.append(f"model.config.num_key_value_heads={fields['num_attention_heads']}")
    return out


def trainer_step(data: Path, work: Path, shape: str, steps: int, batch: int, prune: bool) -> float:
    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer

    yaml = REPO / ("yamls/prune/tiny_cpu.yaml" if prune else "yamls/pretrain/tiny_cpu.yaml")
    ov = _overrides(data, work, shape, steps, batch)
    if prune:
        ov += [f"pruning.target.{k}={v}" for k, v in TARGETS[shape].items()] + ["dynamic_loading=null"]
    else:
        ov += ["optimizer.lr=1.0e-4"]
    timer = StepTimer()
    trainer = build_trainer(load_config(yaml, ov), extra_callbacks=[timer])
    trainer.fit()
    trainer.close()
    return statistics.median(timer.times[WARMUP:])


def bare_step(data: Path, shape: str, steps: int, batch: int) -> float:
    """The same model, data, optimizer and clipping, in a plain PyTorch loop."""
    import torch
    from composer.optim import DecoupledAdamW
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmshearing.data import DomainTokenDataset, load_manifest

    torch.manual_seed(3)
    fields = dict(SHAPES[shape], num_key_value_heads=SHAPES[shape]["num_attention_heads"], vocab_size=2048,
                  max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).train()
    model.config.use_cache = False
    opt = DecoupledAdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    domains = list(load_manifest(str(data))["domains"])
    ds = DomainTokenDataset(str(data), "train", domains, 128)
    batches = [torch.stack([ds[(i * batch + j) % len(ds)]["input_ids"] for j in range(batch)]) for i in range(steps)]
    times = []
    for ids in batches:
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[WARMUP:])


def eval_forward(shape: str, batch: int, iters: int, masked_first: bool = False) -> tuple[float, float]:
    """(plain forward, forward with deterministic masks attached), seconds, medians over ``iters``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmshearing.config import TargetShape
    from llmshearing.models.families import describe_shape
    from llmshearing.pruning import ShearingMasks, attach_masks, resolve_target

    torch.manual_seed(3)
    fields = dict(SHAPES[shape], num_key_value_heads=SHAPES[shape]["num_attention_heads"], vocab_size=2048)
    plain = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    masked = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    masked.load_state_dict(plain.state_dict())
    prune = ["layer", "head", "intermediate", "hidden"]
    src = describe_shape(masked.config)
    masks = ShearingMasks(src, resolve_target(src, TargetShape(**TARGETS[shape]), prune), prune)
    attach_masks(masked, masks)
    masks.eval()
    ids = torch.randint(0, 2048, (batch, 128), generator=torch.Generator().manual_seed(0))
    out = {}
    for m in ((masked, plain) if masked_first else (plain, masked)):
        with torch.no_grad():
            for _ in range(WARMUP):
                m(input_ids=ids)
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                m(input_ids=ids)
                ts.append(time.perf_counter() - t0)
        out[m is masked] = statistics.median(ts)
    return out[False], out[True]


GOALS = {"ratio_prune_vs_plain_step": 1.15, "ratio_masked_eval_vs_plain_forward": 1.05,
         "ratio_project_vs_bare_step": 1.05}


def ratio_summary(num: list[float], den: list[float], goal: float, seed: int = 0) -> dict:
    """Paired per-repetition ratios: geometric mean, median, 95% bootstrap interval, and whether the goal holds."""
    logs = [math.log(a / b) for a, b in zip(num, den)]
    rng = random.Random(seed)
    boots = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(10000))
    lo, hi = math.exp(boots[249]), math.exp(boots[9749])
    return {"geomean": math.exp(statistics.fmean(logs)), "median": statistics.median(a / b for a, b in zip(num, den)),
            "ci95": [lo, hi], "per_rep": [a / b for a, b in zip(num, den)], "goal": goal,
            "verdict": "met" if hi <= goal else "not met" if lo > goal else "not resolved (interval contains the goal)"}


WARMUP = 3


def main(argv: list[str] | None = None) -> int:
    global WARMUP
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/overhead.json")
    p.add_argument("--cache", default="runs/benchmarks/cache_v5")
    p.add_argument("--shapes", nargs="*", default=["small", "medium"], choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="order of the variants, bootstrap")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    WARMUP = args.warmup
    import logging

    logging.basicConfig(level=logging.WARNING)
    data = ensure_data(Path(args.cache).resolve())
    result = {"steps": args.steps, "warmup": args.warmup, "reps": args.reps, "batch": args.batch, "seq_len": 128,
              "seed": args.seed,
              "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            raw: dict[str, list[float]] = {k: [] for k in ("plain_step", "prune_step", "bare_step", "eval_plain",
                                                           "eval_masked")}
            order_rng = random.Random(args.seed)
            variants = ["plain", "prune", "bare", "eval"]
            for _ in range(args.reps):
                order_rng.shuffle(variants)
                for v in variants:
                    if v == "plain":
                        raw["plain_step"].append(trainer_step(data, Path(tmp), shape, args.steps, args.batch, prune=False))
                    elif v == "prune":
                        raw["prune_step"].append(trainer_step(data, Path(tmp), shape, args.steps, args.batch, prune=True))
                    elif v == "bare":
                        raw["bare_step"].append(bare_step(data, shape, args.steps, args.batch))
                    else:
                        e_plain, e_masked = eval_forward(shape, args.batch, args.steps, order_rng.random() < 0.5)
                        raw["eval_plain"].append(e_plain)
                        raw["eval_masked"].append(e_masked)
            med = {k: median(v) for k, v in raw.items()}
            pairs = {"ratio_prune_vs_plain_step": ("prune_step", "plain_step"),
                     "ratio_masked_eval_vs_plain_forward": ("eval_masked", "eval_plain"),
                     "ratio_project_vs_bare_step": ("plain_step", "bare_step")}
            result["shapes"][shape] = {"model": SHAPES[shape], "target": TARGETS[shape], "seconds": med, "raw": raw}
            for name, (num, den) in pairs.items():
                result["shapes"][shape][name] = ratio_summary(raw[num], raw[den], GOALS[name], args.seed)
            write_json(args.out, result)  # after every shape: a later failure keeps what was measured
            for k, v in result["shapes"][shape].items():
                if k.startswith("ratio"):
                    print(f"{shape} {k}: {v['geomean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] "
                          f"(median {v['median']:.3f}; goal <= {v['goal']}: {v['verdict']})", flush=True)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
