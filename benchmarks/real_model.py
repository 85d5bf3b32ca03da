"""Selection methods on a real pretrained model at equal total training tokens: SmolLM2-135M -> half its parameters
(78.8M, ``yamls/prune_smollm2.yaml``'s shape) on the RedPajama sample, on CPU, offline.

Every arm reads the same total budget of ``--budget`` training steps of ``--batch`` x ``--seq-len`` tokens after the
source (pruning + recovery, counted by the trainer), per seed:

| arm | training |
| --- | --- |
| ``activation`` | one-shot activation selection (Minitron) + ``budget`` recovery steps |
| ``random`` | one-shot random selection (the seed's) + ``budget`` recovery steps |
| ``learned`` | today's defaults (``yamls/prune/smollm2_cpu.yaml``: reference init, mask lr 1.0, ramp 20%, co-trained weights, one mask sample a step, dynamic loading) for ``--prune-steps`` + the rest as recovery |
| ``improved`` | the improved learned stage (:data:`IMPROVED`) for ``--improved-prune-steps`` + the rest as recovery |
| ``learned on source`` | ``learned``'s final masks on the *source* weights (kept units at 1) + ``budget - prune_steps`` recovery: the selection alone |
| ``improved - <lever>`` | ablations: :data:`IMPROVED` without one lever (``--ablation-seeds``) |
| ``improved + <lever>`` | :data:`IMPROVED` with one lever that was tried and rejected on val (:data:`REJECTED`; tune phase only) |

Recovery is the same recipe for every arm (``yamls/continue_pretrain/smollm2_cpu.yaml``: lr 1e-4, cosine to 10% over
its own duration, dynamic loading against the source's validation losses, updated every ``--recovery-eval-interval``
batches for every arm) and, within a seed, the same data stream (the seed's, from its first batch): the domains are
drawn in the same order until the first update, then by each arm's own proportions (the report gives each arm's
samples per domain); pruning stages read the stream of ``seed + 7919``. Levers are chosen on
the validation split (``--phase tune`` prints val only); the test split is read for the report. Statistics:
``benchmarks/stats.py`` (paired by seed, test sequences clustered by document, t with the seeds' degrees of
freedom). FLOPs per arm are counted analytically: a pruning step runs the whole masked source (4 N T without weight
gradients, 6 N T with them, plus the teacher's 2 N T with distillation), a recovery step the target (6 N T), a
calibration (activation importance) the source's forward over its sequences (2 N T); plus attention. Not counted:
the evaluations that drive dynamic loading (16 validation sequences per domain at each update, for every arm).

Training runs under bf16 autocast by default (``--precision amp_bf16``: fp32 weights and optimizer, bf16 matmuls;
~1.5x faster than fp32 on a 2-core AVX-512-bf16 CPU, ``benchmarks/cpu_bf16.py``), as the GPU recipe does; evaluation
is fp32. The seed-0 figures of 2026-12-01/02 in docs/results.md were trained in fp32.

Every stage (evaluations, selections, pruning runs, recoveries) is cached in ``<work>/state.json`` under a key made
of everything that changes its result (the fully resolved run config with its YAML files' contents, the source's and
data's identities, seeds, steps, batch, sequence length, calibration, evaluation sequences, the code's stage version),
and writes its folders under names that carry that key, so an interrupted benchmark continues, a changed setting runs
again, and no stage overwrites another's model. Training stages checkpoint every 50 steps (``RESUMABLE``); one that
was interrupted (a killed process, a session's end) continues from its last checkpoint when the benchmark runs again,
and its wall time adds the earlier attempts' seconds up to that checkpoint. The prepared data folder is checked against ``--data``, the source's
tokenizer, ``--seq-len`` and ``--heldout-fraction`` before it is reused.

The work folder does not outlive a machine, and the compare takes longer than a session on 2 CPU cores (about
170 minutes per seed for the five arms). ``--record`` keeps each finished arm (per seed) in
``benchmarks/records/real_model/<arm>_s<seed>.json``: the entries of its stages (the source's evaluation, the
selection, the pruning run, the recovery) with their keys, per-sequence val and test losses, tokens, FLOPs, seconds
and kept units; not its models. A later run on another machine reads them (``--records``) as finished stages when
the keys match, so a changed setting or code version (``STAGE_VERSION``) runs again instead of mixing in; the
report names the arms it took from records.

    python -m benchmarks.real_model --phase tune                  # seed 0: every arm and the ablations (val)
    python -m benchmarks.real_model                               # all arms, seeds 0 1 2, report on test
    python -m benchmarks.real_model --seeds 0 --report-only       # tables from what has run
    python -m benchmarks.real_model --arms activation --seeds 1 --record   # one arm; keep it in the repository
    python -m benchmarks.real_model --extras                      # + full-size parity, generations, inference

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REDPAJAMA, data_identity, dir_identity, forward_flops, git_commit, matmul_params_of, record_machine,
    record_provenance, step_flops, train_counted, write_json)
from benchmarks.stats import compare, t_critical, verdict  # noqa: E402
from llmshearing.quickstart import KNOWN_TARGETS  # noqa: E402

if TYPE_CHECKING:
    import torch

log = logging.getLogger("real_model")
REPO_ROOT = Path(__file__).resolve().parents[1]

STAGE_VERSION = 3  # part of every stage's key: bump when a stage's code changes what it produces
TARGET = KNOWN_TARGETS["smollm2"]  # half the parameters: yamls/prune_smollm2.yaml says why
PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein"]
PRUNE_YAML = "yamls/prune/smollm2_cpu.yaml"
RECOVER_YAML = "yamls/continue_pretrain/smollm2_cpu.yaml"
# how every training stage runs, not what it computes (not in the keys): a checkpoint every 50 steps, the latest
# kept, and a stage interrupted (a session's end, a crash) continues from it when run again (exact resume)
RESUMABLE = ["autoresume=true", "save_interval=50ba", "save_num_checkpoints_to_keep=1"]
# run settings that do not change what a stage computes, left out of its key (added to the config after stages were
# cached under keys that did not have them)
NOT_IN_KEY = ("dist_timeout",)
# manifest fields left out of the data's identity: notes on how a document cut by max_doc_chars is packed
# (prepare.PACKING; document_marks since 2ac7752, later_pieces since 4696aef), which the records pinned before those
# commits did not have. This benchmark never cuts a document (prepare_dataset's max_doc_chars=None), so the notes say
# nothing about its data; the shards' contents stay in the identity, so other tokens match no record
DATA_NOTES = ("document_marks", "later_pieces")
PRUNE_STREAM = 7919  # pruning stages read the stream of seed + this; recoveries the seed's own

# The improved learned stage: a loss-aware refinement of activation importance (README, "Selection"). Each lever is
# a set of overrides of the pruning run; an ablation removes one.
IMPROVED: dict[str, list[str]] = {
    # start at the target by activation importance (pruning.init: target): the first improved run started from
    # importance *below* the intact source (init: importance) and ramped to the target over 20 of its 100 steps;
    # its multipliers wound up while the gates left saturation, it overshot to hidden 344 / FFN 792 (target 448 /
    # 1024) and was cut there (val 4.881, the tune report's first row of the improved stage)
    "importance init": ["pruning.init=target", "pruning.calibration_sequences=64"],
    # hold every row on the target by projection instead of multipliers: with init target the Lagrangian's
    # multipliers still swung the sizes +-7% around the target over the 100 steps (hidden ended at 479.5 of 448,
    # 159 weak FFN channels; val 4.288, the tune report's improved row before this lever)
    "projected constraint": ["pruning.constraint=projection"],
    "distillation": ["distillation.kd_weight=1.0"],  # KL to the source (the teacher defaults to it), KD only
    "4 mask samples": ["pruning.mask_samples=4", "device_train_microbatch_size=1"],
    "low clamp": [f"pruning.log_alpha_min={math.log(1e-4):.4f}"],
}
# Levers tried and rejected on val; each gives an ablation row ``improved + <lever>``. Frozen weights (the masks learned
# on the source's weights): 4.302 with them against 4.168 without (seed 0, val, 2026-12-02, with the other levers
# above), with almost the same selection (kept units differing from activation's 12.9/19.4/23.9% vs 12.5/18.7/22.8%).
REJECTED: dict[str, list[str]] = {
    "frozen weights": ["pruning.freeze_weights=true"],
}


def _sha(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_data_identity(data: Path) -> str:
    """The prepared data's identity in every stage key (:data:`DATA_NOTES` left out)."""
    return data_identity(data, omit=DATA_NOTES)


