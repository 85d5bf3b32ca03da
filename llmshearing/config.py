"""Typed run configuration: YAML (with ``includes:``) + command-line overrides -> validated dataclasses.

A run is described by one YAML file, optionally composed from smaller files listed under
``includes:`` (paths relative to the including file, merged in order, the including file last),
then overridden from the command line with ``key.sub=value`` pairs. OmegaConf does the merging and
the ``${variables.x}`` interpolation; the result is turned into the dataclasses below, which reject
unknown keys (naming the key and the closest known one) and validate values in ``__post_init__``,
so that a typo fails in the first second of a run rather than hours in.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig, ListConfig
from omegaconf import OmegaConf as om

__all__ = [
    "ConfigError",
    "DataConfig",
    "DistillationConfig",
    "DynamicLoadingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PruningConfig",
    "RunConfig",
    "SchedulerConfig",
    "TargetShape",
    "load_config",
    "load_yaml",
    "yaml_contents",
]


class ConfigError(ValueError):
    """A configuration problem, reported before any expensive work starts."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_time(key: str, value: str) -> None:
    """A Composer duration: a number with a unit (``300ba``, ``1000000tok``, ``0.2dur``)."""
    from composer.core import Time, TimeUnit

    try:
        # a bare number parses as seconds of wall clock ("2" is 2 s), which training cannot be measured in
        ok = Time.from_timestring(str(value)).unit in (TimeUnit.BATCH, TimeUnit.TOKEN, TimeUnit.SAMPLE,
                                                        TimeUnit.EPOCH, TimeUnit.DURATION)
    except ValueError:
        ok = False
    if not ok:
        hint = f"; did you mean {value}ba (batches) or {value}tok (tokens)?" if str(value).strip().isdigit() else ""
        raise ConfigError(f"{key}={value!r} is not a duration: give a number with a unit: ba (batches), tok (tokens), "
                          f"sp (samples) or dur (a fraction of the run){hint}") from None


@dataclass
class ModelConfig:
    """Which transformers model to train.

    Args:
        family: ``model_type`` of the transformers family: ``llama`` (LLaMA-1/2/3), ``mistral``, ``qwen2``,
            ``qwen3``, ``phi3``, ``gemma3_text``, ``gemma2``, ``olmo2`` or ``gpt_neox`` (Pythia).
        pretrained: a Hugging Face checkpoint directory to load; ``None`` builds a random model from ``config``.
        config: transformers config fields (``hidden_size``, ``num_attention_heads``, ...). For a random
            model they define the architecture; with ``pretrained`` they must agree with the checkpoint.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2`` (needs the gpu extra).
        gradient_checkpointing: recompute activations in the backward pass (saves memory on large models).
    """

    family: str = "llama"
    pretrained: Optional[str] = None
    config: dict = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        from llmshearing.models.families import FAMILIES

        _require(
            self.family in FAMILIES,
            f"model.family={self.family!r} is not supported; use one of {sorted(FAMILIES)}",
        )
        _require(
            self.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
            f"model.attn_implementation={self.attn_implementation!r}: use sdpa, eager or flash_attention_2",
        )
        import importlib.util

        _require(
            self.attn_implementation != "flash_attention_2" or importlib.util.find_spec("flash_attn") is not None,
            "model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not installed: "
            "pip install -e '.[gpu]' on a CUDA machine, or use model.attn_implementation=sdpa",
        )
        _require(
            self.pretrained is not None or bool(self.config),
            "model: give either `pretrained` (a Hugging Face checkpoint directory) or `config` "
            "(architecture fields for a randomly initialised model)",
        )


