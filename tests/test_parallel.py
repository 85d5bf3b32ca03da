"""The ``fsdp:`` block's translation, the refusals, and the masks under FSDP2 (in-process, one rank, gloo)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmshearing.config import ConfigError, load_config, load_yaml
from llmshearing.parallel import FSDP_KEYS, check_fsdp_block, clip_grad_norm_, grad_norm
from tests.helpers import REPO, make_tiny_model

YAMLS = REPO / "yamls"


def test_every_key_of_the_shipped_fsdp_block_is_translated():
    block = dict(load_yaml(YAMLS / "parts" / "gpu_fsdp.yaml")["fsdp"])
    assert set(check_fsdp_block(block)) == set(block)
    assert set(block) <= set(FSDP_KEYS)


@pytest.mark.parametrize("block, message", [
    ({"sharding_strategy": "NO_SHARD"}, "leave out the fsdp block"),
    ({"cpu_offload": True}, "Composer's FSDP2 has no parameter offload"),
    ({"limit_all_gathers": False}, "FSDP2 always bounds in-flight all-gathers"),
    ({"use_orig_params": False}, "FSDP2 always trains the original parameters"),
    ({"backward_prefetch": "BACKWARD_PRE"}, "prefetches the next unit"),
    ({"sharding_stratgy": "FULL_SHARD"}, "did you mean fsdp.sharding_strategy"),
    ({"sharding_strategy": "SHARD_GRAD_OP", "reshard_after_forward": True}, "implies reshard_after_forward=False"),
    ({"mixed_precision": "HALF"}, "use DEFAULT, PURE or FULL"),
    ({"state_dict_type": "local"}, "use full or sharded"),
    ({"activation_checkpointing_reentrant": True}, "non-reentrant"),
    ({"load_monolith_rank0_only": True, "sync_module_states": False}, "needs sync_module_states=true"),
    ({"reshard_after_forward": "false"}, "must be true or false"),
    ({"data_parallel_replicate_degree": -1}, "give a positive number of ranks$"),
])
def test_a_block_fsdp2_cannot_honour_is_refused_with_the_replacement(block, message):
    with pytest.raises(ConfigError, match=message):
        check_fsdp_block(block)


def _gpu_yaml(*extra):
    return load_config(YAMLS / "prune_2.7b.yaml", ["variables.source=/nowhere", "variables.data=/nowhere",
                                                   "variables.run_dir=/nowhere", *extra])


def test_run_settings_fsdp_cannot_run_fail_in_the_config():
    with pytest.raises(ConfigError, match="device_train_microbatch_size=auto: Composer cannot search"):
        _gpu_yaml("device_train_microbatch_size=auto")
    with pytest.raises(ConfigError, match="keep one"):
        _gpu_yaml("model.gradient_checkpointing=true")
    with pytest.raises(ConfigError, match="across two of pruning.mask_samples=16's groups of 2 sequences"):
        _gpu_yaml("pruning.mask_samples=16", "device_train_microbatch_size=4")  # 32 / 16 = 2 < 4
    with pytest.raises(ConfigError, match="needs an integer device_train_microbatch_size"):
        _gpu_yaml("pruning.mask_samples=8", "device_train_microbatch_size=auto", "fsdp=null")
    assert _gpu_yaml("pruning.mask_samples=8").pruning.mask_samples == 8  # 4 sequences each, micro-batch 4
    with pytest.raises(ConfigError, match="precision=amp_fp16 with fsdp"):
        _gpu_yaml("precision=amp_fp16")


def test_a_micro_batch_must_lie_within_one_mask_sample_on_the_actual_world_size():
    from llmshearing.config import check_mask_samples

    cfg = _gpu_yaml("global_train_batch_size=24", "pruning.mask_samples=2", "device_train_microbatch_size=6")
    check_mask_samples(cfg, world_size=2)  # ranks of 12: micro-batches [0,6) [6,12) | [12,18) [18,24)
    with pytest.raises(ConfigError, match="on 3 rank"):
        check_mask_samples(cfg, world_size=3)  # ranks of 8 cut 6 + 2: rank 1's [8,14) crosses 12


def test_a_gpu_precision_on_the_cpu_is_one_line_before_anything_loads():
    from llmshearing.trainer import build_trainer

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    with pytest.raises(ConfigError, match="precision=amp_bf16 needs a GPU .* set precision=fp32"):
        build_trainer(_gpu_yaml())  # the shipped YAML's amp_bf16; /nowhere is never read


def _dist():
    from composer.devices import DeviceCPU
    from composer.utils import dist

    dist.initialize_dist(DeviceCPU())  # one rank (gloo); a no-op when an earlier test did it


def _masked_composer_model():
    """A Composer model with masks attached exactly as ``L0Pruning`` attaches them at ``Event.INIT``."""
    from composer.core import Event
    from composer.devices import DeviceCPU

    from llmshearing.algorithms import L0Pruning
    from llmshearing.config import TargetShape
    from llmshearing.models import ComposerCausalLM
    from llmshearing.models.families import describe_shape
    from llmshearing.pruning import resolve_target

    hf = make_tiny_model("llama3_gqa").train()
    model = ComposerCausalLM(hf, domains=["a"])
    prune = ["layer", "head", "intermediate", "hidden"]
    src = describe_shape(hf.config)
    algo = L0Pruning(src, resolve_target(src, TargetShape(2, 40, 4, 1, 50), prune), prune, lagrangian_warmup="2ba")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    algo.apply(Event.INIT, SimpleNamespace(model=model, device=DeviceCPU(), optimizers=[optimizer]), None)
    return model, algo, optimizer


def test_masks_stay_whole_and_fp32_when_the_weights_are_sharded_in_bf16():
    """Composer's FSDP2 wrapping (its policy: every child of the Composer model) with bf16 parameters
    (MixedPrecisionPolicy from precision amp_bf16, mixed_precision DEFAULT): the weights become DTensors computed in
    bf16, the masks and multipliers stay plain fp32 tensors with fp32 gradients, and a training step runs. Before
    the masks were kept out of sharding, this forward failed: "aten.add.Tensor: got mixed torch.Tensor and DTensor"."""
    from composer.core.precision import Precision
    from composer.distributed.fsdp2 import prepare_fully_shard
    from composer.distributed.fsdp2_utils import generate_composer_model_policy
    from composer.utils.parallelism import FSDP2Config
    from torch.distributed.tensor import DTensor

    _dist()
    model, algo, _ = _masked_composer_model()
    with pytest.warns(UserWarning, match="experimental"):
        config = FSDP2Config(mixed_precision="DEFAULT")
    prepare_fully_shard(model, config, Precision.AMP_BF16, generate_composer_model_policy(model))
    masks = model.masks
    seen = {}
    o_proj = model.model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, a: seen.update(weight=m.weight.dtype))
    ids = torch.randint(0, model.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "domain_id": torch.zeros(2, dtype=torch.long)}
    masks.set_progress(1.0)
    loss = model.loss(model(batch), batch) + masks.lagrangian()[0]
    loss.backward()
    handle.remove()
    assert all(not isinstance(p, DTensor) and p.dtype == torch.float32 for p in masks.parameters())
    assert isinstance(model.model.lm_head.weight, DTensor)
    assert seen["weight"] == torch.bfloat16  # the weights were gathered in bf16
    assert all(z.dtype == torch.float32 for z in masks.z.values())
    for p in masks.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and not isinstance(p.grad, DTensor)
    assert any(p.grad.abs().sum() > 0 for p in masks.gates.parameters())
    assert all(p.grad.abs().sum() > 0 for p in masks.lambdas.parameters())


def test_the_global_gradient_norm_counts_sharded_and_replicated_gradients_once():
    _dist()
    model, _, _ = _masked_composer_model()
    batch = {"input_ids": torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(1)),
             "domain_id": torch.zeros(2, dtype=torch.long)}
    model.masks.set_progress(1.0)
    (model.loss(model(batch), batch) + model.masks.lagrangian()[0]).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    want = torch.nn.utils.get_total_norm(grads)
    assert torch.allclose(grad_norm(params), want, rtol=1e-6)
    norm = clip_grad_norm_(params, max_norm=float(want) / 4)
    assert torch.allclose(norm, want, rtol=1e-6)  # the norm before clipping
    assert torch.allclose(grad_norm(params), want / 4, rtol=1e-5)
    for p, g in zip(params, grads):
        assert torch.allclose(p.grad, g * (float(want) / 4) / (float(want) + 1e-6), rtol=1e-5, atol=1e-12)


def test_mask_samples_follow_the_global_position_even_on_a_retried_batch():
    """Micro-batches draw the sample of their global position; after an out-of-memory retry Composer leaves the last
    micro-batch in state.batch, and the positions must still count from the rank's whole batch."""
    from composer.core import Event

    _dist()
    _, algo, _ = _masked_composer_model()
    algo.mask_samples = 2
    ts = SimpleNamespace(batch=7)
    state = SimpleNamespace(timestamp=ts, batch={"input_ids": torch.zeros(8, 3, dtype=torch.long)})
    algo._warmup_batches = 2
    algo.apply(Event.AFTER_DATALOADER, state, None)

    def step(micro: int) -> list[int]:
        algo.apply(Event.BEFORE_TRAIN_BATCH, state, None)
        drawn = []
        for _ in range(8 // micro):
            state.batch = {"input_ids": torch.zeros(micro, 3, dtype=torch.long)}
            algo.apply(Event.BEFORE_FORWARD, state, None)
            drawn.append(algo.masks.sample)
        return drawn

    assert step(4) == [0, 1] and algo.masks.step == 7
    assert step(2) == [0, 0, 1, 1]  # retried with half the micro-batch; state.batch was a stale micro-batch
    with pytest.raises(ValueError, match="spans mask samples 0 and 1"):
        step(8)


def _two_ranks(rank: int, port: int, results) -> None:
    """One of two gloo ranks: a failure at a step the ranks take together, on one rank, reaches the other."""
    import os
    import time
    from datetime import timedelta

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=120))
    from llmshearing.parallel import from_rank_zero, together

    def on(failing: tuple[int, ...], value, rank0_only: bool = False):
        def fn():
            if rank0_only and rank != 0:
                raise AssertionError(f"rank {rank} ran rank 0's step")
            if rank in failing:
                raise ValueError(f"rank {rank} cannot read shard 3")
            return value
        return fn

    out = {}
    for name, step in [
        ("rank 0 selects", lambda: from_rank_zero("selecting", on((), {"picked": [1, 2]}, rank0_only=True))),
        ("rank 0 fails alone", lambda: from_rank_zero("selecting", on((0,), None, rank0_only=True))),
        ("every rank loads", lambda: together("loading", on((), rank))),
        ("rank 1 fails to load", lambda: together("loading", on((1,), rank))),
        ("both fail to load", lambda: together("loading", on((0, 1), rank))),
    ]:
        start = time.monotonic()
        try:
            out[name] = ("ok", step())
        except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
            out[name] = (type(e).__name__, str(e))
        out[name] += (time.monotonic() - start,)
    results.put((rank, out))  # before tearing down: gloo's teardown can deadlock at exit (pytorch#56297)


