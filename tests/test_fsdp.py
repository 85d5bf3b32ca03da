"""FSDP (FSDP2) runs on CPU, through the entry points and shipped GPU YAMLs a GPU user runs.

Every multi-process run is ``composer -n 2 tests/trace_run.py <shipped yaml>`` on gloo. The shipped YAMLs
(``prune_2.7b``, ``continue_pretrain_2.7b``, ``prune_llama3_8b_gqa`` and their parts, ``parts/gpu_fsdp.yaml``'s
``fsdp:`` block included) run as they are, overriding only ``variables.*``, ``model.config.*`` (the tiny source),
``pruning.target``, ``data.domains / proportions / num_workers / max_seq_len / eval_sequences_per_domain``,
``dynamic_loading.reference_losses``, steps, batch sizes, evaluation and save intervals and ``precision`` (fp32:
Composer trains on the CPU in fp32 only). References run in one process without FSDP (``fsdp=null``).

The source's FFN (171) and vocabulary (515) do not divide by the 2 ranks, so FSDP shards unevenly. Micro-batches
are aligned (2 sequences on one process and on each rank), so both runs add the same per-micro-batch gradients;
FSDP sums the ranks' gradients in its reduce-scatter in another order than one process accumulates them, so
runs agree to float rounding, not bit for bit. Measured (6 steps, pruning): losses 9.5e-7, gradient norms 9.4e-8
(relative), weights 1.1e-7, masks and multipliers 9.5e-7 at every step (``log_alpha`` moves with lr 1.0, so rounding
in the mask gradient shows most there); two nodes (2 x 2 mesh): weights and masks 4.8e-6. Asserted <= 1e-5.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import REPO, run_traced, save_uneven_source

YAMLS = REPO / "yamls"
PRUNE = YAMLS / "prune_2.7b.yaml"
CPT = YAMLS / "continue_pretrain_2.7b.yaml"
GQA = YAMLS / "prune_llama3_8b_gqa.yaml"
SELECT = YAMLS / "select" / "activation_2.7b.yaml"
TOL = 1e-5
BF16_LOSS_TOL, BF16_WEIGHT_TOL = 1e-4, 5e-3  # a bf16 run against an fp32 one; measured 1.1e-5 and 4.3e-4
STEPS = 6


def _source_config(gqa: bool) -> list[str]:
    fields = dict(vocab_size=515, hidden_size=64, intermediate_size=171, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2 if gqa else 4, max_position_embeddings=512,
                  rms_norm_eps=1e-5 if gqa else 1e-6)
    if gqa:
        fields["rope_theta"] = 500000.0
    return [f"model.config.{k}={v}" for k, v in fields.items()]


def _run_settings(data, run_dir, *extra) -> list[str]:
    """Data, steps, batches, intervals and precision of a tiny run (keys the issue allows to override)."""
    return [f"variables.data={data}", f"variables.run_dir={run_dir}", "data.domains=[code,docstrings,reference]",
            "data.proportions=[0.4,0.3,0.3]", "data.num_workers=0", "data.max_seq_len=64",
            "data.eval_sequences_per_domain=8", "dynamic_loading.reference_losses=[4.0,4.0,4.0]",
            f"max_duration={STEPS}ba", "global_train_batch_size=8", "device_train_microbatch_size=2",
            "device_eval_batch_size=8", "eval_interval=3ba", "save_interval=2ba", "precision=fp32", *extra]


def _prune(data, src, run_dir, gqa=False, *extra) -> list[str]:
    target = dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=2, num_key_value_heads=1 if gqa else 2,
                  intermediate_size=86)
    return [f"variables.source={src}", *_source_config(gqa), *[f"pruning.target.{k}={v}" for k, v in target.items()],
            *_run_settings(data, run_dir, *extra)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _assert_same_run(one: dict, fsdp: dict, every_step: bool = True, tol: float = TOL) -> dict[str, float]:
    """Same batches; losses, gradient norms and tensors (every step with ``every_step``) within ``tol``."""
    assert len(one["batches"]) == STEPS and one["batches"] == fsdp["batches"]
    d = {
        "losses": max(abs(a[k] - b[k]) for a, b in zip(one["losses"], fsdp["losses"]) for k in a),
        "grad_norm": max(abs(a - b) / max(a, 1e-12) for a, b in zip(one["grad_norms"], fsdp["grad_norms"])),
        "tensors": _max_diff(one["tensors"], fsdp["tensors"]),
    }
    if every_step:
        assert len(one["step_tensors"]) == len(fsdp["step_tensors"]) == STEPS
        d["tensors_every_step"] = max(_max_diff(a, b) for a, b in zip(one["step_tensors"], fsdp["step_tensors"]))
    assert all(math.isfinite(v) for v in one["grad_norms"])
    assert max(d.values()) <= tol, d
    return d


def _shipped_fsdp_block() -> dict:
    from llmshearing.config import load_yaml

    return dict(load_yaml(YAMLS / "parts" / "gpu_fsdp.yaml")["fsdp"])


def _assert_block_translated(trace: dict, masks: bool = True) -> None:
    """The fsdp block arrived as shipped and every key of it became something (none ignored)."""
    fsdp = trace["fsdp"]
    block = _shipped_fsdp_block()
    assert fsdp["block"] == block
    assert set(fsdp["translation"]) == set(block)
    assert not [w for w in trace["build_warnings"] if "ignored" in w or "not a settable attribute" in w]
    cfg = fsdp["config"]
    assert cfg["activation_checkpointing"] is block["activation_checkpointing"] is True
    assert cfg["activation_cpu_offload"] is block["activation_cpu_offload"]
    assert cfg["state_dict_type"] == block["state_dict_type"] == "full"
    assert cfg["mixed_precision"] == block["mixed_precision"]
    assert cfg["reshard_after_forward"] is True  # FULL_SHARD
    assert fsdp["rank0_loads"] and cfg["load_monolith_rank0_only"]  # sync_module_states
    assert fsdp["mesh_shape"] == (2,)
    # the masks and multipliers stay whole on every rank; every model weight is sharded
    assert bool(fsdp["plain_params"]) is masks and all(n.startswith("masks.") for n in fsdp["plain_params"])
    assert fsdp["dtensor_params"] and not any(n.startswith("masks.") for n in fsdp["dtensor_params"])
    assert any("_checkpoint_wrapped_module" in n for n in fsdp["dtensor_params"])  # activation checkpointing


# -- shared runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def source(work):
    return save_uneven_source(work / "src")


@pytest.fixture(scope="module")
def prune_one(mds_data, source, work):
    """The shipped pruning YAML in one process without FSDP: the reference of (b), (c), (d) and the two nodes."""
    return run_traced(work / "one.pt", PRUNE, _prune(mds_data, source, work / "one", False, "fsdp=null"),
                      every_step=True)


@pytest.fixture(scope="module")
def prune_fsdp(mds_data, source, work):
    return run_traced(work / "fsdp.pt", PRUNE, _prune(mds_data, source, work / "fsdp"), nproc=2, every_step=True)


@pytest.fixture(scope="module")
def killed(mds_data, source, work):
    """Per state_dict_type: the FSDP run with a rank SIGKILLed half-way through writing the checkpoint of batch 4 (rank
    0 writes a full checkpoint; every rank its shard), then resumed to the end with autoresume (shipped). Returns
    {type: (trace of the last attempt, run folder)}. Kills mid-step (which lose no checkpoint of either kind) and
    repeated kills are in tests/test_resume.py and tests/test_distillation.py, single-process."""
    out = {}
    for sdt, save_rank in (("full", 0), ("sharded", 1)):
        run_dir = work / f"killed_{sdt}"
        args = _prune(mds_data, source, run_dir, False, *(["fsdp.state_dict_type=sharded"] if sdt == "sharded" else []))
        run_traced(work / f"killed_{sdt}.pt", PRUNE, args, nproc=2, kill_at="save:4", kill_rank=save_rank)
        ckpts = run_dir / "checkpoints"
        if sdt == "full":
            assert any(p.name.startswith(".partial-") for p in ckpts.iterdir())  # the write killed half-way
            assert (ckpts / "latest-rank0.pt").resolve().name == "ep0-ba2-rank0.pt"
        else:
            assert (ckpts / "ep0-ba4").is_dir() and not (ckpts / "ep0-ba4" / ".metadata").exists()
            assert (ckpts / "latest-rank0.pt").resolve().name == "ep0-ba2"
        out[sdt] = (run_traced(work / f"killed_{sdt}.pt", PRUNE, args, nproc=2), run_dir)
    return out


# -- (a) + (b) -----------------------------------------------------------------------------------------


def test_the_shipped_pruning_yaml_runs_under_fsdp_as_one_process_does(prune_one, prune_fsdp):
    _assert_block_translated(prune_fsdp)
    d = _assert_same_run(prune_one, prune_fsdp)
    # grad_clip_norm (1.0, shipped) fires: the clipped norm is compared, not just the raw one
    assert sum(n > 1.0 for n in prune_one["grad_norms"]) >= 2, prune_one["grad_norms"]
    assert any(k.startswith("masks.lambdas") for k in prune_fsdp["tensors"])
    assert max(abs(a["loss/train/lagrangian"]) for a in prune_fsdp["losses"]) > 0.1  # the constraint is active
    # parameters FSDP shards unevenly over the 2 ranks
    assert prune_fsdp["tensors"]["model.model.embed_tokens.weight"].shape[0] % 2 == 1
    assert prune_fsdp["tensors"]["model.model.layers.0.mlp.up_proj.weight"].shape[0] % 2 == 1
    print("prune, FSDP (2 ranks) vs one process:", d)


# -- (c) -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # four launches: the killed run and the resumed one per checkpoint type
@pytest.mark.parametrize("sdt", ["full", "sharded"])
def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_one(sdt, killed, prune_fsdp):
    out, run_dir = killed[sdt]
    first = out["first_batch"]
    assert first == 2 and len(out["batches"]) == STEPS - first
    assert out["batches"] == prune_fsdp["batches"][first:]
    assert out["losses"] == prune_fsdp["losses"][first:]
    assert out["grad_norms"] == prune_fsdp["grad_norms"][first:]
    assert out["proportions"] == prune_fsdp["proportions"][first:]
    assert _max_diff(out["tensors"], prune_fsdp["tensors"]) == 0.0
    ckpts = run_dir / "checkpoints"
    assert not any(p.name.startswith(".partial-") for p in ckpts.iterdir())
    if sdt == "sharded":
        assert all((ckpts / f"ep0-ba{b}" / ".metadata").is_file() for b in (2, 4, 6))


# -- (d) -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_one(prune_one, work):
    from llmshearing.export import export_checkpoint

    return export_checkpoint(work / "one" / "checkpoints", work / "export_one")


@pytest.mark.slow
def test_exports_of_fsdp_checkpoints_equal_the_single_process_export(export_one, prune_fsdp, killed, work):
    from transformers import AutoModelForCausalLM

    from llmshearing.export import export_checkpoint

    full = export_checkpoint(work / "fsdp" / "checkpoints", work / "export_full")  # the save folder: latest
    sharded_folder = killed["sharded"][1] / "checkpoints" / "ep0-ba6"
    # README step 3, as a user runs it, on a sharded checkpoint folder
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export_hf.py"), "--checkpoint", str(sharded_folder),
                           "--output", str(work / "export_sharded")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = AutoModelForCausalLM.from_pretrained(export_one)
    assert (one.config.num_hidden_layers, one.config.hidden_size, one.config.num_attention_heads,
            one.config.num_key_value_heads, one.config.intermediate_size) == (1, 48, 2, 2, 86)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    for path in (full, work / "export_sharded"):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert {**model.config.to_dict(), "_name_or_path": ""} == {**one.config.to_dict(), "_name_or_path": ""}
        assert _max_diff(model.state_dict(), one.state_dict()) <= TOL
        with torch.no_grad():
            assert (model(ids).logits - one(ids).logits).abs().max().item() <= 1e-4
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


# -- (e) -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_continued_pretraining_with_doremi_under_fsdp_reweights_as_one_process(export_one, mds_data, work):
    shape = ["model.config.num_hidden_layers=1", "model.config.hidden_size=48", "model.config.num_attention_heads=2",
             "model.config.intermediate_size=86"]
    args = [f"variables.source={export_one}", *shape]
    one = run_traced(work / "cpt_one.pt", CPT, args + _run_settings(mds_data, work / "cpt_one", "fsdp=null",
                                                                      "eval_interval=2ba"))
    fsdp = run_traced(work / "cpt_fsdp.pt", CPT, args + _run_settings(mds_data, work / "cpt_fsdp", "eval_interval=2ba"),
                      nproc=2)
    _assert_block_translated(fsdp, masks=False)
    _assert_same_run(one, fsdp, every_step=False)
    # doremi moved the weights at every evaluation (batches 2 and 4), equally in both runs
    moves = [max(abs(a - b) for a, b in zip(one["proportions"][i], one["proportions"][i - 1]))
             for i in range(1, STEPS) if one["proportions"][i] != one["proportions"][i - 1]]
    assert len(moves) == 2 and min(moves) > 1e-3
    diff = max(abs(a - b) for p, q in zip(one["proportions"], fsdp["proportions"]) for a, b in zip(p, q))
    assert diff <= 2e-6, diff  # evaluation losses are reduced over the ranks in another order
    print("continued pre-training, FSDP vs one process: domain weights", diff)


@pytest.mark.slow
def test_one_shot_activation_selection_under_fsdp_selects_and_trains_as_one_process(mds_data, source, work):
    """The shipped one-shot YAML (README's recommendation at small budgets): rank 0 scores the source on calibration
    sequences while the other ranks wait for its selection. streaming builds a dataset with barriers over every
    rank, so every rank opens the train split first; rank 0 alone reaching them hung the run."""
    target = dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=86)
    args = [f"variables.source={source}", *_source_config(False), "pruning.calibration_sequences=8",
            *[f"pruning.target.{k}={v}" for k, v in target.items()]]
    one = run_traced(work / "select_one.pt", SELECT, args + _run_settings(mds_data, work / "select_one", "fsdp=null"),
                     timeout=180)
    fsdp = run_traced(work / "select_fsdp.pt", SELECT, args + _run_settings(mds_data, work / "select_fsdp"), nproc=2,
                      timeout=180)
    _assert_block_translated(fsdp, masks=False)
    assert fsdp["tensors"]["model.model.embed_tokens.weight"].shape[1] == 48  # the selected shape, trained
    _assert_same_run(one, fsdp, every_step=False)


# -- (f) -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_improved_learned_stage_with_distillation_under_fsdp_equals_one_process_and_keeps_the_teacher_out(
        mds_data, source, work):
    """The benchmark's improved stage under FSDP: distillation (KL to the source, which is never checkpointed), 4 mask
    samples per step (one per micro-batch of 2: each is keyed by its global position, so rank 1's micro-batches draw
    samples 2 and 3, as the single process's third and fourth micro-batches do), masks placed at the target by
    activation importance (every rank scores, rank 0's scores are broadcast), held there by projection, a low clamp;
    the weights frozen (the rejected lever, so that the frozen path runs under FSDP too)."""
    levers = ["distillation.kd_weight=1.0", "pruning.mask_samples=4", "pruning.init=target",
              "pruning.calibration_sequences=4", "pruning.constraint=projection",
              f"pruning.log_alpha_min={math.log(1e-4):.4f}", "pruning.freeze_weights=true"]
    one = run_traced(work / "imp_one.pt", PRUNE, _prune(mds_data, source, work / "imp_one", False, "fsdp=null", *levers))
    fsdp = run_traced(work / "imp_fsdp.pt", PRUNE, _prune(mds_data, source, work / "imp_fsdp", False, *levers), nproc=2)
    # log_alpha's gradients come from the loss alone here (no multiplier term dominates them): the two ranks' sum
    # and the four micro-batches' differ in reduction order, and Adam at mask lr 1.0 carries that to ~13 float32
    # ulps of FFN log_alphas near 8 after 6 steps (1.26e-5 measured); a wrong score, rank or mask sample is O(1)
    d = _assert_same_run(one, fsdp, every_step=False, tol=5e-5)
    kd_loss = [a["loss/train/lm_loss"] for a in fsdp["losses"]]  # ce_weight 0: the KL term alone
    assert all(0.0 < v < 10.0 for v in kd_loss), kd_loss  # the student at the target is not the teacher
    t = fsdp["tensors"]
    keep = {"layer": 1, "hidden": 48, "head": 2, "intermediate": 86}  # _prune's target of the 2-layer source
    threshold = 2.0 / 3.0 * math.log(0.1 / 1.1)
    for name, k in keep.items():  # every row's expected kept count is the target's, without multipliers
        la = t[f"masks.gates.{name}.log_alpha"]
        assert torch.allclose(torch.sigmoid(la - threshold).sum(-1), torch.full(la.shape[:-1], float(k)), atol=1e-3)
        assert not t[f"masks.lambdas.{name}"].any()
    assert all(a["loss/train/lagrangian"] == 0.0 for a in fsdp["losses"])
    src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    weights = {k: v for k, v in t.items() if k.startswith("model.")}
    assert len(weights) >= 10 and all(torch.equal(v, src[k[len("model."):]]) for k, v in weights.items())  # frozen
    state = torch.load(work / "imp_fsdp" / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    keys = set(state["state"]["model"])
    assert keys == set(t) and all(k.startswith(("model.", "masks.")) for k in keys)  # no teacher
    print("improved stage with distillation, FSDP vs one process:", d)


# -- bf16 ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bf16_under_fsdp_gathers_weights_in_bf16_keeps_masks_fp32_and_tracks_one_process(prune_one, mds_data, source,
                                                                                          work):
    """The GPU YAML's precision (amp_bf16, fsdp.mixed_precision DEFAULT) on the CPU: FSDP gathers each layer's
    weights in bf16 as on GPUs, the masks and multipliers stay fp32 and whole, the master weights fp32. The reference
    is the fp32 run in one process: they differ by bf16 rounding, so they agree to bf16 precision, not to float32
    rounding as the fp32 runs do. Measured (6 steps): losses 1.1e-5 (relative), weights 4.3e-4; against one process
    autocasting to bf16 the same (9.5e-6, 4.3e-4)."""
    fsdp = run_traced(work / "bf16_fsdp.pt", PRUNE, _prune(mds_data, source, work / "bf16_fsdp", False, "device=cpu",
                                                           "precision=amp_bf16"), nproc=2)
    assert fsdp["fsdp"]["config"]["mixed_precision"] == {"param_dtype": "bf16", "reduce_dtype": "fp32"}
    assert fsdp["forward_dtypes"] == {"ffn_weight": "torch.bfloat16", "ffn_input": "torch.bfloat16",
                                      "masks": ["torch.float32"]}
    assert prune_one["forward_dtypes"]["ffn_weight"] == "torch.float32"
    assert all(v.dtype == torch.float32 for v in fsdp["tensors"].values())  # fp32 master weights, masks, multipliers
    assert fsdp["batches"] == prune_one["batches"]
    rel = max(abs(a[k] - b[k]) / max(abs(a[k]), 1.0) for a, b in zip(prune_one["losses"], fsdp["losses"]) for k in a)
    weights = max((prune_one["tensors"][k] - fsdp["tensors"][k]).abs().max().item() for k in prune_one["tensors"]
                  if k.startswith("model."))
    print(f"bf16 FSDP vs fp32 one process: losses {rel:.2e} (relative), weights {weights:.2e}")
    # bf16 arithmetic shows in the weights, 250x the fp32 runs' rounding (1.7e-6)
    assert 0.0 < rel <= BF16_LOSS_TOL and 10 * TOL < weights <= BF16_WEIGHT_TOL, (rel, weights)
    assert max(abs(a["loss/train/lagrangian"]) for a in fsdp["losses"]) > 0.1  # the constraint is active


# -- GQA (a) + activation checkpointing (h) --------------------------------------------------------------


@pytest.mark.slow
def test_the_gqa_yaml_under_fsdp_trains_the_same_with_and_without_activation_checkpointing(mds_data, work):
    src = save_uneven_source(work / "gqa_src", gqa=True)
    on = run_traced(work / "ac_on.pt", GQA, _prune(mds_data, src, work / "ac_on", True), nproc=2, every_step=True)
    off = run_traced(work / "ac_off.pt", GQA, _prune(mds_data, src, work / "ac_off", True,
                                                     "fsdp.activation_checkpointing=false"), nproc=2, every_step=True)
    _assert_block_translated(on)
    assert not any("_checkpoint_wrapped_module" in n for n in off["fsdp"]["dtensor_params"])
    assert "masks.gates.kv_group.log_alpha" in on["tensors"]  # whole KV groups are pruned
    # recomputation repeats the same operations: gradients (norms), log_alpha, multipliers, weights identical
    assert on["batches"] == off["batches"] and on["losses"] == off["losses"]
    assert on["grad_norms"] == off["grad_norms"]
    assert all(_max_diff(a, b) == 0.0 for a, b in zip(on["step_tensors"], off["step_tensors"]))


# -- (g) two nodes on one machine ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each node gets a /dev/shm of its own, as separate machines have: streaming's local leaders register their shared
# memory there, and two nodes' leaders on one /dev/shm claim the same name ("File exists: '/000000_locals'").
_OWN_SHM = ["unshare", "-m", "--propagation", "private", "bash", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"',
            "node"]


def _can_unshare() -> bool:
    try:
        return subprocess.run([*_OWN_SHM, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_two_nodes_shard_hybrid_on_a_2x2_mesh_and_train_as_one_process(prune_one, mds_data, source, work):
    from llmshearing.callbacks import read_metrics

    if not _can_unshare():
        pytest.skip("two nodes on one machine need a private /dev/shm each (unshare -m, as root)")
    port, run_dir = _free_port(), work / "two_nodes"
    procs = []
    for node in (0, 1):
        data = work / f"node{node}_data"  # each node its own copy of the prepared data
        if not data.exists():
            shutil.copytree(mds_data, data)
        env = dict(os.environ, NNODES="2", NODE_RANK=str(node), NPROC="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), LOG_DIR=str(work / f"node{node}_logs"), OMP_NUM_THREADS="1",
                   PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        args = _prune(data, source, run_dir, False, "fsdp.sharding_strategy=HYBRID_SHARD")
        procs.append(subprocess.Popen([*_OWN_SHM, "bash", str(REPO / "scripts" / "launch.sh"), str(PRUNE), *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "FSDP2: mesh (2, 2) (replicate x shard)" in outs[0]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    for step in range(STEPS):
        for key in ("loss/train/total", "grad_norm/total"):
            ref = prune_one["losses"][step][key] if key.startswith("loss") else prune_one["grad_norms"][step]
            assert abs(metrics[key][step] - ref) <= TOL * max(1.0, abs(ref)), (step, key)
    state = torch.load(run_dir / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    assert _max_diff({k: v for k, v in state["state"]["model"].items()}, prune_one["tensors"]) <= TOL