def _resolved(yaml: str, overrides: list[str]) -> dict[str, Any]:
    """The fully resolved run config of ``yaml`` (its includes' contents too) under ``overrides``, with the
    machine's paths as placeholders (their identities are in the stage's key already): what a stage's key hashes."""
    import dataclasses

    from llmshearing.config import load_config

    where = ["variables.data=<data>", "variables.source=<source>", "tokenizer=<source>", "variables.run_dir=<run>"]
    cfg = dataclasses.asdict(load_config(str(REPO_ROOT / yaml), [*overrides, *where]))
    for how in NOT_IN_KEY:  # how a run waits or saves, not what it computes
        cfg.pop(how, None)
    return json.loads(json.dumps(cfg, sort_keys=True, default=str))


def _check_prepared(data: Path, args: argparse.Namespace, source: Path) -> None:
    """A prepared data folder is reused only for the inputs, tokenizer, sequence length and split it was made from."""
    from llmshearing.data.prepare import MANIFEST

    m = json.loads((data / MANIFEST).read_text())
    want = {"inputs": str(Path(args.data).resolve()), "tokenizer": str(source), "seq_len": args.seq_len,
            "held-out fraction": args.heldout_fraction}
    have = {"inputs": str(Path(m["inputs"]["path"]).resolve()), "tokenizer": str(m["tokenizer"]["path"]),
            "seq_len": m["seq_len"], "held-out fraction": m["val_fraction"]}
    bad = {k: (have[k], want[k]) for k in want if have[k] != want[k] or
           (k == "held-out fraction" and m["test_fraction"] != want[k])}
    if bad:
        diffs = ", ".join(f"{k}: {a} there, {b} asked" for k, (a, b) in bad.items())
        raise SystemExit(f"{data} was prepared from other settings ({diffs}): give another --work folder, or delete it "
                         "to prepare it again")


