"""Fault injection (issue #6): pruning and continued pre-training runs killed with SIGKILL mid-step (after the
backward pass, before the optimizer step), between steps, during an evaluation and half-way through a
checkpoint write, at several batches, restarted with autoresume; each
final result is compared with an uninterrupted run (model, masks, lambdas, proportions, data order, losses).

    python -m benchmarks.fault_injection --out runs/benchmarks/fault_injection.json

Needs the small trained tokenizer and data of ``benchmarks/small_scale.py`` (built on first use).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import REPO, write_json  # noqa: E402
from benchmarks.small_scale import VOCAB, ensure_data  # noqa: E402

SEQUENCES = [  # each is one crashy run: killed at these points in turn, then restarted to the end
    ["mid:6", "eval:8", "save:12", "step:14"],
    ["save:4", "step:10", "eval:12", "mid:15"],
    ["eval:4", "mid:7", "save:8", "step:15"],
]


def _same(ref: dict, out: dict) -> dict[str, bool]:
    import torch

    f = out["first_batch"]
    return {
        "data_order": out["batches"] == ref["batches"][f:],
        "proportions": out["proportions"] == ref["proportions"][f:],
        "losses": out["losses"] == ref["losses"][f:],
        "tensors": out["tensors"].keys() == ref["tensors"].keys()
        and all(torch.equal(out["tensors"][k], t) for k, t in ref["tensors"].items()),
    }


def main(argv: list[str] | None = None) -> int:
    import sys

    sys.path.insert(0, str(REPO))
    from tests.helpers import run_traced

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/fault_injection.json")
    p.add_argument("--cache", default="runs/benchmarks/cache_v3")
    args = p.parse_args(argv)
    data = ensure_data(Path(args.cache).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4)).save_pretrained(tmp / "src")
        stages = {
            "prune": (REPO / "yamls/prune/tiny_cpu.yaml", []),
            "continue_pretrain": (REPO / "yamls/continue_pretrain/tiny_cpu.yaml",
                                  [f"variables.source={tmp / 'src'}", "variables.reference_losses=[5.0,5.0,5.0]"]),
        }
        for stage, (yaml, extra) in stages.items():
            common = [f"variables.data={data}", f"variables.vocab_size={VOCAB}", "max_duration=16ba",
                      "eval_interval=4ba", "save_interval=4ba", "global_train_batch_size=8",
                      "device_train_microbatch_size=8", "console_log_interval=1000ba", "data.eval_sequences_per_domain=8",
                      "autoresume=true", "dynamic_loading.update=doremi",
                      "dynamic_loading.reference_losses=[5.0,5.0,5.0]", *extra]
            ref = run_traced(tmp / f"{stage}_ref.pt", yaml, common + [f"variables.run_dir={tmp}/{stage}_ref"])
            for i, kills in enumerate(SEQUENCES):
                run = common + [f"variables.run_dir={tmp}/{stage}_{i}"]
                for kill in kills:
                    run_traced(tmp / f"{stage}_{i}.pt", yaml, run, kill_at=kill)
                out = run_traced(tmp / f"{stage}_{i}.pt", yaml, run)
                same = _same(ref, out)
                rows.append({"stage": stage, "kills": kills, "resumed_from": out["first_batch"], **same,
                             "identical": all(same.values())})
                print(rows[-1], flush=True)
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        for k in r["kills"]:
            c = counts.setdefault(f"{r['stage']} {k.split(':')[0]}", {"injected": 0, "identical_end": 0})
            c["injected"] += 1
            c["identical_end"] += int(r["identical"])
    write_json(args.out, {"rows": rows, "counts": counts})
    for k, c in counts.items():
        print(f"| {k} | {c['injected']} | {c['identical_end']}/{c['injected']} identical |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
