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