class Stages:
    """Cached stages: ``state.json`` maps a key (a hash of everything that defines the stage) to its result. Several
    processes may share a work folder (``--arms`` / ``--seeds`` split across them): each re-reads the file under a
    lock before adding its stage."""

    def __init__(self, work: Path, records: Optional[Path] = None) -> None:
        self.file = work / "state.json"
        self.lock = work / "state.lock"
        self.state: dict[str, Any] = self._read()
        self.state["version"] = 2  # the file's layout; stages of other code versions have other keys (``key``)
        self.state.setdefault("stages", {})
        # finished arms kept in the repository (``--record``): read, never run from (their folders are gone)
        self.records: dict[str, dict] = {}  # file name -> its contents
        self.recorded: dict[str, Any] = {}  # key -> entry, over every record
        self.record_files: dict[str, str] = {}  # key -> the record that holds it
        for f in sorted(records.glob("*.json")) if records is not None and records.is_dir() else []:
            rec = json.loads(f.read_text())
            rec["stages"] = {key: _unpack(entry) for key, entry in rec["stages"].items()}
            self.records[f.name] = rec
            for key, entry in rec["stages"].items():
                self.recorded[key] = entry
                self.record_files[key] = f.name

    def _read(self) -> dict[str, Any]:
        return json.loads(self.file.read_text()) if self.file.is_file() else {}

    def _refresh(self) -> None:
        self.state["stages"].update(self._read().get("stages", {}))

    @staticmethod
    def key(name: str, spec: dict[str, Any]) -> str:
        return f"{name}#{_sha({**spec, 'stage_version': STAGE_VERSION})}"

    def get(self, name: str, spec: dict[str, Any]) -> Optional[dict]:
        self._refresh()
        hit = self.entry(name, spec)
        return hit["result"] if hit else None

    def entry(self, name: str, spec: dict[str, Any], record: Optional[str] = None) -> Optional[dict]:
        """The stage's cached entry (spec, result, seconds): this work folder's, else a record's; only ``record``'s
        when given (an arm read from a record takes every stage from it, never a stage run again here)."""
        key = self.key(name, spec)
        if record is not None:
            return self.records[record]["stages"].get(key)
        return self.state["stages"].get(key) or self.recorded.get(key)

    def record_of(self, name: str, spec: dict[str, Any]) -> Optional[str]:
        """The record a stage is read from (None: this work folder has it, or nothing does)."""
        key = self.key(name, spec)
        return None if key in self.state["stages"] else self.record_files.get(key)

    def run(self, name: str, spec: dict[str, Any], fn: Callable[[], dict]) -> dict:
        import fcntl

        key = self.key(name, spec)
        self._refresh()
        if key in self.state["stages"]:
            return self.state["stages"][key]["result"]
        if key in self.recorded and all(Path(self.recorded[key]["result"][f]).exists()
                                        for f in ("dir", "masks") if f in self.recorded[key]["result"]):
            return self.recorded[key]["result"]  # a record whose folders are here (or that has none: evaluations)
        # one process at a time runs a stage: another that needs it waits, then reads its result
        locks = self.file.parent / "locks"
        locks.mkdir(exist_ok=True)
        with open(locks / f"{key}.lock", "w") as stage_lock:
            fcntl.flock(stage_lock, fcntl.LOCK_EX)
            self._refresh()
            if key in self.state["stages"]:
                return self.state["stages"][key]["result"]
            t0 = time.time()
            log.info("stage %s", name)
            result = fn()
            with open(self.lock, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._refresh()
                # wall time of the stage: this attempt's, and an interrupted training's earlier attempts up to
                # their last checkpoint
                seconds = time.time() - t0 + result.get("earlier_attempts_seconds", 0.0)
                self.state["stages"][key] = {"spec": spec, "result": result, "seconds": seconds}
                tmp = self.file.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(self.state, indent=1, default=str))
                tmp.replace(self.file)
        return self.state["stages"][key]["result"]

    def prior(self, name: str, spec: dict[str, Any], fn: Callable[[], dict]) -> dict:
        """A stage another one is built from: its result from this work folder or a record (whose folders may be
        gone: the caller reads what the record keeps), else run here."""
        self._refresh()
        hit = self.entry(name, spec)
        return hit["result"] if hit else self.run(name, spec, fn)

    def seconds(self, name: str, spec: dict[str, Any], record: Optional[str] = None) -> float:
        return (self.entry(name, spec, record) or {}).get("seconds", float("nan"))


def _pack(entry: dict) -> dict:
    """A stage entry for a record: kept-unit masks as bits (a 78.8M selection is ~50K booleans)."""
    keep = entry["result"].get("keep")
    if not keep:
        return entry
    packed = {k: {"shape": list(np.shape(v)), "bits": np.packbits(np.asarray(v, bool).ravel()).tobytes().hex()}
              for k, v in keep.items()}
    return {**entry, "result": {**entry["result"], "keep": packed}}


def _unpack(entry: dict) -> dict:
    keep = entry["result"].get("keep")
    if not keep or not isinstance(next(iter(keep.values())), dict):
        return entry
    out = {}
    for k, v in keep.items():
        n = int(np.prod(v["shape"])) if v["shape"] else 1
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(v["bits"]), np.uint8))[:n].astype(bool)
        out[k] = bits.reshape(v["shape"]).tolist()
    return {**entry, "result": {**entry["result"], "keep": out}}


def masks_from_keep(keep: dict[str, list], groups: int) -> dict[str, torch.Tensor]:
    """The ``*_keep`` fields of ``DeterministicMasks`` from a record's kept units, a KV group kept when any of its
    query heads is (what a materialised model needs of it); the values are the caller's (kept units at 1)."""
    import torch

    det = {f"{k}_keep": torch.tensor(keep[k], dtype=torch.bool) for k in ("layer", "hidden", "intermediate", "head")}
    heads = det["head_keep"]
    det["kv_keep"] = heads.reshape(heads.shape[0], groups, -1).any(-1)
    return det


CODE = ["llmshearing", "benchmarks/real_model.py", "benchmarks/common.py", "yamls"]  # what computes a stage


def _provenance(record: dict) -> str:
    return record_provenance(record, CODE)


