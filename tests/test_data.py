"""Data prep and the domain batch sampler."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from llmshearing.data import DomainBatchSampler, DomainExhausted, DomainTokenDataset, load_manifest
from llmshearing.data.prepare import DataPrepError, prepare_dataset
from tests.helpers import LLAMA2_TOKENIZER, REDPAJAMA

needs_shared = pytest.mark.skipif(
    not (REDPAJAMA.is_dir() and LLAMA2_TOKENIZER.is_file()), reason="../shared RedPajama sample / LLaMA-2 tokenizer absent"
)


@needs_shared
def test_redpajama_prep_counts_match_direct_tokenization(tmp_path):
    import sentencepiece as spm

    domains = ["arxiv", "github", "wiki"]
    res = prepare_dataset(REDPAJAMA, tmp_path / "out", str(LLAMA2_TOKENIZER), 256, domains=domains,
                          val_fraction=0.1, test_fraction=0.1, max_doc_chars=None, workers=2, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    for d in domains:
        texts = [json.loads(line)["text"] for f in sorted((REDPAJAMA / d).glob("*.jsonl")) for line in open(f)]
        direct = sum(len(ids) for ids in sp.encode(texts))
        entry = res.manifest["domains"][d]
        assert entry["text_tokens"] == direct
        written = sum(entry[s]["tokens"] for s in ("train", "val", "test"))
        dropped = sum(entry[s]["dropped_tail_tokens"] for s in ("train", "val", "test"))
        assert written + dropped == direct + 2 * entry["documents"]  # + BOS and EOS per document
    assert res.manifest["dtype"] == "uint16"


@needs_shared
def test_first_sequence_decodes_to_start_of_first_document(tmp_path):
    from llmshearing.data.tokenizer import load_tokenizer

    prepare_dataset(REDPAJAMA, tmp_path / "out", str(LLAMA2_TOKENIZER), 64, domains=["wiki"], val_fraction=0.0, test_fraction=0.0,
                    progress=False)
    ds = DomainTokenDataset(str(tmp_path / "out"), "train", ["wiki"], 64)
    tok = load_tokenizer(str(LLAMA2_TOKENIZER))
    first_doc = json.loads(open(next((REDPAJAMA / "wiki").glob("*.jsonl"))).readline())["text"]
    ids = ds[0]["input_ids"].tolist()
    assert ids[0] == tok.bos_token_id
    text = tok.decode(ids, skip_special_tokens=True)
    assert first_doc.startswith(text[:150].strip()[:100])


@pytest.mark.parametrize("chunk_bytes", [None, 100])
def test_malformed_lines_are_reported_by_line(tmp_path, small_tokenizer, chunk_bytes):
    src = tmp_path / "in" / "web"
    src.mkdir(parents=True)
    lines = [json.dumps({"text": "good text number %d " % i * 20}) for i in range(30)]
    lines[4] = "{not json"
    lines[9] = json.dumps({"meta": "no text"})
    blob = ("\n".join(lines) + "\n").encode()
    blob = blob.replace(b'"good text number 20', b'"good text number \xff20')  # line 21: not UTF-8
    (src / "a.jsonl").write_bytes(blob)
    res = prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 16, val_fraction=0.1, test_fraction=0.1,
                          chunk_bytes=chunk_bytes, progress=False)
    bad = res.manifest["domains"]["web"]["malformed"]
    assert [(b["file"], b["line"]) for b in bad] == [("a.jsonl", 5), ("a.jsonl", 10), ("a.jsonl", 21)]
    assert "invalid JSON" in bad[0]["error"] and "text" in bad[1]["error"] and "UTF-8" in bad[2]["error"]
    assert res.manifest["domains"]["web"]["documents"] == 27


def test_workers_and_chunk_size_do_not_change_the_output(tmp_path, small_tokenizer):
    """Work is cut into chunks at line starts and packed in input order: the shards are the same bytes."""
    for domain, n in (("web", 80), ("code", 45)):
        src = tmp_path / "in" / domain
        src.mkdir(parents=True)
        for f in range(2):
            docs = [json.dumps({"text": f"{domain} {f} doc {i} " + "more words " * (i % 13)}) for i in range(n)]
            docs[7] = "{broken"
            (src / f"part{f}.jsonl").write_text("\r\n".join(docs) + ("\n" if f else ""))  # CRLF, no final newline
    outputs = []
    for i, (workers, chunk) in enumerate([(1, None), (2, 300), (1, 1), (2, None)]):
        res = prepare_dataset(tmp_path / "in", tmp_path / f"o{i}", small_tokenizer, 16, val_fraction=0.1, test_fraction=0.1,
                              workers=workers, chunk_bytes=chunk, progress=False)
        files = {p.relative_to(res.output): p.read_bytes() for p in sorted(res.output.rglob("*")) if p.is_file()}
        outputs.append((res.manifest["domains"], files))
    assert outputs[0][0]["web"]["documents"] == 158 and outputs[0][0]["code"]["malformed"][1]["line"] == 8
    assert outputs[0][0]["web"]["val"]["sequences"] > 0 and outputs[0][0]["web"]["test"]["sequences"] > 0
    for other in outputs[1:]:
        assert other == outputs[0]


def test_compressed_inputs_give_the_same_dataset_as_plain_ones(tmp_path, small_tokenizer):
    import gzip

    import zstandard

    lines = [json.dumps({"text": f"document {i}: " + "some words here " * (5 + i % 7), "meta": {}}) for i in range(60)]
    blob = ("\n".join(lines) + "\n").encode()
    for name, write in {
        "plain": lambda d: (d / "part.jsonl").write_bytes(blob),
        "packed": lambda d: ((d / "a.jsonl.gz").write_bytes(gzip.compress(blob[: blob.index(b"\n", 2000) + 1])),
                             (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
                                 blob[blob.index(b"\n", 2000) + 1 :]))),
    }.items():
        (tmp_path / name / "web").mkdir(parents=True)
        write(tmp_path / name / "web")
    plain = prepare_dataset(tmp_path / "plain", tmp_path / "o1", small_tokenizer, 16, val_fraction=0.0, test_fraction=0.0, progress=False)
    packed = prepare_dataset(tmp_path / "packed", tmp_path / "o2", small_tokenizer, 16, val_fraction=0.0, test_fraction=0.0,
                             progress=False)
    a, b = plain.manifest["domains"]["web"], packed.manifest["domains"]["web"]
    assert (a["documents"], a["text_tokens"]) == (b["documents"], b["text_tokens"]) == (60, a["text_tokens"])
    assert b["files"] == 2 and a["train"] == b["train"]
    x = DomainTokenDataset(str(tmp_path / "o1"), "train", ["web"], 16)
    y = DomainTokenDataset(str(tmp_path / "o2"), "train", ["web"], 16)
    assert all(np.array_equal(x[i]["input_ids"], y[i]["input_ids"]) for i in range(len(x)))


def test_token_budget_caps_a_domain(tmp_path, small_tokenizer):
    src = tmp_path / "in" / "web"
    src.mkdir(parents=True)
    (src / "a.jsonl").write_text("".join(json.dumps({"text": "words and more words " * 30}) + "\n" for _ in range(40)))
    res = prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 16, val_fraction=0.0, test_fraction=0.0,
                          max_tokens={"web": 200}, progress=False)
    assert res.manifest["domains"]["web"]["train"]["tokens"] == 192  # 12 full sequences of the 200-token budget
    # Reading stops after the chunk that fills the budget, the same way for any number of workers.
    small = [prepare_dataset(tmp_path / "in", tmp_path / f"c{w}", small_tokenizer, 16, val_fraction=0.0, test_fraction=0.0,
                             max_tokens={"web": 200}, workers=w, chunk_bytes=1000, progress=False) for w in (1, 2)]
    web = small[0].manifest["domains"]["web"]
    assert web["train"]["tokens"] == 192 and web["documents"] < 40 / 2  # most chunks never tokenized
    assert small[1].manifest == small[0].manifest
    with pytest.raises(ValueError, match="unknown domains"):
        prepare_dataset(tmp_path / "in", tmp_path / "o2", small_tokenizer, 16, max_tokens={"nope": 1}, progress=False)


def test_bad_inputs_fail_before_tokenizing(tmp_path, small_tokenizer):
    (tmp_path / "in" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="domain 'empty' is empty"):
        prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 16, progress=False)
    with pytest.raises(DataPrepError, match="missing"):
        prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 16, domains=["nope"], progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset(tmp_path / "in", tmp_path / "exists", small_tokenizer, 16, progress=False)


def test_bad_split_name_is_refused(mds_data):
    with pytest.raises(ValueError, match="unknown split 'eval'"):
        DomainTokenDataset(mds_data, "eval", ["code"], 64)
    with pytest.raises(ValueError, match="longer than the prepared sequences"):
        DomainTokenDataset(mds_data, "train", ["code"], 65)


def _sampler(**kw):
    args = dict(sizes=[500, 300, 200], offsets=[0, 500, 800], proportions=[0.5, 0.3, 0.2], global_batch_size=8, seed=1)
    args.update(kw)
    return DomainBatchSampler(**args)


def _domain(idx):
    return 0 if idx < 500 else 1 if idx < 800 else 2


def test_realised_mixture_matches_proportions():
    s = _sampler(sizes=[5000, 5000, 5000], offsets=[0, 5000, 10000], global_batch_size=20)
    counts = np.zeros(3)
    it = iter(s)
    for _ in range(100):  # 2000 samples
        for i in next(it):
            counts[min(i // 5000, 2)] += 1
    p = np.array([0.5, 0.3, 0.2])
    sd = np.sqrt(2000 * p * (1 - p))
    assert np.all(np.abs(counts - 2000 * p) < 4 * sd), counts


def test_each_sample_once_per_domain_pass_and_stop_mode():
    s = _sampler(proportions=[1.0, 0.0, 0.0], on_exhausted="stop")
    seen = [i for _ in range(62) for i in s.draw_global_batch()]
    assert len(seen) == len(set(seen)) == 496
    with pytest.raises(DomainExhausted, match="no unseen sequences"):
        for _ in range(2):
            s.draw_global_batch()


def test_global_batches_are_the_same_for_any_world_size():
    one = iter(_sampler())
    two = [iter(_sampler(rank=r, world_size=2)) for r in range(2)]
    for _ in range(20):
        assert next(one) == next(two[0]) + next(two[1])


def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run():
    a = _sampler(lag=2)
    ita = iter(a)
    head = [next(ita) for _ in range(7)]  # 7 consumed, 2 more prefetched below
    a.set_proportions([0.1, 0.1, 0.8], consumed_batches=7)
    state = a.state_dict(num_samples=7 * 8)
    prefetched = [next(ita) for _ in range(2)]
    tail = [next(ita) for _ in range(10)]
    b = _sampler(lag=2)
    b.load_state_dict(state)
    itb = iter(b)
    assert [next(itb) for _ in range(12)] == prefetched + tail
    assert head  # the first part was drawn


def test_proportion_change_reaches_workers_within_lag(mds_data):
    manifest = load_manifest(mds_data)
    domains = list(manifest["domains"])
    ds = DomainTokenDataset(mds_data, "train", domains, 64, manifest=manifest)
    workers, prefetch = 2, 2
    sampler = DomainBatchSampler(ds.sizes, ds.offsets, [1.0, 0.0, 0.0], 4, seed=0, lag=workers * prefetch)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, prefetch_factor=prefetch)
    seen = []
    for n, batch in enumerate(loader):
        seen.append(set(batch["domain_id"].tolist()))
        if n == 3:
            sampler.set_proportions([0.0, 0.0, 1.0], consumed_batches=n + 1)
        if n == 3 + workers * prefetch + 2:
            break
    assert all(s == {0} for s in seen[:4])
    first_new = next(i for i, s in enumerate(seen) if s == {2})
    assert first_new - 3 <= workers * prefetch + 1


def test_remote_dataset_is_fetched_into_the_local_cache(mds_data, tmp_path):
    """data.remote: the manifest and shards come through streaming's downloaders (a path stands in for s3://)."""
    import torch

    cache = tmp_path / "cache"
    manifest = load_manifest(str(cache), remote=mds_data)
    domains = list(manifest["domains"])
    remote = DomainTokenDataset(str(cache), "train", domains, 64, remote=mds_data, manifest=manifest)
    local = DomainTokenDataset(mds_data, "train", domains, 64)
    assert len(remote) == len(local)
    assert all(torch.equal(remote[i]["input_ids"], local[i]["input_ids"]) for i in range(0, len(local), 7))
    assert (cache / "manifest.json").is_file() and any((cache / "train" / domains[0]).glob("shard.*.mds"))
    # another rank's fetch of the same manifest renews its time stamp, not the dataset: the same instance serves
    from llmshearing.data.dataset import _streaming_dataset

    first = _streaming_dataset(str(cache), mds_data, "train", tuple(domains))
    os.utime(cache / "manifest.json", ns=(1, 1))
    assert _streaming_dataset(str(cache), mds_data, "train", tuple(domains)) is first


