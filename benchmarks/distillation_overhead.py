"""Step time of distillation: a KD step (KL to a frozen teacher) vs a CE step of the same student, side by side
in one process, next to its floor ``1 + teacher forward FLOPs / student training-step FLOPs`` (issue #14).

    python -m benchmarks.distillation_overhead --out runs/benchmarks/distillation_overhead.json
    python -m benchmarks.distillation_overhead --device gpu ...        # scripts/gpu_check.sh

The student is the pruning target of ``benchmarks/overhead.py``'s shapes, the teacher the source shape (random
weights: the timing does not depend on them); the real Composer Trainer runs both, from the same data, batch and
optimizer; FLOPs come from ``ComposerCausalLM.flops_per_batch`` (matmuls and attention). Repetitions alternate the
variants in a seeded random order; ratios are paired per repetition (geometric mean, 95% bootstrap interval). The
goal: KD / CE within 1.15x of the floor.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import REPO, StepTimer, median, write_json
from benchmarks.overhead import SHAPES, TARGETS, _overrides, ratio_summary
from benchmarks.small_scale import ensure_data

GOAL = 1.15


def _teacher(shape: str, out: Path, tokenizer: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmshearing.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    fields = dict(SHAPES[shape], num_key_value_heads=SHAPES[shape]["num_attention_heads"], vocab_size=2048,
                  max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(out)
    load_tokenizer(str(tokenizer)).save_pretrained(out)  # the student's: the agreement check passes
    return out


def step(data: Path, work: Path, shape: str, steps: int, batch: int, device: str, teacher: Path | None,
         warmup: int) -> tuple[float, int]:
    """Median step seconds of the student's continued training (with a teacher: KD only), and its FLOPs a batch."""
    import torch

    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer

    ov = _overrides(data, work, shape, steps, batch) + ["optimizer.lr=1.0e-4", f"device={device}"]
    ov = [o for o in ov if not o.startswith("model.config.")]
    student = dict(TARGETS[shape], num_key_value_heads=TARGETS[shape]["num_attention_heads"])
    ov += [f"model.config.{k}={v}" for k, v in student.items()]
    if teacher is not None:
        ov += [f"distillation.teacher={teacher}"]
    timer = StepTimer()
    trainer = build_trainer(load_config(REPO / "yamls/pretrain/tiny_cpu.yaml", ov), extra_callbacks=[timer])
    flops = trainer.state.model.flops_per_batch({"input_ids": torch.zeros(batch, 128, dtype=torch.long)})
    trainer.fit()
    trainer.close()
    return statistics.median(timer.times[warmup:]), flops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/distillation_overhead.json")
    p.add_argument("--cache", default="runs/benchmarks/cache_v5")
    p.add_argument("--shapes", nargs="*", default=["small", "medium"], choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    data = ensure_data(Path(args.cache).resolve())
    result = {"args": vars(args), "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in args.shapes:
            teacher = _teacher(shape, tmp / f"teacher_{shape}", Path(args.cache).resolve() / "tokenizer")
            raw = {"ce": [], "kd": []}
            flops = {}
            rng = random.Random(args.seed)
            for _ in range(args.reps):
                order = ["ce", "kd"]
                rng.shuffle(order)
                for v in order:
                    t, f = step(data, tmp / v, shape, args.steps, args.batch, args.device,
                                teacher if v == "kd" else None, args.warmup)
                    raw[v].append(t)
                    flops[v] = f
            floor = flops["kd"] / flops["ce"]
            ratio = ratio_summary(raw["kd"], raw["ce"], GOAL * floor, args.seed)
            result["shapes"][shape] = {"student": TARGETS[shape], "teacher": SHAPES[shape], "seconds": {
                k: median(v) for k, v in raw.items()}, "raw": raw, "flops_per_batch": flops, "floor": floor,
                "ratio_kd_vs_ce": ratio, "ratio_over_floor": ratio["geomean"] / floor}
            write_json(args.out, result)
            print(f"{shape}: KD/CE step {ratio['geomean']:.3f} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}], floor "
                  f"{floor:.3f}, over the floor {ratio['geomean'] / floor:.3f} (goal <= {GOAL}: "
                  f"{'met' if ratio['ci95'][1] <= GOAL * floor else 'not met'})", flush=True)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