@dataclass
class DataConfig:
    """Prepared (tokenized, MDS) data, as written by ``data_prep/prepare_data.py``.

    Args:
        local: the prepared dataset root (holds ``manifest.json``, ``train/<domain>``, ``val/<domain>``,
            ``test/<domain>``); training evaluates ``val`` only.
        remote: optional object-store URI of the same layout; ``local`` is then the cache directory.
        domains: domains to train on (default: all in the manifest, in manifest order).
        proportions: initial domain sampling proportions (default: each domain's share of tokens).
        max_seq_len: training sequence length; must not exceed the prepared sequence length.
        num_workers: dataloader worker processes.
        prefetch_factor: batches prefetched per worker (ignored with 0 workers).
        on_exhausted: what to do when a domain runs out of unseen samples: ``repeat`` (reshuffle, warn) or ``stop``.
        eval_sequences_per_domain: evaluate on at most this many validation sequences per domain (default: all).
    """

    local: str = "???"
    remote: Optional[str] = None
    domains: Optional[list[str]] = None
    proportions: Optional[list[float]] = None
    max_seq_len: int = 4096
    num_workers: int = 0
    prefetch_factor: int = 2
    on_exhausted: str = "repeat"
    eval_sequences_per_domain: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.local != "???", "data.local is required: the prepared dataset directory")
        _require(self.max_seq_len > 1, f"data.max_seq_len must be > 1, got {self.max_seq_len}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        _require(
            self.on_exhausted in ("repeat", "stop"),
            f"data.on_exhausted={self.on_exhausted!r}: use 'repeat' or 'stop'",
        )
        if self.proportions is not None:
            _require(all(p >= 0 for p in self.proportions), f"data.proportions must be >= 0: {self.proportions}")
            total = sum(self.proportions)
            _require(
                abs(total - 1.0) < 1e-3,
                f"data.proportions sum to {total:.6f}, not 1; rescale them (or leave them out to use token shares)",
            )
            if self.domains is not None:
                _require(
                    len(self.proportions) == len(self.domains),
                    f"data.proportions has {len(self.proportions)} values but data.domains has "
                    f"{len(self.domains)}; give one proportion per domain, in the same order",
                )


@dataclass
class DynamicLoadingConfig:
    """Online domain re-weighting (Sheared-LLaMA Algorithm 1), applied after every evaluation.

    Args:
        update: ``doremi`` (exponentiated excess loss, clipped at zero) or ``constant`` (keep the proportions).
        reference_losses: per-domain reference loss, one per ``data.domains`` entry, in that order.
        smoothing: mix with the uniform distribution, ``(1 - c) * w + c / k`` (DoReMi uses 1e-4).
    """

    update: str = "doremi"
    reference_losses: Optional[list[float]] = None
    smoothing: float = 1e-4

    def __post_init__(self) -> None:
        _require(
            self.update in ("doremi", "constant"),
            f"dynamic_loading.update={self.update!r}: use 'doremi' or 'constant'",
        )
        _require(0.0 <= self.smoothing < 1.0, f"dynamic_loading.smoothing must be in [0, 1), got {self.smoothing}")
        _require(
            self.update == "constant" or self.reference_losses is not None,
            "dynamic_loading.update=doremi needs dynamic_loading.reference_losses (one per domain); "
            "fit them with `python -m llmshearing.data.reference_losses` or use update=constant",
        )


@dataclass
class TargetShape:
    """The architecture the pruned model must have (uniform across layers).

    Args:
        num_hidden_layers: layers kept.
        hidden_size: model (residual) dimension kept.
        num_attention_heads: query heads per layer kept.
        num_key_value_heads: KV heads (groups) per layer kept; defaults to the query heads for a
            multi-head source, to the source's KV heads for a grouped-query source.
        intermediate_size: FFN channels per layer kept.
    """

    num_hidden_layers: int = 0
    hidden_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: Optional[int] = None
    intermediate_size: int = 0

    def __post_init__(self) -> None:
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
            _require(getattr(self, name) > 0,
                     f"pruning.target.{name} is required and must be > 0: give the target shape in the YAML or on the "
                     f"command line, e.g. pruning.target.{name}=<N> (the four fields: num_hidden_layers, hidden_size, "
                     "num_attention_heads, intermediate_size; num_key_value_heads for GQA)")


