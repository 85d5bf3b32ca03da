"""The paper's claims at small scale on CPU, under the evidence protocol (issue #18).

From the cached trained source of ``benchmarks/small_scale.py`` (1.33M parameters) to the half-size target of
``yamls/prune/small_cpu.yaml`` (0.70M parameters), at equal tokens after the source (``T`` = pruning steps +
continued-training steps, counted by the trainer):

| arm | what it is |
| --- | --- |
| ``sheared`` | learned-mask pruning (reference init, dynamic loading) + continued pre-training with dynamic loading |
| ``sheared (importance init)`` | the same, the masks seeded from the source's activation importance |
| ``sheared_constant`` | the ``sheared`` pruned model, continued pre-training with constant proportions |
| ``random`` / ``magnitude`` / ``activation`` | one-shot selection at the target shape + ``T`` steps of continued training |
| ``learned masks on source`` | ``sheared``'s final masks applied to the *original* source weights + ``T`` steps |
| ``scratch`` | the target architecture trained from random init, one fully decayed run per budget |
| ``sheared + KD`` | the ``sheared`` pruned model, continued training by logit distillation from the source (KL only) |
| ``sheared + CE, equal compute`` | the ``sheared`` pruned model, continued training with cross-entropy for as many more steps as the teacher's forwards cost (``--kd`` arms) |
| ``sheared, KD in pruning`` | pruning with distillation from the source, then continued training with cross-entropy |
| ``sheared, KD in both`` | pruning and continued training with distillation |

Protocol:
- data split by document into train / val / test (``benchmarks/small_scale.py``); the tokenizer saw only
  train. Dynamic loading's reference losses are the source's *validation* losses; every number reported
  here is on *test* (every test sequence: at most ``TEST_SEQUENCES`` per domain, fixed before any run).
- every arm is a run (or two, for ``sheared``) whose cosine schedule ends at its own budget: no mid-run
  evaluation stands in for a budget. Scratch is run at ``T``, 2T and 3T with the same seeds; the tokens scratch
  needs to match an arm are interpolated in log tokens between those final losses, on the seed means and seed by
  seed (``benchmarks/stats.py``: ``crossover``).
- scratch trains at the domains' token shares (no dynamic loading); ``sheared_constant`` continues at the same
  shares (only its pruning steps load dynamically), so ``sheared_constant - scratch`` is the comparison least helped
  by dynamic loading.
- every arm's tokens include everything it needed after the source: ``learned masks on source`` counts the pruning
  run its masks come from.
- learning rates: one small sweep (``--lrs``; a best rate at the grid's edge adds the next half decade that way, up
  to ``--lr-extensions`` times, and one still at the edge is reported as such) on the validation split, at budget
  ``T`` and a seed of its own (``--sweep-seed``, so no reported seed is the best of several runs), for each of the
  two kinds of training: from random init (scratch) and from a selected model (continued training: tuned on the
  ``random`` arm, then used by every continued-training arm, ``sheared`` included). The pruning stage's model rate
  is swept the same way after the whole sheared chain (``--prune-lrs`` and the continued-training rate); the stage
  keeps its config's mask dynamics (mask/lambda lr 1.0, 10% warmup, reference init and clamp).
- seeds 0..n-1: the seed sets the trainer's data order and domain draws, the masks' gate noise, and the
  random selection; the magnitude selection is deterministic.
- tokens and passes over the training data come from the trainer's timestamps and the batch sampler.
- a difference is reported as mean over seeds +- a standard error that adds the between-seed error and the
  test-set sampling error of the seed-averaged paired per-sequence differences, clustered by the document each
  test sequence comes from; a verdict names the lower arm only when |t| exceeds Student's two-sided 95% point at
  the seeds' degrees of freedom (4.30 with 3 seeds); the worst-domain comparison takes each arm's worst domain per
  seed and adds those domains' test error.
- every cached run is keyed by everything that changes its result (its config overrides: steps, budget, sequence
  length, batch, seed, learning rates, calibration, evaluation sequences; its YAML file's contents with the files it
  includes; the run it continues; the source's and the data's contents; the code's stage version, bumped by hand when
  the code changes what a run produces), so a changed setting runs again instead of reusing a stale result.
  Keys name no folder of this machine, so a key means the same run anywhere.

    python -m benchmarks.replication --out runs/benchmarks/replication.json       # one process
    python -m benchmarks.replication --threads 1 & python -m benchmarks.replication --threads 1   # two processes
    python -m benchmarks.replication --report-only                                 # tables from finished runs

The whole benchmark takes longer than a session on 2 cores, and the output's folder does not outlive a machine:
``--record`` keeps each run finished here in ``benchmarks/records/replication/<run>.json`` (its counts, per-sequence
test losses, validation loss and a pruning run's convergence; no model, ~10 KB), to be committed. A recorded run is
done on any machine whose source and data have the same contents (the source is trained again on each machine: its
records match only where that training reproduces bit for bit; where it does not, nothing matches and every run
trains again); a run that continues from a recorded one and is not recorded itself trains that one again first
(its record is kept, and a rebuilt run that does not reproduce its record's test loss is logged). The report says how
many runs came from records, at which commits, and whether the code changed since.

    python -m benchmarks.replication --threads 1 --record    # run, keeping finished runs in the repository

Every run is cached under the output's folder, so an interrupted benchmark continues where it stopped. Several
processes may share the folder: each claims a run (a lock file) before training it and skips runs another process
holds or whose predecessor is not finished; every phase waits until all its runs are done, so the learning rates
chosen on validation and the report see every run; the data and the source are built by the first process while the
others wait.
Writes JSON and a markdown report next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from benchmarks.common import REPO, train_counted, write_json  # noqa: E402
from benchmarks.small_scale import (TEST_SEQUENCES, VAL_SEQUENCES, common_overrides, ensure_data,  # noqa: E402
                                   ensure_source)

log = logging.getLogger("replication")

BATCH, SEQ = 32, 128
TARGET = dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=3, intermediate_size=224)
SE_BOUND = 0.005  # nats: the paired per-domain standard error the test set is meant to resolve
STAGE_VERSION = 5  # part of every run's cache key: bump when a run's code changes what it produces (5: gate noise
# drawn on the CPU, top-k ties in a stable order, one BOS/EOS per cut document, its pieces tokenized in context)
CALIBRATION = 64  # training sequences scored for activation importance (one-shot and importance init)
CODE = ["llmshearing", "benchmarks/replication.py", "benchmarks/small_scale.py", "benchmarks/common.py", "yamls"]


def _sha(obj) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def next_rate(losses: dict[float, float], max_rates: int) -> Optional[float]:
    """The rate to add to a sweep so that its best is bracketed: half a decade (1, 3, 10, 30, ...) beyond the best
    when the best is the grid's largest or smallest rate; None when the best lies inside the grid, or the grid has
    ``max_rates`` rates (then the report says the optimum is at its edge)."""
    rates = sorted(losses)
    if len(rates) < 2 or len(rates) >= max_rates:
        return None
    best = min(rates, key=losses.get)
    if best not in (rates[0], rates[-1]):
        return None
    h = round(2 * math.log10(best)) + (1 if best == rates[-1] else -1)  # half-decades: 10^k, 3 x 10^k
    return float(f"{10 ** (h // 2) * (3 if h % 2 else 1):.0e}")


class Bench:
    """Runs (cached under a key of everything that defines them), their exports, and their test-set per-sequence
    losses. ``run`` and ``save_oneshot`` return the keyed name every other method takes.

    Records (``records``): a finished run's results (counts, per-sequence test losses, validation loss, the pruning
    run's convergence), one JSON file per run, kept in the repository because the work folder does not outlive a
    machine and the benchmark takes longer than a session. A recorded run counts as done (once its predecessor
    does); where a run that is not recorded needs a recorded one's model (its continuation, its masks), the recorded
    run is trained again here first (the same key: the same config, source and data) and its record is kept, and
    reported. Every run notes the contents of its own model and of the model it continued from
    (:meth:`inconsistent` lists the runs whose predecessor's record is not the model they were trained on)."""

    def __init__(self, cache: Path, work: Path, data: Path, source: Path, records: Optional[Path] = None,
                 record: bool = False) -> None:
        self.cache, self.work, self.data, self.source = cache, work, data, source
        self.work.mkdir(parents=True, exist_ok=True)
        self.domains = list(json.loads((data / "manifest.json").read_text())["domains"])
        self.records, self.record = records, record
        self.recorded: dict[str, dict] = {}  # keyed name -> its record
        for f in sorted(records.glob("*.json")) if records is not None and records.is_dir() else []:
            rec = _usable_record(f)
            if rec:
                self.recorded[rec["name"]] = rec
        self.read_from_records = set(self.recorded)  # (not the runs this process records)
        self.recipes: dict[str, Callable[[], None]] = {}  # keyed name -> how this process builds it
        self.rebuilt: list[str] = []  # recorded runs trained again here for a successor
        self._identity: Optional[dict] = None

    def identity(self) -> dict:
        """The source's and data's contents (not their paths): part of every key, so a record matches on another
        machine exactly when it was made from the same source and data."""
        if self._identity is None:
            from benchmarks.common import data_identity, dir_identity

            src = dir_identity(self.source, skip=("README.md", "llmshearing.json"))  # notes that name paths, dates
            self._identity = {"source": src, "data": data_identity(self.data)}
        return self._identity

    def key(self, spec: dict) -> str:
        """A run's key: its spec with this machine's folders as placeholders, the source's and data's identities and
        the stage version."""
        text = json.dumps(spec, sort_keys=True, default=str)
        for path, mark in sorted(((str(self.work), "<work>"), (str(self.cache), "<cache>")), key=lambda x: -len(x[0])):
            text = text.replace(json.dumps(path)[1:-1], mark)  # as the JSON writes it; the longer first: one folder
            # may lie inside the other
        return _sha({"spec": text, **self.identity(), "version": STAGE_VERSION})

    def model_dir(self, name: str) -> Path:
        return self.work / f"{name}_hf"

    def stats(self, name: str) -> Optional[dict]:
        """A run's counts: its record's (what the report reads for every figure of a recorded run), else this work
        folder's."""
        if name in self.recorded:
            return self.recorded[name]["stats"]
        p = self.work / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def built(self, name: str) -> bool:
        """Trained (or selected) here: its model is in the work folder."""
        return (self.work / f"{name}.json").is_file() and (self.model_dir(name) / "config.json").is_file()

    def done(self, name: str) -> bool:
        if self.built(name):
            return True
        before = self.recorded[name]["stats"].get("after") if name in self.recorded else None
        return name in self.recorded and (before is None or self.done(before))

    def model_identity(self, name: str) -> str:
        """The contents of a run's model (and masks) here."""
        from benchmarks.common import dir_identity

        ids = [dir_identity(self.model_dir(name), skip=("README.md", "llmshearing.json"))]
        if (self.work / name / "masks").is_dir():
            ids.append(dir_identity(self.work / name / "masks"))
        return "+".join(ids)

    def inconsistent(self, names) -> list[str]:
        """Runs (of ``names`` and their predecessors) trained on a predecessor whose reported figures (its record's,
        or this folder's) are not from the model they continued: a recorded run trained again here that did not
        reproduce, or a run recorded without its predecessor."""
        out, seen = [], set()
        for name in names:
            while name and name not in seen:
                seen.add(name)
                st = self.stats(name) or {}
                before = st.get("after")
                if before:
                    have = (self.stats(before) or {}).get("model")
                    if have is None or st.get("after_model") != have:
                        out.append(name)
                name = before
        return sorted(out)

    def run(self, name: str, yaml: str, overrides: list[str], after: Optional[str] = None, train: bool = True) -> str:
        """Train ``name`` (unless cached) and export it; returns its keyed name. ``after``: the run whose tokens
        precede it (for totals); ``train`` False: only the keyed name (reporting)."""
        from llmshearing.config import yaml_contents

        key = self.key({"yaml": yaml, "yaml_contents": yaml_contents(REPO / yaml), "overrides": overrides,
                        "after": after, "batch": BATCH, "seq": SEQ, "common": common_overrides(self.cache)})
        name = f"{name}-{key}"
        self.recipes[name] = lambda: self._train(name, yaml, overrides, after)
        return self._build(name, after, train)

    def _build(self, name: str, needs: Optional[str], train: bool) -> str:
        if self.done(name) or not train or (needs and not self.done(needs)):
            return name  # finished, not asked for, or its predecessor is another process's and still running
        if needs and not self.rebuild(needs):
            return name  # its predecessor is recorded, and another process is training it again here
        with self.claim(name) as mine:
            if mine and not self.done(name):
                self.recipes[name]()
                self._record(name)
        return name

    def rebuild(self, name: str) -> bool:
        """Make a run's model here (a recorded run's: train it again, after its own predecessor) for a run that
        continues from it; True once it is here, False while another process holds it."""
        if self.built(name):
            return True
        if name not in self.recipes:
            raise RuntimeError(f"{name} was never planned in this process: it cannot be built")
        before = (self.stats(name) or {}).get("after")
        if before and not self.rebuild(before):
            return False
        with self.claim(name) as mine:
            if not mine:
                return False
            if not self.built(name):
                log.info("building %s here: a run continues from it", name)
                self.recipes[name]()
                if name in self.recorded:
                    self.rebuilt.append(name)
                    local = json.loads((self.work / f"{name}.json").read_text())["model"]
                    if local != self.recorded[name]["stats"].get("model"):
                        log.warning("%s trained again here is not its record's model: training did not reproduce "
                                    "on this machine, so a run continued from it here is not comparable with the "
                                    "record's successors (the report lists such runs)", name)
        return True

    def _record(self, name: str) -> None:
        """Keep a run finished here in ``records`` (``--record``): what the report reads, not the model. Its
        predecessor first, so that no record continues a run that is not recorded."""
        if not self.record or self.records is None or name in self.recorded or not self.built(name):
            return
        written = self.records / f"{name}.json"
        rec = _usable_record(written) if written.is_file() else None  # by another process sharing the folder
        if rec:  # since this one read the records (an unusable one is replaced below)
            self.recorded[name] = rec
            return
        from benchmarks.common import git_commit, record_machine

        before = self.stats(name).get("after")
        if before:
            self._record(before)
        rec = {"name": name, "stats": self.stats(name),
               "test": _pack_losses(self.test_losses(name)), "val": self.val_loss(name),
               "shape_error": self.expected_shape_error(name), "stage_version": STAGE_VERSION,
               "test_sequences": TEST_SEQUENCES, "commit": git_commit(), "machine": record_machine(),
               "recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        self.records.mkdir(parents=True, exist_ok=True)
        tmp = self.records / f".{name}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.records / f"{name}.json")
        self.recorded[name] = rec

    def record_finished(self, names) -> None:
        """With ``--record``: keep every run of ``names`` finished here and not recorded yet (runs finished before
        ``--record`` was given, or by a process without it)."""
        for name in names:
            self._record(name)

    @contextmanager
    def claim(self, name: str):
        """Yields True when this process holds ``name`` (an exclusive lock on ``<work>/<name>.lock``, released at
        exit, also when the process dies), False when another process does."""
        import fcntl

        with open(self.work / f"{name}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True

    def _write_json(self, name: str, obj: dict) -> None:  # the run's "done" marker: written last, atomically
        tmp = self.work / f"{name}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(obj, indent=1))
        tmp.replace(self.work / f"{name}.json")

    def _train(self, name: str, yaml: str, overrides: list[str], after: Optional[str]) -> None:
        from llmshearing.export import export_checkpoint

        run = self.work / name
        shutil.rmtree(run, ignore_errors=True)
        log.info("run %s", name)
        counted = train_counted(yaml, common_overrides(self.cache) + [f"variables.run_dir={run}", "autoresume=false",
                                                               f"global_train_batch_size={BATCH}",
                                                               f"device_train_microbatch_size={BATCH}", *overrides])
        export_checkpoint(run / "checkpoints" / "latest-rank0.pt", self.model_dir(name), overwrite=True)
        if (run / "checkpoints" / "masks").is_dir():
            shutil.move(str(run / "checkpoints" / "masks"), str(run / "masks"))
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # keep metrics.jsonl and masks, drop the optimizer
        counted.update(after=after, model=self.model_identity(name),
                       after_model=self.model_identity(after) if after else None)
        self._write_json(name, counted)

    def save_oneshot(self, name: str, method: str, seed: int, masks_of: Optional[str] = None, train: bool = True) -> str:
        """The source pruned to ``TARGET`` by a one-shot ``method``, or (``method="learned"``) by the final masks of
        the pruning run ``masks_of`` with every kept unit at 1 (the selection alone, without co-trained weights);
        returns its keyed name. Its own tokens are 0; a learned selection's run counts the pruning run's (``after``)."""
        key = self.key({"method": method, "seed": seed if method == "random" else None, "masks_of": masks_of,
                        "calibration": CALIBRATION if method == "activation" else None,
                        "seq": SEQ if method == "activation" else None, "target": TARGET})
        name = f"{name}-{key}"
        self.recipes[name] = lambda: self._select(name, method, seed, masks_of)
        return self._build(name, masks_of, train)

    def _select(self, name: str, method: str, seed: int, masks_of: Optional[str]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from llmshearing.data import calibration_batch
        from llmshearing.pruning import materialize
        from llmshearing.pruning.baselines import select_masks
        from llmshearing.pruning.masks import DeterministicMasks

        out = self.model_dir(name)
        src = AutoModelForCausalLM.from_pretrained(self.source, dtype=torch.float32)
        if method == "learned":
            final = max((self.work / masks_of / "masks").glob("ba*.pt"), key=lambda p: int(p.stem[2:]))
            masks = DeterministicMasks.selection(torch.load(final, weights_only=False)["deterministic"])
        else:
            calib = calibration_batch(str(self.data), CALIBRATION, SEQ) if method == "activation" else None
            masks = select_masks(src, TARGET, method, seed=seed, calibration=calib)
        shutil.rmtree(out, ignore_errors=True)
        materialize(src, masks).save_pretrained(out)
        self._write_json(name, {"batches": 0, "samples": 0, "tokens": 0, "after": masks_of,
                                "model": self.model_identity(name),
                                "after_model": self.model_identity(masks_of) if masks_of else None})

    def expected_shape_error(self, name: str) -> Optional[dict[str, float]]:
        """Relative gap between a pruning run's last logged expected sizes and the target, per structure."""
        from llmshearing.callbacks.metrics_file import read_metrics

        if name in self.recorded:
            return self.recorded[name].get("shape_error")
        path = self.work / name / "metrics.jsonl"
        if not path.is_file():
            return None
        logged = read_metrics(path)
        out = {}
        for k, want in TARGET.items():
            series = logged.get(f"pruning/expected_{k}")
            if series:
                out[k] = series[max(series)] / want - 1
        return out

    def chain(self, name: str) -> list[dict]:
        """The counts of ``name`` and of every run before it (``after``): an arm's runs, newest first."""
        out = []
        while name:
            st = self.stats(name) or {}
            out.append(st)
            name = st.get("after")
        return out

    def total_tokens(self, name: str) -> int:
        return sum(int(st.get("tokens", 0)) for st in self.chain(name))

    def passes(self, name: str) -> dict[str, float]:
        """Passes over each domain's training sequences, summed over the arm's runs."""
        total: dict[str, float] = {}
        for st in self.chain(name):
            for d, k in (st.get("samples_per_domain") or {}).items():
                total[d] = total.get(d, 0.0) + k / st["train_sequences_per_domain"][d]
        return total

    def test_losses(self, name: str, path: Optional[Path] = None) -> dict[str, np.ndarray]:
        """Per-sequence test losses per domain (recorded, or cached here), in the same order for every model."""
        if name in self.recorded and "test" in self.recorded[name]:
            return _unpack_losses(self.recorded[name]["test"])
        cached = self.work / f"{name}_test{TEST_SEQUENCES}.npz"
        if cached.is_file():
            with np.load(cached) as z:
                return {d: z[d] for d in self.domains}
        res = _test_losses(path or self.model_dir(name), self.data)
        tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **res)
        tmp.replace(cached)
        return res

    def val_loss(self, name: str) -> float:
        if name in self.recorded and "val" in self.recorded[name]:
            return float(self.recorded[name]["val"])
        return _val_loss(self.model_dir(name), self.data)


def _usable_record(path: Path) -> Optional[dict]:
    """The record in ``path``, or None (with a warning) when its test losses cover another test set."""
    rec = json.loads(path.read_text())
    if rec.get("test_sequences") != TEST_SEQUENCES:
        log.warning("%s: recorded with test_sequences=%s, not %s: not used", path.name, rec.get("test_sequences"),
                    TEST_SEQUENCES)
        return None
    return rec


def _target_config(source: Path, out: Path) -> Path:
    """A folder with the target's config (the source's, at ``TARGET``'s sizes; heads keep their width): what the
    FLOPs count reads, without selecting a model."""
    from transformers import AutoConfig

    if (out / "config.json").is_file():  # made from the same source (the folder's name carries its identity)
        return out
    cfg = AutoConfig.from_pretrained(source)
    cfg.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for k, v in {**TARGET, "num_key_value_heads": TARGET["num_attention_heads"]}.items():
        setattr(cfg, k, v)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    cfg.save_pretrained(tmp)
    try:
        tmp.replace(out)
    except OSError:  # another process sharing the folder put the same config there first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _test_losses(model_dir: Path, data: Path) -> dict[str, np.ndarray]:
    from llmshearing.evaluate import load_model, sequence_losses

    return sequence_losses(load_model(model_dir), data, "test", batch_size=64, max_sequences_per_domain=TEST_SEQUENCES)


def _val_loss(model_dir: Path, data: Path) -> float:
    from llmshearing.evaluate import domain_losses, load_model

    return float(domain_losses(load_model(model_dir), data, batch_size=64, max_sequences_per_domain=VAL_SEQUENCES,
                               split="val")["all"])


def _pack_losses(per: dict[str, np.ndarray]) -> dict[str, str]:
    """Per-sequence losses for a record: float32 bytes in base64 (exact: ``sequence_losses`` computes in float32)."""
    import base64

    return {d: base64.b64encode(np.asarray(v, np.float32).tobytes()).decode() for d, v in per.items()}


def _unpack_losses(packed: dict[str, str]) -> dict[str, np.ndarray]:
    import base64

    return {d: np.frombuffer(base64.b64decode(v), np.float32).astype(np.float64) for d, v in packed.items()}


def _cfg(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _shape(model_dir: Path) -> dict[str, int]:
    from llmshearing.models.families import describe_shape

    return describe_shape(_cfg(model_dir))


def _mean_all(per: dict[str, np.ndarray]) -> float:
    return float(np.concatenate(list(per.values())).mean())


def _sem(values: list[float]) -> float:
    """Standard error of the mean over seeds (nan with one seed)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def _fmt(m: float, se: float) -> str:
    return f"{m:.3f} ± {se:.3f}" if np.isfinite(se) else f"{m:.3f}"


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one experiment, top to bottom
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/replication.json")
    p.add_argument("--cache", default="runs/benchmarks/cache_v5")
    p.add_argument("--prune-steps", type=int, default=400)
    p.add_argument("--cpt-steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2],
                   help="swept on validation, the sweep seed, budget T (a grid that brackets the optimum)")
    p.add_argument("--scratch-budgets", type=float, nargs="+", default=[2.0, 3.0],
                   help="extra scratch budgets (multiples of T), every seed, each its own fully decayed run")
    p.add_argument("--lr-extensions", type=int, default=2,
                   help="rates a sweep may add, half a decade at a time, when its best is at the grid's edge")
    p.add_argument("--sweep-seed", type=int, default=100,
                   help="the learning-rate sweeps' seed (not one of the reported seeds 0..n-1)")
    p.add_argument("--prune-lrs", type=float, nargs="+", default=[1e-4, 1e-3],
                   help="model lrs of the pruning stage swept on validation (the sweep seed) with the continued-training "
                        "lr, grown like --lrs")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs already finished")
    p.add_argument("--kd", action="store_true", help="also run the distillation arms (issue #14)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (two processes on 2 cores: 1 each)")
    p.add_argument("--lr-sweep-only", action="store_true",
                   help="stop after the learning-rate sweeps (the sweep seed, val)")
    p.add_argument("--records", default=str(REPO / "benchmarks" / "records" / "replication"),
                   help="finished runs kept in the repository (read as done when their keys match; '' for none)")
    p.add_argument("--record", action="store_true", help="write each run finished here into --records")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from benchmarks.stats import (clustered_se, compare as paired, seed_matched_crossover, t_critical, verdict,
                                  worst_excess_compare)
    from llmshearing.evaluate import domain_losses, load_model, sequence_documents

    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(cache / "build.lock", "w") as lock:  # a second process waits here while the first builds them
        fcntl.flock(lock, fcntl.LOCK_EX)
        data, source = ensure_data(cache), ensure_source(cache)
    if args.record and not args.records:
        p.error("--record needs --records")
    b = Bench(cache, Path(args.out).resolve().with_suffix(""), data, source,
              records=Path(args.records) if args.records else None, record=args.record)
    domains = b.domains
    T = args.prune_steps + args.cpt_steps
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every process (any --threads, any machine) rounds the same references: keys use them
    src_val = domain_losses(load_model(source), data, batch_size=64, max_sequences_per_domain=VAL_SEQUENCES,
                            split="val")
    torch.set_num_threads(args.threads or threads)
    ref = "[" + ",".join(f"{src_val[d]:.4f}" for d in domains) + "]"  # dynamic loading's references: validation
    sched = ["scheduler.t_warmup=0.03dur", "scheduler.alpha_f=0.1"]  # every run decays fully by its own end
    target_cfg = [f"model.config.{k}={v}" for k, v in TARGET.items()] + [
        f"model.config.num_key_value_heads={TARGET['num_attention_heads']}"]

    train = not args.report_only

    def settle(phase) -> None:
        """Run ``phase`` (it returns the names of its runs) until every run it names is done: another process may
        hold some of them, or their predecessors."""
        while train:
            pending = [n for n in phase() if not b.done(n)]
            if not pending:
                return
            log.info("waiting for %d run(s) that other processes hold: %s", len(pending), ", ".join(pending[:3]))
            time.sleep(20)

    def scratch(steps: int, lr: float, seed: int) -> str:
        return b.run(f"scratch_{steps}_lr{lr:g}_s{seed}", "yamls/pretrain/small_cpu.yaml", [
            f"max_duration={steps}ba", f"eval_interval={steps}ba", f"save_interval={steps}ba", f"optimizer.lr={lr}",
            f"seed={seed}", *sched, *target_cfg], train=train)

    def oneshot_ft(method: str, seed: int, lr: float, steps: Optional[int] = None) -> str:
        """A one-shot selection + ``steps`` (default: T) of continued training; a learned selection's masks come from
        the seed's pruning run, whose tokens the arm counts (``after``)."""
        base = {"random": f"random_s{seed}", "learned": f"learned_on_source_s{seed}"}.get(method, method)
        masks_of = sheared(seed, lr_of["continued"], True)[0] if method == "learned" else None
        steps = steps or T
        start = b.save_oneshot(base, method, seed, masks_of=masks_of, train=train)
        return b.run(f"{base}_ft{steps}_lr{lr:g}_s{seed}", "yamls/continue_pretrain/tiny_cpu.yaml", [
            f"variables.source={b.model_dir(start)}", f"variables.reference_losses={ref}", f"max_duration={steps}ba",
            f"eval_interval={max(steps // 10, 1)}ba", f"save_interval={steps}ba", f"optimizer.lr={lr}", f"seed={seed}",
            *sched], after=start, train=train)

    def sheared(seed: int, lr: float, dynamic: bool, init: str = "reference", plr: Optional[float] = None,
                kd_prune: bool = False, kd_cpt: bool = False, cpt_steps: Optional[int] = None) -> tuple[str, str]:
        plr = prune_lr if plr is None else plr
        cpt_steps = cpt_steps or args.cpt_steps
        tag = {"reference": "ref", "importance": "imp"}[init]
        prune = b.run(f"prune_{tag}_plr{plr:g}{'_kd' if kd_prune else ''}_s{seed}", "yamls/prune/small_cpu.yaml", [
            f"variables.source={source}", f"max_duration={args.prune_steps}ba",
            f"eval_interval={args.prune_steps // 4}ba", f"save_interval={args.prune_steps}ba",
            "dynamic_loading.update=doremi", f"dynamic_loading.reference_losses={ref}", f"seed={seed}",
            f"optimizer.lr={plr}", f"pruning.init={init}", f"pruning.calibration_sequences={CALIBRATION}",
            *(["distillation.kd_weight=1.0"] if kd_prune else [])], train=train)  # teacher: the pruning source
        name = b.run(f"cpt_{tag}_plr{plr:g}{'_kd' if kd_prune else ''}_{'dynamic' if dynamic else 'constant'}"
                     f"{'_kd' if kd_cpt else ''}_{cpt_steps}ba_lr{lr:g}_s{seed}", "yamls/continue_pretrain/tiny_cpu.yaml", [
            f"variables.source={b.model_dir(prune)}", f"variables.reference_losses={ref}",
            f"max_duration={cpt_steps}ba", f"eval_interval={cpt_steps // 6}ba",
            f"save_interval={cpt_steps}ba", f"optimizer.lr={lr}", f"seed={seed}", *sched,
            *([] if dynamic else ["dynamic_loading.update=constant"]),
            *([f"distillation.teacher={source}"] if kd_cpt else [])], after=prune, train=train)
        return prune, name

    # 1. learning rates, on validation (the sweep seed, budget T); a grid whose best rate is at its edge grows half a
    # decade that way (at most --lr-extensions times) until the best is bracketed
    sw = args.sweep_seed  # a seed of its own: the best run of a sweep is not one of the reported arms' seeds
    settle(lambda: [n for lr in args.lrs for n in (scratch(T, lr, sw), oneshot_ft("random", sw, lr))])
    run_of = {"scratch": lambda lr: scratch(T, lr, sw), "continued": lambda lr: oneshot_ft("random", sw, lr)}
    val_of: dict[str, float] = {}  # run name -> validation loss

    def val(name: str) -> float:
        if name not in val_of:
            val_of[name] = b.val_loss(name)
        return val_of[name]

    sweep: dict[str, dict[str, float]] = {}
    edge: dict[str, bool] = {}
    complete: dict[str, bool] = {}  # every rate of the sweep's final grid has run

    def swept(kind: str, grid: list[float], name_of: Callable[[float], str]) -> None:
        """Sweep ``kind`` over ``grid`` (the run ``name_of(rate)`` per rate, chosen on its validation loss), growing
        it half a decade past a best rate at its edge, up to ``--lr-extensions`` more rates."""
        max_rates = len(grid) + args.lr_extensions
        while True:
            settle(lambda: [name_of(r) for r in grid])
            losses = {r: val(name_of(r)) for r in grid if b.done(name_of(r))}
            nxt = next_rate(losses, max_rates) if len(losses) == len(grid) else None
            if nxt is None or (not train and not b.done(name_of(nxt))):
                break
            grid = sorted(grid + [nxt])
        sweep[kind] = {f"{r:g}": x for r, x in sorted(losses.items())}
        best = min(losses, key=losses.get) if losses else None
        complete[kind] = bool(losses) and len(losses) == len(grid) and nxt is None  # not waiting for a next rate
        edge[kind] = complete[kind] and best in (min(grid), max(grid))

    for kind, run in run_of.items():
        swept(kind, sorted(args.lrs), run)
    lr_of = {k: float(min(v, key=v.get)) if v else args.lrs[0] for k, v in sweep.items()}
    if args.lr_sweep_only:
        log.info("learning rates chosen on validation: %s (%s; at the grid's edge: %s)", lr_of, sweep, edge)
        write_json(args.out, {"lr_sweep_val": sweep, "learning_rates": lr_of, "at_edge": edge, "args": vars(args)})
        return 0
    # the pruning stage's model lr: from the paper's 1e-4 to the continued-training rate, chosen on validation after
    # the whole sheared chain (pruning + continued training, the sweep's seed, budget T), grown like the others
    swept("pruning", sorted({*args.prune_lrs, lr_of["continued"]}),
          lambda plr: sheared(sw, lr_of["continued"], True, plr=plr)[1])
    prune_lr = float(min(sweep["pruning"], key=sweep["pruning"].get)) if sweep["pruning"] else lr_of["continued"]
    lr_of["pruning"] = prune_lr
    log.info("learning rates chosen on validation: %s (%s)", lr_of, sweep)

    # distillation (issue #14): FLOPs per token of a KD continued-training step over a CE one (the teacher's
    # forward, 2 N_source, on top of 6 N_target), which sets the CE arm of equal compute
    from benchmarks.common import matmul_params_of, step_flops

    n_src, src_cfg = matmul_params_of(source)
    tgt_dir = _target_config(source, b.work / f"target_config-{b.identity()['source']}")
    n_tgt, tgt_cfg = matmul_params_of(tgt_dir)
    ce_step = step_flops(n_tgt, tgt_cfg, BATCH * SEQ, SEQ)  # the project's FLOPs count, attention included
    kd_cost = step_flops(n_tgt, tgt_cfg, BATCH * SEQ, SEQ, teacher=n_src, teacher_config=src_cfg) / ce_step
    eq_steps = int(round(args.cpt_steps * kd_cost))
    cl = lr_of["continued"]
    kd_arms = ("sheared + KD", "sheared + CE, equal compute", "learned, KD in pruning (after pruning)",
               "sheared, KD in pruning", "sheared, KD in both")

    # 2. every arm, seed by seed, most needed first (an interrupted benchmark still reports what finished)
    def plan() -> tuple:
        """Every arm's runs (trained unless done or held by another process) -> (arms, one-shot selections, extra
        scratch budgets, scratch by budget)."""
        arms: dict[str, list[str]] = {k: [] for k in (
            "learned (after pruning)", "learned, importance init (after pruning)", "sheared", "sheared (importance init)",
            "sheared_constant", "random", "magnitude", "activation", "learned masks on source", "scratch")}
        oneshot: dict[str, list[str]] = {
            "random one-shot": [], "magnitude one-shot": [b.save_oneshot("magnitude", "magnitude", 0, train=False)],
            "activation one-shot": [b.save_oneshot("activation", "activation", 0, train=False)],
            "learned masks on source, one-shot": []}
        extra_scratch: dict[int, str] = {}
        for seed in range(args.seeds):
            prune, dyn = sheared(seed, cl, True)
            arms["learned (after pruning)"].append(prune)
            arms["sheared"].append(dyn)
            prune_imp, dyn_imp = sheared(seed, cl, True, "importance")
            arms["learned, importance init (after pruning)"].append(prune_imp)
            arms["sheared (importance init)"].append(dyn_imp)
            arms["random"].append(oneshot_ft("random", seed, cl))
            arms["magnitude"].append(oneshot_ft("magnitude", seed, cl))
            arms["activation"].append(oneshot_ft("activation", seed, cl))
            arms["scratch"].append(scratch(T, lr_of["scratch"], seed))
            oneshot["random one-shot"].append(b.save_oneshot(f"random_s{seed}", "random", seed, train=False))
        for seed in range(args.seeds):
            # the selection alone: the pruning run's masks on the source weights, then the T - P steps the sheared arm
            # continues for, so that (with the pruning run's tokens counted) every arm reads T
            arms["learned masks on source"].append(oneshot_ft("learned", seed, cl, steps=args.cpt_steps))
            base = b.save_oneshot(f"learned_on_source_s{seed}", "learned", seed,
                                  masks_of=sheared(seed, cl, True)[0], train=False)
            oneshot["learned masks on source, one-shot"].append(base)
        for seed in range(args.seeds):
            arms["sheared_constant"].append(sheared(seed, cl, False)[1])
        scratch_by_budget: dict[int, list[str]] = {T: arms["scratch"]}
        for f in args.scratch_budgets:  # every seed: the crossover compares seed-matched curves
            steps = int(round(f * T))
            scratch_by_budget[steps] = [scratch(steps, lr_of["scratch"], seed) for seed in range(args.seeds)]
            extra_scratch[steps] = scratch_by_budget[steps][0]
        for k in kd_arms:
            arms[k] = []
        if args.kd:
            for seed in range(args.seeds):
                arms["sheared + KD"].append(sheared(seed, cl, True, kd_cpt=True)[1])
            for seed in range(args.seeds):
                arms["sheared + CE, equal compute"].append(sheared(seed, cl, True, cpt_steps=eq_steps)[1])
            for seed in range(args.seeds):
                prune_kd, name = sheared(seed, cl, True, kd_prune=True)
                arms["learned, KD in pruning (after pruning)"].append(prune_kd)
                arms["sheared, KD in pruning"].append(name)
            for seed in range(args.seeds):
                arms["sheared, KD in both"].append(sheared(seed, cl, True, kd_prune=True, kd_cpt=True)[1])
        return arms, oneshot, extra_scratch, scratch_by_budget

    def all_runs() -> list[str]:
        arms_, oneshot_, _, by_budget = plan()
        return [n for v in (*arms_.values(), *oneshot_.values(), *by_budget.values()) for n in v]

    settle(all_runs)
    arms, oneshot, extra_scratch, scratch_by_budget = plan()
    # the previous mask defaults (log_alpha from 0, no clamp, mean-gap penalty, mask lr 0.1, model lr 1e-4), as
    # cached by earlier versions of this benchmark: reported when present, never run
    legacy = {"learned, old defaults (after pruning)": [f"prune_s{s}" for s in range(args.seeds)],
              "sheared, old defaults": [f"cpt_dynamic_lr{cl:g}_s{s}" for s in range(args.seeds)]}

    # 3. report: test losses of the finished runs
    source_test = b.test_losses("source", source)
    src_mean = {d: float(source_test[d].mean()) for d in domains}

    def worst_excess(per: dict[str, np.ndarray]) -> float:  # the worst domain's loss above the source's
        return max(float(per[d].mean()) - src_mean[d] for d in domains)

    def summary(names: list[str]) -> Optional[dict]:
        names = [n for n in names if b.done(n)]
        if not names:
            return None
        per = [b.test_losses(n) for n in names]
        means = [_mean_all(x) for x in per]
        worst = [worst_excess(x) for x in per]
        return {"runs": names, "seeds": len(names), "loss": statistics.mean(means), "loss_se": _sem(means),
                "per_seed_loss": means, "domains": {d: statistics.mean(float(x[d].mean()) for x in per) for d in domains},
                "worst_excess": statistics.mean(worst), "worst_excess_se": _sem(worst),
                "tokens_after_source": [b.total_tokens(n) for n in names],
                "batches": [(b.stats(n) or {}).get("batches") for n in names],
                "passes_per_domain": [b.passes(n) for n in names]}

    rows = {"source": {"runs": ["source"], "seeds": 1, "loss": _mean_all(source_test), "loss_se": float("nan"),
                       "per_seed_loss": [_mean_all(source_test)], "domains": src_mean, "worst_excess": 0.0,
                       "worst_excess_se": float("nan"), "tokens_after_source": [0], "batches": [0]}}
    for k, v in {**oneshot, **arms, **legacy}.items():
        s = summary(v)
        if s:
            rows[k] = s
    for steps in extra_scratch:
        s = summary(scratch_by_budget[steps])  # every seed run at that budget
        if s:
            rows[f"scratch, {steps / T:g}T"] = s

    docs = sequence_documents(data, "test", max_sequences_per_domain=TEST_SEQUENCES)
    clusters = np.concatenate([k * 1_000_000 + docs[d] for k, d in enumerate(domains)])  # distinct across domains

    def compare(a: str, c: str, metric: str = "loss") -> Optional[dict]:
        """Seed-paired comparison (benchmarks/stats.py): between-seed SE with seeds - 1 df, test SE clustered by
        document; the worst-domain metric takes each arm's worst domain per seed (``stats.worst_excess_compare``)."""
        every = {**arms, **legacy}
        pairs = [(s, x, y) for s, (x, y) in enumerate(zip(every.get(a, []), every.get(c, []))) if b.done(x) and b.done(y)]
        if not pairs:
            return None
        la = {s: b.test_losses(x) for s, x, _ in pairs}
        lc = {s: b.test_losses(y) for s, _, y in pairs}
        flat = lambda per: np.concatenate([per[d] for d in domains])  # noqa: E731
        if metric == "worst_excess":  # each arm's worst domain per seed, its test error with those domains fixed
            r = worst_excess_compare(la, lc, src_mean, docs)
            per_seed = [worst_excess(la[s]) - worst_excess(lc[s]) for s in la]
        else:
            r = paired({s: flat(x) for s, x in la.items()}, {s: flat(x) for s, x in lc.items()}, clusters)
            per_seed = [float(flat(la[s]).mean() - flat(lc[s]).mean()) for s in la]
        per_domain = {}
        for d in domains:
            dd = np.mean([la[s][d] - lc[s][d] for s in la], axis=0)
            per_domain[d] = {"diff": float(dd.mean()), "se_test": clustered_se(dd, docs[d])}
        v = verdict(r["diff"], r["se"], r["df"], a, c)
        return {"a": a, "b": c, "metric": metric, "seeds": r["n_seeds"], "per_seed": per_seed, "mean": r["diff"],
                "se_seed": r["se_seed"], "se_test": r["se_test"], "se": r["se"], "t": r["t"], "df": r["df"],
                "t_critical": t_critical(r["df"]), "verdict": v, "per_domain": per_domain, "worst": r.get("worst")}

    comparisons = [c for c in (
        compare("sheared", "scratch"),
        compare("sheared_constant", "scratch"),  # both trained at the token shares (only its 400 pruning steps load
        # dynamically): the comparison with the least help from dynamic loading
        *(compare(a, o) for a in ("sheared", "sheared (importance init)") for o in ("random", "magnitude", "activation")),
        compare("sheared", "sheared (importance init)"),
        compare("learned masks on source", "sheared"),
        *(compare("learned masks on source", o) for o in ("random", "magnitude", "activation")),
        compare("sheared", "sheared, old defaults"),
        compare("sheared", "sheared_constant"), compare("sheared", "sheared_constant", "worst_excess"),
        compare("activation", "magnitude"), compare("random", "magnitude"),
        compare("sheared + KD", "sheared"), compare("sheared + KD", "sheared + CE, equal compute"),
        compare("sheared + KD", "scratch"), compare("learned, KD in pruning (after pruning)", "learned (after pruning)"),
        compare("sheared, KD in pruning", "sheared"), compare("sheared, KD in both", "sheared + KD")) if c]

    # tokens scratch needs to reach an arm's final test loss, between fully decayed scratch runs; and the same in
    # compute: FLOPs of the arm (pruning steps at the source's size, teacher forwards) in scratch-step units
    def crossover_of(arm: str, steps_equiv: float) -> Optional[dict]:
        """Scratch tokens to reach ``arm``'s test loss, between scratch runs at T, 2T, 3T: with the seeds every budget
        and the arm have, on their means and seed by seed (scratch seed s against the arm's seed s)."""
        every = {**arms, **legacy}
        if arm not in every:
            return None
        curves = {steps * BATCH * SEQ: {s: _mean_all(b.test_losses(n)) for s, n in enumerate(scratch_by_budget[steps])
                                        if b.done(n)} for steps in scratch_by_budget}
        mine = {s: _mean_all(b.test_losses(n)) for s, n in enumerate(every[arm]) if b.done(n)}
        r = seed_matched_crossover(curves, mine)
        if r is None:
            return None
        tok = T * BATCH * SEQ
        compute_tok = steps_equiv * BATCH * SEQ  # scratch tokens of the same FLOPs as the arm
        needed = r["tokens"]
        return {"arm": arm, "seeds": r["seeds"], "curve_tokens_loss": r["curve"], "sheared_loss": r["target"],
                "sheared_tokens": tok, "scratch_tokens_to_match": needed, "where": r["where"],
                "ratio": None if needed is None else needed / tok,
                "per_seed_ratio": {s: (None if n is None else n / tok, w) for s, (n, w) in r["per_seed"].items()},
                "compute_equivalent_scratch_tokens": compute_tok,
                "ratio_in_compute": None if needed is None else needed / compute_tok}

    # a pruning step trains the masked source (6 N_source + attention per token; with distillation the teacher's
    # forward too), in units of a target training step: the project's FLOPs count, as for kd_cost
    prune_cost = step_flops(n_src, src_cfg, BATCH * SEQ, SEQ) / ce_step
    prune_kd_cost = step_flops(n_src, src_cfg, BATCH * SEQ, SEQ, teacher=n_src, teacher_config=src_cfg) / ce_step
    crossovers = [c for c in (
        crossover_of("sheared", args.prune_steps * prune_cost + args.cpt_steps),
        crossover_of("sheared_constant", args.prune_steps * prune_cost + args.cpt_steps),
        crossover_of("sheared + KD", args.prune_steps * prune_cost + args.cpt_steps * kd_cost),
        crossover_of("sheared, KD in both", args.prune_steps * prune_kd_cost + args.cpt_steps * kd_cost)) if c]
    crossover = crossovers[0] if crossovers else None

    # the test set's resolution: paired per-domain SE achieved, and the sequences needed for SE_BOUND
    resolution = {}
    for c in comparisons:
        if c["metric"] != "loss":
            continue
        for d, v in c["per_domain"].items():
            n = min(TEST_SEQUENCES, len(source_test[d]))
            need = int(math.ceil(n * (v["se_test"] / SE_BOUND) ** 2)) if np.isfinite(v["se_test"]) else None
            resolution[f"{c['a']} - {c['b']}: {d}"] = {"se_test": v["se_test"], "sequences": n, "needed_for_bound": need}

    lines = [f"Test split: {', '.join(f'{d} {len(source_test[d])}' for d in domains)} sequences of {SEQ} tokens. "
             f"T = {T} steps x {BATCH} x {SEQ} = {T * BATCH * SEQ / 1e6:.2f}M tokens after the source. "
             f"Learning rates chosen on validation: scratch {lr_of['scratch']:g}, continued training "
             f"{lr_of['continued']:g}, pruning stage (model weights) {lr_of['pruning']:g} "
             f"(sweep: {json.dumps(sweep)})"
             + ("; at the edge of the grid, not bracketed: " + ", ".join(k for k, e in edge.items() if e)
                if any(edge.values()) else "; every swept rate's optimum is inside its grid"
                if all(complete.values()) else "; the sweeps have not finished") + ".", "",
             ("Test loss and worst excess: mean over seeds +- the between-seed SE (the comparisons below add the "
              "test-set error)."), "",
             "| arm | seeds | tokens after source (trainer) | passes over train (code/docstrings/reference) | test loss | "
             + " | ".join(domains) + " | worst excess over source |",
             "|---|---|---|---|---|" + "---|" * len(domains) + "---|"]
    for k, r in rows.items():
        passes = r.get("passes_per_domain") or []
        ps = "/".join(f"{statistics.mean(p.get(d, 0.0) for p in passes):.2f}" for d in domains) if passes else "-"
        lines.append(f"| {k} | {r['seeds']} | {statistics.mean(r['tokens_after_source']) / 1e6:.2f}M | {ps} | "
                     f"{_fmt(r['loss'], r['loss_se'])} | " + " | ".join(f"{r['domains'][d]:.3f}" for d in domains)
                     + f" | {_fmt(r['worst_excess'], r['worst_excess_se'])} |")
    lines += ["", "| comparison (a - b) | metric | seeds | mean difference | SE (seeds, test by document) | t (df; 95% "
              "point) | verdict |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['a']} - {c['b']} | {c['metric']} | {c['seeds']} | {c['mean']:+.4f} | "
                     f"{c['se']:.4f} ({c['se_seed']:.4f}, {c['se_test']:.4f}) | {c['t']:+.2f} ({c['df']}; "
                     f"{c['t_critical']:.2f}) | {c['verdict']} |")
    if crossover:
        lines += ["", "Scratch, final test loss of each fully decayed run: " + ", ".join(
            f"{t / 1e6:.2f}M tokens {l:.3f}" for t, l in crossover["curve_tokens_loss"]) + "."]
    largest = max(scratch_by_budget) / T

    def ratio_text(r: Optional[float], where: str) -> str:
        if where == "beyond":
            return f"not reached by {largest:g}T"
        if where == "undetermined":
            return "undetermined (a loss is not finite)"
        return f"{r:.2f}x" if where == "between" else f"<= {r:.2f}x (scratch's smallest budget is already as low)"

    for c in crossovers:
        per_seed = ", ".join(f"seed {s} {ratio_text(*v)}" for s, v in c["per_seed_ratio"].items())
        lines.append(f"- {c['arm']} {c['sheared_loss']:.3f} at {c['sheared_tokens'] / 1e6:.2f}M tokens "
                     f"({c['compute_equivalent_scratch_tokens'] / 1e6:.2f}M scratch tokens of the same FLOPs), against "
                     f"scratch seeds {', '.join(map(str, c['seeds']))} at every budget: "
                     + (f"scratch needs {'at most ' if c['where'] == 'at most' else ''}"
                        f"{c['scratch_tokens_to_match'] / 1e6:.2f}M tokens: {c['ratio']:.2f}x in tokens, "
                        f"{c['ratio_in_compute']:.2f}x in compute" if c["where"] in ("between", "at most")
                        else ratio_text(None, c["where"]))
                     + f"; seed by seed: {per_seed}.")
    if args.kd or any(rows.get(k) for k in kd_arms):
        lines.append(f"- distillation: a KD continued-training step costs {kd_cost:.2f}x a CE step in FLOPs (the "
                     f"project's count: 6 N + attention for the student, 2 N + attention for the teacher; source "
                     f"{n_src / 1e6:.2f}M, target {n_tgt / 1e6:.2f}M multiplied weights); the equal-compute CE arm "
                     f"trains {eq_steps} steps instead of {args.cpt_steps}.")
    worst_res = max(resolution.items(), key=lambda kv: kv[1]["se_test"] if np.isfinite(kv[1]["se_test"]) else 0,
                    default=None)
    if worst_res:
        lines += ["", f"Largest paired per-domain test-set SE: {worst_res[1]['se_test']:.4f} ({worst_res[0]}; bound "
                  f"{SE_BOUND}; {worst_res[1]['sequences']} sequences, {worst_res[1]['needed_for_bound']} needed)."]
    # do the pruning runs land on the target? (expected sizes at the last step; top-k always matches it)
    convergence = {n: b.expected_shape_error(n) for k in ("learned (after pruning)", "learned, importance init (after pruning)")
                   for n in arms[k] if b.done(n)}
    convergence = {k: v for k, v in convergence.items() if v}
    if convergence:
        worst = max(abs(x) for v in convergence.values() for x in v.values())
        lines += ["", "Expected sizes at the end of pruning, relative to the target (" + ", ".join(TARGET) + "): "
                  + "; ".join(f"{n} " + "/".join(f"{v[k]:+.1%}" for k in TARGET if k in v)
                              for n, v in convergence.items())
                  + f". Largest: {worst:.1%}."]
    planned = sorted({n for v in (*arms.values(), *oneshot.values(), *scratch_by_budget.values()) for n in v})
    if train:
        b.record_finished(n for n in planned if b.done(n))
    from_records = [n for n in planned if n in b.read_from_records]
    if from_records or b.rebuilt:
        from benchmarks.common import numerics_of, record_provenance

        groups: dict[tuple, list[dict]] = {}  # by commit and what of the machine can change the numbers
        for n in from_records:
            r = b.recorded[n]
            groups.setdefault((r.get("commit"), numerics_of(r.get("machine"))), []).append(r)
        provenance = []
        for (c, _), rs in groups.items():
            when = sorted(str(r.get("recorded")) for r in rs)
            span = when[0] + (f" to {when[-1]}" if when[-1] != when[0] else "")
            provenance.append(f"{len(rs)} " + record_provenance({"commit": c, "recorded": span,
                                                                 "machine": rs[0].get("machine")}, CODE))
        lines += ["", f"From records ({b.records}): {len(from_records)} of the {len(planned)} runs above"
                  + "".join(f"; {p}" for p in provenance)
                  + (f". Trained again here because a run that is not recorded continued from them: {len(b.rebuilt)}"
                     if b.rebuilt else "")
                  + "."]
    mixed = b.inconsistent(n for n in planned if b.done(n))
    if mixed:
        lines += ["", f"**Not comparable**: {len(mixed)} run(s) continued a model that is not the one their "
                  "predecessor's figures come from (a recorded run trained again here did not reproduce): "
                  + ", ".join(mixed) + "."]
    report = "\n".join(lines)
    write_json(args.out, {"target": TARGET, "T_steps": T, "batch": BATCH, "seq_len": SEQ,
                          "reference_losses_val": src_val, "learning_rates": lr_of, "lr_sweep_val": sweep,
                          "rows": rows, "comparisons": comparisons, "prune_lr": prune_lr, "expected_shape_error": convergence,
                          "crossover": crossover, "crossovers": crossovers, "kd_cost": kd_cost, "resolution": resolution,
                          "se_bound": SE_BOUND, "report": report, "args": vars(args)})
    Path(args.out).with_suffix(".md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
