"""RedPajama-style JSON-lines folders -> per-domain MDS datasets of packed, fixed-length token sequences.

Input: ``<input>/<domain>/*.jsonl[.gz|.zst]``, one JSON object per line with a ``text`` field.
Output (written to ``<output>.tmp`` and renamed when complete)::

    <output>/manifest.json          # tokenizer, seq_len, dtype, per-domain counts, malformed lines
    <output>/train/<domain>/        # MDS shards, one column "tokens": ndarray of seq_len ids
    <output>/eval/<domain>/         # held-out documents, same format

Each document becomes ``[BOS] + tokens(text) + [EOS]`` (BOS when the tokenizer has one); documents
are concatenated per domain and split and cut into ``seq_len`` sequences (the last partial sequence
is dropped and counted). A document goes to the evaluation split when a seeded hash of
``(domain, file, line, piece)`` falls below ``eval_fraction``, so the split is by document, never
overlaps, and is the same for the same seed regardless of the number of workers; a domain that
would get no evaluation document gives its first document to evaluation instead. Long documents
can be cut into pieces of at most ``max_doc_chars`` characters (at line breaks) first, so that a
domain of a few very long documents (books) can still hold some out.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm

from llmshearing.data.tokenizer import load_tokenizer, token_dtype, vocab_size

__all__ = ["PrepareResult", "prepare_dataset", "read_manifest", "MANIFEST", "FORMAT"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "llmshearing-mds-v1"
SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="strict")
    if name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def _split_long(text: str, max_chars: Optional[int]) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters, preferring line breaks."""
    if not max_chars or len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n", start + max_chars // 2, end)
            end = cut + 1 if cut != -1 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def _is_eval(seed: int, key: str, eval_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < eval_fraction


@dataclass
class _FileResult:
    domain: str
    relpath: str
    train: list[np.ndarray] = field(default_factory=list)  # one array per document, BOS/EOS included
    eval: list[np.ndarray] = field(default_factory=list)
    text_tokens: int = 0
    documents: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0


_WORKER: dict = {}


def _init_worker(tokenizer: str, seed: int, eval_fraction: float, max_doc_chars: Optional[int], add_bos: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = load_tokenizer(tokenizer)
    _WORKER.update(
        tok=tok,
        seed=seed,
        eval_fraction=eval_fraction,
        max_doc_chars=max_doc_chars,
        bos=[tok.bos_token_id] if add_bos and tok.bos_token_id is not None else [],
        eos=[tok.eos_token_id],
        dtype=np.dtype(token_dtype(vocab_size(tok))),
    )


def _process_file(task: tuple[str, str, str]) -> _FileResult:
    domain, path, relpath = task
    w = _WORKER
    res = _FileResult(domain=domain, relpath=relpath)
    t0 = time.perf_counter()
    texts, keys = [], []
    with _open_text(Path(path)) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                res.malformed.append((line_no, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                res.malformed.append((line_no, "no string 'text' field"))
                continue
            res.documents += 1
            for j, piece in enumerate(_split_long(text, w["max_doc_chars"])):
                texts.append(piece)
                keys.append(f"{domain}/{relpath}:{line_no}:{j}")
    for start in range(0, len(texts), 256):
        chunk = texts[start : start + 256]
        ids = w["tok"](chunk, add_special_tokens=False)["input_ids"]
        for key, doc in zip(keys[start : start + 256], ids):
            res.text_tokens += len(doc)
            arr = np.asarray(w["bos"] + doc + w["eos"], dtype=w["dtype"])
            (res.eval if _is_eval(w["seed"], key, w["eval_fraction"]) else res.train).append(arr)
    res.seconds = time.perf_counter() - t0
    return res


class _Packer:
    """Concatenates documents and writes full ``seq_len`` sequences to an MDS writer."""

    def __init__(self, out: Path, seq_len: int, dtype: str, compression: Optional[str]) -> None:
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.writer = MDSWriter(
            out=str(out), columns={"tokens": f"ndarray:{dtype}"}, compression=compression, size_limit="64mb"
        )
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.sequences = 0
        self.tokens = 0

    def add(self, doc: np.ndarray) -> None:
        self.buffer.append(doc)
        self.buffered += len(doc)
        if self.buffered >= self.seq_len:
            flat = np.concatenate(self.buffer)
            n_full = len(flat) // self.seq_len
            for i in range(n_full):
                self.writer.write({"tokens": flat[i * self.seq_len : (i + 1) * self.seq_len]})
            self.sequences += n_full
            self.tokens += n_full * self.seq_len
            rest = flat[n_full * self.seq_len :]
            self.buffer, self.buffered = [rest], len(rest)

    def finish(self) -> int:
        """Close the writer; returns the number of trailing tokens dropped."""
        self.writer.finish()
        return self.buffered


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` wrote."""

    output: Path
    manifest: dict
    seconds: float
    tokenize_seconds: float


def _discover(input_dir: Path, domains: Optional[Sequence[str]]) -> dict[str, list[Path]]:
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist; it must hold one sub-folder per domain")
    found = {d.name: d for d in sorted(input_dir.iterdir()) if d.is_dir()}
    names = list(domains) if domains else list(found)
    if not names:
        raise ValueError(f"{input_dir} has no domain sub-folders; expected <input>/<domain>/*.jsonl")
    out = {}
    for name in names:
        if name not in found:
            raise FileNotFoundError(f"domain folder {input_dir / name} is missing (domains found: {sorted(found)})")
        files = sorted(p for p in found[name].rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise ValueError(f"domain {name!r} is empty: no {'/'.join(SUFFIXES)} files under {found[name]}")
        out[name] = files
    return out


def prepare_dataset(
    input_dir: str | Path,
    output_dir: str | Path,
    tokenizer: str,
    seq_len: int,
    *,
    domains: Optional[Sequence[str]] = None,
    eval_fraction: float = 0.01,
    max_doc_chars: Optional[int] = None,
    max_tokens: Optional[dict[str, int]] = None,
    seed: int = 0,
    workers: int = 1,
    add_bos: bool = True,
    compression: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize and pack a RedPajama-style folder into per-domain MDS datasets (see module docstring).

    Args:
        input_dir: folder with one sub-folder per domain.
        output_dir: where to write; must not exist unless ``overwrite``.
        tokenizer: Hugging Face tokenizer directory or SentencePiece ``.model`` file.
        seq_len: tokens per sequence.
        domains: domains to include (default: every sub-folder).
        eval_fraction: share of documents held out for evaluation.
        max_doc_chars: cut longer documents into pieces first (None: never).
        max_tokens: optional per-domain cap on training tokens (a mixture budget).
        seed: seed of the train/eval assignment.
        workers: tokenizer processes (parallel over files).
        add_bos: start every document with BOS (when the tokenizer has one).
        compression: MDS shard compression (e.g. ``zstd``) or None.
        overwrite: replace an existing output.
        progress: show a progress bar.

    Raises:
        FileExistsError, FileNotFoundError, ValueError: bad input, reported before any tokenization.
    """
    t_start = time.perf_counter()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; choose another output folder or pass --overwrite to replace it")
    files = _discover(input_dir, domains)
    unknown_budget = set(max_tokens or {}) - set(files)
    if unknown_budget:
        raise ValueError(f"max_tokens names unknown domains {sorted(unknown_budget)}; domains are {list(files)}")
    tok = load_tokenizer(tokenizer)
    n_vocab = vocab_size(tok)
    dtype = token_dtype(n_vocab)

    tmp = output_dir.with_name(output_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    packers = {
        (d, split): _Packer(tmp / split / d, seq_len, dtype, compression) for d in files for split in ("train", "eval")
    }
    stats = {d: {"documents": 0, "text_tokens": 0, "files": len(fs), "malformed": []} for d, fs in files.items()}
    pending_first: dict[str, Optional[np.ndarray]] = {}  # first train doc, held until the domain has an eval doc
    has_eval = {d: False for d in files}
    budget_hit = {d: False for d in files}
    tasks = [(d, str(p), str(p.relative_to(input_dir / d))) for d, fs in files.items() for p in fs]
    tokenize_seconds = 0.0

    worker_tokenizer = str(tokenizer)
    if workers > 1 and Path(tokenizer).is_file():
        # A bare SentencePiece model is converted to a fast tokenizer on load (seconds per process):
        # convert once here and let the workers load the converted tokenizer.json.
        worker_tokenizer = str(tmp / "_tokenizer")
        tok.save_pretrained(worker_tokenizer)
    init_args = (worker_tokenizer, seed, eval_fraction, max_doc_chars, add_bos)
    results: Iterator[_FileResult]
    if workers > 1:
        # fork where the platform has it: a spawned worker re-imports torch, streaming and transformers
        # (seconds each); the parent has only loaded the tokenizer, never run it, so forking is safe.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=init_args)
        results = pool.imap(_process_file, tasks)
    else:
        pool = None
        _init_worker(*init_args)
        results = map(_process_file, tasks)
    try:
        for res in tqdm(results, total=len(tasks), desc="tokenizing files", disable=not progress, unit="file"):
            d = res.domain
            tokenize_seconds += res.seconds
            st = stats[d]
            st["documents"] += res.documents
            st["text_tokens"] += res.text_tokens
            for line_no, why in res.malformed:
                st["malformed"].append({"file": res.relpath, "line": line_no, "error": why})
                log.warning("%s/%s line %d skipped: %s", d, res.relpath, line_no, why)
            for doc in res.eval:
                packers[(d, "eval")].add(doc)
            if res.eval and not has_eval[d]:
                has_eval[d] = True
                if pending_first.get(d) is not None:
                    packers[(d, "train")].add(pending_first.pop(d))
            for doc in res.train:
                if budget_hit[d]:
                    break
                if eval_fraction > 0 and not has_eval[d] and d not in pending_first:
                    pending_first[d] = doc
                    continue
                packer = packers[(d, "train")]
                cap = (max_tokens or {}).get(d)
                if cap is not None and packer.tokens + packer.buffered + len(doc) > cap:
                    doc = doc[: max(0, cap - packer.tokens - packer.buffered)]
                    budget_hit[d] = True
                packer.add(doc)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    for d in files:
        first = pending_first.pop(d, None)
        if first is not None:  # no document of this domain was drawn for evaluation: hold out the first one
            packers[(d, "eval")].add(first)
            has_eval[d] = eval_fraction > 0
    manifest_domains = {}
    for d in files:
        entry = dict(stats[d])
        for split in ("train", "eval"):
            p = packers[(d, split)]
            dropped = p.finish()
            entry[split] = {"sequences": p.sequences, "tokens": p.tokens, "dropped_tail_tokens": dropped}
        manifest_domains[d] = entry
        if entry["train"]["sequences"] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(
                f"domain {d!r} produced no training sequence of {seq_len} tokens "
                f"({entry['documents']} documents, {entry['text_tokens']} tokens); add text, lower seq_len, "
                "or leave the domain out"
            )
        if eval_fraction > 0 and entry["eval"]["sequences"] == 0:
            log.warning(
                "domain %r has no full evaluation sequence; raise eval_fraction or set max_doc_chars", d
            )
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "dtype": dtype,
        "tokenizer": {
            "path": str(tokenizer),
            "class": type(tok).__name__,
            "vocab_size": n_vocab,
            "bos_token_id": tok.bos_token_id if add_bos else None,
            "eos_token_id": tok.eos_token_id,
        },
        "seed": seed,
        "eval_fraction": eval_fraction,
        "max_doc_chars": max_doc_chars,
        "domains": manifest_domains,
    }
    shutil.rmtree(tmp / "_tokenizer", ignore_errors=True)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    n_bad = sum(len(s["malformed"]) for s in stats.values())
    if n_bad:
        log.warning("%d malformed lines skipped; see 'malformed' in %s", n_bad, output_dir / MANIFEST)
    return PrepareResult(output_dir, manifest, time.perf_counter() - t_start, tokenize_seconds)


def read_manifest(root: str | Path) -> dict:
    """The manifest of a prepared dataset, with a clear error when it is not one."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a prepared dataset (no {MANIFEST}); create it with "
            "`python data_prep/prepare_data.py --input <jsonl folder> --output <dir> --tokenizer <tok>`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
