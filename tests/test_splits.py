"""The evidence protocol's data guarantees: train / val / test share no document (not even a piece of one),
the embedded corpus's domains share no source file, and a tokenizer can be trained on the training split only."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from llmshearing.data import DomainTokenDataset
from llmshearing.data.prepare import iter_documents, prepare_dataset, read_manifest
from llmshearing.data.tokenizer import load_tokenizer

MARK = re.compile(r"qd(\d{3})q")


def _marked_corpus(root, n_docs: int = 60, lines: int = 12) -> None:
    """One domain of documents whose every line carries the document's marker ``qdNNNq``."""
    src = root / "web"
    src.mkdir(parents=True)
    with open(src / "a.jsonl", "w") as fh:
        for i in range(n_docs):
            text = "\n".join(f"qd{i:03d}q line {k} of a document about things" for k in range(lines))
            fh.write(json.dumps({"text": text}) + "\n")


def _markers(data, split: str, tokenizer) -> set[int]:
    """Document markers found in the decoded text of a split (its sequences in order form one token stream)."""
    ds = DomainTokenDataset(str(data), split, ["web"], read_manifest(data)["seq_len"])
    if len(ds) == 0:
        return set()
    ids = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
    return {int(m) for m in MARK.findall(tokenizer.decode(ids.tolist(), skip_special_tokens=True))}


@pytest.mark.parametrize("workers,chunk_bytes", [(1, None), (2, 500)])
def test_pieces_of_one_document_never_land_in_two_splits(tmp_path, small_tokenizer, workers, chunk_bytes):
    """Documents are cut into ~5 pieces each (max_doc_chars); the split must be decided for the whole document.
    Assigning splits per piece (the v1 behaviour) puts pieces of most held-out documents into training."""
    _marked_corpus(tmp_path / "in")
    res = prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 16, val_fraction=0.2, test_fraction=0.2,
                          max_doc_chars=100, workers=workers, chunk_bytes=chunk_bytes, progress=False)
    tok = load_tokenizer(small_tokenizer)
    found = {s: _markers(res.output, s, tok) for s in ("train", "val", "test")}
    assert found["val"] and found["test"] and len(found["train"]) >= 25
    assert not found["train"] & found["val"]
    assert not found["train"] & found["test"]
    assert not found["val"] & found["test"]
    # the split is the hash's, document by document, as iter_documents reports it (what a tokenizer trains on)
    expected = {s: set() for s in ("train", "val", "test")}
    for _, split, text in iter_documents(tmp_path / "in", 0, 0.2, 0.2):
        expected[split].add(int(MARK.search(text).group(1)))
    for s in ("val", "test"):
        assert found[s] <= expected[s]  # a packed split drops at most its tail, never gains a document
        assert len(expected[s] - found[s]) <= 1
    assert res.manifest["split_unit"] == "document"
    web = res.manifest["domains"]["web"]
    assert web["val"]["documents"] == len(expected["val"]) and web["test"]["documents"] == len(expected["test"])


def test_a_domain_without_hashed_heldout_documents_lends_whole_documents(tmp_path, small_tokenizer):
    _marked_corpus(tmp_path / "in", n_docs=4)
    res = prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 16, val_fraction=0.001,
                          test_fraction=0.001, max_doc_chars=100, progress=False)
    web = res.manifest["domains"]["web"]
    assert web["lent_to_heldout"] == ["val", "test"]
    tok = load_tokenizer(small_tokenizer)
    found = {s: _markers(res.output, s, tok) for s in ("train", "val", "test")}
    assert found["val"] == {0} and found["test"] == {1} and found["train"] == {2, 3}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_single_document_domain_holds_out_its_tail_and_says_so(tmp_path, small_tokenizer, workers, caplog):
    """One long document (a book) cannot be split by document: its tail is held out, the domain is marked."""
    _marked_corpus(tmp_path / "in", n_docs=40)
    book = tmp_path / "in" / "book"
    book.mkdir()
    lines = [f"line {k} of the only book, chapter {k // 10}" for k in range(400)]
    (book / "b.jsonl").write_text(json.dumps({"text": "\n".join(lines)}) + "\n")
    with caplog.at_level("WARNING"):
        res = prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 32, val_fraction=0.05,
                              test_fraction=0.05, workers=workers, chunk_bytes=300, progress=False)
    entry = res.manifest["domains"]["book"]
    assert entry["document_disjoint"] is False and res.manifest["not_document_disjoint"] == ["book"]
    assert res.manifest["domains"]["web"]["document_disjoint"] is True
    assert all(entry[s]["sequences"] >= 1 for s in ("train", "val", "test"))
    assert entry["val"]["tokens"] == entry["tail_split"]["val_tokens"] and entry["train"]["sequences"] > 10
    assert "too few documents for document-disjoint splits" in caplog.text
    # the held-out splits are the end of the book, in order: test holds its last line
    tok = load_tokenizer(small_tokenizer)
    ds = {s: DomainTokenDataset(str(res.output), s, ["book"], 32) for s in ("train", "val", "test")}
    text = {s: tok.decode(np.concatenate([d[i]["input_ids"].numpy() for i in range(len(d))]).tolist(),
                          skip_special_tokens=True) for s, d in ds.items()}
    assert "line 399 " in text["test"] + " " and "line 0 " in text["train"]
    assert "line 399 " not in text["train"] + " " and "line 0 " not in text["val"]


