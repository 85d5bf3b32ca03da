"""Distributed runs: the ``fsdp:`` block as FSDP2, and the small state every rank keeps whole.

**Version: FSDP2** (``torch.distributed.fsdp.fully_shard`` through Composer's ``FSDP2Config``) for every sharded
run. Why not FSDP1: it flattens each wrapped unit's parameters into one flat parameter and shards that, so the
masks' ``log_alpha`` became a rank's slice of a flat buffer outside any FSDP forward (the first pruning step
crashed: "The size of tensor a (172) must match the size of tensor b (149)"); Composer's FSDP1 path asks for CUDA,
so no CPU test could ever run the code the GPUs run; and torch develops FSDP2. FSDP2 shards parameter by parameter
(DTensors), runs on gloo, and lets a module stay out of sharding, which is what the masks need.

Layout (Composer's policy, decided by the model): every decoder layer is its own FSDP2 unit, the rest of the
transformers model (embedding, final norm, LM head) the unit above them. The masks and Lagrange multipliers
(``ComposerCausalLM.masks``, ~0.36M values for LLaMA2-7B) are **replicated, never sharded**: the module is marked
``_fsdp_wrap = False``, its parameters stay plain fp32 tensors on every rank, readable whole wherever they are used
(the mask sample before the forward, the Lagrangian after the loss, clamping after the step, top-k at evaluation)
and untouched by bf16 mixed precision. Their gradients are all-reduced explicitly once per step, before the one
global gradient norm is taken (:func:`sync_replicated_grads`, :func:`clip_grad_norm_`, run by
:class:`~llmshearing.algorithms.GlobalGradNorm`). The alternative, a unit of their own, would make them DTensors
that every reader outside a forward would have to gather first: the bug class of the FSDP1 crash.

The ``fsdp:`` block is read in FSDP1's vocabulary (as llm-foundry and the shipped YAMLs write it) or FSDP2's, and
translated key by key (:data:`FSDP_KEYS`); a key FSDP2 cannot honour is refused with its replacement, never dropped
(Composer's own conversion drops such keys with a warning).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

import torch
from composer.utils.parallelism import FSDP2Config
from torch import nn

__all__ = [
    "FSDP_KEYS",
    "FsdpPlan",
    "MeshFSDP2Config",
    "RankFailed",
    "check_fsdp_block",
    "clip_grad_norm_",
    "from_rank_zero",
    "grad_norm",
    "node_signal_files_of_their_own",
    "plan_fsdp",
    "replicated_params",
    "sync_replicated_grads",
    "together",
]

log = logging.getLogger(__name__)

_STRATEGIES = {  # FSDP1 sharding strategy -> (reshard_after_forward, hybrid)
    "FULL_SHARD": (True, False),
    "SHARD_GRAD_OP": (False, False),
    "HYBRID_SHARD": (True, True),
    "_HYBRID_SHARD_ZERO2": (False, True),
}

# Every key an ``fsdp:`` block may hold: what FSDP2 makes of it (README, "Distributed training").
FSDP_KEYS: dict[str, str] = {
    "sharding_strategy": "FULL_SHARD -> parameters sharded over all ranks, re-gathered in the backward "
    "(reshard_after_forward: true); SHARD_GRAD_OP -> kept gathered between forward and backward (false); "
    "HYBRID_SHARD / _HYBRID_SHARD_ZERO2 -> a 2-D mesh: replicated across nodes, sharded within a node; "
    "NO_SHARD is refused (leave out the fsdp block: Composer then uses DDP)",
    "reshard_after_forward": "FSDP2's own key (true / false); must agree with sharding_strategy if both are given",
    "mixed_precision": "DEFAULT (parameters gathered in the run's precision, gradients reduced in fp32), PURE, FULL; "
    "device=cpu precision=amp_bf16 gathers in bf16 as a GPU's amp_bf16 does",
    "activation_checkpointing": "every decoder layer recomputed in the backward (non-reentrant checkpoint wrapper)",
    "activation_checkpointing_reentrant": "false only: FSDP2's wrapper is non-reentrant",
    "activation_cpu_offload": "activations offloaded to the CPU",
    "state_dict_type": "full (one file, written by rank 0; read by rank 0 only when sync_module_states) or sharded "
    "(a folder, one file per rank)",
    "sync_module_states": "true -> rank 0 alone loads the source (and a full checkpoint), the other ranks build the "
    "model on the meta device and receive their shards by broadcast; false -> every rank loads it whole",
    "load_monolith_rank0_only": "default: true with sync_module_states and state_dict_type full (rank 0 reads a full "
    "checkpoint, the others receive it); false: every rank reads it whole",
    "limit_all_gathers": "true only: FSDP2 always bounds in-flight all-gathers (it frees each unit's gathered "
    "parameters in stream order; FSDP1's rate limiter does not exist)",
    "use_orig_params": "true only: FSDP2 always trains the original parameters (as DTensors)",
    "data_parallel_shard_degree": "ranks one parameter is sharded over (-1: all, or a node's with HYBRID_SHARD); "
    "with a smaller degree the remaining ranks hold replicas (2-D mesh)",
    "data_parallel_replicate_degree": "replicas of the sharded model (2-D mesh); the shard degree is world / this",
    "verbose": "log the wrapped model",
}

_REFUSED: dict[str, str] = {
    "cpu_offload": "Composer's FSDP2 has no parameter offload; remove the key (use activation_cpu_offload, or more "
    "ranks to shard over)",
    "backward_prefetch": "FSDP2 prefetches the next unit's all-gather itself; remove the key",
    "backward_prefetch_limit": "FSDP2 prefetches the next unit's all-gather itself; remove the key",
    "forward_prefetch": "FSDP2 prefetches the next unit's all-gather itself; remove the key",
    "forward_prefetch_limit": "FSDP2 prefetches the next unit's all-gather itself; remove the key",
    "auto_wrap": "the wrapping is fixed by the model (each decoder layer one unit); remove the key",
    "ignored_modules": "the masks are kept out of sharding by the pruning algorithm; remove the key",
    "keep_low_precision_grads": "FSDP2 reduces gradients in mixed_precision's reduce dtype; remove the key (PURE "
    "reduces in the run's precision)",
    "process_group": "the mesh comes from sharding_strategy / data_parallel_*_degree; remove the key",
    "device_mesh": "the mesh comes from sharding_strategy / data_parallel_*_degree; remove the key",
    "load_planner": "checkpoints use Composer's planners; remove the key",
    "save_planner": "checkpoints use Composer's planners; remove the key",
    "sharded_ckpt_prefix_dir": "sharded checkpoints are named ep<epoch>-ba<batch>; remove the key",
    "te_checkpoint_wrapper": "Transformer Engine is not used; remove the key",
    "te_shard_fp8_weight": "Transformer Engine is not used; remove the key",
}


def _only(key: str, value: Any, allowed: Any, why: str) -> None:
    from llmshearing.config import ConfigError

    if value != allowed:
        raise ConfigError(f"fsdp.{key}={value!r} cannot be honoured: {why}")


def check_fsdp_block(block: dict[str, Any]) -> dict[str, str]:
    """Validate an ``fsdp:`` block without a process group: every key known and honourable.

    Returns:
        key -> what it becomes (the translation, for logs and tests).

    Raises:
        ConfigError: an unknown key, a key FSDP2 cannot honour (with its replacement) or a bad value.
    """
    from llmshearing.config import ConfigError

    out: dict[str, str] = {}
    for key, value in block.items():
        if key in _REFUSED:
            raise ConfigError(f"fsdp.{key} is not supported: {_REFUSED[key]}")
        if key not in FSDP_KEYS:
            import difflib

            close = difflib.get_close_matches(key, list(FSDP_KEYS), n=1)
            raise ConfigError(f"unknown key fsdp.{key}" + (f"; did you mean fsdp.{close[0]}?" if close else "")
                              + f" (known: {', '.join(FSDP_KEYS)})")
        out[key] = FSDP_KEYS[key]
    strategy = str(block.get("sharding_strategy", "FULL_SHARD")).upper()
    if strategy == "NO_SHARD":
        raise ConfigError("fsdp.sharding_strategy=NO_SHARD replicates everything: leave out the fsdp block (or set "
                          "fsdp=null) and Composer trains with DDP, which is the same thing")
    if strategy not in _STRATEGIES:
        raise ConfigError(f"fsdp.sharding_strategy={block['sharding_strategy']!r}: use one of {sorted(_STRATEGIES)}")
    if "reshard_after_forward" in block and "sharding_strategy" in block:
        _only("reshard_after_forward", block["reshard_after_forward"], _STRATEGIES[strategy][0],
              f"sharding_strategy={strategy} implies reshard_after_forward={_STRATEGIES[strategy][0]}; give one of them")
    mp = block.get("mixed_precision", "DEFAULT")
    if not isinstance(mp, str) or mp.upper() not in ("DEFAULT", "PURE", "FULL"):
        raise ConfigError(f"fsdp.mixed_precision={mp!r}: use DEFAULT, PURE or FULL")
    if block.get("state_dict_type", "full") not in ("full", "sharded"):
        raise ConfigError(f"fsdp.state_dict_type={block['state_dict_type']!r}: use full or sharded")
    if "limit_all_gathers" in block:
        _only("limit_all_gathers", block["limit_all_gathers"], True, FSDP_KEYS["limit_all_gathers"])
    if "use_orig_params" in block:
        _only("use_orig_params", block["use_orig_params"], True, FSDP_KEYS["use_orig_params"])
    if "activation_checkpointing_reentrant" in block:
        _only("activation_checkpointing_reentrant", block["activation_checkpointing_reentrant"], False,
              FSDP_KEYS["activation_checkpointing_reentrant"])
    if block.get("load_monolith_rank0_only") and not (
            block.get("sync_module_states", True) and block.get("state_dict_type", "full") == "full"):
        raise ConfigError("fsdp.load_monolith_rank0_only=true needs sync_module_states=true and state_dict_type=full "
                          "(the other ranks must start empty to receive rank 0's weights)")
    for key, minus_one in (("data_parallel_shard_degree", True), ("data_parallel_replicate_degree", False)):
        v = block.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or (v < 1 and not (minus_one and v == -1))):
            raise ConfigError(f"fsdp.{key}={v!r}: give a positive number of ranks" + (" (or -1: all)" if minus_one else ""))
    for key in ("activation_checkpointing", "activation_cpu_offload", "sync_module_states", "verbose",
                "load_monolith_rank0_only", "reshard_after_forward", "limit_all_gathers", "use_orig_params"):
        if key in block and not isinstance(block[key], bool):
            raise ConfigError(f"fsdp.{key} must be true or false, got {block[key]!r}")
    return out


@dataclass
class MeshFSDP2Config(FSDP2Config):
    """Composer's ``FSDP2Config`` with the mesh degrees a run asks for.

    Composer 0.32 builds the device mesh itself (``State``) from ``data_parallel_replicate_degree`` /
    ``data_parallel_shard_degree``, which its ``FSDP2Config`` fixes at None / -1 (read-only), so an FSDP2 run is
    always sharded over all ranks and a mesh given to the config is replaced. This subclass returns the planned
    degrees, so Composer builds the 2-D (replicate, shard) mesh of a hybrid run and its checkpointing knows it.
    """

    replicate_degree: Optional[int] = None
    shard_degree: int = -1

    @property
    def data_parallel_replicate_degree(self) -> Optional[int]:
        return self.replicate_degree

    @property
    def data_parallel_shard_degree(self) -> int:
        return self.shard_degree


@dataclass
class FsdpPlan:
    """What a run's ``fsdp:`` block becomes on this world.

    Attributes:
        config: Composer's ``FSDP2Config`` (Composer builds its device mesh from the degrees).
        mesh_shape: ``(shard,)`` or ``(replicate, shard)``.
        rank0_loads: rank 0 alone loads the source; the other ranks build the model on the meta device.
        translation: key -> what it became.
    """

    config: Any
    mesh_shape: tuple[int, ...]
    rank0_loads: bool
    translation: dict[str, str] = field(default_factory=dict)


def _mixed_precision(block: dict[str, Any], cpu_bf16: bool) -> str | dict[str, str]:
    """``fsdp.mixed_precision`` as Composer's ``FSDP2Config`` takes it.

    Composer derives the gathered parameters' dtype from the Trainer's precision. A CPU run in bf16 hands Composer
    fp32 (its CPU device trains in fp32 only) and autocasts itself, so for it the policy is spelled out as Composer
    derives it for ``amp_bf16`` on a GPU: parameters gathered in bf16, gradients reduced in fp32 (DEFAULT) or bf16
    (PURE); buffers are not cast (Composer's FSDP2 policy has no buffer dtype). The CPU test of the GPU path then runs
    the same dtypes as the GPUs."""
    mp = str(block.get("mixed_precision", "DEFAULT")).upper()
    if not cpu_bf16 or mp == "FULL":
        return mp
    return {"param_dtype": "bf16", "reduce_dtype": "fp32" if mp == "DEFAULT" else "bf16"}


def plan_fsdp(block: dict[str, Any], device_type: str, cpu_bf16: bool = False) -> FsdpPlan:
    """The ``FSDP2Config`` for ``block`` on the current process group.

    Args:
        block: the run's ``fsdp:`` mapping (checked by :func:`check_fsdp_block`).
        device_type: ``cpu`` or ``cuda``.
        cpu_bf16: the run autocasts to bf16 on the CPU (``device: cpu``, ``precision: amp_bf16``): parameters are
            gathered in bf16 as a GPU's ``amp_bf16`` run gathers them (:func:`_mixed_precision`).

    Raises:
        ConfigError: the mesh degrees do not multiply to the world size.
    """
    from composer.utils import dist

    from llmshearing.config import ConfigError

    translation = check_fsdp_block(block)
    if device_type == "cpu":
        _fix_fsdp2_on_cpu()
    world, local = dist.get_world_size(), dist.get_local_world_size()
    strategy = str(block.get("sharding_strategy", "FULL_SHARD")).upper()
    reshard, hybrid = _STRATEGIES[strategy]
    reshard = block.get("reshard_after_forward", reshard)
    shard = block.get("data_parallel_shard_degree", -1) or -1
    replicate = block.get("data_parallel_replicate_degree")
    if shard == -1:
        shard = world // replicate if replicate else (local if hybrid else world)
    if replicate is None:
        replicate = world // shard if shard else 0
    if shard < 1 or replicate * shard != world:
        raise ConfigError(
            f"fsdp: {replicate} replicas x {shard} shards != {world} ranks ({world // max(local, 1)} nodes x {local}); "
            "choose data_parallel_shard_degree / data_parallel_replicate_degree whose product is the world size")
    two_d = replicate > 1 or hybrid
    rank0_loads = bool(block.get("sync_module_states", True)) and world > 1
    state_dict_type = block.get("state_dict_type", "full")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")
        config = MeshFSDP2Config(
            replicate_degree=replicate if two_d else None,
            shard_degree=shard,
            reshard_after_forward=reshard,
            activation_checkpointing=bool(block.get("activation_checkpointing", False)),
            activation_cpu_offload=bool(block.get("activation_cpu_offload", False)),
            state_dict_type=state_dict_type,
            load_monolith_rank0_only=rank0_loads and state_dict_type == "full" and block.get("load_monolith_rank0_only",
                                                                                             True),
            mixed_precision=_mixed_precision(block, cpu_bf16),  # type: ignore[arg-type]  # Composer reads a dict too
            verbose=bool(block.get("verbose", False)),
        )
    mesh_shape = (replicate, shard) if two_d else (shard,)
    log.info("FSDP2: mesh %s (%s), reshard_after_forward=%s, state_dict_type=%s, %s", mesh_shape,
             "replicate x shard" if two_d else "shard", reshard, state_dict_type,
             "rank 0 loads, the others receive by broadcast" if rank0_loads else "every rank loads")
    return FsdpPlan(config=config, mesh_shape=mesh_shape, rank0_loads=rank0_loads, translation=translation)


def _fix_fsdp2_on_cpu() -> None:
    """Two fixes that let FSDP2 run on CPU (gloo) exactly as on GPUs (NCCL); both are no-ops for NCCL runs.

    1. Average, not sum. For fp32 / bf16 gradients FSDP2 reduce-scatters with ``ReduceOp.AVG``, which gloo's
       ``reduce_scatter_tensor`` silently executes as a sum (torch 2.7: 2x the single-process gradient norm on 2
       ranks, measured), and gloo's ``all_reduce`` (the replica reduction of a hybrid mesh) refuses ("Cannot use
       ReduceOp.AVG with Gloo"). FSDP2's other path, used for fp16, sums and divides afterwards; it is selected for
       gloo groups (pre-divide 1, post-divide the data-parallel size: exactly the average).
    2. Hybrid sharding. FSDP2 asserts that the replica all-reduce recorded a stream event, but the CPU "stream"
       records none (``torch.cpu.Stream.record_event`` returns None), so every hybrid backward on the CPU fails with
       a bare AssertionError. CPU work is synchronous: the stream returns a (no-op) ``torch.cpu.Event`` instead.
    """
    import torch.distributed as tdist
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    original = collectives._get_gradient_divide_factors
    if getattr(original, "_llmshearing_gloo", False):
        return

    def divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type=""):
        if tdist.get_backend(reduce_scatter_group) == "gloo":
            n = reduce_scatter_group.size() * (all_reduce_group.size() if all_reduce_group is not None else 1)
            return 1.0, float(n)
        return original(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type)

    divide_factors._llmshearing_gloo = True  # type: ignore[attr-defined]
    collectives._get_gradient_divide_factors = divide_factors
    torch.cpu.Stream.record_event = lambda self, event=None: event or torch.cpu.Event()


def node_signal_files_of_their_own() -> None:
    """Give each node its own name for Composer's "local rank 0 is done" signal file.

    Composer 0.32 names the file ``._signal_file_node<rank 0's node>_<random>`` and broadcasts rank 0's name, so every
    node uses the same file. In a save folder on a file system the nodes share (the usual multi-node setup), each
    node's local rank 0 writes it and later removes it, and the second removal fails ("No such file or directory:
    '.../checkpoints/._signal_file_node0_...'", seen at the autoresume lookup of a 2-node run). The random part is
    still rank 0's (every node agrees on it); the node number becomes each node's own.
    """
    from composer.utils import dist

    original = dist.get_node_signal_file_name
    if getattr(original, "_llmshearing_per_node", False):
        return

    def name(rng=None) -> str:
        shared = original(rng)  # '._signal_file_node<n>_<random>', broadcast from rank 0
        return f"._signal_file_node{dist.get_node_rank()}_{shared.rsplit('_', 1)[-1]}"

    name._llmshearing_per_node = True  # type: ignore[attr-defined]
    dist.get_node_signal_file_name = name


# -- failing together --------------------------------------------------------------------------------
#
# Work that one rank does alone (rank 0 reading the source while the others build it on meta, rank 0 selecting
# the one-shot masks) or that can fail on one rank only (a node's disk) must not leave the other ranks waiting in
# the next collective: they would sit there until dist_timeout (600 s by default), on every node, and then fail
# with a timeout that names neither the rank nor the cause. These helpers exchange each rank's outcome; every rank
# must call them at the same point (they are collectives).

T = TypeVar("T")


class RankFailed(RuntimeError):
    """Another rank failed at a step every rank takes together; this rank stops too (the failing rank's log has the
    traceback)."""


def _failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def from_rank_zero(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0 and give every rank its result (pickled, by broadcast).

    If ``fn`` raises on rank 0, rank 0 raises it and every other rank raises :class:`RankFailed` with its message,
    at once. One process: ``fn()``."""
    from composer.utils import dist

    if dist.get_world_size() == 1:
        return fn()
    error: Optional[BaseException] = None
    box: list[Any] = [None]
    if dist.get_global_rank() == 0:
        try:
            box = [(True, fn())]
        except BaseException as e:  # noqa: BLE001 - sent to the other ranks (a signal too), then raised here
            error, box = e, [(False, _failure(e))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    ok, value = box[0]
    if not ok:
        raise RankFailed(f"rank 0 failed while {what}: {value} (rank 0's log has the traceback)")
    return value


def together(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank and return this rank's result once every rank has finished it.

    If it raised on any rank, the rank raises its own exception and every other rank :class:`RankFailed`, naming
    the ranks that failed and the first one's message. One process: ``fn()``."""
    from composer.utils import dist

    if dist.get_world_size() == 1:
        return fn()
    error: Optional[BaseException] = None
    result: Any = None
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 - reported to the other ranks (a signal too), then raised here
        error = e
    outcomes = dist.all_gather_object(None if error is None else _failure(error))
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, msg in enumerate(outcomes) if msg is not None]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise RankFailed(f"rank{'s' if len(failed) > 1 else ''} {ranks} failed while {what}: {failed[0][1]} "
                         f"(rank {failed[0][0]}'s log has the traceback)")
    return result


# -- gradients ---------------------------------------------------------------------------------------


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters FSDP left whole (not DTensors): under FSDP2, the masks and multipliers."""
    return [p for p in model.parameters() if p.requires_grad and not _is_dtensor(p)]


@torch.no_grad()
def sync_replicated_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over all ranks (one all-reduce of one flat buffer).

    FSDP averages the gradients it shards; these it does not see. A missing gradient counts as zeros, so every
    rank takes part with the same buffer."""
    from composer.utils import dist

    world = dist.get_world_size()
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, reduce_operation="SUM")  # gloo has no AVG
    flat.div_(world)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def _shard_groups(t: torch.Tensor) -> tuple:
    """The process groups over which a DTensor's local values are disjoint pieces (its Shard mesh dims)."""
    from torch.distributed.tensor import Shard

    return tuple(t.device_mesh.get_group(i) for i, pl in enumerate(t.placements) if isinstance(pl, Shard))


@torch.no_grad()
def grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients, as one model's, however its parameters are sharded (fp32 scalar).

    Sharded gradients: squares summed locally, then over the ranks that hold other pieces of them (replicas of
    a hybrid mesh are not counted twice); replicated gradients: counted once. The groups come from the parameters
    (the same on every rank), and a missing gradient counts as zero, so every rank joins the same collectives."""
    import torch.distributed as tdist

    plain: list[torch.Tensor] = []
    by_groups: dict[tuple, list[torch.Tensor]] = {}
    device = None
    for p in params:
        if _is_dtensor(p):
            local = p.grad.to_local() if p.grad is not None else None
            by_groups.setdefault(_shard_groups(p), [])
            if local is not None:
                by_groups[_shard_groups(p)].append(local)
            device = device or p.to_local().device
        else:
            device = device or p.device
            if p.grad is not None:
                plain.append(p.grad)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for groups, local in by_groups.items():
        sq = torch.stack([t.float().pow(2).sum() for t in local]).sum() if local else torch.zeros((), device=device)
        for group in groups:
            tdist.all_reduce(sq, group=group)
        total += sq.to(device)
    if plain:
        total += torch.stack([g.float().pow(2).sum() for g in plain]).sum().to(device)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))`` (``torch.nn.utils.clip_grad_norm_``'s rule) with
    the global norm of :func:`grad_norm`; returns that norm (before clipping). ``max_norm`` None: only measure."""
    params = [p for p in params if p.requires_grad]
    norm = grad_norm(params)
    if max_norm is not None and max_norm > 0 and math.isfinite(float(norm)):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is None:
                continue
            g = p.grad.to_local() if _is_dtensor(p.grad) else p.grad
            g.mul_(coef.to(g.device, g.dtype))
    return norm

