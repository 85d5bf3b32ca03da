"""benchmarks/replication.py's machinery: its run folder shared between processes (a run another process holds, or
one whose predecessor is not finished, is skipped: not trained twice, not trained on a missing model; a released
claim is taken by the next process that reaches it), and learning-rate grids that grow until the best is bracketed."""

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


def test_a_sweep_grows_half_a_decade_past_a_best_rate_at_its_edge_until_bracketed():
    from benchmarks.replication import next_rate

    assert next_rate({1e-3: 3.35, 3e-3: 3.26, 1e-2: 3.257}, max_rates=5) == 3e-2  # best at the top: one step up
    assert next_rate({1e-3: 3.1, 3e-3: 3.2, 1e-2: 3.3}, max_rates=5) == 3e-4  # best at the bottom: one step down
    assert next_rate({3e-4: 3.0, 1e-3: 3.1, 3e-3: 3.2}, max_rates=5) == 1e-4
    assert next_rate({1e-3: 3.65, 3e-3: 3.44, 1e-2: 3.62}, max_rates=5) is None  # bracketed
    assert next_rate({1e-3: 3.35, 3e-3: 3.26, 1e-2: 3.25, 3e-2: 3.2, 1e-1: 3.1}, max_rates=5) is None  # no more
    assert next_rate({1e-2: 3.0}, max_rates=5) is None  # one rate brackets nothing
