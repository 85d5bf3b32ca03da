"""RedPajama-style JSON-lines folders -> per-domain MDS datasets of packed, fixed-length token sequences.

Input: ``<input>/<domain>/*.jsonl[.gz|.zst]``, one JSON object per line with a ``text`` field.
Output (written to a temporary folder of its own, ``<output>.tmp-<random>``, and renamed when complete; an
existing output is replaced only with ``overwrite``, by renaming it aside, renaming the new one in, then deleting
the old; the temporary folder is removed on every error, and nothing else is ever deleted)::

    <output>/manifest.json          # tokenizer, seq_len, dtype, splits, per-domain counts, malformed lines
    <output>/train/<domain>/        # MDS shards, one column "tokens": ndarray of seq_len ids
    <output>/val/<domain>/          # held-out documents: what training evaluates and dynamic loading reads
    <output>/test/<domain>/         # held-out documents: what results are reported on

Each document becomes ``[BOS] + tokens(text) + [EOS]`` (BOS when the tokenizer has one); documents
are concatenated per domain and split and cut into ``seq_len`` sequences (the last partial sequence
is dropped and counted). A document's split is decided by a seeded hash of its key
``(domain, file, byte offset of its line in the uncompressed file)`` (:func:`split_of`): below
``val_fraction`` it is validation, below ``val_fraction + test_fraction`` test, else training. The key
is the whole document's, taken before any cutting, so every piece of a document lands in the same split
(splits share no document), and it is the same for the same seed regardless of the number of workers or
the chunking. A domain whose hash draws no document for a held-out split gives it one of its first
training documents instead (packed last, so the output stays independent of chunking). A domain with too
few documents for that (a split would hold no full sequence: one long book, say) holds out the *tail* of its
token stream instead, and is marked ``document_disjoint: false`` in the manifest. Long documents can
be cut into pieces of at most ``max_doc_chars`` characters (at line breaks) before tokenizing; the pieces
stay together, joined again into one ``[BOS] ... [EOS]`` document (``document_marks: document`` in the
manifest; data prepared before 2026-12-03 marked every piece, so a cut document counted as several).
:func:`iter_documents` yields the same keys and splits without tokenizing, so a tokenizer can be trained on the
training split alone.

Work is split into tasks of about ``chunk_bytes`` of input (whole lines of a plain file; a compressed
file is one task), tokenized by ``workers`` processes and packed in input order by the parent, so the
output is byte-identical for any number of workers and (without token budgets) any chunk size, a
worker holds one chunk at a time, at most ``2 x workers`` finished chunks wait in memory, and a few large
files still spread over every worker.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm

from llmshearing.data.tokenizer import fingerprint, load_tokenizer, token_dtype, vocab_size

__all__ = ["DataPrepError", "PrepareResult", "prepare_dataset", "read_manifest", "split_of", "iter_documents", "MANIFEST", "FORMAT", "PACKING",
           "SPLITS", "HELDOUT"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OWNER_MARK = ".llmshearing-prepare"  # in every temporary folder data prep creates: what it may remove later
FORMAT = "llmshearing-mds-v2"  # v2: train/val/test split by whole document (v1: train/eval, split by piece)
# How a document cut by ``max_doc_chars`` is packed (in the manifest; what code that relies on it checks): one BOS/EOS
# pair per document, not per piece; its later pieces tokenized after their line break (no word-start marker at a cut)
PACKING = {"document_marks": "document", "later_pieces": "tokenized after a line break"}
SPLITS = ("train", "val", "test")
HELDOUT = ("val", "test")
CHUNK_BYTES = 1 << 20  # input per worker task: ~0.3 s of tokenizing, so hand-over costs <1% and work balances
SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


class DataPrepError(ValueError):
    """Bad input to data prep (a file, a folder, a flag): the message names it and the fix."""


class BadInputFile(DataPrepError):
    """An input file that cannot be read to its end (a truncated or corrupt compressed file)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(path, why)
        self.path, self.why = path, why

    def __str__(self) -> str:
        return (f"{self.path}: cannot be read to its end ({self.why}); replace or remove the file, or pass "
                "--skip-bad-files to leave it out and list it in the manifest")


