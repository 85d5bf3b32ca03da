"""GPU-only paths (skipped without CUDA): the world-size-1 FSDP2 checks in bf16 on one GPU (NCCL, CUDA mixed
precision). The same code paths run on CPU (gloo, fp32) in tests/test_fsdp.py and tests/test_parallel.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.gpu


def test_fsdp_pruning_saves_exports_and_loads_at_the_target_shape(tmp_path):
    """FSDP2 FULL_SHARD + activation checkpointing (``yamls/parts/gpu_fsdp.yaml``), bf16, a GQA source pruned for a
    few steps with the masks kept whole in fp32, its checkpoint exported and loaded back with plain transformers at
    exactly the target shape."""
    from benchmarks.gpu_throughput import DRY_SMOKE, pruning_smoke, synthetic_dataset

    args = SimpleNamespace(device="gpu", precision="amp_bf16", seq_len=64, vocab=512, attn="sdpa",
                           checkpointing=False, accum=1)
    data = synthetic_dataset(tmp_path / "data", args.vocab, args.seq_len, n_train=256)
    res = pruning_smoke(DRY_SMOKE, data, tmp_path, args, steps=4)
    assert res["fsdp"] is True
    assert {k: res["exported_shape"][k] for k in DRY_SMOKE["prune"]} == DRY_SMOKE["prune"]


def test_a_distillation_teacher_is_on_the_gpu_once_the_trainer_is_built(mds_data, tmp_path):
    """Each rank reads its teacher onto its GPU (device_map, with accelerate): 8 ranks loading at once would otherwise
    each hold a host copy of it (~110 GB for a bf16 LLaMA2-7B)."""
    import torch

    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer
    from tests.helpers import REPO, save_tiny_cpu_source

    src = save_tiny_cpu_source(tmp_path / "src")
    cfg = load_config(REPO / "yamls" / "prune" / "tiny_cpu.yaml", [
        f"variables.data={mds_data}", f"variables.run_dir={tmp_path / 'run'}", f"variables.source={src}",
        "variables.vocab_size=512", "data.max_seq_len=64", "global_train_batch_size=8",
        "device_train_microbatch_size=4", "max_duration=2ba", "device=gpu", "precision=amp_bf16",
        "distillation.ce_weight=0.5"])
    trainer = build_trainer(cfg)
    teacher = trainer.state.model.teacher
    assert teacher.device.type == "cuda" and next(teacher.model.parameters()).dtype == torch.bfloat16
    trainer.close()


def test_mask_sampling_and_the_lagrangian_do_not_synchronise_the_device():
    import torch

    from llmshearing.config import TargetShape
    from llmshearing.models.families import describe_shape
    from llmshearing.pruning import ShearingMasks, resolve_target
    from tests.helpers import make_tiny_model

    src = describe_shape(make_tiny_model("llama3_gqa").config)
    structures = ["layer", "head", "intermediate", "hidden"]
    masks = ShearingMasks(src, resolve_target(src, TargetShape(2, 40, 4, 1, 50), structures), structures).cuda()
    masks.set_progress(0.5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z = masks.sampled()
        loss, _ = masks.lagrangian()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert z["hidden_count"].is_cuda and torch.isfinite(loss)
    # the gate noise is the CPU's, whatever the GPU (CUDA's own generator depends on its multiprocessor count)
    cpu = ShearingMasks(src, resolve_target(src, TargetShape(2, 40, 4, 1, 50), structures), structures)
    for name, g in masks.gates.items():
        assert torch.equal(masks._noise((32, 11008), name, torch.device("cuda")).cpu(),
                           cpu._noise((32, 11008), name, torch.device("cpu")))
