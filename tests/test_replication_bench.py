"""benchmarks/replication.py's machinery: its run folder shared between processes (a run another process holds, or
one whose predecessor is not finished, is skipped: not trained twice, not trained on a missing model; a released
claim is taken by the next process that reaches it), and learning-rate grids that grow until the best is bracketed."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

YAML = "yamls/pretrain/tiny_cpu.yaml"  # a real file: a run's key hashes its YAML's contents


def _bench(tmp_path: Path, records: Path | None = None, record: bool = False, weights: bytes = b"source weights"):
    """A Bench in ``tmp_path``: a prepared-data manifest, one shard and a source with ``weights`` as its file."""
    from benchmarks.replication import Bench

    data, source = tmp_path / "data", tmp_path / "cache" / "source_hf"
    data.mkdir(parents=True, exist_ok=True)
    source.mkdir(parents=True, exist_ok=True)
    (data / "manifest.json").write_text(json.dumps({
        "domains": {"a": {}, "b": {}}, "tokenizer": {"path": str(tmp_path / "tok")},
        "inputs": {"path": str(tmp_path / "corpus"), "files_sha256": "machine-specific"}}))
    (data / "shard.mds").write_bytes(b"tokens")
    (source / "model.safetensors").write_bytes(weights)
    return Bench(tmp_path / "cache", tmp_path / "work", data, source, records=records, record=record)


def fake_test_losses(model_dir) -> dict[str, np.ndarray]:
    """A model's per-sequence losses: a function of its weights file."""
    seed = sum((Path(model_dir) / "weights").read_bytes())
    return {d: np.random.default_rng(seed + i).random(5) for i, d in enumerate(("a", "b"))}


@pytest.fixture
def fake_training(monkeypatch):
    """Training and export replaced by a record of what ran (the claim logic is what is under test)."""
    import benchmarks.replication as rep
    import llmshearing.export as export

    class Trained(list):
        machine_noise = ""  # set: training on "this machine" does not reproduce another's models

    trained: list[str] = Trained()

    def train_counted(yaml, overrides):
        run = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("variables.run_dir=")))
        trained.append(run.name)
        (run / "checkpoints").mkdir(parents=True)
        return {"batches": 1, "samples": 1, "tokens": 1}

    def export_checkpoint(ckpt, out, **kw):  # the model: its run's name, and what differs between machines
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text("{}")
        (Path(out) / "weights").write_text(Path(ckpt).parts[-3] + trained.machine_noise)

    monkeypatch.setattr(rep, "train_counted", train_counted)
    monkeypatch.setattr(export, "export_checkpoint", export_checkpoint)
    monkeypatch.setattr(rep, "_test_losses", lambda model_dir, data: fake_test_losses(model_dir))
    monkeypatch.setattr(rep, "_val_loss", lambda model_dir, data: float(fake_test_losses(model_dir)["a"].mean()))
    return trained