def write_record(records: Path, arm: str, seed: int, entries: dict[str, dict]) -> bool:
    """Keep one finished arm's stages (source evaluation, selection, pruning run, recovery) in ``records``: the
    results a report needs (per-sequence losses, tokens, FLOPs, seconds, kept units), not its models, with the
    commit and machine of the process writing it (normally the one that ran the stages). Rewritten only when its
    stages changed; atomic. Returns whether it wrote."""
    records.mkdir(parents=True, exist_ok=True)
    path = records / f"{arm.replace(' ', '_')}_s{seed}.json"
    stages = {k: _pack(e) for k, e in sorted(entries.items())}
    if path.is_file() and json.loads(path.read_text())["stages"] == json.loads(json.dumps(stages, default=str)):
        return False
    commit = git_commit()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"arm": arm, "seed": seed, "stage_version": STAGE_VERSION, "commit": commit,
                               "recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": record_machine(), "stages": stages},
                              indent=1, default=str) + "\n")
    tmp.replace(path)
    return True


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one experiment, top to bottom
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="smollm2", help="a GGUF short name, .gguf file or Hugging Face directory")
    p.add_argument("--data", default=str(REDPAJAMA), help="RedPajama-style folder <dir>/<domain>/*.jsonl")
    p.add_argument("--work", default="runs/benchmarks/real_model")
    p.add_argument("--out", default="runs/benchmarks/real_model")
    p.add_argument("--phase", choices=["tune", "compare"], default="compare",
                   help="tune: seed 0's arms and ablations, validation only; compare: every arm and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ablation-seeds", type=int, nargs="*", default=[0], help="seeds of the ablation rows (none: none)")
    p.add_argument("--target", nargs="*", default=None, metavar="FIELD=N",
                   help="the target shape (default: SmolLM2's half, yamls/prune_smollm2.yaml)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--budget", type=int, default=400, help="training steps per arm after the source (B)")
    p.add_argument("--prune-steps", type=int, default=200, help="P of the learned arm (today's defaults)")
    p.add_argument("--improved-prune-steps", type=int, default=100, help="P' of the improved stage")
    p.add_argument("--eval-sequences", type=int, default=64, help="val and test sequences per domain (at most)")
    p.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="share of documents held out for val and for test, each (the prep's default 0.01 gives the "
                        "RedPajama sample 82 test sequences; 0.1 gives 318 from 59 documents, at most 64 per domain)")
    p.add_argument("--calibration", type=int, default=64, help="train sequences scored for activation importance")
    p.add_argument("--recovery-eval-interval", type=int, default=100,
                   help="batches between dynamic loading's updates in every recovery (the same for every arm)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--precision", default="amp_bf16", choices=["fp32", "amp_bf16"],
                   help="training precision of every stage (amp_bf16 on the CPU: bf16 autocast, fp32 weights; "
                        "benchmarks/cpu_bf16.py measures its speed); evaluation is fp32 either way")
    p.add_argument("--prune-yaml", default=PRUNE_YAML, help="the pruning config (another source: yamls/prune/cpu.yaml)")
    p.add_argument("--report-only", action="store_true", help="report what has run; run nothing")
    p.add_argument("--records", default=str(REPO_ROOT / "benchmarks" / "records" / "real_model"),
                   help="finished arms kept in the repository, one JSON per arm and seed: their stages are not run "
                        "again when the keys match (a new machine has no work folder; '' reads none)")
    p.add_argument("--record", action="store_true", help="write every finished arm's stages to --records")
    p.add_argument("--arms", nargs="*", default=None, help="run only these arms (others are reported if cached)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (two processes on 2 cores: 1 each)")
    p.add_argument("--extras", action="store_true", help="also full-size parity, generations and inference speed")
    args = p.parse_args(argv)
    if args.record and not args.records:
        p.error("--record needs --records (the folder the records go to)")
    global TARGET
    if args.target:
        TARGET = {k: int(v) for k, v in (t.split("=", 1) for t in args.target)}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.data import calibration_batch
    from llmshearing.data.prepare import MANIFEST, prepare_dataset
    from llmshearing.evaluate import load_model, sequence_documents, sequence_losses
    from llmshearing.export import export_checkpoint
    from llmshearing.models.gguf import resolve_pretrained
    from llmshearing.pruning import materialize
    from llmshearing.pruning.baselines import select_masks
    from llmshearing.pruning.masks import DeterministicMasks

    if args.threads:
        torch.set_num_threads(args.threads)
    eval_device = "cuda" if args.device == "gpu" else "cpu"
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work, Path(args.records) if args.records else None)
    source = Path(resolve_pretrained(args.source))
    data = work / f"data_heldout{args.heldout_fraction:g}"
    if not (data / MANIFEST).is_file():
        prepare_dataset(args.data, data, str(source), args.seq_len, val_fraction=args.heldout_fraction,
                        test_fraction=args.heldout_fraction, workers=2, overwrite=True, progress=False)
    _check_prepared(data, args, source)
    # SOURCE: the GGUF conversion's note of the file it came from (a path of this machine)
    base = {"source": dir_identity(source, skip=("SOURCE",)), "data": stage_data_identity(data),
            "seq": args.seq_len, "batch": args.batch, "eval_sequences": args.eval_sequences}
    manifest = json.loads((data / MANIFEST).read_text())
    domains = list(manifest["domains"])

    def evaluate(path: Path) -> dict[str, Any]:
        model = load_model(path, device=eval_device)
        out = {"parameters": model.num_parameters()}
        for split in ("val", "test"):
            per = sequence_losses(model, data, split, batch_size=8, max_sequences_per_domain=args.eval_sequences)
            out[split] = {d: [round(float(x), 6) for x in v] for d, v in per.items()}
        return out

    docs = {split: sequence_documents(data, split, max_sequences_per_domain=args.eval_sequences)
            for split in ("val", "test")}
    clusters = {split: np.concatenate([k * 1_000_000 + docs[split][d] for k, d in enumerate(domains)])
                for split in docs}  # document ids, distinct across domains, in sequence_losses' order

    source_eval = stages.run("source_eval", {**base}, lambda: evaluate(source))
    ref = [float(np.mean(source_eval["val"][d])) for d in domains]  # dynamic loading's references: the source's val
    ref_arg = "[" + ",".join(f"{x:.4f}" for x in ref) + "]"
    target_ov = [f"pruning.target.{k}={v}" for k, v in TARGET.items()]
    common = [f"variables.data={data}", f"variables.source={source}", f"tokenizer={source}",
              f"variables.reference_losses={ref_arg}", f"dynamic_loading.reference_losses={ref_arg}",
              f"data.max_seq_len={args.seq_len}", f"global_train_batch_size={args.batch}",
              f"device_train_microbatch_size={args.batch}", f"device_eval_batch_size={args.batch}",
              f"data.eval_sequences_per_domain={min(args.eval_sequences, 16)}", "autoresume=false",
              f"device={args.device}", f"precision={args.precision}", "save_overwrite=true", "progress_bar=false",
              "console_log_interval=50ba"]
    n_src, src_cfg = matmul_params_of(source)
    tokens_per_step = args.batch * args.seq_len

    # -- selections -----------------------------------------------------------------------------------
    def one_shot(method: str, seed: int, spec: dict) -> dict:
        out = work / f"select_{method}_s{seed}-{_sha(spec)[:8]}"
        src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        calib = calibration_batch(str(data), args.calibration, args.seq_len) if method == "activation" else None
        masks = select_masks(src, TARGET, method, seed=seed, calibration=calib)
        small = materialize(src, masks)
        shutil.rmtree(out, ignore_errors=True)
        small.save_pretrained(out)
        from llmshearing.data.tokenizer import load_tokenizer

        load_tokenizer(str(source)).save_pretrained(out)
        keep = {k: getattr(masks, f"{k}_keep").tolist() for k in ("layer", "hidden", "intermediate", "head")}
        calib = args.calibration * args.seq_len if method == "activation" else 0
        return {"dir": str(out), "keep": keep, "tokens": 0, "flops": forward_flops(n_src, src_cfg, calib, args.seq_len),
                "batches": 0, "calibration_tokens": calib}

    def one_shot_spec(method: str, seed: int) -> dict:
        return {**base, "method": method, "seed": seed if method == "random" else None, "target": TARGET,
                "calibration": args.calibration if method == "activation" else None}

    def prune(name: str, seed: int, steps: int, levers: list[str]) -> tuple[str, dict, Callable[[], dict]]:
        overrides = common + [f"seed={seed + PRUNE_STREAM}", f"max_duration={steps}ba",
                              f"eval_interval={max(steps // 4, 1)}ba", f"save_interval={steps}ba",
                              "dynamic_loading.update=doremi", *target_ov, *levers]
        kept = [o for o in overrides if not o.startswith(("variables.data=", "variables.source=", "tokenizer="))]
        cfg = _resolved(args.prune_yaml, kept)
        spec = {**base, "kind": "prune", "steps": steps, "seed": seed, "yaml": args.prune_yaml, "overrides": kept,
                "config": _sha(cfg)}
        tag = f"{name}_s{seed}-{Stages.key(name, spec)[-8:]}"
        # what a step computes, from the resolved config (a teacher's forward with distillation, no weight gradients
        # with frozen weights), and the calibration that places the gates (init importance / target)
        kd = cfg["distillation"] is not None and cfg["distillation"]["kd_weight"] > 0
        if kd and cfg["distillation"]["teacher"] not in (None, "<source>"):
            raise SystemExit(f"{name}: the FLOPs count knows the source as the teacher only, not "
                             f"{cfg['distillation']['teacher']}")
        step = step_flops(n_src, src_cfg, tokens_per_step, args.seq_len,
                          weight_grads=not cfg["pruning"]["freeze_weights"], teacher=n_src if kd else 0,
                          teacher_config=src_cfg)
        calib = cfg["pruning"]["calibration_sequences"] * args.seq_len \
            if cfg["pruning"]["init"] in ("importance", "target") else 0

        def fn() -> dict:
            run = work / f"prune_{tag}"  # a folder of this stage's key: an interrupted attempt is continued
            counted = train_counted(args.prune_yaml, overrides + [f"variables.run_dir={run}", *RESUMABLE])
            out = export_checkpoint(run / "checkpoints" / "latest-rank0.pt", work / f"pruned_{tag}",
                                    tokenizer=str(source), overwrite=True)
            from llmshearing.callbacks.metrics_file import read_metrics

            logged = read_metrics(run / "metrics.jsonl")
            expected = {k: logged[f"pruning/expected_{k}"][max(logged[f"pruning/expected_{k}"])] for k in TARGET
                        if f"pruning/expected_{k}" in logged}
            final = max((run / "checkpoints" / "masks").glob("ba*.pt"), key=lambda q: int(q.stem[2:]))
            det = torch.load(final, weights_only=False)["deterministic"]
            keep = {k: det[f"{k}_keep"].tolist() for k in ("layer", "hidden", "intermediate", "head")}
            masks = work / f"masks_{tag}.pt"
            torch.save(det, masks)
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            flops = counted["batches"] * step + forward_flops(n_src, src_cfg, calib, args.seq_len)
            return {"dir": str(out), "keep": keep, "expected_shape": expected, "flops": flops, "masks": str(masks),
                    "calibration_tokens": calib, "earlier_attempts_seconds": counted["earlier_seconds"], **counted}

        return f"prune_{name}_s{seed}", spec, fn

    def recover(name: str, seed: int, selected: dict, sel_spec: dict, steps: int) -> tuple[str, dict, Callable]:
        overrides = common + [f"seed={seed}", f"variables.source={selected['dir']}", f"max_duration={steps}ba",
                              f"eval_interval={args.recovery_eval_interval}ba", f"save_interval={steps}ba"]
        kept = [o for o in overrides if not o.startswith(("variables.data=", "variables.source=", "tokenizer="))]
        spec = {**base, "kind": "recover", "selection": _sha(sel_spec), "steps": steps, "seed": seed,
                "yaml": RECOVER_YAML, "overrides": kept, "config": _sha(_resolved(RECOVER_YAML, kept))}
        tag = f"{name}_s{seed}-{Stages.key(name, spec)[-8:]}"

        def fn() -> dict:
            run = work / f"recover_{tag}"  # a folder of this stage's key: an interrupted attempt is continued
            counted = train_counted(RECOVER_YAML, overrides + [f"variables.run_dir={run}", *RESUMABLE]) if steps \
                else {"batches": 0, "tokens": 0, "samples": 0, "seconds": 0.0, "earlier_seconds": 0.0}
            if steps:
                out = export_checkpoint(run / "checkpoints" / "latest-rank0.pt", work / f"final_{tag}",
                                        tokenizer=str(source), overwrite=True)
            else:
                out = Path(selected["dir"])
            n_tgt, tgt_cfg = matmul_params_of(out)
            flops = counted["batches"] * step_flops(n_tgt, tgt_cfg, tokens_per_step, args.seq_len)
            result = {"dir": str(out), "recovery": counted, "recovery_flops": flops,
                      "earlier_attempts_seconds": counted["earlier_seconds"], **evaluate(out)}
            # the final checkpoint goes once the evaluation is done: a stage stopped in it continues from there
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            return result

        return f"recover_{name}_s{seed}", spec, fn

    def learned_on_source(seed: int, masks_of: str, pruned: dict, spec: dict) -> dict:
        """The pruning run's masks on the source weights; its tokens and FLOPs are this arm's too (it needed them)."""
        out = work / f"select_on_source_{masks_of}_s{seed}-{_sha(spec)[:8]}"
        src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        masks_file = Path(pruned.get("masks", work / f"masks_{masks_of}_s{seed}.pt"))
        if masks_file.is_file():
            det = torch.load(masks_file, weights_only=False)
        else:  # a recorded pruning run (its folders are on another machine): its kept units, not run again
            from llmshearing.models.families import describe_shape

            det = masks_from_keep(pruned["keep"], describe_shape(src.config)["num_key_value_heads"])
        shutil.rmtree(out, ignore_errors=True)
        materialize(src, DeterministicMasks.selection(det)).save_pretrained(out)
        from llmshearing.data.tokenizer import load_tokenizer

        load_tokenizer(str(source)).save_pretrained(out)
        return {"dir": str(out), "tokens": pruned["tokens"], "flops": pruned["flops"], "batches": pruned["batches"],
                "keep": pruned["keep"], "calibration_tokens": pruned.get("calibration_tokens", 0)}

    improved_levers = [o for lever in IMPROVED.values() for o in lever]

    def arm_plan(seed: int, tune: bool) -> dict[str, tuple]:
        """arm -> (selection stage (name, spec, fn), recovery steps)."""
        plan: dict[str, tuple] = {}
        for method in ("activation", "random"):  # in both phases: levers are judged against them on val too
            spec = one_shot_spec(method, seed)
            s_name = seed if method == "random" else 0  # activation's selection does not depend on the seed
            plan[method] = ((f"select_{method}_s{s_name}", spec,
                             lambda m=method, s=s_name, sp=spec: one_shot(m, s, sp)), args.budget)
        plan["learned"] = (prune("learned", seed, args.prune_steps, []), args.budget - args.prune_steps)
        plan["improved"] = (prune("improved", seed, args.improved_prune_steps, improved_levers),
                            args.budget - args.improved_prune_steps)
        if tune or seed in args.ablation_seeds:
            for lever in IMPROVED:
                levers = [o for name, ov in IMPROVED.items() if name != lever for o in ov]
                tag = "improved_without_" + lever.replace(" ", "_")
                plan[f"improved - {lever}"] = (prune(tag, seed, args.improved_prune_steps, levers),
                                               args.budget - args.improved_prune_steps)
            for lever, ov in (REJECTED if tune else {}).items():  # decided on val: not read on test
                tag = "improved_with_" + lever.replace(" ", "_")
                plan[f"improved + {lever}"] = (prune(tag, seed, args.improved_prune_steps, improved_levers + ov),
                                               args.budget - args.improved_prune_steps)
        # learned masks on the source weights (the selection alone): in both phases, val-tunable like the others;
        # its pruning run is a stage of its own (``needs``), run first and timed apart
        name, spec, fn = plan["learned"][0]
        os_spec = {**base, "masks_of": _sha(spec), "seed": seed}
        plan["learned on source"] = ((f"select_on_source_s{seed}", os_spec,
                                      lambda: learned_on_source(seed, "learned", stages.prior(name, spec, fn), os_spec)),
                                     args.budget - args.prune_steps)
        needs[seed] = {"learned on source": (name, spec, fn)}
        return plan

    needs: dict[int, dict[str, tuple]] = {}

    results: dict[str, dict[int, dict]] = {}
    used: dict[tuple[str, int], list[tuple[str, dict]]] = {}  # results of this machine: stages, for --record
    from_records: dict[tuple[str, int], str] = {}  # results read from records: the file
    seeds = [0] if args.phase == "tune" else args.seeds
    for seed in seeds:
        for arm, ((sel_name, sel_spec, sel_fn), rec_steps) in arm_plan(seed, args.phase == "tune").items():
            run_it = not args.report_only and (args.arms is None or arm in args.arms)
            pre = needs.get(seed, {}).get(arm)
            tag = arm.replace(" ", "_")
            # a finished recovery (here or in a record) needs nothing run; its key does not depend on where the
            # selection's model lies
            rname, rspec, rfn = recover(tag, seed, {"dir": "<selection>"}, sel_spec, rec_steps)
            rec, record = stages.get(rname, rspec), stages.record_of(rname, rspec)
            if rec is not None or not run_it:
                sel = (stages.entry(sel_name, sel_spec, record) or {}).get("result")
                if rec is None:
                    continue
                if sel is None:
                    log.warning("%s, seed %d: its recovery is cached but not its selection %s; left out", arm, seed,
                                sel_name)
                    continue
            else:
                if pre:
                    stages.prior(*pre)
                sel = stages.run(sel_name, sel_spec, sel_fn)
                rname, rspec, rfn = recover(tag, seed, sel, sel_spec, rec_steps)
                rec = stages.run(rname, rspec, rfn)
            if record is not None:
                from_records[(arm, seed)] = record
            else:
                used[(arm, seed)] = [("source_eval", {**base}), (sel_name, sel_spec), (rname, rspec)] + \
                    ([pre[:2]] if pre else [])
            rec_tokens = rec["recovery"].get("tokens", 0)
            calib = 0.0
            if "calibration_tokens" not in sel and sel_spec.get("calibration"):  # selections cached by stage version 2
                calib = forward_flops(n_src, src_cfg, sel_spec["calibration"] * args.seq_len, args.seq_len)
            timed = [(sel_name, sel_spec), (rname, rspec)] + ([pre[:2]] if pre else [])
            seconds = sum(stages.seconds(n, sp, record) for n, sp in timed)
            # stages this arm took from another arm's record (e.g. the learned arm's pruning run): run elsewhere
            elsewhere = sum(stages.seconds(n, sp, record) for n, sp in timed
                            if (stages.entry(n, sp, record) or {}).get("from_record")
                            or (record is None and stages.record_of(n, sp) is not None))
            results.setdefault(arm, {})[seed] = {
                **rec, "selection": sel, "tokens": sel.get("tokens", 0) + rec_tokens,
                "flops": sel.get("flops", 0.0) + calib + rec["recovery_flops"], "seconds": seconds,
                "seconds_elsewhere": elsewhere}

    if args.record:
        for (arm, seed), named in used.items():
            entries = {}
            for n, sp in named:
                entry, origin = stages.entry(n, sp), stages.record_of(n, sp)
                if origin is not None and n != "source_eval":  # run for another arm, on another machine: say where
                    r = stages.records[origin]
                    entry = {**entry, "from_record": {"file": origin, "commit": r["commit"], "recorded": r["recorded"]}}
                entries[stages.key(n, sp)] = entry
            if write_record(Path(args.records), arm, seed, entries):
                log.info("recorded %s, seed %d in %s", arm, seed, args.records)
    report = _report(args, results, clusters, docs, domains, manifest, source_eval)
    if from_records:
        report += "\n\nFrom records (" + args.records + "), not run on this machine: " + ", ".join(
            f"{f} ({_provenance(stages.records[f])})" for f in sorted(set(from_records.values()))) + "."
    extras = _extras(args, stages, base, source, results, work) if args.extras and not args.report_only else ""
    print(report + extras)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"args": vars(args), "results": {a: {str(s): {k: v for k, v in r.items()
                                                                                          if k not in ("val", "test")}
                                                                               for s, r in rs.items()}
                                                                           for a, rs in results.items()},
                                          "report": report + extras})
    out.with_suffix(".md").write_text(report + extras + "\n")
    return 0


