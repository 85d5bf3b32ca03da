"""Data path: data-prep throughput against the tokenizer alone, and the dynamic loader against a plain
StreamingDataset over the same shards (issues #4 and #7).

    python benchmarks/data_path.py --out runs/benchmarks/data_path.json

Uses ../shared's RedPajama sample and LLaMA-2 tokenizer when present, else the embedded corpus and a
small trained tokenizer. Every figure is a median over ``--reps`` repetitions, the compared variants
interleaved within each repetition.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import LLAMA2_TOKENIZER, REDPAJAMA, REPO, median, write_json  # noqa: E402


MAX_DOC_CHARS = 20_000  # cut long documents (the one-document book domain) so every domain has train and eval


def _texts(root: Path) -> list[str]:
    from llmshearing.data.prepare import SUFFIXES, _open_text, _split_long

    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(p for p in d.rglob("*") if p.name.endswith(SUFFIXES)):
            with _open_text(f) as fh:
                for line in fh:
                    if line.strip():
                        out.extend(_split_long(json.loads(line)["text"], MAX_DOC_CHARS))
    return out


def tokenizer_alone(tokenizer: str, texts: list[str]) -> tuple[int, float]:
    from llmshearing.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 256):
        n += sum(len(ids) for ids in tok(texts[i : i + 256], add_special_tokens=False)["input_ids"])
    return n, time.perf_counter() - t0


def prep(corpus: Path, tokenizer: str, out: Path, workers: int, seq_len: int) -> tuple[int, float, float]:
    from llmshearing.data.prepare import prepare_dataset

    res = prepare_dataset(corpus, out, tokenizer, seq_len, val_fraction=0.01, test_fraction=0.01, max_doc_chars=MAX_DOC_CHARS,
                          workers=workers, overwrite=True,
                          progress=False)
    tokens = sum(d["text_tokens"] for d in res.manifest["domains"].values())
    return tokens, res.seconds, res.tokenize_seconds


def _clean_shm() -> None:
    from streaming.base.util import clean_stale_shared_memory

    gc.collect()
    clean_stale_shared_memory()


def ours(data: Path, workers: int, batch: int, n_batches: int, seq_len: int) -> float:
    from llmshearing.config import DataConfig
    from llmshearing.data import build_train_dataloader, load_manifest, resolve_domains

    cfg = DataConfig(local=str(data), max_seq_len=seq_len, num_workers=workers, prefetch_factor=2)
    manifest = load_manifest(str(data))
    domains, props = resolve_domains(cfg, manifest)
    loader = build_train_dataloader(cfg, manifest, domains, props, batch, seed=0)
    rate = _time_loader(loader, n_batches, batch)
    del loader
    _clean_shm()
    return rate


def plain(data: Path, workers: int, batch: int, n_batches: int, seq_len: int) -> float:
    from streaming import Stream, StreamingDataset
    from torch.utils.data import DataLoader

    manifest = json.loads((data / "manifest.json").read_text())
    streams = [Stream(local=str(data / "train" / d)) for d in manifest["domains"]]
    ds = StreamingDataset(streams=streams, shuffle=True, shuffle_seed=0, batch_size=batch)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, prefetch_factor=2 if workers else None,
                        persistent_workers=False)
    rate = _time_loader(loader, n_batches, batch)
    del loader, ds
    _clean_shm()
    return rate


def _time_loader(loader, n_batches: int, batch: int, warmup: int = 10) -> float:
    it = iter(loader)
    for _ in range(warmup):  # worker start-up and first shard opens are not steady state
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
        assert (b["tokens"] if "tokens" in b else b["input_ids"]).shape[0] == batch
    rate = n_batches * batch / (time.perf_counter() - t0)
    del it
    return rate


def _isolated(kind: str, data: Path, workers: int, batch: int, n_batches: int, seq_len: int) -> float:
    """One loader measurement in a fresh process: an abandoned StreamingDataset iteration leaves polling
    threads behind that would slow every later measurement in the same process."""
    cmd = [sys.executable, "-m", "benchmarks.data_path", "--measure", kind, str(data), str(workers), str(batch),
           str(n_batches), str(seq_len)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--measure":
        kind, data, *nums = argv[1:]
        workers, batch, n_batches, seq_len = map(int, nums)
        print((ours if kind == "ours" else plain)(Path(data), workers, batch, n_batches, seq_len))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/data_path.json")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=220)  # the sample holds ~240 batches of 16 x 512
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="llmshearing_bench_"))
    try:
        if REDPAJAMA.is_dir() and LLAMA2_TOKENIZER.is_file():
            corpus, tokenizer, source = REDPAJAMA, str(LLAMA2_TOKENIZER), "shared RedPajama sample, LLaMA-2 tokenizer"
        else:
            from llmshearing.data.embedded_corpus import build_embedded_corpus
            from llmshearing.data.train_tokenizer import train_tokenizer

            corpus = build_embedded_corpus(work / "corpus", max_chars_per_domain=2_000_000)
            tokenizer = str(train_tokenizer(corpus, work / "tok", vocab_size=2048))
            source = "embedded corpus, 2048-token SentencePiece"
        texts = _texts(Path(corpus))

        rows: dict[str, list[float]] = {k: [] for k in ("tokenizer_tok_s", "prep1_tok_s", "prep1_inworker_tok_s",
                                                         "prep2_tok_s_per_worker", "prep2_inworker_tok_s")}
        tokens = 0
        for _ in range(args.reps):
            n, s = tokenizer_alone(tokenizer, texts)
            rows["tokenizer_tok_s"].append(n / s)
            tokens, wall, inworker = prep(Path(corpus), tokenizer, work / "mds", 1, args.seq_len)
            assert tokens == n, (tokens, n)  # the same text, the same tokens
            rows["prep1_tok_s"].append(tokens / wall)
            rows["prep1_inworker_tok_s"].append(tokens / inworker)
            tokens, wall, inworker = prep(Path(corpus), tokenizer, work / "mds", 2, args.seq_len)
            rows["prep2_tok_s_per_worker"].append(tokens / wall / 2)
            rows["prep2_inworker_tok_s"].append(tokens / inworker)
        prep_res = {k: median(v) for k, v in rows.items()}
        base = prep_res["tokenizer_tok_s"]
        prep_res.update(
            text_tokens=tokens,
            ratio_prep1_vs_tokenizer=prep_res["prep1_tok_s"] / base,
            ratio_prep1_inworker_vs_tokenizer=prep_res["prep1_inworker_tok_s"] / base,
            ratio_prep2_per_worker_vs_tokenizer=prep_res["prep2_tok_s_per_worker"] / base,
            ratio_prep2_inworker_vs_tokenizer=prep_res["prep2_inworker_tok_s"] / base,
            raw=rows,
        )

        loader: dict[str, list[float]] = {f"{k}_w{w}": [] for k in ("ours", "plain") for w in (0, 2)}
        for _ in range(args.reps):
            for w in (0, 2):
                for kind in ("ours", "plain"):
                    loader[f"{kind}_w{w}"].append(
                        _isolated(kind, work / "mds", w, args.batch, args.batches, args.seq_len)
                    )
        load_res = {f"{k}_samples_s": median(v) for k, v in loader.items()}
        for w in (0, 2):
            load_res[f"ratio_ours_vs_plain_w{w}"] = load_res[f"ours_w{w}_samples_s"] / load_res[f"plain_w{w}_samples_s"]
        load_res["raw"] = loader

        result = {"data": source, "seq_len": args.seq_len, "batch": args.batch, "batches_timed": args.batches,
                  "reps": args.reps, "prep": prep_res, "loader": load_res}
        write_json(args.out, result)
        print(json.dumps({k: v for k, v in prep_res.items() if k != "raw"}, indent=1))
        print(json.dumps({k: v for k, v in load_res.items() if k != "raw"}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