def test_ranks_that_fetch_the_remote_manifest_together_never_read_a_half_written_one(mds_data, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from streaming.base.storage import CloudDownloader

    whole = (Path(mds_data) / "manifest.json").read_bytes()

    def slow_download(url, dest, timeout=60):  # a fetch from an object store, in two parts
        with open(dest, "wb") as f:
            f.write(whole[: len(whole) // 2])
            f.flush()
            time.sleep(0.3)
            f.write(whole[len(whole) // 2:])

    monkeypatch.setattr(CloudDownloader, "direct_download", staticmethod(slow_download))
    cache = tmp_path / "cache"

    def rank(i):
        time.sleep(0.1 * i)  # the ranks of a node start within moments of each other
        return load_manifest(str(cache), remote=mds_data)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(rank, range(4)))
    assert all(g == got[0] for g in got)
    assert [p.name for p in cache.iterdir()] == ["manifest.json"] and (cache / "manifest.json").read_bytes() == whole


def _sleep_as_a_pool_worker(tok):
    from llmshearing.data import prepare

    prepare._init_pool_worker(tok, 0, (0.1, 0.1), None, True, "uint16")
    time.sleep(60)


def test_pool_workers_end_on_sigterm_whatever_handler_the_parent_installed(small_tokenizer):
    """A forked worker inherits the parent's handlers; Composer's turns SIGTERM into sys.exit, which a worker can
    survive (a data-prep worker in a process that had trained before outlived the pool's terminate()). The pool's
    initializer restores the default, so the signal itself ends the worker."""
    import multiprocessing as mp
    import signal
    import sys

    from llmshearing.data.tokenizer import load_tokenizer

    tok = load_tokenizer(small_tokenizer)
    before = signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    try:
        p = mp.get_context("fork").Process(target=_sleep_as_a_pool_worker, args=(tok,))
        p.start()
        time.sleep(2)
        p.terminate()
        p.join(10)
        assert p.exitcode == -signal.SIGTERM  # killed by the signal, not 143 from the inherited handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_spawned_workers_give_the_same_output(tmp_path, small_tokenizer, monkeypatch):
    """Where fork is unavailable (macOS, Windows) workers are spawned and load the tokenizer themselves."""
    import multiprocessing as mp

    src = tmp_path / "in" / "web"
    src.mkdir(parents=True)
    (src / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " + "words " * i}) + "\n" for i in range(60)))
    forked = prepare_dataset(tmp_path / "in", tmp_path / "o1", small_tokenizer, 16, val_fraction=0.1, test_fraction=0.1, workers=2,
                             chunk_bytes=500, progress=False)
    monkeypatch.setattr(mp, "get_all_start_methods", lambda: ["spawn"])
    spawned = prepare_dataset(tmp_path / "in", tmp_path / "o2", small_tokenizer, 16, val_fraction=0.1, test_fraction=0.1, workers=2,
                              chunk_bytes=500, progress=False)
    assert spawned.manifest["domains"] == forked.manifest["domains"]
    for p in sorted(forked.output.rglob("*.mds")):
        assert (spawned.output / p.relative_to(forked.output)).read_bytes() == p.read_bytes()


def _open_every_split(data: str, start, results) -> None:
    from llmshearing.data.dataset import _streaming_dataset

    domains = tuple(load_manifest(data)["domains"])
    start.wait()  # every process registers its shared memory at once
    try:
        for split in ("train", "val", "test"):
            _streaming_dataset(data, None, split, domains)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the test reports what failed
        results.put(repr(e))


def test_runs_that_start_together_on_one_machine_each_get_their_own_shared_memory(mds_data):
    """streaming picks a dataset's shared-memory name by probing for a free one and then creating it: without
    the registry lock, three runs starting at once failed with FileExistsError ('/000000_locals') in all but one."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_every_split, args=(mds_data, start, results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok"] * 3, outcomes
