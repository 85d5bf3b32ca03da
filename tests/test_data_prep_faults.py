"""Data prep never loses or deletes what it did not create, replaces atomically, names unreadable files, and
reports every input error as one line with the fix (no traceback unless --debug)."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest

from llmshearing.data.prepare import OWNER_MARK, BadInputFile, DataPrepError, prepare_dataset
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "data_prep"))
from prepare_data import main as prep_main  # noqa: E402


def _corpus(root: Path, docs: int = 40) -> Path:
    for domain in ("web", "code"):
        (root / domain).mkdir(parents=True, exist_ok=True)
        (root / domain / "a.jsonl").write_text(
            "".join(json.dumps({"text": f"{domain} document {i}: " + "some words here " * 12}) + "\n"
                    for i in range(docs)))
    return root


def _prep(src, out, tok, **kw):
    return prepare_dataset(src, out, tok, 16, val_fraction=0.1, test_fraction=0.1, progress=False, **kw)


def test_a_folder_named_like_the_temporary_output_is_never_touched(tmp_path, small_tokenizer):
    src = _corpus(tmp_path / "in")
    mine = tmp_path / "out.tmp"  # the user's own folder, named as the old temporary output was
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _prep(src, tmp_path / "out", small_tokenizer)
    (tmp_path / "in" / "bad").mkdir()
    (tmp_path / "in" / "bad" / "x.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000)[:50])
    with pytest.raises(BadInputFile):
        _prep(src, tmp_path / "out2", small_tokenizer)
    assert (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "out.tmp"]  # no temporary left either


def test_stale_temporaries_of_a_killed_run_are_removed_and_only_those(tmp_path, small_tokenizer):
    src = _corpus(tmp_path / "in")
    dead = tmp_path / "out.tmp-dead1"  # a killed data prep's: marked, its process gone
    dead.mkdir()
    (dead / OWNER_MARK).write_text("999999999\n")
    alien = tmp_path / "out.tmp-user"  # same pattern, no mark: not ours
    alien.mkdir()
    _prep(src, tmp_path / "out", small_tokenizer)
    assert not dead.exists() and alien.is_dir()


def test_overwrite_replaces_atomically_and_a_kill_between_the_renames_loses_nothing(tmp_path, small_tokenizer,
                                                                                   monkeypatch):
    import llmshearing.data.prepare as prep

    src = _corpus(tmp_path / "in")
    old = _prep(src, tmp_path / "out", small_tokenizer).manifest
    new = _prep(src, tmp_path / "out", small_tokenizer, seed=1, overwrite=True).manifest
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["seed"] == new["seed"] == 1 != old["seed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700

    real_replace = os.replace
    calls = []

    def killed_after_moving_the_old_aside(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new output's rename: "killed" before it
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(prep.os, "replace", killed_after_moving_the_old_aside)
    with pytest.raises(KeyboardInterrupt):
        _prep(src, tmp_path / "out", small_tokenizer, seed=2, overwrite=True)
    monkeypatch.undo()
    kept = list(tmp_path.glob("out.old-*/out/manifest.json"))  # the old dataset, whole, beside the output name
    assert len(kept) == 1 and json.loads(kept[0].read_text())["seed"] == 1
    assert not list(tmp_path.glob("out.tmp-*"))


def _error_lines(capsys) -> list[str]:
    """The error lines of stderr (progress and log lines aside): exactly one, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("workers", [1, 2])
def test_a_truncated_gzip_is_named_and_can_be_skipped(tmp_path, small_tokenizer, capsys, workers):
    src = _corpus(tmp_path / "in")
    blob = gzip.compress(("".join(json.dumps({"text": f"zipped {i} " * 20}) + "\n" for i in range(50))).encode())
    (src / "web" / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    args = ["--input", str(src), "--output", str(tmp_path / "out"), "--tokenizer", small_tokenizer,
            "--seq-len", "16", "--val-fraction", "0.1", "--test-fraction", "0.1", "--workers", str(workers)]
    assert prep_main(args) == 2
    err = _error_lines(capsys)
    assert err[0].startswith(f"error: {src / 'web' / 'cut.jsonl.gz'}: cannot be read to its end (EOFError")
    assert "--skip-bad-files" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no temporary output left
    assert prep_main(args + ["--skip-bad-files"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = manifest["domains"]["web"]["skipped_files"]
    assert [s["file"] for s in skipped] == ["cut.jsonl.gz"] and "EOFError" in skipped[0]["error"]
    assert manifest["domains"]["web"]["documents"] == 40  # the readable file only


@pytest.mark.parametrize("case", ["empty domain", "no jsonl", "missing tokenizer", "seq-len 0", "missing input",
                                  "unknown domain"])
def test_input_errors_are_one_line_with_the_fix(tmp_path, small_tokenizer, capsys, case):
    src = _corpus(tmp_path / "in")
    args = {"--input": str(src), "--output": str(tmp_path / "out"), "--tokenizer": small_tokenizer, "--seq-len": "16"}
    expect = {
        "empty domain": "domain 'empty' is empty",
        "no jsonl": "domain 'notes' is empty: no .jsonl",
        "missing tokenizer": "--tokenizer /nowhere/tok: tokenizer '/nowhere/tok' not found",
        "seq-len 0": "seq_len must be >= 2, got 0; give --seq-len",
        "missing input": "input folder /nowhere/in does not exist",
        "unknown domain": "domain folder",
    }[case]
    if case == "empty domain":
        (src / "empty").mkdir()
    elif case == "no jsonl":
        (src / "notes").mkdir()
        (src / "notes" / "readme.txt").write_text("hello")
    elif case == "missing tokenizer":
        args["--tokenizer"] = "/nowhere/tok"
    elif case == "seq-len 0":
        args["--seq-len"] = "0"
    elif case == "missing input":
        args["--input"] = "/nowhere/in"
    argv = [x for kv in args.items() for x in kv] + (["--domains", "web", "nope"] if case == "unknown domain" else [])
    assert prep_main(argv) == 2
    err = _error_lines(capsys)
    assert expect in err[0], err
    if case in ("empty domain", "no jsonl"):
        assert "--domains" in err[0]
    with pytest.raises(DataPrepError):
        prep_main(argv + ["--debug"])  # the traceback when asked for


def test_a_malformed_line_reads_as_one_clause(tmp_path, small_tokenizer):
    src = _corpus(tmp_path / "in")
    with open(src / "web" / "a.jsonl", "a") as f:
        f.write('{"text": "cut\n')
    res = _prep(src, tmp_path / "out", small_tokenizer)
    bad = res.manifest["domains"]["web"]["malformed"]
    assert bad == [{"file": "a.jsonl", "line": 41, "error": "invalid JSON (Unterminated string starting at, column 10)"}]