PRUNING_INITS = ("reference", "importance", "target")  # pruning.init (PruningConfig says what each does)
PRUNING_CONSTRAINTS = ("lagrangian", "projection")  # pruning.constraint (likewise)


@dataclass
class PruningConfig:
    """Targeted structured pruning with hard-concrete masks and a Lagrangian constraint.

    Args:
        target: the target architecture.
        method: how the kept units are chosen. ``learned`` (default): hard-concrete masks learned with the Lagrangian
            for ``max_duration``, then materialised at export (the paper). ``activation`` (Minitron's activation
            importance on ``calibration_sequences`` training sequences), ``magnitude`` or ``random``: a one-shot
            selection before the first step, after which the run trains the dense target model (continued
            pre-training) for ``max_duration``; the mask keys below do not apply.
        prune: structures to learn masks for, any of ``layer``, ``head``, ``intermediate``, ``hidden``.
            A structure not listed keeps its source size, so the target must equal the source there.
        lagrangian_warmup: duration over which the target is ramped from the source shape (Composer time
            string, e.g. ``"640ba"`` or ``"0.2dur"``).
        mask_lr: learning rate of the mask log-alphas (scheduled with the model's: warmup and decay).
        lambda_lr: learning rate of the Lagrange multipliers (applied as gradient *ascent*).
        constraint: how the expected sizes are held to the (ramped) target. ``lagrangian`` (default, the paper):
            ``lambda_1 (s - t) + lambda_2 (s - t)^2`` per row, the multipliers learned by gradient ascent; on
            SmolLM2 they oscillate around the target (+-7% in 100 steps, docs/results.md). ``projection``: no
            multipliers; after every optimizer step each row's ``log_alpha`` is shifted by one scalar so that its
            expected kept count equals the target, which leaves the order the masks learned from the loss intact
            and keeps the sizes on the target at every step (``lambda_lr`` does not apply).
        init: how the masks start. ``reference``: every ``log_alpha`` at ``init_log_alpha`` (the intact source,
            as the reference implementation); ``importance``: spread below ``init_log_alpha`` by the source's
            activation importance on ``calibration_sequences`` training sequences, so mask learning starts from
            Minitron's selection rather than a tie; ``target``: placed by the same ranking so that the expected
            sizes start *at* the target (the target's top-k above the gate threshold, the rest below, the gates out
            of saturation): the ramp is flat and the multipliers do not wind up while the gates leave saturation,
            which with the reference's start overshoots the target by ~25% mid-run on SmolLM2 and needs ~130
            steps to settle (the benchmark's logs); they still oscillate (+-7% in 100 steps there, docs/results.md).
        init_log_alpha: initial ``log_alpha`` (``ln 100`` = 4.6, the upper clamp: P(z = 1) ~ 0.95).
        importance_spread: with ``init: importance``, how far below ``init_log_alpha`` the least important unit
            of a row starts (linear in rank; null: 3.0); with ``init: target``, the slope of ``log_alpha`` from a
            row's best unit to its worst (null: 12.0).
        calibration_sequences: sequences of the training split scored for ``init: importance``.
        eval_target: also evaluate, under the label ``eval_target``, the model top-k'd to the target (what
            materialisation will produce); the ``eval`` evaluation, which dynamic loading reads, uses the
            current expected masks as the reference does.
        temperature: hard-concrete temperature beta.
        mask_samples: independent mask samples per training step: the global batch is cut into this many equal
            groups of consecutive sequences, each trained under its own sample of the gates (noise keyed by seed,
            step and sample, so the same on any number of ranks). 1 (default): one sample per step; the number of
            global micro-batches: one per forward, as the reference draws one per rank and forward.
        log_alpha_min: the lower clamp of every ``log_alpha`` (the reference's ln 0.01 = -4.6, where a unit still
            counts P(z != 0) = 0.047 in the expected size; lower, e.g. -9.2, makes pushed-down units count ~0, so the
            constraint is met by alive units only and the top-k export does not keep near-dead ones).
        freeze_weights: learn the masks on the source's weights (the weights are not trained while pruning).
        save_masks: write the deterministic masks to ``<save_folder>/masks/`` at every evaluation.
    """

    target: TargetShape = field(default_factory=TargetShape)
    method: str = "learned"
    prune: list[str] = field(default_factory=lambda: ["layer", "head", "intermediate", "hidden"])
    lagrangian_warmup: str = "0.2dur"
    mask_lr: float = 1.0
    lambda_lr: float = 1.0
    constraint: str = "lagrangian"
    init: str = "reference"
    init_log_alpha: float = math.log(100.0)
    importance_spread: Optional[float] = None
    calibration_sequences: int = 64
    eval_target: bool = True
    temperature: float = 2.0 / 3.0
    mask_samples: int = 1
    log_alpha_min: float = math.log(0.01)
    freeze_weights: bool = False
    save_masks: bool = True

    def __post_init__(self) -> None:
        allowed = ("layer", "head", "intermediate", "hidden")
        bad = [p for p in self.prune if p not in allowed]
        _require(not bad, f"pruning.prune has unknown structures {bad}; choose from {list(allowed)}")
        _require(len(self.prune) > 0, "pruning.prune is empty: list at least one structure to prune")
        _require(self.init in PRUNING_INITS, f"pruning.init={self.init!r}: use 'reference', 'importance' or 'target'")
        _require(self.constraint in PRUNING_CONSTRAINTS,
                 f"pruning.constraint={self.constraint!r}: use 'lagrangian' (the paper's multipliers) or 'projection'")
        _require(self.method in ("learned", "activation", "magnitude", "random"),
                 f"pruning.method={self.method!r}: use learned, activation, magnitude or random")
        lo, hi = math.log(0.01), math.log(100.0)
        _require(self.log_alpha_min < hi, f"pruning.log_alpha_min={self.log_alpha_min} must be below ln 100 = {hi:.3f}")
        lo = self.log_alpha_min
        _require(lo <= self.init_log_alpha <= hi,
                 f"pruning.init_log_alpha={self.init_log_alpha} is outside the clamp [log_alpha_min, ln 100] = [{lo:.3f}, {hi:.3f}]")
        _require(self.importance_spread is None or self.importance_spread >= 0,
                 "pruning.importance_spread must be >= 0 (or null: the init's default)")
        _require(self.calibration_sequences > 0, "pruning.calibration_sequences must be > 0")
        _require(self.mask_lr > 0 and self.lambda_lr > 0, "pruning.mask_lr and pruning.lambda_lr must be > 0")
        _require(self.mask_samples >= 1, f"pruning.mask_samples must be >= 1, got {self.mask_samples}")


