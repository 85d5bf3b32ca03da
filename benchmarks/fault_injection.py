"""Fault injection (issues #6, #17): pruning and continued pre-training runs killed with SIGKILL mid-step (after
the backward pass, before the optimizer step), between steps, during an evaluation and half-way through a
checkpoint write, at several batches, restarted with autoresume; each final result is compared with an
uninterrupted run (model, masks, lambdas, proportions, data order, losses), and the checkpoints left on disk are
counted against ``save_num_checkpoints_to_keep=2`` (over all attempts). Then data prep, replacing an existing
dataset with ``--overwrite``, SIGKILLed at spread-out moments: after each kill the old dataset must still be whole
under its name (or, killed between the two renames, beside it), a user's folder named ``<output>.tmp`` untouched,
and the next run must complete and leave no temporary folder behind.

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
    p.add_argument("--cache", default="runs/benchmarks/cache_v5")
    p.add_argument("--prep-kills", type=int, default=10, help="data prep runs to kill")
    p.add_argument("--only-data-prep", action="store_true")
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
        for stage, (yaml, extra) in ({} if args.only_data_prep else stages).items():
            common = [f"variables.data={data}", f"variables.vocab_size={VOCAB}", "max_duration=16ba",
                      "eval_interval=4ba", "save_interval=4ba", "global_train_batch_size=8",
                      "device_train_microbatch_size=8", "console_log_interval=1000ba", "data.eval_sequences_per_domain=8",
                      "autoresume=true", "save_num_checkpoints_to_keep=2", "dynamic_loading.update=doremi",
                      "dynamic_loading.reference_losses=[5.0,5.0,5.0]", *extra]
            ref = run_traced(tmp / f"{stage}_ref.pt", yaml, common + [f"variables.run_dir={tmp}/{stage}_ref"])
            for i, kills in enumerate(SEQUENCES):
                run = common + [f"variables.run_dir={tmp}/{stage}_{i}"]
                for kill in kills:
                    run_traced(tmp / f"{stage}_{i}.pt", yaml, run, kill_at=kill)
                out = run_traced(tmp / f"{stage}_{i}.pt", yaml, run)
                same = _same(ref, out)
                left = len(list((tmp / f"{stage}_{i}" / "checkpoints").glob("ep*-ba*-rank0.pt")))
                rows.append({"stage": stage, "kills": kills, "resumed_from": out["first_batch"], **same,
                             "identical": all(same.values()), "checkpoints_left": left})
                print(rows[-1], flush=True)
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        for k in r["kills"]:
            c = counts.setdefault(f"{r['stage']} {k.split(':')[0]}", {"injected": 0, "identical_end": 0})
            c["injected"] += 1
            c["identical_end"] += int(r["identical"])
    prep_rows = data_prep_kills(Path(args.cache).resolve(), args.prep_kills)
    write_json(args.out, {"rows": rows, "counts": counts, "data_prep": prep_rows})
    for k, c in counts.items():
        print(f"| {k} | {c['injected']} | {c['identical_end']}/{c['injected']} identical |")
    print(f"checkpoints left (save_num_checkpoints_to_keep=2): {sorted({r['checkpoints_left'] for r in rows})}")
    ok = sum(r["old_dataset_whole"] and r["user_folder_intact"] for r in prep_rows)
    print(f"| data prep --overwrite, killed | {len(prep_rows)} | {ok}/{len(prep_rows)} nothing lost; next run clean: "
          f"{sum(r['next_run_clean'] for r in prep_rows)}/{len(prep_rows)} |")
    return 0


def data_prep_kills(cache: Path, n: int) -> list[dict]:
    """SIGKILL ``data_prep/prepare_data.py --overwrite`` over an existing dataset at ``n`` moments spread over its
    run time; check what is left after each kill and after a complete rerun."""
    import json
    import shutil
    import subprocess
    import sys
    import time

    corpus, tok = cache / "corpus", cache / "tokenizer"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = tmp / "data"
        cmd = [sys.executable, str(REPO / "data_prep" / "prepare_data.py"), "--input", str(corpus), "--output",
               str(out), "--tokenizer", str(tok), "--seq-len", "64", "--workers", "2", "--chunk-mb", "0.05"]
        subprocess.run(cmd + ["--seed", "1"], check=True, capture_output=True)
        (tmp / "data.tmp").mkdir()
        (tmp / "data.tmp" / "mine.txt").write_text("a user's file")
        t0 = time.time()
        subprocess.run(cmd + ["--seed", "2", "--overwrite"], check=True, capture_output=True)
        full = time.time() - t0
        for i in range(n):
            at = full * (i + 0.5) / n
            proc = subprocess.Popen(cmd + ["--seed", "3", "--overwrite"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(at)
            proc.kill()
            proc.wait()
            manifests = [out / "manifest.json", *tmp.glob("data.old-*/data/manifest.json")]
            whole = any(m.is_file() and json.loads(m.read_text())["domains"] for m in manifests)
            intact = (tmp / "data.tmp" / "mine.txt").read_text() == "a user's file"
            if not (out / "manifest.json").is_file():  # killed between the renames: put the old one back by hand
                for old in tmp.glob("data.old-*/data"):
                    old.rename(out)
            rerun = subprocess.run(cmd + ["--seed", "2", "--overwrite"], capture_output=True)
            clean = rerun.returncode == 0 and not list(tmp.glob("data.tmp-*")) and (out / "manifest.json").is_file()
            for old in tmp.glob("data.old-*"):
                shutil.rmtree(old)
            rows.append({"kill_after_s": round(at, 2), "of_s": round(full, 2), "old_dataset_whole": whole,
                         "user_folder_intact": intact, "next_run_clean": clean})
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
