"""benchmarks/real_model.py on a tiny source: every arm reads the same number of training tokens (pruning +
recovery, from the trainer), the report carries the paired comparisons, and a finished stage is not run again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import save_tiny_cpu_source


@pytest.mark.slow  # ~8 short training runs
def test_every_arm_reads_the_same_tokens_and_the_report_compares_them(corpus_dir, small_tokenizer, tmp_path,
                                                                        monkeypatch):
    import benchmarks.real_model as rm
    from benchmarks.real_model import main
    from llmshearing.data.tokenizer import load_tokenizer

    src = save_tiny_cpu_source(tmp_path / "src")
    load_tokenizer(small_tokenizer).save_pretrained(src)
    args = ["--source", str(src), "--data", str(corpus_dir), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--seeds", "0", "--ablation-seeds", "--seq-len", "64", "--batch", "4",
            "--budget", "6", "--prune-steps", "4", "--improved-prune-steps", "2", "--eval-sequences", "6",
            "--calibration", "4", "--prune-yaml", "yamls/prune/cpu.yaml",
            "--target", "num_hidden_layers=2", "hidden_size=48", "num_attention_heads=2", "num_key_value_heads=2",
            "intermediate_size=86"]
    assert main(args) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    results = out["results"]
    assert set(results) == {"activation", "random", "learned", "improved", "learned on source"}
    tokens = {arm: r["0"]["tokens"] for arm, r in results.items()}
    assert set(tokens.values()) == {6 * 4 * 64}, tokens  # B x batch x sequence, whatever the split
    assert results["learned"]["0"]["selection"]["batches"] == 4 and results["improved"]["0"]["selection"]["batches"] == 2
    assert results["learned on source"]["0"]["recovery"]["batches"] == 2  # B - P: its selection cost the P steps
    flops = {arm: r["0"]["flops"] for arm, r in results.items()}
    assert flops["learned"] > flops["activation"] > 0  # pruning steps run the whole source
    report = (tmp_path / "out.md").read_text()
    assert "vs activation" in report and "no verdict (1 seed)" in report and "-> none" not in report
    act = results["activation"]["0"]
    assert act["selection"]["calibration_tokens"] == 4 * 64 and act["flops"] > act["recovery_flops"]  # calibration
    assert len({r["0"]["dir"] for r in results.values()}) == 5  # every arm's model in a folder of its own key
    assert "Kept units that differ from activation's selection" in report
    # finished arms kept as records (what the repository carries between machines): another work folder with only
    # the records trains and evaluates nothing and reports the same figures
    recs = tmp_path / "records"
    assert main([*args, "--report-only", "--record", "--records", str(recs)]) == 0
    assert sorted(f.name for f in recs.glob("*.json")) == sorted(f"{a.replace(' ', '_')}_s0.json" for a in results)
    assert all("isa" in json.loads(f.read_text())["machine"]["cpu"] for f in recs.glob("*.json"))  # where it ran
    stamp = {f: f.stat().st_mtime_ns for f in recs.glob("*.json")}
    assert main([*args, "--report-only", "--record", "--records", str(recs)]) == 0
    assert stamp == {f: f.stat().st_mtime_ns for f in recs.glob("*.json")}  # unchanged stages: not rewritten
    fresh, elsewhere = tmp_path / "fresh", tmp_path / "elsewhere"  # another machine: other paths and time stamps
    shutil.copytree(corpus_dir, elsewhere / "corpus", copy_function=shutil.copy)
    shutil.copytree(src, elsewhere / "source", copy_function=shutil.copy)
    assert main([*args, "--work", str(fresh), "--out", str(tmp_path / "fresh_out"), "--records", str(recs),
                 "--data", str(elsewhere / "corpus"), "--source", str(elsewhere / "source")]) == 0
    assert not [p.name for p in fresh.iterdir() if p.name.startswith(("prune_", "recover_", "select_", "final_"))]
    assert not (fresh / "state.json").exists()  # no stage ran, not even the source's evaluation
    again = (tmp_path / "fresh_out.md").read_text()
    body = lambda md: md.split("\n", 1)[1]  # noqa: E731 - after the heading, which names the source's path
    assert body(again).startswith(body(report).rstrip("\n")) and "From records" in again  # every figure, kept units
    assert "; on " in again and "differs from this machine" not in again  # the records' machine, the same one
    # an arm built on another's recorded stage: without its own record, "learned on source" takes the learned arm's
    # kept units from that arm's record (the pruning run is not repeated) and reproduces its recovery
    (recs / "learned_on_source_s0.json").unlink()
    rebuilt, away = tmp_path / "rebuilt", tmp_path / "work_elsewhere"
    (tmp_path / "work").rename(away)  # the records' folders (the pruning run's masks) are not on this machine
    assert main([*args, "--work", str(rebuilt), "--out", str(tmp_path / "rebuilt_out"), "--records", str(recs),
                 "--arms", "learned on source", "--record"]) == 0
    away.rename(tmp_path / "work")
    written = json.loads((recs / "learned_on_source_s0.json").read_text())["stages"]
    assert [e["from_record"]["file"] for k, e in written.items() if k.startswith("prune_learned")] == ["learned_s0.json"]
    assert "another arm's stage, run elsewhere" in (tmp_path / "rebuilt_out.md").read_text()
    made = [p.name for p in rebuilt.iterdir() if p.name.startswith(("prune_", "recover_", "select_"))]
    assert not [m for m in made if m.startswith("prune_")] and [m for m in made if m.startswith("select_on_source")]
    first = json.loads((tmp_path / "work" / "state.json").read_text())["stages"]
    again_stages = json.loads((rebuilt / "state.json").read_text())["stages"]
    key = next(k for k in again_stages if k.startswith("recover_learned_on_source"))
    assert again_stages[key]["result"]["test"] == first[key]["result"]["test"]
    # a second run reuses every stage (nothing trains again)
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    n_stages = len(state["stages"])
    assert main(args) == 0
    assert len(json.loads((tmp_path / "work" / "state.json").read_text())["stages"]) == n_stages
    # a changed setting is a new stage, not a stale hit; its first training (activation's recovery) is interrupted
    # after step 3, and the next run continues it from the checkpoint of step 2
    monkeypatch.setattr(rm, "RESUMABLE", ["autoresume=true", "save_interval=2ba", "save_num_checkpoints_to_keep=1"])
    calls = []

    def interrupted_once(yaml, overrides, callbacks=()):
        calls.append(yaml)
        return train_counted(yaml, overrides, [*callbacks, *([_Interrupt(3)] if len(calls) == 1 else [])])

    from benchmarks.common import train_counted

    monkeypatch.setattr(rm, "train_counted", interrupted_once)
    with pytest.raises(RuntimeError, match="interrupted"):
        main([*args, "--budget", "5"])
    assert main([*args, "--budget", "5"]) == 0
    state = json.loads((tmp_path / "work" / "state.json").read_text())["stages"]
    assert len(state) > n_stages
    rec = json.loads((tmp_path / "out.json").read_text())["results"]["activation"]["0"]["recovery"]
    assert rec["batches"] == 5 and rec["tokens"] == 5 * 4 * 64  # the resumed run ends where the budget does
    assert 0 < rec["earlier_seconds"] < rec["seconds"]  # the first attempt's time to its checkpoint is counted


class _Interrupt:
    """Raises at the end of batch ``at``, as a killed process would stop there."""

    def __new__(cls, at: int):
        from composer.core import Callback

        class Interrupt(Callback):
            def batch_end(self, state, logger) -> None:
                if int(state.timestamp.batch) == at:
                    raise RuntimeError(f"interrupted after step {at}")

        return Interrupt()


def test_a_stage_key_sees_the_yaml_files_contents_not_only_their_names(tmp_path):
    from benchmarks.real_model import RECOVER_YAML, REPO_ROOT, _resolved

    over = ["variables.reference_losses=[1,2,3,4,5,6,7]", "max_duration=8ba"]
    same = tmp_path / "same.yaml"
    same.write_text(f"includes: [{REPO_ROOT / RECOVER_YAML}]\n")
    changed = tmp_path / "changed.yaml"
    changed.write_text(f"includes: [{REPO_ROOT / RECOVER_YAML}]\noptimizer: {{lr: 3.0e-4}}\n")
    base = _resolved(RECOVER_YAML, over)
    assert _resolved(str(same), over) == base  # the same contents under another name: the same stage
    assert _resolved(str(changed), over) != base and _resolved(RECOVER_YAML, [*over[:1], "max_duration=9ba"]) != base
    assert "<data>" in json.dumps(base) and str(REPO_ROOT) not in json.dumps(base)  # no machine paths in the key


def test_a_prepared_data_folder_is_reused_only_for_the_settings_it_was_made_from(tmp_path):
    from argparse import Namespace

    from benchmarks.real_model import _check_prepared

    (tmp_path / "manifest.json").write_text(json.dumps({
        "inputs": {"path": str(tmp_path / "in")}, "tokenizer": {"path": str(tmp_path / "tok")}, "seq_len": 256,
        "val_fraction": 0.1, "test_fraction": 0.1}))
    ok = Namespace(data=str(tmp_path / "in"), seq_len=256, heldout_fraction=0.1)
    _check_prepared(tmp_path, ok, tmp_path / "tok")
    for bad, what in ((Namespace(**{**vars(ok), "seq_len": 128}), "seq_len: 256 there, 128 asked"),
                      (Namespace(**{**vars(ok), "data": str(tmp_path / "other")}), "inputs"),
                      (Namespace(**{**vars(ok), "heldout_fraction": 0.01}), "held-out fraction")):
        with pytest.raises(SystemExit, match=what):
            _check_prepared(tmp_path, bad, tmp_path / "tok")
    with pytest.raises(SystemExit, match="tokenizer"):
        _check_prepared(tmp_path, ok, tmp_path / "other_tok")


@pytest.mark.parametrize("name,target", [("llama3_gqa", (2, 40, 4, None, 50)), ("llama3_gqa", (2, 40, 4, 1, 50)),
                                         ("llama2_mha", (2, 32, 2, None, 24))])
def test_a_recorded_selection_rebuilds_the_model_its_pruning_run_exported(name, target):
    """``learned on source`` from a record (the pruning run's folders are on another machine) materialises the same
    model as from the run's own deterministic masks: the record's kept units are enough, KV groups included."""
    import torch

    from benchmarks.real_model import masks_from_keep
    from llmshearing.config import TargetShape
    from llmshearing.models.families import describe_shape
    from llmshearing.pruning import ShearingMasks, materialize, resolve_target
    from llmshearing.pruning.masks import DeterministicMasks
    from tests.helpers import make_tiny_model

    model = make_tiny_model(name)
    src = describe_shape(model.config)
    structures = ["layer", "head", "intermediate", "hidden"]
    masks = ShearingMasks(src, resolve_target(src, TargetShape(*target), structures), structures)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for g in masks.gates.values():
            g.log_alpha.copy_(torch.randn(g.log_alpha.shape, generator=gen) * 3)
    det = masks.deterministic().to_dict()
    keep = {k: det[f"{k}_keep"].tolist() for k in ("layer", "hidden", "intermediate", "head")}  # what a record keeps
    rebuilt = masks_from_keep(keep, src["num_key_value_heads"])
    assert torch.equal(rebuilt["kv_keep"], det["kv_keep"])
    # kept units at 1, as learned_on_source puts them on the source
    a, b = (materialize(model, DeterministicMasks.selection(m)) for m in (det, rebuilt))
    chosen = DeterministicMasks.selection(det).to_dict()
    assert all(torch.equal(chosen[k], det[f"{k}_keep"].float()) for k in ("layer", "hidden", "intermediate", "head"))
    assert torch.equal(chosen["kv_keep"], det["kv_keep"])
    assert a.config.to_dict() == b.config.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_massive_activation_report_finds_an_amplified_channel_and_which_records_kept_it(corpus_dir, small_tokenizer,
                                                                                       tmp_path, capsys):
    """The channel made massive (its embedding column scaled up) ranks first, and a record that dropped it says so."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.massive_activations import main
    from benchmarks.real_model import _pack
    from llmshearing.data.tokenizer import load_tokenizer

    src = save_tiny_cpu_source(tmp_path / "src")
    load_tokenizer(small_tokenizer).save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 5] *= 1000.0  # channel 5 carries a massive activation
    model.save_pretrained(src)
    d = model.config.hidden_size
    records = tmp_path / "records"
    records.mkdir()
    for arm, kept5, loss in (("activation", True, 4.0), ("random", False, 7.0)):
        keep = np.ones(d, bool)
        keep[5] = kept5
        keep[-1] = not kept5
        stages = {"select#1": _pack({"spec": {}, "result": {"keep": {"hidden": keep.tolist()}}, "seconds": 1.0}),
                  "recover_x#2": {"spec": {}, "result": {"test": {"code": [loss, loss]}}, "seconds": 1.0}}
        (records / f"{arm}_s0.json").write_text(json.dumps({"arm": arm, "seed": 0, "stages": stages}))
    assert main(["--source", str(src), "--data", str(corpus_dir), "--records", str(records),
                 "--domains", "code", "docstrings", "--seq-len", "32", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "top 2: 5 (" in out
    assert "| activation, seed 0 | 4.0000 | kept |" in out and "| random, seed 0 | 7.0000 | **dropped** |" in out


def test_record_provenance_names_the_records_machine_and_flags_other_numerics():
    """A record made on a CPU with other bf16 kernels (or another torch / transformers) may not reproduce bit for bit
    here: the provenance line names its CPU and says so; one from this machine's stack does not; an old record says
    nothing is known; a record whose commit this checkout lacks still names its machine."""
    from benchmarks.common import git_commit, record_machine, record_provenance, same_numerics

    here = record_machine()
    assert "torch_threads" not in here  # the writer's, not the training's
    assert here["cpu"]["isa"] is None or set(here["cpu"]["isa"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    other = json.loads(json.dumps(here))
    other["cpu"]["isa"] = ["avx2"] if here["cpu"]["isa"] != ["avx2"] else ["avx2", "amx_bf16"]
    assert same_numerics(here, record_machine()) is True and same_numerics(other, here) is False
    assert same_numerics(None, here) is None and same_numerics({"torch": here["torch"]}, here) is None
    assert same_numerics({"cpu": None}, here) is None
    for pkg in ("transformers", "mosaicml-streaming"):
        newer = json.loads(json.dumps(here))
        newer["packages"][pkg] = "0.0.999"
        assert same_numerics(newer, here) is False, pkg
    rec = {"commit": git_commit(), "recorded": "2026-12-04 00:00 UTC"}
    line = record_provenance({**rec, "machine": here}, ["benchmarks"])
    assert f"; on {here['cpu']['model']}" in line and "differs from this machine" not in line
    assert "differs from this machine" in record_provenance({**rec, "machine": other}, ["benchmarks"])
    assert "machine not recorded" in record_provenance(rec, ["benchmarks"])
    elsewhere = record_provenance({**rec, "commit": "0000000", "machine": other}, ["benchmarks"])
    assert "not in this checkout" in elsewhere and "differs from this machine" in elsewhere


def test_the_real_model_datas_identity_is_its_tokens_not_the_manifests_later_packing_notes(mds_data, tmp_path):
    """The records of benchmarks/real_model.py were keyed at a commit before the manifest gained its packing notes
    (2ac7752, 4696aef): the same shards with or without the notes keep one identity there, and other tokens get
    another."""
    from benchmarks.common import data_identity
    from benchmarks.real_model import DATA_NOTES, stage_data_identity
    from llmshearing.data.prepare import MANIFEST

    old = tmp_path / "old"
    shutil.copytree(mds_data, old)
    manifest = json.loads((old / MANIFEST).read_text())
    assert set(DATA_NOTES) <= set(manifest)  # the notes this benchmark leaves out are what the manifest writes
    for k in DATA_NOTES:
        manifest.pop(k)
    (old / MANIFEST).write_text(json.dumps(manifest))
    new = Path(mds_data)
    assert stage_data_identity(old) == stage_data_identity(new)  # what every stage key of the benchmark carries
    assert data_identity(old) != data_identity(new)  # the replication benchmark's identity keeps the notes
    shard = next(p for p in sorted((old / "train").rglob("*")) if p.is_file() and p.suffix != ".json")
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert stage_data_identity(old) != stage_data_identity(new)  # other tokens: no match