def test_a_failure_on_one_rank_stops_every_rank_at_once_with_its_cause():
    """Rank 0 loading the source or selecting masks alone, or one rank's failing disk, must not leave the other
    ranks (other nodes: their launcher does not see it) waiting in the next collective until dist_timeout."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(r, port, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = dict(results.get(timeout=100) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    zero, one = outcomes[0], outcomes[1]
    assert zero["rank 0 selects"][:2] == one["rank 0 selects"][:2] == ("ok", {"picked": [1, 2]})
    assert zero["rank 0 fails alone"][:2] == ("ValueError", "rank 0 cannot read shard 3")
    assert one["rank 0 fails alone"][:2] == (
        "RankFailed", "rank 0 failed while selecting: ValueError: rank 0 cannot read shard 3 (rank 0's log has the "
        "traceback)")
    assert [zero["every rank loads"][:2], one["every rank loads"][:2]] == [("ok", 0), ("ok", 1)]
    assert one["rank 1 fails to load"][:2] == ("ValueError", "rank 1 cannot read shard 3")
    assert zero["rank 1 fails to load"][:2] == (
        "RankFailed", "rank 1 failed while loading: ValueError: rank 1 cannot read shard 3 (rank 1's log has the "
        "traceback)")
    assert [zero["both fail to load"][:2], one["both fail to load"][:2]] == [
        ("ValueError", "rank 0 cannot read shard 3"), ("ValueError", "rank 1 cannot read shard 3")]
    # at once: far below the process group's 120 s timeout, which is where a rank waiting for a dead one ends
    assert max(t for out in outcomes.values() for *_, t in out.values()) < 20


def test_one_process_runs_the_step_itself():
    from llmshearing.parallel import from_rank_zero, together

    assert from_rank_zero("selecting", lambda: 3) == together("loading", lambda: 3) == 3
    with pytest.raises(ValueError, match="no source"):
        together("loading", lambda: (_ for _ in ()).throw(ValueError("no source")))


def test_cpu_bf16_spells_out_the_fsdp_policy_composer_derives_for_amp_bf16_on_gpus():
    """Composer derives the gathered dtype from the Trainer's precision, which a CPU run gives as fp32 (it autocasts
    itself): for device=cpu precision=amp_bf16 the policy is written out as a GPU's amp_bf16 gets it."""
    from composer.core.precision import Precision
    from composer.distributed.fsdp2 import create_mixed_precision_policy

    from llmshearing.parallel import _mixed_precision

    want = {"DEFAULT": (torch.bfloat16, torch.float32), "PURE": (torch.bfloat16, torch.bfloat16), "FULL": (None, None)}
    for mp, dtypes in want.items():
        gpu = create_mixed_precision_policy(Precision.AMP_BF16, mp)
        cpu = create_mixed_precision_policy(Precision.FP32, _mixed_precision({"mixed_precision": mp.lower()}, True))
        assert (cpu.param_dtype, cpu.reduce_dtype) == (gpu.param_dtype, gpu.reduce_dtype) == dtypes
        assert _mixed_precision({"mixed_precision": mp}, False) == mp  # fp32 and GPU runs: Composer's own