@dataclass
class DistillationConfig:
    """Logit distillation from a frozen teacher (``llmshearing.distillation``), in pruning or continued
    pre-training: the block's presence turns it on for that run.

    Args:
        teacher: the teacher (Hugging Face directory, ``.gguf`` file or GGUF short name). ``None``: the pruning
            source (``model.pretrained`` of a pruning run); a continued pre-training run must name it (its
            ``model.pretrained`` is the pruned student).
        temperature: softmax temperature tau of both distributions (Minitron: 1).
        kd_weight: weight of the KL term.
        ce_weight: weight of the next-token cross-entropy (Minitron: 0, KD only; cross-entropy is logged anyway).
        chunk_tokens: positions whose teacher logits are made at once (bounds logits memory in the vocabulary).
        dtype: the teacher's weights: ``auto`` (bf16 on GPUs, fp32 on CPU), ``fp32`` or ``bf16``.
    """

    teacher: Optional[str] = None
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 4096
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(self.temperature > 0, f"distillation.temperature must be > 0, got {self.temperature}")
        _require(self.kd_weight >= 0 and self.ce_weight >= 0, "distillation.kd_weight and ce_weight must be >= 0")
        _require(self.kd_weight + self.ce_weight > 0, "distillation: kd_weight and ce_weight are both 0: nothing to train")
        _require(self.chunk_tokens > 0, f"distillation.chunk_tokens must be > 0, got {self.chunk_tokens}")
        _require(self.dtype in ("auto", "fp32", "bf16"), f"distillation.dtype={self.dtype!r}: use auto, fp32 or bf16")


