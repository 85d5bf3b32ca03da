"""Peak memory of exporting a Composer checkpoint to a Hugging Face directory (issue #7).

Makes two real checkpoints of a 58M-parameter LLaMA (32k vocabulary, fp32, with Adam state: ~0.7 GB each)
with the Composer Trainer: one pruning run (masks; the export materialises a 6-layer / 384-hidden model)
and one plain run (the export is the whole model). Each export runs in a fresh process that samples its
anonymous resident memory (``RssAnon``: what the process allocates; the memory-mapped checkpoint's pages
are file-backed and reclaimable) from the parent process every ~1 ms, minus the level after imports.

    python -m benchmarks.export_memory --out runs/benchmarks/export_memory.json

Goal: peak <= 1.5 x the largest single source tensor + the output buffer (the exported weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import REPO, write_json  # noqa: E402

SHAPE = dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=1408)
TARGET = dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=6, intermediate_size=1024)
VOCAB = 32000


def _rss_anon(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def child(checkpoint: str, output: str) -> None:
    import torch  # noqa: F401  imports first: they are not the export's memory

    from llmshearing.export import export_checkpoint

    base = _rss_anon()
    t0 = time.perf_counter()
    export_checkpoint(checkpoint, output)
    print(json.dumps({"baseline": base, "seconds": time.perf_counter() - t0}))


def _run_sampled(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd`` and sample its RssAnon from this process every ~1 ms (a thread in the child could not
    sample while the export holds the GIL in C code); returns the process and the peak."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon(proc.pid))
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak


def make_checkpoint(work: Path, data: Path, prune: bool) -> Path:
    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer

    yaml = REPO / ("yamls/prune/tiny_cpu.yaml" if prune else "yamls/pretrain/tiny_cpu.yaml")
    run = work / ("prune" if prune else "plain")
    ov = [f"variables.data={data}", f"variables.run_dir={run}", f"variables.vocab_size={VOCAB}",
          "data.max_seq_len=32", "global_train_batch_size=2", "device_train_microbatch_size=2", "max_duration=2ba",
          "save_interval=2ba", "eval_interval=100ba", "autoresume=false", "console_log_interval=100ba",
          "data.eval_sequences_per_domain=1", "metrics_file=null"]
    ov += [f"model.config.{k}={v}" for k, v in SHAPE.items()] + [f"model.config.num_key_value_heads={SHAPE['num_attention_heads']}"]
    if prune:
        ov += [f"pruning.target.{k}={v}" for k, v in TARGET.items()] + ["dynamic_loading=null"]
    trainer = build_trainer(load_config(yaml, ov))
    trainer.fit()
    trainer.close()
    return run / "checkpoints" / "ep0-ba2-rank0.pt"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/export_memory.json")
    args = p.parse_args(argv)
    import logging

    from benchmarks.gpu_throughput import synthetic_dataset
    from llmshearing.export import load_composer_checkpoint

    logging.basicConfig(level=logging.WARNING)
    result = {"source_shape": SHAPE, "vocab": VOCAB, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_dataset(tmp / "data", VOCAB, 32, 16)
        for case, prune in (("pruning checkpoint -> materialised target", True), ("plain checkpoint -> same model", False)):
            ckpt = make_checkpoint(tmp, data, prune)
            state = load_composer_checkpoint(ckpt)
            model_tensors = {k: v for k, v in state["model"].items() if k.startswith("model.")}
            largest = max(v.numel() * v.element_size() for v in model_tensors.values())
            del state, model_tensors
            out = tmp / f"out_{int(prune)}"
            proc, peak = _run_sampled([sys.executable, "-m", "benchmarks.export_memory", "--child", str(ckpt), str(out)])
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            m["peak"] = peak
            output_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            used = m["peak"] - m["baseline"]
            bound = 1.5 * largest + output_bytes
            result["cases"][case] = {
                "checkpoint_bytes": ckpt.stat().st_size, "largest_tensor_bytes": largest, "output_bytes": output_bytes,
                "peak_anon_above_baseline_bytes": used, "bound_bytes": bound, "ratio_to_bound": used / bound,
                "export_seconds": m["seconds"],
            }
            print(case, {k: (round(v / 2**20, 1) if k.endswith("bytes") else round(v, 3))
                         for k, v in result["cases"][case].items()}, flush=True)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