def _mean_loss(r: dict, split: str) -> float:
    return float(np.mean(np.concatenate([np.asarray(v) for v in r[split].values()])))


def _elsewhere(r: dict) -> str:
    """Wall time that ran on another machine, for another arm (a stage read from its record)."""
    m = r.get("seconds_elsewhere", 0.0) / 60
    return f" ({m:.0f} min of it another arm's stage, run elsewhere)" if m > 0 else ""


def _report(args, results: dict, clusters: dict, docs: dict, domains: list[str], manifest: dict,
            source_eval: dict) -> str:
    split = "val" if args.phase == "tune" else "test"
    flat = lambda r: np.concatenate([np.asarray(r[split][d]) for d in domains])  # noqa: E731
    lines = [f"{args.source} -> {TARGET}; budget {args.budget} steps x {args.batch} x {args.seq_len} tokens per arm; "
             f"reported on **{split}** ({args.eval_sequences} sequences per domain at most).", ""]
    src = _mean_loss(source_eval, split)
    lines += [f"Source: {src:.3f}.", "", "| arm | seed | tokens | FLOPs | " + split + " loss | worst domain excess "
              "over the source (point estimate) | wall time |", "|---|---|---|---|---|---|---|"]
    for arm, by_seed in results.items():
        for seed, r in sorted(by_seed.items()):
            worst = max(float(np.mean(r[split][d])) - float(np.mean(source_eval[split][d])) for d in domains)
            lines.append(f"| {arm} | {seed} | {r['tokens'] / 1e6:.3f}M | {r['flops']:.3g} | {_mean_loss(r, split):.4f} "
                         f"| {worst:.3f} | {r['seconds'] / 60:.0f} min{_elsewhere(r)} |")
    lines += ["", "| arm | seeds | mean " + split + " loss ± SE over seeds | vs activation: diff (SE seed, SE test) t "
              "-> verdict | vs random | vs improved (ablations) |", "|---|---|---|---|---|---|"]
    for arm, by_seed in results.items():
        losses = [_mean_loss(r, split) for r in by_seed.values()]
        sd = float(np.std(losses, ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else float("nan")
        cells = []
        for other in ("activation", "random", "improved"):
            if other == arm or other not in results or (other == "improved" and not arm.startswith("improved ")):
                cells.append("")
                continue
            c = compare({s: flat(r) for s, r in by_seed.items()}, {s: flat(r) for s, r in results[other].items()},
                        clusters[split])
            v = verdict(c["diff"], c["se"], c["df"], arm, other)
            crit = f" (crit {t_critical(c['df']):.2f})" if c["df"] >= 1 else ""
            cells.append(f"{c['diff']:+.4f} ({c['se_seed']:.4f}, {c['se_test']:.4f}) t={c['t']:.2f}, df {c['df']}{crit} "
                         f"-> {v}")
        lines.append(f"| {arm} | {len(losses)} | {np.mean(losses):.4f} ± {sd:.4f} | " + " | ".join(cells) + " |")
    # kept units that differ from activation's selection
    if "activation" in results:
        act_keep = next(iter(results["activation"].values()))["selection"]["keep"]
        lines += ["", "Kept units that differ from activation's selection (fraction of the kept units, per structure):",
                  "", "| arm | seed | " + " | ".join(act_keep) + " |", "|---|---|" + "---|" * len(act_keep)]
        for arm, by_seed in results.items():
            for seed, r in sorted(by_seed.items()):
                keep = r["selection"].get("keep")
                if not keep or arm == "activation":
                    continue
                cells = []
                for k, a in act_keep.items():
                    x, y = np.asarray(keep[k], bool), np.asarray(a, bool)
                    cells.append(f"{(x & ~y).sum() / max(x.sum(), 1):.3f}")
                lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
    # what each recovery read: the same stream per seed, the domains drawn by each arm's own dynamic loading
    lines += ["", "Recovery samples per domain (" + ", ".join(domains) + "):", ""]
    for arm, by_seed in results.items():
        for seed, r in sorted(by_seed.items()):
            per = r["recovery"].get("samples_per_domain")
            if per:
                lines.append(f"- {arm}, seed {seed}: " + " / ".join(str(per.get(d, 0)) for d in domains))
    # learned arms' convergence
    lines += ["", "Expected sizes at the end of pruning (target " + ", ".join(f"{k}={v}" for k, v in TARGET.items())
              + "):", ""]
    for arm, by_seed in results.items():
        for seed, r in sorted(by_seed.items()):
            exp = r["selection"].get("expected_shape")
            if exp:
                gap = max(abs(exp[k] - TARGET[k]) / TARGET[k] for k in exp)
                lines.append(f"- {arm}, seed {seed}: " + ", ".join(f"{k}={v:.1f}" for k, v in exp.items())
                             + f" (worst gap {gap:.1%})")
    # the evaluation set
    lines += ["", f"The {split} split: sequences and documents per domain (flagged: fewer than {args.eval_sequences} "
              "sequences or 5 documents, or not document-disjoint):", "", "| domain | sequences | documents | flag |",
              "|---|---|---|---|"]
    for d in domains:
        n, g = len(docs[split][d]), len(set(docs[split][d].tolist()))
        few = f"< {args.eval_sequences} sequences"
        flags = [f for f, bad in ((few, n < args.eval_sequences), ("< 5 documents", g < 5),
                                  ("tail of one stream", not manifest["domains"][d].get("document_disjoint", True)))
                 if bad]
        lines.append(f"| {d} | {n} | {g} | {', '.join(flags)} |")
    return "\n".join(lines)


def _extras(args, stages: Stages, base: dict, source: Path, results: dict, work: Path) -> str:
    """Full-size parity, greedy generations and inference speed (shape only) of the sheared model."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.config import TargetShape
    from llmshearing.evaluate import generate
    from llmshearing.pruning.parity import masked_export_parity

    def parity() -> dict:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        r, _ = masked_export_parity(model, TargetShape(**TARGET), ["layer", "head", "intermediate", "hidden"],
                                    work / "parity_hf", seed=0)
        shutil.rmtree(work / "parity_hf", ignore_errors=True)
        return r

    par = stages.run("parity", {**base, "target": TARGET}, parity)
    lines = ["", f"Parity at full size (fp32): masked vs materialised {par['materialised']:.2e}, vs exported and "
             f"reloaded {par['exported']:.2e}; tied: {par['tied']}.", "", "Generations (greedy, seed 0):"]
    for arm, by_seed in results.items():
        if 0 in by_seed and Path(by_seed[0]["dir"]).is_dir():  # not an arm read from a record (no model here)
            lines.append(f"- {arm}: " + " | ".join(repr(generate(by_seed[0]['dir'], q, max_new_tokens=16))
                                                    for q in PROMPTS))
    if "improved" in results and 0 in results["improved"] and Path(results["improved"][0]["dir"]).is_dir():
        from benchmarks.inference import main as inference_main

        def speed() -> dict:
            out = work / "inference.json"
            inference_main(["--model", f"source={source}", "--model", f"sheared={results['improved'][0]['dir']}",
                            "--new-tokens", "32", "--repeats", "5", "--out", str(out)])
            return {"report": json.loads(out.read_text())["report"]}

        lines += ["", "Inference speed (CPU, fp32):", "", stages.run("inference", {**base, "target": TARGET}, speed)["report"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