def _open_text(path: Path) -> io.TextIOBase:
    """A (possibly compressed) JSON-lines file as text."""
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="strict")


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _compressed(path: Path) -> bool:
    return path.name.endswith((".gz", ".zst"))


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


def document_key(domain: str, relpath: str, offset: int) -> str:
    """The identity of one document: its domain, file (relative to the domain folder) and line's byte offset."""
    return f"{domain}/{relpath}@{offset}"


def split_of(seed: int, key: str, val_fraction: float, test_fraction: float) -> str:
    """``"val"``, ``"test"`` or ``"train"`` for the document ``key``: a seeded hash, uniform on [0, 1)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


@dataclass(frozen=True)
class _Task:
    """Whole lines ``[start, end)`` (bytes) of one input file; ``end=None``: the whole file, streamed."""

    domain: str
    path: str
    relpath: str
    start: int = 0
    end: Optional[int] = None


def _plan(files: dict[str, list[Path]], input_dir: Path, chunk_bytes: Optional[int]) -> list[_Task]:
    """Tasks in input order: each plain file cut at the first line start after every ``chunk_bytes``."""
    tasks = []
    for d, paths in files.items():
        for p in paths:
            rel = str(p.relative_to(input_dir / d))
            if _compressed(p) or not chunk_bytes:
                tasks.append(_Task(d, str(p), rel))
                continue
            size = p.stat().st_size
            bounds = [0]
            with open(p, "rb") as fh:
                while bounds[-1] + chunk_bytes < size:
                    fh.seek(bounds[-1] + chunk_bytes - 1)
                    fh.readline()  # to the end of the line holding byte start + chunk_bytes - 1
                    if fh.tell() >= size:
                        break
                    bounds.append(fh.tell())
            bounds.append(size)
            tasks.extend(_Task(d, str(p), rel, a, b) for a, b in zip(bounds[:-1], bounds[1:]))
    return tasks


def _lines(task: _Task) -> Iterator[tuple[int, bytes]]:
    """(byte offset in the uncompressed file, line) for every line of the task, newline kept or not."""
    if task.end is not None:
        with open(task.path, "rb") as fh:
            fh.seek(task.start)
            data = fh.read(task.end - task.start)
        pos = task.start
        for line in data.split(b"\n"):
            yield pos, line
            pos += len(line) + 1
        return
    with _open_binary(Path(task.path)) as fh:
        pos = 0
        for line in fh:
            yield pos, line
            pos += len(line)


@dataclass
class _ChunkResult:
    task: _Task
    # split -> (documents concatenated in input order, each [BOS] its pieces' tokens [EOS]; lengths)
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    lines: int = 0  # newline characters in the chunk: where the next chunk of the file starts counting
    text_tokens: int = 0
    documents: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line within the chunk, 1-based; why)
    seconds: float = 0.0
    bad_file: Optional[str] = None  # the file could not be read to its end (skipped: --skip-bad-files)

    def documents_of(self, split: str) -> list[np.ndarray]:
        tokens, lengths = self.splits[split]
        return np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []


_WORKER: dict = {}


def _in_order(pool, tasks: Sequence[_Task], window: int, skip) -> Iterator[_ChunkResult]:
    """Results of ``tasks`` in input order, at most ``window`` in flight (so finished chunks never pile up
    in memory), not submitting a task for which ``skip(task)`` holds when its turn comes."""
    pending: deque = deque()
    todo = iter(tasks)

    def submit() -> None:
        for task in todo:
            if not skip(task):
                pending.append(pool.apply_async(_process, (task,)))
                return

    for _ in range(window):
        submit()
    while pending:
        res = pending.popleft().get()
        submit()  # before yielding: keep the workers busy while the caller packs
        yield res


def _init_pool_worker(*args) -> None:
    """A pool worker's initializer: SIGTERM back to its default, then :func:`_init_worker`. A forked worker inherits
    the parent's handlers (Composer's turns SIGTERM into ``sys.exit``); the pool's ``terminate()`` must end it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(*args)