@dataclass
class OptimizerConfig:
    """DecoupledAdamW hyperparameters for the model weights."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _require(len(self.betas) == 2, f"optimizer.betas needs two values, got {self.betas}")


@dataclass
class SchedulerConfig:
    """Cosine decay with linear warmup (Composer ``CosineAnnealingWithWarmupScheduler``)."""

    t_warmup: str = "0.03dur"
    alpha_f: float = 0.1


@dataclass
class RunConfig:
    """One training run (pre-training, pruning or continued pre-training).

    See README "Configuration reference" for every field.
    """

    model: ModelConfig
    data: DataConfig
    max_duration: str
    global_train_batch_size: int
    run_name: str = "llmshearing"
    seed: int = 17
    variables: dict = field(default_factory=dict)
    tokenizer: Optional[str] = None
    dynamic_loading: Optional[DynamicLoadingConfig] = None
    pruning: Optional[PruningConfig] = None
    distillation: Optional[DistillationConfig] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device_train_microbatch_size: Union[int, str] = "auto"
    device_eval_batch_size: int = 8
    eval_interval: str = "100ba"
    eval_subset_num_batches: int = -1
    eval_first: bool = True
    precision: str = "auto"
    grad_clip_norm: float = 1.0
    fsdp: Optional[dict] = None
    device: str = "auto"
    # seconds a collective waits for the slowest rank before the run fails (torch.distributed's timeout): rank 0
    # loading a 7B/8B source from a network disk can take longer than the 600 s default
    dist_timeout: float = 600.0
    save_folder: Optional[str] = None
    save_interval: str = "500ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    load_path: Optional[str] = None
    autoresume: bool = False
    loggers: dict = field(default_factory=dict)
    metrics_file: Optional[str] = "auto"
    console_log_interval: str = "10ba"
    progress_bar: bool = False

    def __post_init__(self) -> None:
        for key in ("max_duration", "eval_interval", "save_interval", "console_log_interval"):
            _check_time(f"{key}", getattr(self, key))
        _check_time("scheduler.t_warmup", self.scheduler.t_warmup)
        if self.pruning is not None:
            _check_time("pruning.lagrangian_warmup", self.pruning.lagrangian_warmup)
        _require(self.global_train_batch_size > 0, "global_train_batch_size must be > 0")
        _require(self.device_eval_batch_size > 0, "device_eval_batch_size must be > 0")
        if isinstance(self.device_train_microbatch_size, str):
            _require(
                self.device_train_microbatch_size == "auto",
                f"device_train_microbatch_size={self.device_train_microbatch_size!r}: use an integer or 'auto'",
            )
        _require(
            self.precision in ("auto", "fp32", "amp_bf16", "amp_fp16"),
            f"precision={self.precision!r}: use auto, fp32, amp_bf16 or amp_fp16",
        )
        _require(self.device in ("auto", "cpu", "gpu"), f"device={self.device!r}: use auto, cpu or gpu")
        _require(math.isfinite(self.dist_timeout) and self.dist_timeout > 0,
                 f"dist_timeout={self.dist_timeout}: give a finite number of seconds > 0 (default 600)")
        _require(
            not self.autoresume or self.save_folder is not None,
            "autoresume=true needs save_folder (where the checkpoints to resume from are written)",
        )
        _require(
            self.distillation is None or self.distillation.teacher is not None or (
                self.pruning is not None and self.model.pretrained is not None),
            "distillation.teacher is not set and this run has no pruning source to default to: name the teacher "
            "(e.g. the unpruned source model) in distillation.teacher",
        )
        if self.fsdp is not None:
            from llmshearing.parallel import check_fsdp_block

            check_fsdp_block(self.fsdp)
            _require(
                self.device_train_microbatch_size != "auto",
                "device_train_microbatch_size=auto: Composer cannot search the micro-batch size under FSDP2; give "
                "an integer (the shipped GPU configs use 4 for pruning, 8 for continued pre-training at 4096 tokens)",
            )
            _require(
                self.precision != "amp_fp16",
                "precision=amp_fp16 with fsdp: Composer's fp16 loss scaler cannot unscale sharded and replicated "
                "(mask) gradients together, and its per-rank overflow check would let the masks diverge; use "
                "precision=amp_bf16",
            )
            _require(
                not (self.fsdp.get("activation_checkpointing") and self.model.gradient_checkpointing),
                "fsdp.activation_checkpointing and model.gradient_checkpointing both recompute the decoder layers; "
                "keep one (fsdp.activation_checkpointing under FSDP)",
            )
        if self.pruning is not None and self.pruning.mask_samples > 1:
            k, b = self.pruning.mask_samples, self.global_train_batch_size
            _require(b % k == 0, f"pruning.mask_samples={k} does not divide global_train_batch_size={b}")
            _require(isinstance(self.device_train_microbatch_size, int),
                     f"pruning.mask_samples={k} needs an integer device_train_microbatch_size (a micro-batch must lie "
                     f"within one mask sample's {b // k} sequences; 'auto' may change it mid-run)")
            check_mask_samples(self, world_size=1)
        unknown_loggers = set(self.loggers) - {"wandb", "mlflow", "tensorboard"}
        _require(not unknown_loggers, f"loggers: unknown logger(s) {sorted(unknown_loggers)}; use wandb, mlflow, tensorboard")
        import importlib.util

        for name, module, install in (("wandb", "wandb", "pip install -e '.[wandb]'"),
                                      ("mlflow", "mlflow", "pip install mlflow"),
                                      ("tensorboard", "tensorboard", "pip install tensorboard")):
            _require(name not in self.loggers or importlib.util.find_spec(module) is not None,
                     f"loggers.{name} needs the {module} package, which is not installed: {install} (or remove "
                     f"loggers.{name})")
        if "wandb" in self.loggers:
            problem = wandb_credentials_problem()
            _require(problem is None, f"loggers.wandb: {problem}")
        if self.dynamic_loading is not None and self.dynamic_loading.reference_losses is not None:
            if self.data.domains is not None:
                n_ref, n_dom = len(self.dynamic_loading.reference_losses), len(self.data.domains)
                _require(
                    n_ref == n_dom,
                    f"dynamic_loading.reference_losses has {n_ref} values but data.domains has {n_dom}; "
                    "give one reference loss per domain, in the same order",
                )


def wandb_credentials_problem() -> Optional[str]:
    """Why wandb would stop the run at its first step for want of credentials, or None. Only the places wandb reads
    without asking are looked at (its environment variables, the netrc file, its settings file); with a terminal on
    stdin wandb asks for the key itself, so nothing is said."""
    import netrc
    import sys
    from urllib.parse import urlparse

    env = os.environ
    if env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or env.get("WANDB_DISABLED"):
        return None
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE") or sys.stdin.isatty():
        return None
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    home = Path.home()
    for f in [env.get("NETRC", ""), str(home / ".netrc"), str(home / "_netrc")]:
        try:
            if f and Path(f).is_file() and netrc.netrc(f).authenticators(host):
                return None
        except (netrc.NetrcParseError, OSError):
            return None  # a file wandb may read in its own way: let it decide
    settings = Path(env.get("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))) / "settings"
    if settings.is_file() and "api_key" in settings.read_text(errors="replace"):
        return None
    return (f"no wandb credentials for {host} (WANDB_API_KEY, or `wandb login` once on this machine); or log locally "
            "with WANDB_MODE=offline and upload later with `wandb sync`")


def check_mask_samples(cfg: RunConfig, world_size: int) -> None:
    """A micro-batch must lie within one mask sample's group of consecutive sequences on ``world_size`` ranks:
    the micro-batch divides both a rank's batch and a group, or is a rank's whole batch and ranks tile groups."""
    k, b, m = cfg.pruning.mask_samples, cfg.global_train_batch_size, cfg.device_train_microbatch_size
    per_rank, group = b // world_size, b // k
    ok = (per_rank % m == 0 and group % m == 0) or (m >= per_rank and group % per_rank == 0)
    _require(ok, f"device_train_microbatch_size={m} on {world_size} rank(s) ({per_rank} sequences each) would put a "
             f"micro-batch across two of pruning.mask_samples={k}'s groups of {group} sequences; choose a micro-batch "
             f"that divides both {per_rank} and {group}")


# --------------------------------------------------------------------------------------------------
# YAML loading and dataclass construction
# --------------------------------------------------------------------------------------------------


def load_yaml(path: str | Path, overrides: typing.Sequence[str] = ()) -> DictConfig:
    """Load a YAML file, resolve its ``includes:`` and apply ``key=value`` overrides.

    Args:
        path: the YAML file.
        overrides: command-line style ``dotted.key=value`` strings, applied last.

    Returns:
        The merged, interpolation-resolved OmegaConf config.
    """
    cfg = _load_with_includes(Path(path), seen=())
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command-line overrides must look like key=value; got {bad}")
    if overrides:
        cfg = om.merge(cfg, om.from_dotlist(list(overrides)))
    try:
        resolved = om.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:  # omegaconf raises several types; all mean the same to a user
        from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

        key = getattr(e, "full_key", None)
        if isinstance(e, MissingMandatoryValue) and key:
            raise ConfigError(f"{key} is required ({Path(path).name} leaves it ???): give it on the command line, "
                              f"e.g. {key}=<value>") from None
        if isinstance(e, InterpolationResolutionError) and "???" in str(e) or "Missing mandatory value" in str(e):
            missing = str(e).split("Missing mandatory value:")[-1].split("\n")[0].strip() or key
            raise ConfigError(f"{missing} is required ({Path(path).name} leaves it ???; {key} refers to it): give it "
                              f"on the command line, e.g. {missing}=<value>") from None
        raise ConfigError(f"{path}: could not resolve the config: {' '.join(str(e).split())}") from None
    return om.create(resolved)


def yaml_contents(path: str | Path) -> dict:
    """The YAML file with its ``includes:`` merged, before overrides and interpolation (comments dropped): what a
    run's config is made of, for a cache key that changes when the file or one it includes does."""
    return om.to_container(_load_with_includes(Path(path), seen=()), resolve=False)