def test_a_domain_too_small_for_any_split_names_the_cause(tmp_path, small_tokenizer):
    _marked_corpus(tmp_path / "in", n_docs=40)
    (tmp_path / "in" / "tiny").mkdir()
    (tmp_path / "in" / "tiny" / "t.jsonl").write_text(json.dumps({"text": "a few words"}) + "\n")
    with pytest.raises(ValueError, match="'tiny' has .* tokens in 1 documents: too few for one 32-token training"):
        prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 32, val_fraction=0.05,
                        test_fraction=0.05, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_version_1_datasets_are_refused_with_the_reason(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "llmshearing-mds-v1"}))
    with pytest.raises(ValueError, match="prepare it again"):
        read_manifest(tmp_path)


def test_tokenizer_trains_on_the_training_split_only(tmp_path):
    """Held-out documents get a word no training document has; with the split given, the vocabulary must not
    learn it (without the split, it does)."""
    from llmshearing.data.train_tokenizer import train_tokenizer

    src = tmp_path / "in" / "web"
    src.mkdir(parents=True)
    filler = "common words in every document here "
    docs = [json.dumps({"text": filler * 20 + f"number {i}"}) for i in range(40)]
    (src / "a.jsonl").write_text("\n".join(docs) + "\n")
    held = [i for i, (_, s, _) in enumerate(iter_documents(tmp_path / "in", 3, 0.25, 0.25)) if s != "train"]
    assert 5 < len(held) < 35
    secret = ("zyxwvu " * 200)[: len(filler) * 20]  # as long as the text it replaces: document keys unchanged
    for i in held:
        docs[i] = docs[i].replace(filler * 20, secret)
    (src / "a.jsonl").write_text("\n".join(docs) + "\n")
    assert [i for i, (_, s, _) in enumerate(iter_documents(tmp_path / "in", 3, 0.25, 0.25)) if s != "train"] == held

    def vocab(**split) -> set[str]:
        out = train_tokenizer(tmp_path / "in", tmp_path / f"tok{len(split)}", vocab_size=300, **split)
        return set(load_tokenizer(str(out)).get_vocab())

    assert any("zyx" in v for v in vocab())
    assert not any("zyx" in v for v in vocab(seed=3, val_fraction=0.25, test_fraction=0.25))


def test_embedded_corpus_domains_share_no_source_file(corpus_dir):
    rows = {d: [json.loads(line) for line in open(corpus_dir / d / f"{d}.jsonl")] for d in ("code", "docstrings")}
    files = {d: {r["meta"]["file"] for r in rs} for d, rs in rows.items()}
    assert files["code"] and files["docstrings"] and not files["code"] & files["docstrings"]
    # docstring lines found verbatim among code lines: 77% when both domains came from the same files
    code_lines = {ln.strip() for r in rows["code"] for ln in r["text"].splitlines()}
    doc_lines = [ln.strip() for r in rows["docstrings"] for ln in r["text"].splitlines() if len(ln.strip()) > 30]
    shared = sum(ln in code_lines for ln in doc_lines) / len(doc_lines)
    assert len(doc_lines) > 500 and shared < 0.05


def test_a_cut_document_is_one_bos_eos_document_so_sequence_ids_name_documents(tmp_path, small_tokenizer):
    """max_doc_chars cuts each document into ~6 pieces; they are joined again under one [BOS] ... [EOS], so
    ``sequence_documents`` (which counts EOS) clusters by document, not by piece (marking every piece made the
    replication's clustered standard errors too small)."""
    from llmshearing.evaluate import sequence_documents

    _marked_corpus(tmp_path / "in")
    res = prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 32, val_fraction=0.2, test_fraction=0.2,
                          max_doc_chars=100, progress=False)
    assert res.manifest["document_marks"] == "document"
    eos = res.manifest["tokenizer"]["eos_token_id"]
    ds = DomainTokenDataset(str(res.output), "test", ["web"], 32)
    stream = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
    documents = res.manifest["domains"]["web"]["test"]["documents"]
    pieces = sum(len(text) // 100 + 1 for _, split, text in iter_documents(tmp_path / "in", 0, 0.2, 0.2)
                 if split == "test")
    assert pieces > 3 * documents  # the cut did happen
    assert documents - 1 <= int((stream == eos).sum()) <= documents  # the packed tail may drop the last EOS
    ids = sequence_documents(res.output, "test")["web"]
    assert ids[-1] <= documents - 1 and len(set(ids.tolist())) > documents // 2


def test_a_cut_document_has_the_tokens_of_the_whole_document(tmp_path, small_tokenizer):
    """Pieces are cut at line breaks; tokenized alone, a SentencePiece tokenizer would open each later piece with its
    word-start marker (a space that is not in the text). Each packed document must equal the whole text tokenized."""
    _marked_corpus(tmp_path / "in", n_docs=20)
    res = prepare_dataset(tmp_path / "in", tmp_path / "out", small_tokenizer, 32, val_fraction=0.2, test_fraction=0.2,
                          max_doc_chars=100, progress=False)
    tok = load_tokenizer(small_tokenizer)
    bos, eos = res.manifest["tokenizer"]["bos_token_id"], res.manifest["tokenizer"]["eos_token_id"]
    whole = {tuple([bos] * (bos is not None) + tok(text, add_special_tokens=False)["input_ids"] + [eos])
             for _, split, text in iter_documents(tmp_path / "in", 0, 0.2, 0.2) if split == "test"}
    ds = DomainTokenDataset(str(res.output), "test", ["web"], 32)
    stream = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))]).tolist()
    ends = [i for i, t in enumerate(stream) if t == eos]
    packed = [tuple(stream[a + 1: b + 1]) for a, b in zip([-1] + ends[:-1], ends)]  # complete documents
    assert len(packed) >= 2 and all(len(d) > 40 for d in packed)  # documents of several 100-char pieces
    assert all(d in whole for d in packed)