def _init_worker(tokenizer, seed: int, fractions: tuple[float, float], max_doc_chars: Optional[int], add_bos: bool,
                 dtype: str, skip_bad_files: bool = False) -> None:
    """``tokenizer``: a loaded tokenizer (inherited by a forked worker) or a path to load."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the worker processes
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    _WORKER.update(
        tok=tok,
        seed=seed,
        fractions=fractions,
        max_doc_chars=max_doc_chars,
        bos=[tok.bos_token_id] if add_bos and tok.bos_token_id is not None else [],
        eos=[tok.eos_token_id],
        joint=tok("\n", add_special_tokens=False)["input_ids"],  # a later piece is tokenized after this, then cut
        dtype=np.dtype(dtype),
        skip_bad_files=skip_bad_files,
    )


def _parse(task: _Task, malformed: list[tuple[int, str]], seen: Optional[list[int]] = None
           ) -> Iterator[tuple[int, str]]:
    """(byte offset, text) of every well-formed document of ``task``. A malformed line is appended to
    ``malformed`` as (line number within the task, 1-based; why); ``seen[0]`` ends as the number of lines read
    (for a chunk: its newline characters, so the next chunk of the file knows where its numbering starts)."""
    line_no = 0
    for line_no, (offset, line) in enumerate(_lines(task), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as e:
            malformed.append((line_no, f"invalid UTF-8 at byte {e.start}"))
            continue
        except json.JSONDecodeError as e:
            malformed.append((line_no, f"invalid JSON ({e.msg}, column {e.colno})"))
            continue
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            malformed.append((line_no, "no string 'text' field"))
            continue
        yield offset, text
    if seen is not None:
        # a chunk's last piece (after its last newline) belongs to the next chunk, or is the empty tail
        seen[0] = line_no - 1 if task.end is not None else line_no


_READ_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
try:
    import zstandard

    _READ_ERRORS += (zstandard.ZstdError,)
except ImportError:  # pragma: no cover - zstandard comes with mosaicml-streaming
    pass


def _process(task: _Task) -> _ChunkResult:
    """:func:`_tokenize_task`, with an input file that cannot be read to its end (a truncated ``.gz``, say) named:
    raised as :class:`BadInputFile`, or, with ``skip_bad_files``, returned as an empty result that says why."""
    try:
        return _tokenize_task(task)
    except _READ_ERRORS as e:
        why = f"{type(e).__name__}: {e}"
        if _WORKER.get("skip_bad_files"):
            empty = (np.zeros(0, dtype=_WORKER["dtype"]), np.zeros(0, dtype=np.int64))
            return _ChunkResult(task, {s: empty for s in SPLITS}, bad_file=why)
        raise BadInputFile(task.path, why) from None


def _tokenize_task(task: _Task) -> _ChunkResult:
    """Parse, tokenize and split one task. Texts are tokenized 256 pieces at a time and kept only as token
    arrays, so a worker's memory is about 2-4 bytes per token of its task (a compressed file is one task).
    The pieces of one document are joined again after tokenizing: a document is the unit of the split."""
    w = _WORKER
    t0 = time.perf_counter()
    pieces: list[str] = []  # what is tokenized: a document's later pieces after a line break (see flush)
    later: list[bool] = []  # a piece after its document's first: "\n" + its text
    owner: list[int] = []  # index into docs_split of the document each piece belongs to
    docs_split: list[str] = []
    malformed: list[tuple[int, str]] = []
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in SPLITS}
    text_tokens = 0

    def flush() -> None:
        nonlocal text_tokens
        ids = w["tok"](pieces, add_special_tokens=False)["input_ids"]
        # A later piece starts after a line break (where _split_long cuts), so it is tokenized as "\n" + piece and the
        # line break's tokens are cut off again: tokenized alone, a SentencePiece tokenizer would open it with its
        # word-start marker, a space that is not in the text (an extra indent on a line of code). Where the break
        # merges with the piece's first characters into other tokens, the piece is tokenized alone.
        joint = w["joint"]
        for k in itertools.compress(range(len(pieces)), later):
            ids[k] = (ids[k][len(joint):] if ids[k][: len(joint)] == joint
                      else w["tok"](pieces[k][1:], add_special_tokens=False)["input_ids"])
        text_tokens += sum(len(p) for p in ids)
        docs: dict[int, list[int]] = {}
        for doc_index, piece in zip(owner, ids):  # pieces of a document are consecutive
            docs.setdefault(doc_index, []).extend(piece)
        by_split: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        for doc_index, tokens in docs.items():  # one [BOS] ... [EOS] per document, however many pieces it was cut in
            by_split[docs_split[doc_index]].append(w["bos"] + tokens + w["eos"])
        for split, ds in by_split.items():
            if ds:
                lengths = np.fromiter((len(x) for x in ds), dtype=np.int64, count=len(ds))
                tokens = np.fromiter(itertools.chain.from_iterable(ds), dtype=w["dtype"], count=int(lengths.sum()))
                parts[split].append((tokens, lengths))
        pieces.clear()
        later.clear()
        owner.clear()
        docs_split.clear()

    documents = 0
    seen = [0]
    for offset, text in _parse(task, malformed, seen):
        documents += 1
        docs_split.append(split_of(w["seed"], document_key(task.domain, task.relpath, offset), *w["fractions"]))
        for k, piece in enumerate(_split_long(text, w["max_doc_chars"])):
            pieces.append(piece if k == 0 else "\n" + piece)
            later.append(k > 0)
            owner.append(len(docs_split) - 1)
        if len(pieces) >= 256:
            flush()  # only between documents: a document's pieces are never split over two flushes
    if pieces:
        flush()

    def joined(split: str) -> tuple[np.ndarray, np.ndarray]:
        ps = parts[split]
        if not ps:
            return np.zeros(0, dtype=w["dtype"]), np.zeros(0, dtype=np.int64)
        return np.concatenate([t for t, _ in ps]), np.concatenate([n for _, n in ps])

    return _ChunkResult(task, {s: joined(s) for s in SPLITS}, lines=seen[0], text_tokens=text_tokens,
                        documents=documents, malformed=malformed, seconds=time.perf_counter() - t0)


def iter_documents(input_dir: str | Path, seed: int, val_fraction: float, test_fraction: float,
                   domains: Optional[Sequence[str]] = None) -> Iterator[tuple[str, str, str]]:
    """(domain, split, text) of every well-formed document under ``input_dir``, in input order, with the split
    :func:`prepare_dataset` assigns by hash for the same seed and fractions. (A domain whose hash draws no
    held-out document lends one of its first training documents to that split in prepare; this yields it as
    ``train``.) Use it to train a tokenizer on the training split only."""
    input_dir = Path(input_dir)
    for d, paths in _discover(input_dir, domains).items():
        for p in paths:
            task = _Task(d, str(p), str(p.relative_to(input_dir / d)))
            for offset, text in _parse(task, []):
                yield d, split_of(seed, document_key(d, task.relpath, offset), val_fraction, test_fraction), text


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


def _tail_split(d: str, short: list[str], tasks: list[_Task], packers: dict, tmp: Path, seq_len: int, dtype: str,
                compression: Optional[str], fractions: dict[str, float], heldout: list[str], add_train,
                documents: int) -> dict[str, int]:
    """Re-pack domain ``d`` with its held-out splits cut from the tail of its token stream (see the caller)."""
    docs: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for task in tasks:  # a small domain: tokenized again, in the parent
        res = _process(task)
        for split in SPLITS:
            docs[split].extend(res.documents_of(split))
    stream = np.concatenate([x for split in SPLITS for x in docs[split]] or [np.zeros(0, dtype=dtype)])
    n = len(stream)
    need = {s: seq_len * max(1, int(np.ceil(fractions[s] * n / seq_len))) for s in heldout}
    if n - sum(need.values()) < seq_len:
        raise DataPrepError(
            f"domain {d!r} has {n} tokens in {documents} documents: too few for one {seq_len}-token training "
            f"sequence plus one per held-out split ({', '.join(heldout)}); add text, lower seq_len, or leave the "
            "domain out"
        )
    log.warning(
        "domain %r: %s would get no full %d-token sequence from whole documents (%d documents, %d tokens): too few "
        "documents for document-disjoint splits. Its last %s tokens are held out instead; its held-out losses are "
        "measured on documents training also reads (manifest: document_disjoint false)",
        d, "/".join(short), seq_len, documents, n, " + ".join(f"{need[s]} ({s})" for s in heldout),
    )
    for split in SPLITS:
        packers[(d, split)].finish()
        shutil.rmtree(tmp / split / d, ignore_errors=True)
        packers[(d, split)] = _Packer(tmp / split / d, seq_len, dtype, compression)
    end = n
    for split in reversed(heldout):  # test last, val before it
        packers[(d, split)].add(stream[end - need[split] : end])
        end -= need[split]
    add_train(d, stream[:end])
    return {f"{s}_tokens": need[s] for s in heldout}


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` wrote."""

    output: Path
    manifest: dict
    seconds: float
    tokenize_seconds: float