def _load_with_includes(path: Path, seen: tuple[Path, ...]) -> DictConfig:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        cfg = om.load(path)
    except Exception as e:  # yaml's scanner/constructor errors: report where, not a traceback
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a run config must be a YAML mapping")
    includes = cfg.pop("includes", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged = om.create()
    for inc in includes:
        merged = om.merge(merged, _load_with_includes(path.parent / str(inc), seen=(*seen, path)))
    return om.merge(merged, cfg)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load and validate a run config: see :func:`load_yaml` and :class:`RunConfig`."""
    cfg = load_yaml(path, overrides)
    return build_dataclass(RunConfig, om.to_container(cfg), where="")


_REPLACED = {
    "droprate_init": "masks start at pruning.init_log_alpha (default ln 100, the reference's intact source); "
    "delete the key, or set pruning.init_log_alpha = logit(1 - droprate_init) for the old start",
}


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys by their dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key in _REPLACED and key not in names:
            raise ConfigError(f"config key '{where}{key}' was replaced: {_REPLACED[key]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{where}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{where}{key}'{hint} (known keys here: {', '.join(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(where + m for m in missing)}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where=f"{where}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def to_plain(obj: Any) -> Any:
    """A dataclass config as plain containers (for logging hyperparameters)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple, ListConfig)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (dict, DictConfig)):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