def _hold(work: str, name: str, ready, release) -> None:  # another process holding a claim
    import fcntl

    with open(Path(work) / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        ready.set()
        release.wait(30)


def test_a_claimed_run_is_skipped_and_taken_once_released(tmp_path, fake_training):
    b = _bench(tmp_path)
    name = b.run("x", YAML, ["seed=0"], train=False)  # the keyed name, nothing run
    assert fake_training == [] and not b.done(name)
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(b.work), name, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        assert b.run("x", YAML, ["seed=0"]) == name
        assert fake_training == [] and not b.done(name)  # another process holds it: skipped, not trained twice
        nxt = b.run("z", YAML, ["seed=0"], after=name)
        assert fake_training == [] and not b.done(nxt)  # its predecessor is not finished: skipped
    finally:
        release.set()
        holder.join(10)
    assert b.run("x", YAML, ["seed=0"]) == name and b.done(name)
    assert b.run("z", YAML, ["seed=0"], after=name) == nxt and b.done(nxt)
    assert fake_training == [name, nxt]
    assert b.run("x", YAML, ["seed=0"]) == name and fake_training == [name, nxt]  # done: never again
    assert b.total_tokens(nxt) == 2  # the chain's tokens: its own and its predecessor's
    assert not list(b.work.glob("*.tmp*"))  # the done markers were written atomically


def test_a_sweep_grows_half_a_decade_past_a_best_rate_at_its_edge_until_bracketed():
    from benchmarks.replication import next_rate

    assert next_rate({1e-3: 3.35, 3e-3: 3.26, 1e-2: 3.257}, max_rates=5) == 3e-2  # best at the top: one step up
    assert next_rate({1e-3: 3.1, 3e-3: 3.2, 1e-2: 3.3}, max_rates=5) == 3e-4  # best at the bottom: one step down
    assert next_rate({3e-4: 3.0, 1e-3: 3.1, 3e-3: 3.2}, max_rates=5) == 1e-4
    assert next_rate({1e-3: 3.65, 3e-3: 3.44, 1e-2: 3.62}, max_rates=5) is None  # bracketed
    assert next_rate({1e-3: 3.35, 3e-3: 3.26, 1e-2: 3.25, 3e-2: 3.2, 1e-1: 3.1}, max_rates=5) is None  # no more
    assert next_rate({1e-2: 3.0}, max_rates=5) is None  # one rate brackets nothing


def test_recorded_runs_are_done_on_another_machine_and_trained_again_only_for_a_run_that_continues_them(
        tmp_path, fake_training):
    """The work folder does not outlive a machine and the benchmark takes longer than a session: finished runs are
    kept as records (no models), keyed by contents, not paths, and read as done elsewhere."""
    records = tmp_path / "records"
    b = _bench(tmp_path / "one", records, record=True)
    x = b.run("x", YAML, ["seed=0"])
    z = b.run("z", YAML, [f"variables.source={b.model_dir(x)}"], after=x)
    assert fake_training == [x, z]
    assert sorted(p.stem for p in records.glob("*.json")) == sorted([x, z]) and not list(records.glob(".*"))

    c = _bench(tmp_path / "two", records)  # another machine: other folders, the same source and data
    assert c.run("x", YAML, ["seed=0"]) == x
    assert c.run("z", YAML, [f"variables.source={c.model_dir(x)}"], after=x) == z
    assert fake_training == [x, z] and c.done(z) and not c.built(z)  # nothing trained: both recorded
    assert c.read_from_records == {x, z}
    assert c.total_tokens(z) == 2
    for d in ("a", "b"):  # the record's per-sequence losses are the model's, exactly
        assert np.array_equal(c.test_losses(z)[d], np.asarray(fake_test_losses(b.model_dir(z))[d], np.float32))
    assert c.val_loss(x) == pytest.approx(float(fake_test_losses(b.model_dir(x))["a"].mean()))

    w = c.run("w", YAML, [f"variables.source={c.model_dir(x)}"], after=x)  # not recorded: continues x's model
    assert fake_training == [x, z, x, w] and c.rebuilt == [x] and c.built(x) and c.built(w)
    assert not (records / f"{w}.json").exists()  # --record was not given on this machine
    assert c.inconsistent([w, z]) == []  # x trained again here is x's recorded model

    # a third machine where training does not reproduce: the run continued from the rebuilt x is not comparable
    fake_training.machine_noise = " (other bits)"
    d = _bench(tmp_path / "three", records)
    assert d.run("x", YAML, ["seed=0"]) == x  # planned (as main() plans a run before its successors): recorded
    v = d.run("v", YAML, [f"variables.source={d.model_dir(x)}"], after=x)
    assert fake_training[-2:] == [x, v] and d.inconsistent([v, z]) == [v]

    # runs finished without --record are recorded later by a process with it, their predecessors first
    fake_training.machine_noise = ""
    e = _bench(tmp_path / "two", records, record=True)
    w_again = e.run("w", YAML, [f"variables.source={e.model_dir(x)}"], after=x)
    assert w_again == w and fake_training[-1] == v  # built on machine two already: not trained again
    e.record_finished([w])
    assert (records / f"{w}.json").is_file() and e.inconsistent([w]) == []

    # two processes share a work folder: one that recorded nothing yet finds the other's record and keeps it
    late = _bench(tmp_path / "two", tmp_path / "nothing recorded yet", record=True)
    late.records = records
    before = (records / f"{w}.json").stat().st_ino
    late.record_finished([w])
    assert (records / f"{w}.json").stat().st_ino == before and late.recorded[w]["name"] == w  # not written again

    other = _bench(tmp_path / "four", records, weights=b"another source")
    assert other.run("x", YAML, ["seed=0"], train=False) != x  # another source: no record is its run

    # a record of another test set (its per-sequence losses cover other sequences) is not this benchmark's run
    rec = json.loads((records / f"{x}.json").read_text())
    (records / f"{x}.json").write_text(json.dumps({**rec, "test_sequences": 1024}))
    assert x not in _bench(tmp_path / "five", records).recorded


def test_a_recorded_run_whose_predecessor_is_neither_recorded_nor_here_is_not_done(tmp_path, fake_training):
    records = tmp_path / "records"
    b = _bench(tmp_path / "one", records)
    x = b.run("x", YAML, ["seed=0"])
    z = b.run("z", YAML, ["seed=1"], after=x)
    b.record, b.records = True, records
    b._record(z)  # records x first
    (records / f"{x}.json").unlink()  # a record set without the run z continued
    c = _bench(tmp_path / "two", records)
    assert z in c.recorded and not c.done(z)  # its tokens would be missing from the chain


def test_a_run_key_changes_with_its_yaml_or_a_file_it_includes_not_with_a_comment(tmp_path, fake_training):
    b = _bench(tmp_path)
    run, base = tmp_path / "run.yaml", tmp_path / "base.yaml"
    base.write_text("optimizer:\n  lr: 0.001\n")
    run.write_text("includes:\n  - base.yaml\nseed: 1\n")
    first = b.run("x", str(run), ["seed=0"], train=False)
    run.write_text("# what this run is\nincludes:\n  - base.yaml\nseed: 1\n")
    assert b.run("x", str(run), ["seed=0"], train=False) == first
    base.write_text("optimizer:\n  lr: 0.003\n")
    assert b.run("x", str(run), ["seed=0"], train=False) != first
