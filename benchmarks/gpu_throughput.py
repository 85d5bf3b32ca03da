"""GPU throughput check (issue #7): tokens/s per GPU and model FLOPs utilisation of
- continued pre-training of the Sheared-LLaMA 1.3B shape (24 x 2048, 16 heads, 5504 FFN), and
- pruning a source of LLaMA2-7B width (4096 hidden, 32 heads, 11008 FFN) at reduced depth,
through the real Composer Trainer (bf16, sequence 4096, synthetic MDS data of random tokens), on one GPU;
then a functional smoke test of the multi-GPU pruning path on that GPU: FSDP FULL_SHARD with activation
checkpointing (as ``yamls/parts/gpu_fsdp.yaml``), a GQA source, a checkpoint, its export, and the exported
model loaded back with plain transformers at exactly the target shape.

    python -m benchmarks.gpu_throughput --out runs/benchmarks/gpu_throughput.json   # bash scripts/gpu_check.sh
    python -m benchmarks.gpu_throughput --dry-run                                   # tiny shapes, CPU, fp32

MFU = tokens/s x FLOPs per token / peak bf16 FLOP/s (dense; ``--peak-tflops``, default 989 for H100/H200
SXM); beside it, the same against an 8192^3 bf16 matrix product timed on the card. FLOPs per token = 6 N
(non-embedding parameters plus the LM head) + 6 L H hd T (causal attention, forward + backward). Step time is measured from BATCH_START to BATCH_END after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import REPO, StepTimer, write_json  # noqa: E402

CASES = {
    "continue_pretrain_1.3b": dict(shape=dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=16,
                                              intermediate_size=5504), micro=8, prune=None),
    "prune_7b_width": dict(shape=dict(num_hidden_layers=8, hidden_size=4096, num_attention_heads=32,
                                      intermediate_size=11008), micro=4,
                           prune=dict(num_hidden_layers=6, hidden_size=2560, num_attention_heads=20,
                                      intermediate_size=6912)),
}
SMOKE = dict(shape=dict(num_hidden_layers=4, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4,
                        intermediate_size=2816), micro=2,
             prune=dict(num_hidden_layers=3, hidden_size=768, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=2048))
DRY_SMOKE = dict(shape=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128), micro=2,
                 prune=dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=96))
DRY = {
    "continue_pretrain_1.3b": dict(shape=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                              intermediate_size=128), micro=4, prune=None),
    "prune_7b_width": dict(shape=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      intermediate_size=128), micro=4,
                           prune=dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=2, intermediate_size=96)),
}


def synthetic_dataset(root: Path, vocab: int, seq_len: int, n_train: int, n_eval: int = 8) -> Path:
    """A prepared dataset (manifest + MDS shards) of uniformly random tokens, one domain."""
    import numpy as np
    from streaming import MDSWriter

    from llmshearing.data.prepare import FORMAT, MANIFEST

    rng = np.random.default_rng(0)
    entry = {"documents": 0, "text_tokens": 0, "files": 0, "malformed": []}
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        with MDSWriter(out=str(root / split / "random"), columns={"tokens": "ndarray:uint16"}, size_limit="64mb") as w:
            for _ in range(n):
                w.write({"tokens": rng.integers(0, vocab, size=seq_len, dtype=np.uint16)})
        entry[split] = {"sequences": n, "tokens": n * seq_len, "dropped_tail_tokens": 0}
    manifest = {"format": FORMAT, "seq_len": seq_len, "dtype": "uint16", "seed": 0, "split_unit": "document",
                "val_fraction": 0.0, "test_fraction": 0.0,
                "max_doc_chars": None, "domains": {"random": entry},
                "tokenizer": {"path": "synthetic", "class": None, "vocab_size": vocab, "bos_token_id": None,
                              "eos_token_id": None}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def flops_per_token(shape: dict, vocab: int, seq_len: int) -> float:
    """Training FLOPs per token of a LLaMA-style decoder: 6 x the matmul parameters (q and o: d x H hd;
    k and v: d x G hd, smaller under GQA; gate/up/down: d x m; LM head: V x d; the embedding lookup is free),
    plus causal attention: scores and weighted values, 2 x 2 x T x H hd per layer forward, halved by the causal
    mask, x 3 for the backward: 6 L T H hd."""
    d, L, m = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    H = shape["num_attention_heads"]
    G = shape.get("num_key_value_heads") or H
    hd = shape.get("head_dim") or d // H
    per_layer = 2 * d * H * hd + 2 * d * G * hd + 3 * d * m  # q, o; k, v; gate, up, down
    n = L * per_layer + vocab * d
    return 6 * n + 6 * L * H * hd * seq_len


def _overrides(name: str, case: dict, data: Path, work: Path, args, steps: int) -> list[str]:
    shape, micro = case["shape"], case["micro"]
    ov = [f"variables.data={data}", f"variables.run_dir={work / name}", f"variables.vocab_size={args.vocab}",
          f"data.max_seq_len={args.seq_len}", f"global_train_batch_size={micro * args.accum}",
          f"device_train_microbatch_size={micro}", f"max_duration={steps}ba",
          "eval_interval=100000ba", "save_folder=null", "autoresume=false", "console_log_interval=100000ba",
          "data.eval_sequences_per_domain=1", f"precision={args.precision}", f"device={args.device}",
          f"model.config.max_position_embeddings={args.seq_len}", f"model.attn_implementation={args.attn}",
          f"model.gradient_checkpointing={str(args.checkpointing).lower()}", "data.num_workers=2"]
    ov += [f"model.config.{k}={v}" for k, v in shape.items()]
    ov.append(f"model.config.num_key_value_heads={shape.get('num_key_value_heads', shape['num_attention_heads'])}")
    if case["prune"]:
        ov += [f"pruning.target.{k}={v}" for k, v in case["prune"].items()] + ["dynamic_loading=null"]
    return ov


def _yaml(case: dict) -> Path:
    return REPO / ("yamls/prune/tiny_cpu.yaml" if case["prune"] else "yamls/pretrain/tiny_cpu.yaml")


def run_case(name: str, case: dict, data: Path, work: Path, args) -> dict:
    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer

    shape, micro = case["shape"], case["micro"]
    batch = micro * args.accum
    ov = _overrides(name, case, data, work, args, steps=args.warmup + args.steps)
    timer = StepTimer(cuda_sync=args.device == "gpu")
    trainer = build_trainer(load_config(_yaml(case), ov), extra_callbacks=[timer])
    trainer.fit()
    peak_mem = None
    if args.device == "gpu":
        import torch

        peak_mem = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    trainer.close()
    step = statistics.median(timer.times[args.warmup:])
    tokens_s = batch * args.seq_len / step
    fpt = flops_per_token(shape, args.vocab, args.seq_len)
    return {"shape": shape, "prune_target": case["prune"], "micro_batch": micro, "global_batch": batch,
            "step_seconds": step, "tokens_per_s": tokens_s, "flops_per_token": fpt,
            "mfu": tokens_s * fpt / (args.peak_tflops * 1e12), "peak_memory_gib": peak_mem,
            "step_times": timer.times}


FSDP = ["fsdp.sharding_strategy=FULL_SHARD", "fsdp.mixed_precision=DEFAULT", "fsdp.activation_checkpointing=true",
        "fsdp.state_dict_type=full", "fsdp.use_orig_params=true", "fsdp.sync_module_states=true",
        "fsdp.limit_all_gathers=true"]  # as yamls/parts/gpu_fsdp.yaml


def pruning_smoke(case: dict, data: Path, work: Path, args, steps: int = 12) -> dict:
    """The multi-GPU pruning path on one device: FSDP2 FULL_SHARD with activation checkpointing, the block of
    ``yamls/parts/gpu_fsdp.yaml`` (world size 1: bf16 on a GPU; the dry run in fp32 on the CPU), GQA, a checkpoint
    saved at the end, exported, and loaded back with plain transformers in bf16; the masks must have stayed fp32."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.config import load_config
    from llmshearing.export import export_checkpoint
    from llmshearing.models.families import describe_shape
    from llmshearing.trainer import build_trainer

    ov = _overrides("smoke", case, data, work, args, steps=steps)
    ov += [f"save_folder={work / 'smoke_ckpt'}", f"save_interval={steps}ba"]
    ov += FSDP
    trainer = build_trainer(load_config(_yaml(case), ov))
    trainer.fit()
    masks = trainer.state.model.masks
    if any(p.dtype != torch.float32 or type(p.data).__name__ == "DTensor" for p in masks.parameters()):
        raise AssertionError("the masks were sharded or cast: they must stay whole fp32 tensors under FSDP")
    trainer.close()
    out = export_checkpoint(work / "smoke_ckpt" / "latest-rank0.pt", work / "smoke_hf")
    device = "cuda" if args.device == "gpu" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16).to(device).eval()
    shape = describe_shape(model.config)
    ids = torch.randint(0, args.vocab, (1, min(args.seq_len, 512)), device=device)
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    wrong = {k: (shape[k], v) for k, v in case["prune"].items() if shape[k] != v}
    if wrong or not math.isfinite(loss):
        raise AssertionError(f"exported model: shape mismatches (got, target) {wrong}, loss {loss}")
    return {"fsdp": True, "source": case["shape"], "exported_shape": shape, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/gpu_throughput.json")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU in fp32: checks the code path only")
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--no-smoke", action="store_true", help="skip the FSDP prune -> export -> load check")
    args = p.parse_args(argv)
    cases = DRY if args.dry_run else CASES
    if args.dry_run:
        args.seq_len, args.vocab, args.steps, args.warmup = 64, 512, 3, 1
        args.device, args.precision = "cpu", "fp32"
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --dry-run to check the code path on CPU")
        args.device, args.precision = "gpu", "amp_bf16"
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = {"dry_run": args.dry_run, "seq_len": args.seq_len, "vocab": args.vocab, "peak_tflops": args.peak_tflops,
              "attn": args.attn, "checkpointing": args.checkpointing, "environment": _environment(),
              "matmul_tflops": None, "cases": {}}
    if not args.dry_run:
        mm = _guarded(lambda: {"tflops": matmul_tflops()})
        result["matmul_tflops"] = mm.get("tflops")
        if "error" in mm:
            print(f"matmul ceiling: FAILED: {mm['error']}", flush=True)
    if result["matmul_tflops"]:
        print(f"bf16 8192^3 matmul: {result['matmul_tflops']:.0f} TFLOP/s (datasheet peak {args.peak_tflops:.0f})",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        n_train = max(64, (args.steps + args.warmup + 2) * max(c["micro"] for c in cases.values()) * args.accum)
        data = synthetic_dataset(Path(tmp) / "data", args.vocab, args.seq_len, n_train)
        for name in args.cases:
            result["cases"][name] = r = _run_with_fallback(name, dict(cases[name]), data, Path(tmp), args)
            if "mfu" in r and result["matmul_tflops"]:
                r["fraction_of_measured_matmul"] = r["tokens_per_s"] * r["flops_per_token"] / (
                    result["matmul_tflops"] * 1e12)
            if "error" in r:
                print(f"{name}: FAILED: {r['error']}", flush=True)
            else:
                of_measured = r.get("fraction_of_measured_matmul")
                print(f"{name}: {r['tokens_per_s']:.0f} tokens/s per GPU, MFU {100 * r['mfu']:.1f}%"
                      + (f" ({100 * of_measured:.1f}% of the measured matmul rate)" if of_measured else "") + ", "
                      f"micro-batch {r['micro_batch']}, step {r['step_seconds']:.3f} s, "
                      f"peak memory {r['peak_memory_gib']} GiB", flush=True)
            write_json(args.out, result)  # after every case: a crash later keeps what was measured
        if not args.no_smoke:
            _free_gpu()
            result["pruning_smoke"] = r = _guarded(pruning_smoke, DRY_SMOKE if args.dry_run else SMOKE, data,
                                                   Path(tmp), args)
            print("pruning smoke: " + (f"FAILED: {r['error']}" if "error" in r else
                  f"{'FSDP FULL_SHARD + activation checkpointing, ' if r['fsdp'] else ''}exported "
                  f"{r['exported_shape']} loads in transformers, loss {r['loss']:.3f}"), flush=True)
    write_json(args.out, result)
    failed = [r for r in (*result["cases"].values(), result.get("pruning_smoke", {})) if "error" in r]
    return 1 if failed else 0


def _guarded(fn, *a) -> dict:
    import traceback

    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001 - reported in the JSON, and the exit status says it failed
        return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-8000:]}


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """Median rate of an n^3 bf16 matrix product on random data: the achievable ceiling, beside the datasheet."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times) / 1e12


def _environment() -> dict:
    import sys

    import composer
    import torch
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "composer": composer.__version__,
           "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _run_with_fallback(name: str, case: dict, data: Path, work: Path, args) -> dict:
    """One case; on running out of GPU memory, again at half the micro-batch (down to 1). Any other failure
    is recorded with its traceback and the next case still runs: one device run answers as much as it can."""
    oom: list[int] = []
    while True:
        # _guarded returns outside its except block: the traceback (and the model it holds) is gone by now
        r = _guarded(run_case, name, case, data, work / f"micro{case['micro']}", args)
        r["out_of_memory_at_micro_batch"] = oom
        if "error" not in r:
            return r
        r["micro_batch"] = case["micro"]
        if "out of memory" not in r["error"].lower() or case["micro"] == 1:
            return r
        oom.append(case["micro"])
        print(f"{name}: out of memory at micro-batch {case['micro']}; retrying at {case['micro'] // 2}", flush=True)
        case["micro"] //= 2
        _free_gpu()


def _free_gpu() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    raise SystemExit(main())
