"""Targeted structured pruning as a Composer Algorithm.

The model's code knows nothing about masks. At ``Event.INIT`` this algorithm builds the
:class:`~llmshearing.pruning.ShearingMasks` for the source and target shapes, registers it as the
``masks`` submodule of the Composer model (so it is checkpointed with the model), hooks it into the
transformers model and adds two optimizer parameter groups: the mask log-alphas (``mask_lr``) and the
Lagrange multipliers (``-lambda_lr``); the run's scheduler scales both with the model's rate (warmup and
decay), as the reference does. Before every training forward it tells the masks the step (which ramps the
target) and which of the step's ``mask_samples`` independent samples this micro-batch draws (from its global
position in the batch, so any world size and micro-batch size draw the same masks for the same sequences);
after the loss it adds the Lagrangian; after the optimizer step it clamps every ``log_alpha`` to
``[ln 0.01, ln 100]``. With ``constraint: projection`` there are no multipliers (no Lagrangian, no optimizer
group for them): after the optimizer step every row's ``log_alpha`` is shifted onto the next step's ramped target
instead (``ShearingMasks.project_``); replicated masks with all-reduced gradients make the same shift on every rank.

Under FSDP the masks are replicated, never sharded (``_fsdp_wrap = False``; see :mod:`llmshearing.parallel`):
plain fp32 tensors on every rank, whose gradients :class:`~llmshearing.algorithms.GlobalGradNorm` averages.
``init: importance`` / ``target`` score the source once, at the first ``Event.EVAL_START`` or ``Event.FIT_START`` of a run
that starts at batch 0 (after wrapping, on the training device, every rank on the same calibration sequences) with the
masks switched off, so the evaluation before the first step already sees the initialised masks.

Evaluation (the hooks follow ``model.training``): the ``eval`` evaluator -- the one dynamic loading reads --
sees the model the gates currently describe (``expected`` masks: each row keeps ``n - round(expected
zeros)`` units, as the reference's ``eval_target_model=false``); an ``eval_target`` evaluator, when the
trainer adds one, sees the top-k-to-target model that materialisation will produce.

| Key | Logged (every batch) |
| --- | --- |
| ``pruning/expected_<structure>`` | expected kept units per row (layers, hidden dims, channels/layer, heads/group, groups/layer) |
| ``pruning/target_<structure>`` | ramped target of the same |
| ``pruning/lambda1_<structure>``, ``pruning/lambda2_<structure>`` | Lagrange multipliers |
| ``pruning/expected_params`` | parameter count of the expected architecture |
| ``pruning/expected_<config field>`` | expected target-config sizes (heads, KV heads, ...) |
| ``pruning/weak_kept_<structure>`` | units the target keeps whose test-time value is < 0.1 (dead capacity) |
| ``loss/train/lm_loss``, ``loss/train/lagrangian`` | the two parts of ``loss/train/total`` |
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from transformers import PretrainedConfig

from llmshearing.config import PRUNING_CONSTRAINTS, PRUNING_INITS, ConfigError, PruningConfig
from llmshearing.models.adapters import UnsupportedModel, adapter_for
from llmshearing.models.families import count_params, describe_shape
from llmshearing.pruning import ShearingMasks, attach_masks, resolve_target
from llmshearing.pruning.importance import activation_scores, gate_scores
from llmshearing.pruning.masks import LOG_ALPHA_MAX, LOG_ALPHA_MIN

__all__ = ["L0Pruning"]

# log_alpha spread by rank: below ln 100 for ``importance``; the slope through the gate threshold for ``target``
# (12: a row's middle third lies within +-2 of the threshold, P(z != 0) in [0.12, 0.88], where learning can swap
# units; the rest is decided).
DEFAULT_SPREAD = {"importance": 3.0, "target": 12.0}

log = logging.getLogger(__name__)


class L0Pruning(Algorithm):
    """Learns hard-concrete masks that prune the model to ``target`` (see module docstring).

    Args:
        source: source shape (``describe_shape`` of the model config).
        target: resolved target shape (``resolve_target``).
        prune: structures to mask.
        lagrangian_warmup: duration of the linear target ramp (Composer time string).
        mask_lr: learning rate of the log-alphas.
        lambda_lr: learning rate of the Lagrange multipliers (applied as ascent).
        constraint: ``lagrangian`` (the multipliers) or ``projection`` (every row shifted onto the target after
            each step; see ``PruningConfig.constraint``).
        init: ``reference`` (every gate at ``init_log_alpha``), ``importance`` (spread below it by activation
            importance) or ``target`` (placed by activation importance so the expected sizes start at the target).
        init_log_alpha: initial ``log_alpha``.
        importance_spread: with ``importance``: the least important unit of a row starts this far below; with
            ``target``: the slope of ``log_alpha`` over a row's rank (None: 3.0 and 12.0).
        calibration: with ``importance``: returns the calibration token ids (N, S).
        temperature: hard-concrete beta.
        seed: seed of the gate noise.
        mask_samples: independent mask samples per step; the global batch is cut into this many equal groups
            of consecutive sequences, each trained under its own sample (a micro-batch must not straddle two).
        log_alpha_min: the lower clamp of every ``log_alpha``.
        freeze_weights: train the masks (and multipliers) only; the model's weights stay the source's.
        save_folder: where ``masks/ba<step>.pt`` are written at every evaluation (None: not saved).
    """

    TARGET_LABEL = "eval_target"  # the evaluator that sees the top-k-to-target model (the trainer adds it)

    def __init__(
        self,
        source: dict[str, int],
        target: dict[str, int],
        prune: list[str],
        lagrangian_warmup: str = "0.2dur",
        mask_lr: float = 1.0,
        lambda_lr: float = 1.0,
        constraint: str = "lagrangian",
        init: str = "reference",
        init_log_alpha: float = LOG_ALPHA_MAX,
        importance_spread: Optional[float] = None,
        calibration: Optional[Callable[[], torch.Tensor]] = None,
        temperature: float = 2.0 / 3.0,
        seed: int = 0,
        mask_samples: int = 1,
        log_alpha_min: float = LOG_ALPHA_MIN,
        freeze_weights: bool = False,
        save_folder: Optional[str] = None,
        tie_word_embeddings: bool = False,
        qkv_bias: bool = False,
        model_config: Optional[PretrainedConfig] = None,
    ) -> None:
        if init not in PRUNING_INITS:
            raise ValueError(f"init={init!r}: use one of {list(PRUNING_INITS)}")
        if constraint not in PRUNING_CONSTRAINTS:
            raise ValueError(f"constraint={constraint!r}: use one of {list(PRUNING_CONSTRAINTS)}")
        if init != "reference" and calibration is None:
            raise ValueError(f"init={init!r} needs calibration sequences")
        if importance_spread is None:
            importance_spread = DEFAULT_SPREAD.get(init, 0.0)
        self.source, self.target, self.prune = source, target, list(prune)
        self.lagrangian_warmup = Time.from_timestring(lagrangian_warmup)
        if self.lagrangian_warmup.unit not in (TimeUnit.BATCH, TimeUnit.DURATION):
            raise ValueError(f"lagrangian_warmup={lagrangian_warmup!r}: give batches ('640ba') or a fraction ('0.2dur')")
        self.mask_lr, self.lambda_lr, self.constraint = mask_lr, lambda_lr, constraint
        self.init, self.init_log_alpha, self.importance_spread = init, init_log_alpha, importance_spread
        self.calibration = calibration
        self.temperature, self.seed = temperature, seed
        if mask_samples < 1:
            raise ValueError(f"mask_samples={mask_samples}: give at least 1")
        self.mask_samples = mask_samples
        self.log_alpha_min, self.freeze_weights = log_alpha_min, freeze_weights
        self._offset = 0  # global position of the next training micro-batch's first sequence
        self._rank_batch = 0
        self.save_folder = save_folder
        self.tie_word_embeddings, self.qkv_bias = tie_word_embeddings, qkv_bias
        self.model_config = model_config
        self.masks: Optional[ShearingMasks] = None
        self._warmup_batches = 0
        self._started = False
        self._lagrangian_logs: dict[str, torch.Tensor | float] = {}

    @classmethod
    def from_config(
        cls, cfg: PruningConfig, model_config: PretrainedConfig, seed: int = 0, save_folder: Optional[str] = None,
        calibration: Optional[Callable[[], torch.Tensor]] = None,
    ) -> L0Pruning:
        """Validate the family, its features and the target against the source config (before any training)
        and build the algorithm."""
        adapter, source, target = cls.validate(cfg, model_config)
        return cls(
            source=source,
            target=target,
            prune=cfg.prune,
            lagrangian_warmup=cfg.lagrangian_warmup,
            mask_lr=cfg.mask_lr,
            lambda_lr=cfg.lambda_lr,
            constraint=cfg.constraint,
            init=cfg.init,
            init_log_alpha=cfg.init_log_alpha,
            importance_spread=cfg.importance_spread,
            calibration=calibration,
            temperature=cfg.temperature,
            seed=seed,
            mask_samples=cfg.mask_samples,
            log_alpha_min=cfg.log_alpha_min,
            freeze_weights=cfg.freeze_weights,
            save_folder=save_folder if cfg.save_masks else None,
            tie_word_embeddings=bool(getattr(model_config, "tie_word_embeddings", False)),
            qkv_bias=any(p.bias(model_config) for p in adapter.projections if p.rows in ("q", "kv")),
            model_config=model_config,
        )

    @staticmethod
    def validate(cfg: PruningConfig, model_config: PretrainedConfig) -> tuple[Any, dict[str, int], dict[str, int]]:
        """The family's adapter, the source shape and the full target, or a :class:`ConfigError` naming what the
        family, its features or the target do not allow (needs only the config: run it before loading weights)."""
        try:
            adapter = adapter_for(model_config)
            source = describe_shape(model_config)
            target = resolve_target(source, cfg.target, cfg.prune)
            adapter.check_target(model_config, source, target, cfg.prune)
        except UnsupportedModel as e:
            raise ConfigError(str(e)) from None
        return adapter, source, target

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_DATALOADER, Event.BEFORE_TRAIN_BATCH,
                         Event.BEFORE_FORWARD, Event.AFTER_LOSS, Event.BATCH_END, Event.EVAL_START, Event.EVAL_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._init(state)
        elif event == Event.FIT_START:
            self._warmup_batches = self._to_batches(state, self.lagrangian_warmup)
            self._start(state)
        elif event == Event.AFTER_DATALOADER:  # the rank's whole batch (a retried batch keeps this one)
            self._rank_batch = int(state.batch["input_ids"].shape[0])
        elif event == Event.BEFORE_TRAIN_BATCH:  # again on a retry after running out of memory
            self._offset = dist.get_global_rank() * self._rank_batch
        elif event == Event.BEFORE_FORWARD:
            self._set_step(state)
        elif event == Event.AFTER_LOSS:
            self._add_lagrangian(state)
        elif event == Event.BATCH_END:  # after the optimizer step
            self.masks.clamp_()
            if self.constraint == "projection":  # onto the next forward's target (the batch count has advanced)
                self.masks.project_(self._progress(int(state.timestamp.batch)))
            self._log(state, logger)
        elif event == Event.EVAL_START:
            self._start(state)  # eval_first evaluates before fit(): the masks must have started by then
            self.masks.eval_mode = "target" if state.dataloader_label == self.TARGET_LABEL else "expected"
        elif event == Event.EVAL_END:
            if state.dataloader_label != self.TARGET_LABEL:
                self._save_masks(state)
            self.masks.eval_mode = "target"

    # -- events --------------------------------------------------------------------------------------
    def _init(self, state: State) -> None:
        model = state.model
        hf_model = model.model
        masks = ShearingMasks(
            self.source, self.target, self.prune, self.init_log_alpha, self.temperature, self.seed,
            self.tie_word_embeddings, self.qkv_bias, self.model_config, self.log_alpha_min,
        )
        if self.freeze_weights:  # the optimizer skips parameters without gradients
            for p in hf_model.parameters():
                p.requires_grad_(False)
        # Replicated under FSDP: Composer's FSDP2 policy wraps every child of the Composer model unless it says
        # otherwise, and a sharded mask would be a DTensor slice wherever it is read outside a forward. The weights
        # may still be on the CPU (or the meta device) here: the masks go to the training device themselves.
        masks._fsdp_wrap = False
        state.device.module_to_device(masks)
        model.masks = masks  # a submodule: in the model's state dict, checkpointed and resumed with it
        self.masks = masks
        self.hf_model = hf_model
        self.hooks = attach_masks(hf_model, masks)
        gate_params = [g.log_alpha for g in masks.gates.values()]
        lambda_params = list(masks.lambdas.values())
        for opt in state.optimizers:
            opt.add_param_group({"params": gate_params, "lr": self.mask_lr, "weight_decay": 0.0})
            if self.constraint == "projection":  # no multipliers to learn (they stay 0 in the state dict)
                continue
            # Gradient ASCENT on the Lagrange multipliers: the min-max objective maximises over lambda,
            # which Adam-style optimizers do with a negative learning rate (no weight decay: it would
            # grow the lambdas with a negative lr).
            opt.add_param_group({"params": lambda_params, "lr": -self.lambda_lr, "weight_decay": 0.0})
        n_src = count_params(self.source, self.tie_word_embeddings, self.qkv_bias, config=self.model_config)
        n_tgt = count_params({**self.source, **self.target}, self.tie_word_embeddings, self.qkv_bias,
                             config=self.model_config)
        log.info(
            "pruning %s -> %s: %.2fM -> %.2fM parameters (%s), masks over %s (%d mask parameters)",
            self.source, self.target, n_src / 1e6, n_tgt / 1e6,
            "tied embedding counted once" if self.tie_word_embeddings else "untied embedding and LM head",
            sorted(masks.gates), sum(p.numel() for p in gate_params),
        )

    def _start(self, state: State) -> None:
        """Once, before the first forward of the run (training or the evaluation before it): scored inits."""
        if self._started:
            return
        self._started = True
        if self.init != "reference" and int(state.timestamp.batch) == 0:  # a resumed run has its masks
            self._init_from_importance(state)
        self.masks.clamp_()  # (no projection here: the ramp starts at the masks' own sizes, a resumed run's masks
        # were projected after its last step, and a second projection would move them by rounding)

    def _init_from_importance(self, state: State) -> None:
        ids = self.calibration()
        with self.masks.disabled():  # the plain source, through the (possibly wrapped) model
            scores = activation_scores(self.hf_model, ids)
        if dist.get_world_size() > 1:  # every rank scored the same sequences; rank 0's scores make the masks equal
            for name in sorted(scores):
                t = scores[name].to(self.masks.device)
                dist.broadcast(t, src=0)
                scores[name] = t.cpu()
        self.masks.init_from_scores(gate_scores(scores, {k: g.shape for k, g in self.masks.gates.items()}),
                                    self.importance_spread, at_target=self.init == "target")
        log.info("masks initialised from activation importance on %d calibration sequences of %d tokens",
                 ids.shape[0], ids.shape[1])

    def _to_batches(self, state: State, t: Time) -> int:
        if t.unit == TimeUnit.BATCH:
            return int(t.value)
        max_dur = state.max_duration
        if max_dur is None or max_dur.unit != TimeUnit.BATCH:
            raise ValueError("lagrangian_warmup as a fraction of the run ('0.2dur') needs max_duration in batches")
        return int(round(t.value * max_dur.value))

    def _set_step(self, state: State) -> None:
        step = int(state.timestamp.batch)
        self.masks.step = step
        n = int(state.batch["input_ids"].shape[0])
        group = self._rank_batch * dist.get_world_size() // self.mask_samples  # sequences per mask sample
        first, last = self._offset // group, (self._offset + n - 1) // group
        if first != last:
            raise ValueError(
                f"a micro-batch of {n} sequences at global position {self._offset} spans mask samples {first} and "
                f"{last} (pruning.mask_samples={self.mask_samples}: {group} sequences each); choose "
                "device_train_microbatch_size dividing global_train_batch_size / pruning.mask_samples")
        self.masks.sample = first
        self._offset += n
        self.masks.set_progress(self._progress(step))

    def _progress(self, step: int) -> float:
        """How far the target ramp is at ``step`` (0: the start sizes, 1: the target)."""
        return 1.0 if self._warmup_batches <= 0 else min(1.0, step / self._warmup_batches)

    def _add_lagrangian(self, state: State) -> None:
        lm_loss = state.loss
        if isinstance(lm_loss, dict):
            lm_loss = lm_loss["total"]
        lagrangian, self._lagrangian_logs = self.masks.lagrangian()
        if self.constraint == "projection":  # logged (it is 0 with the multipliers at 0), not optimised
            lagrangian = lagrangian.detach()
        state.loss = {"total": lm_loss + lagrangian, "lm_loss": lm_loss, "lagrangian": lagrangian}

    def _log(self, state: State, logger: Logger) -> None:
        """The step's pruning metrics, at two moments: the Lagrangian's (``expected_<gate>``, ``target_<gate>``,
        ``lambda1/2_<gate>``) from the step's last forward, before the optimizer step; the expected shape,
        ``expected_params`` and ``weak_kept_<gate>`` after the step's clamp and projection (the next forward's)."""
        logs = self._lagrangian_logs
        # every device value of the step's log (the Lagrangian's, the expected kept counts, the weak-unit counts)
        # read to the host at once: one wait for the device per step, not one per value
        with torch.no_grad():
            groups = ({k: v for k, v in logs.items() if isinstance(v, torch.Tensor)},
                      self.masks.expected_counts(), self.masks.weak_kept_counts())
            values = iter(torch.stack([v.float() for g in groups for v in g.values()]).tolist())
        lagrangian, counts, weak = [{k: next(values) for k in g} for g in groups]
        metrics: dict[str, Any] = {f"pruning/{k}": v for k, v in {**logs, **lagrangian}.items()}
        shape = self.masks.expected_shape(counts)
        metrics["pruning/expected_params"] = self.masks.expected_params(shape)
        metrics.update({f"pruning/weak_kept_{k}": int(v) for k, v in weak.items()})
        for k, v in shape.items():
            if k in ("num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size", "num_hidden_layers"):
                metrics[f"pruning/expected_{k}"] = v
        logger.log_metrics(metrics)

    def _save_masks(self, state: State) -> None:
        if self.save_folder is None or dist.get_global_rank() != 0:
            return
        out = Path(self.save_folder) / "masks" / f"ba{int(state.timestamp.batch)}.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "step": int(state.timestamp.batch),
            "source": self.source,
            "target": self.target,
            "deterministic": self.masks.deterministic().to_dict(),
            "log_alpha": {k: g.log_alpha.detach().cpu() for k, g in self.masks.gates.items()},
            "expected_shape": self.masks.expected_shape(),
        }
        tmp = out.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        tmp.replace(out)

    # -- checkpoint contract (the masks' tensors live in the model's state dict) --------------------
    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "prune": self.prune, "constraint": self.constraint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and (state.get("source") != self.source or state.get("target") != self.target):
            raise ValueError(
                f"the checkpoint was written pruning {state.get('source')} -> {state.get('target')}, this run prunes "
                f"{self.source} -> {self.target}; resume with the same source model and target, or start a new run"
            )
        written = state.get("constraint", "lagrangian") if state else self.constraint
        if written != self.constraint:  # the multipliers' optimizer group exists in one and not the other
            raise ValueError(
                f"the checkpoint was written with pruning.constraint={written}, this run has {self.constraint}; resume "
                f"with pruning.constraint={written}, or start a new run"
            )