def _discover(input_dir: Path, domains: Optional[Sequence[str]]) -> dict[str, list[Path]]:
    if not input_dir.is_dir():
        raise DataPrepError(f"input folder {input_dir} does not exist; it must hold one sub-folder per domain")
    found = {d.name: d for d in sorted(input_dir.iterdir()) if d.is_dir()}
    names = list(domains) if domains else list(found)
    if not names:
        raise DataPrepError(f"{input_dir} has no domain sub-folders; expected <input>/<domain>/*.jsonl")
    out = {}
    for name in names:
        if name not in found:
            raise DataPrepError(f"domain folder {input_dir / name} is missing (domains found: {sorted(found)}); fix "
                                "--domains")
        files = sorted(p for p in found[name].rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise DataPrepError(f"domain {name!r} is empty: no {'/'.join(SUFFIXES)} files under {found[name]}; add "
                                f"files or leave the domain out with --domains (found: {sorted(found)})")
        out[name] = files
    return out


def prepare_dataset(
    input_dir: str | Path,
    output_dir: str | Path,
    tokenizer: str,
    seq_len: int,
    *,
    domains: Optional[Sequence[str]] = None,
    val_fraction: float = 0.01,
    test_fraction: float = 0.01,
    max_doc_chars: Optional[int] = None,
    max_tokens: Optional[dict[str, int]] = None,
    seed: int = 0,
    workers: int = 1,
    chunk_bytes: Optional[int] = CHUNK_BYTES,
    add_bos: bool = True,
    compression: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    skip_bad_files: bool = False,
    input_identity: Optional[dict[str, Any]] = None,
) -> PrepareResult:
    """Tokenize and pack a RedPajama-style folder into per-domain MDS datasets (see module docstring).

    Args:
        input_dir: folder with one sub-folder per domain.
        output_dir: where to write; must not exist unless ``overwrite``.
        tokenizer: Hugging Face tokenizer directory or SentencePiece ``.model`` file.
        seq_len: tokens per sequence.
        domains: domains to include (default: every sub-folder).
        val_fraction: share of documents held out for validation (evaluation during training, dynamic loading,
            any tuning).
        test_fraction: share of documents held out for testing (reported results only).
        max_doc_chars: cut longer documents into pieces first (None: never).
        max_tokens: optional per-domain cap on training tokens (a mixture budget). A domain's input is read
            only up to the chunk in which its budget fills; the rest is never tokenized, and its held-out
            documents come from the same prefix.
        seed: seed of the document -> split assignment.
        workers: tokenizer processes.
        chunk_bytes: input per task (plain files are cut at line starts; None: one task per file).
        add_bos: start every document with BOS (when the tokenizer has one).
        compression: MDS shard compression (e.g. ``zstd``) or None.
        overwrite: replace an existing output.
        progress: show a progress bar.
        skip_bad_files: leave out an input file that cannot be read to its end (a truncated or corrupt compressed
            file) and list it in the manifest (``skipped_files``) instead of stopping.
        input_identity: what the input was, for the manifest (default: the input folder and its files).

    Raises:
        DataPrepError: bad input (a :class:`BadInputFile` for an unreadable file), naming it and the fix; checks
            of the folders, flags and tokenizer happen before any tokenization.
        FileExistsError: the output exists and ``overwrite`` is false.
    """
    t_start = time.perf_counter()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if chunk_bytes is not None and chunk_bytes < 1:
        raise DataPrepError(f"chunk_bytes must be a positive number of bytes or None (one task per file), got {chunk_bytes}")
    if seq_len < 2:
        raise DataPrepError(f"seq_len must be >= 2, got {seq_len}; give --seq-len, e.g. the model's context (4096)")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise DataPrepError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise DataPrepError(f"val_fraction + test_fraction must leave documents for training, got "
                         f"{val_fraction} + {test_fraction}")
    fractions = {"val": val_fraction, "test": test_fraction}
    heldout = [s for s in HELDOUT if fractions[s] > 0]
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; choose another output folder or pass --overwrite to replace it")
    files = _discover(input_dir, domains)
    unknown_budget = set(max_tokens or {}) - set(files)
    if unknown_budget:
        raise DataPrepError(f"max_tokens names unknown domains {sorted(unknown_budget)}; domains are {list(files)}")
    try:
        tok = load_tokenizer(tokenizer)
    except (OSError, ValueError) as e:
        raise DataPrepError(f"--tokenizer {tokenizer}: {e}") from None
    n_vocab = vocab_size(tok)
    dtype = token_dtype(n_vocab)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.tmp-", dir=output_dir.parent))  # ours alone
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the dataset's: keep the usual permissions
    (tmp / OWNER_MARK).write_text(f"{os.getpid()}\n")
    try:
        return _prepare_into(tmp, input_dir, output_dir, tokenizer, tok, n_vocab, dtype, seq_len, files, fractions,
                             heldout, val_fraction, test_fraction, max_doc_chars, max_tokens, seed, workers,
                             chunk_bytes, add_bos, compression, progress, skip_bad_files, t_start, input_identity)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary output, on every error (Ctrl-C included)
        raise


def _inputs_identity(input_dir: str | Path, files: dict[str, list[Path]]) -> dict[str, Any]:
    """What the dataset was made from: the input folder and a hash of its files' names, sizes and modification times
    (a run that reuses prepared data can tell whether its input changed)."""
    root = Path(input_dir).resolve()
    entries = []
    for d, fs in sorted(files.items()):
        for f in sorted(fs):
            st = Path(f).stat()
            entries.append(f"{d}/{Path(f).resolve().relative_to(root) if Path(f).resolve().is_relative_to(root) else f}"
                           f"|{st.st_size}|{st.st_mtime_ns}")
    return {"path": str(root), "files_sha256": hashlib.sha256("\n".join(entries).encode()).hexdigest(),
            "domains": sorted(files)}


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Remove temporary folders of earlier, killed runs for ``output_dir``: only folders data prep created
    (they hold :data:`OWNER_MARK`) whose process is gone."""
    for old in output_dir.parent.glob(f"{output_dir.name}.tmp-*"):
        mark = old / OWNER_MARK
        if not mark.is_file():
            continue  # not ours: never touched
        try:
            pid = int(mark.read_text().strip())
            os.kill(pid, 0)
            continue  # its process still runs (another data prep of the same output)
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        log.info("removing %s, left by an interrupted data prep", old)
        shutil.rmtree(old, ignore_errors=True)


def _replace_atomically(tmp: Path, output_dir: Path) -> None:
    """Move ``tmp`` to ``output_dir``; an existing output is renamed aside first and deleted only after the new
    one is in place (a kill in between leaves it under ``<output>.old-*``, never lost)."""
    if not output_dir.exists():
        os.replace(tmp, output_dir)
        return
    aside = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.old-", dir=output_dir.parent))
    os.replace(output_dir, aside / output_dir.name)
    os.replace(tmp, output_dir)
    shutil.rmtree(aside)


def _prepare_into(tmp, input_dir, output_dir, tokenizer, tok, n_vocab, dtype, seq_len, files, fractions, heldout,
                  val_fraction, test_fraction, max_doc_chars, max_tokens, seed, workers, chunk_bytes, add_bos,
                  compression, progress, skip_bad_files, t_start, input_identity=None) -> PrepareResult:
    """The body of :func:`prepare_dataset`, writing into ``tmp`` (which the caller removes on any error)."""
    packers = {
        (d, split): _Packer(tmp / split / d, seq_len, dtype, compression) for d in files for split in SPLITS
    }
    stats = {d: {"documents": 0, "text_tokens": 0, "files": len(fs), "malformed": [], "skipped_files": []}
             for d, fs in files.items()}
    # The first training documents of each domain (one per held-out split) are held back and packed last:
    # into training when the domain drew held-out documents by hash, else one into each empty held-out split
    # (a domain never has an empty held-out split while it has documents to spare). Holding them whatever
    # comes later keeps the output independent of how the input was chunked.
    held: dict[str, list[np.ndarray]] = {d: [] for d in files}
    drawn = {(d, s): 0 for d in files for s in HELDOUT}
    budget_hit = {d: False for d in files}

    def add_train(d: str, doc: np.ndarray) -> None:
        if budget_hit[d]:
            return
        packer = packers[(d, "train")]
        cap = (max_tokens or {}).get(d)
        if cap is not None and packer.tokens + packer.buffered + len(doc) > cap:
            doc = doc[: max(0, cap - packer.tokens - packer.buffered)]
            budget_hit[d] = True
        packer.add(doc)

    tasks = _plan(files, input_dir, chunk_bytes)
    lines_before: dict[tuple[str, str], int] = {}  # lines of the file in its chunks already consumed
    tokenize_seconds = 0.0

    results: Iterator[_ChunkResult]
    if workers > 1:
        if "fork" in mp.get_all_start_methods():
            # Forked workers inherit the loaded tokenizer (the parent has never run it, so no tokenizer
            # thread pool exists to be broken by the fork) and skip re-importing torch and transformers.
            ctx, worker_tok = mp.get_context("fork"), tok
        else:
            # Spawned workers load it themselves; a bare SentencePiece model is converted to a fast
            # tokenizer once here, not in every worker.
            ctx, worker_tok = mp.get_context("spawn"), str(tokenizer)
            if Path(tokenizer).is_file():
                worker_tok = str(tmp / "_tokenizer")
                tok.save_pretrained(worker_tok)
        pool = ctx.Pool(workers, initializer=_init_pool_worker,
                        initargs=(worker_tok, seed, (val_fraction, test_fraction), max_doc_chars, add_bos, dtype,
                                  skip_bad_files))
        results = _in_order(pool, tasks, window=2 * workers, skip=lambda t: budget_hit[t.domain])
    else:
        pool = None
        _init_worker(tok, seed, (val_fraction, test_fraction), max_doc_chars, add_bos, dtype, skip_bad_files)
        results = (_process(t) for t in tasks if not budget_hit[t.domain])
    failed = True
    try:
        for res in tqdm(results, total=len(tasks), desc="tokenizing", disable=not progress, unit="chunk"):
            d, relpath = res.task.domain, res.task.relpath
            if budget_hit[d]:
                continue  # tokenized while the budget ran out in an earlier chunk: not used, not counted
            if res.bad_file is not None:
                stats[d]["skipped_files"].append({"file": relpath, "error": res.bad_file})
                log.warning("%s/%s skipped (--skip-bad-files): %s", d, relpath, res.bad_file)
                continue
            tokenize_seconds += res.seconds
            st = stats[d]
            st["documents"] += res.documents
            st["text_tokens"] += res.text_tokens
            first_line = lines_before.get((d, relpath), 0)
            lines_before[(d, relpath)] = first_line + res.lines
            for line_no, why in res.malformed:
                st["malformed"].append({"file": relpath, "line": first_line + line_no, "error": why})
                log.warning("%s/%s line %d skipped: %s", d, relpath, first_line + line_no, why)
            for split in HELDOUT:
                for doc in res.documents_of(split):
                    packers[(d, split)].add(doc)
                drawn[(d, split)] += len(res.splits[split][1])
            for doc in res.documents_of("train"):
                if len(held[d]) < len(heldout):
                    held[d].append(doc.copy())  # not a view that keeps the whole chunk alive
                else:
                    add_train(d, doc)
        failed = False
    finally:
        if pool is not None:
            if failed:
                pool.terminate()  # a worker's error (or Ctrl-C): stop the others now
            else:
                pool.close()
            pool.join()

    lent: dict[str, list[str]] = {d: [] for d in files}
    for d, docs in held.items():
        for split in heldout:
            if drawn[(d, split)] == 0 and docs:  # the hash drew no document of this domain for this split
                packers[(d, split)].add(docs.pop(0))
                lent[d].append(split)
                log.warning("domain %r: no document drew the %s split by hash; one of its first training "
                            "documents was moved there (raise --%s-fraction for a random choice)", d, split, split)
        for doc in docs:
            add_train(d, doc)
    # A domain too small for document-disjoint splits (a split without one full sequence: e.g. one long book, or
    # held-out documents shorter than seq_len together) holds out the tail of its token stream instead: its
    # documents in split order (train, then the val and test documents the hash drew), the last tokens to test,
    # the ones before to val, the rest to training. Marked ``document_disjoint: false`` and reported apart.
    tail_split: dict[str, dict[str, int]] = {}
    for d in files:
        short = [s for s in ("train", *heldout) if packers[(d, s)].sequences == 0]
        if short:
            if not _WORKER:  # the tokenizing ran in worker processes
                _init_worker(tok, seed, (val_fraction, test_fraction), max_doc_chars, add_bos, dtype, skip_bad_files)
            budget_hit[d] = False  # re-packed from the start, under the same budget
            tail_split[d] = _tail_split(d, short, [t for t in tasks if t.domain == d], packers, tmp, seq_len, dtype,
                                        compression, fractions, heldout, add_train, stats[d]["documents"])
    manifest_domains = {}
    for d in files:
        entry = dict(stats[d])
        for split in SPLITS:
            p = packers[(d, split)]
            dropped = p.finish()
            entry[split] = {"sequences": p.sequences, "tokens": p.tokens, "dropped_tail_tokens": dropped}
            if split != "train":
                entry[split]["documents"] = None if d in tail_split else drawn[(d, split)] + (split in lent[d])
        entry["lent_to_heldout"] = lent[d]
        entry["document_disjoint"] = d not in tail_split
        if d in tail_split:
            entry["tail_split"] = tail_split[d]
        manifest_domains[d] = entry
        if entry["train"]["sequences"] == 0:
            raise DataPrepError(
                f"domain {d!r} produced no training sequence of {seq_len} tokens "
                f"({entry['documents']} documents, {entry['text_tokens']} tokens); add text, lower seq_len, "
                "or leave the domain out"
            )
        for split in heldout:
            if entry[split]["sequences"] == 0:
                log.warning("domain %r has no full %s sequence (its held-out documents are shorter than seq_len "
                            "together); raise --%s-fraction", d, split, split)
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
            "fingerprint": fingerprint(tok),  # training checks the model's tokenizer encodes these alike
        },
        "inputs": input_identity or _inputs_identity(input_dir, files),
        "seed": seed,
        "split_unit": "document",  # every piece of a document is in one split (except in not_document_disjoint)
        "not_document_disjoint": sorted(tail_split),
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "max_doc_chars": max_doc_chars,
        **PACKING,
        "domains": manifest_domains,
    }
    shutil.rmtree(tmp / "_tokenizer", ignore_errors=True)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (tmp / OWNER_MARK).unlink()
    _replace_atomically(tmp, output_dir)
    skipped = [f"{d}/{f['file']}" for d, st in stats.items() for f in st["skipped_files"]]
    if skipped:
        log.warning("%d unreadable input files left out (--skip-bad-files): %s; listed under 'skipped_files' in %s",
                    len(skipped), skipped, output_dir / MANIFEST)
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
    if manifest.get("format") == "llmshearing-mds-v1":
        raise ValueError(
            f"{root} was prepared by an older llmshearing (format v1: one 'eval' split assigned per piece of a "
            "document, so pieces of one document could be in both splits; no test split); prepare it again with "
            "`python data_prep/prepare_data.py` (train/val/test split by whole document)"
        )
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
