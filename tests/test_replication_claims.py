"""benchmarks/replication.py shares its run folder between processes: a run another process holds, or one whose
predecessor is not finished, is skipped (not trained twice, not trained on a missing model), and a released claim
is taken by the next process that reaches it."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest


def _bench(tmp_path: Path):
    from benchmarks.replication import Bench

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text(json.dumps({"domains": {"a": {}, "b": {}}}))
    return Bench(tmp_path / "cache", tmp_path / "work", data, tmp_path / "source")


@pytest.fixture
def fake_training(monkeypatch):
    """Training and export replaced by a record of what ran (the claim logic is what is under test)."""
    import benchmarks.replication as rep
    import llmshearing.export as export

    trained: list[str] = []

    def train_counted(yaml, overrides):
        run = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("variables.run_dir=")))
        trained.append(run.name)
        (run / "checkpoints").mkdir(parents=True)
        return {"batches": 1, "samples": 1, "tokens": 1}

    def export_checkpoint(ckpt, out, **kw):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text("{}")

    monkeypatch.setattr(rep, "train_counted", train_counted)
    monkeypatch.setattr(export, "export_checkpoint", export_checkpoint)
    return trained


def _hold(work: str, name: str, ready, release) -> None:  # another process holding a claim
    import fcntl

    with open(Path(work) / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        ready.set()
        release.wait(30)


def test_a_claimed_run_is_skipped_and_taken_once_released(tmp_path, fake_training):
    b = _bench(tmp_path)
    name = b.run("x", "y.yaml", ["seed=0"], train=False)  # the keyed name, nothing run
    assert fake_training == [] and not b.done(name)
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(b.work), name, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        assert b.run("x", "y.yaml", ["seed=0"]) == name
        assert fake_training == [] and not b.done(name)  # another process holds it: skipped, not trained twice
        nxt = b.run("z", "y.yaml", ["seed=0"], after=name)
        assert fake_training == [] and not b.done(nxt)  # its predecessor is not finished: skipped
    finally:
        release.set()
        holder.join(10)
    assert b.run("x", "y.yaml", ["seed=0"]) == name and b.done(name)
    assert b.run("z", "y.yaml", ["seed=0"], after=name) == nxt and b.done(nxt)
    assert fake_training == [name, nxt]
    assert b.run("x", "y.yaml", ["seed=0"]) == name and fake_training == [name, nxt]  # done: never again
    assert b.total_tokens(nxt) == 2  # the chain's tokens: its own and its predecessor's
    assert not list(b.work.glob("*.tmp*"))  # the done markers were written atomically
