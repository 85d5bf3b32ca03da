"""Builds the Composer ``Trainer`` for a run config: ``train.py`` is ``train_from_yaml(path, overrides)``."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from composer import Evaluator, Trainer
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from composer.utils import dist, get_device, reproducibility

from llmshearing.checkpointing import (
    check_checkpoint_file,
    install_atomic_checkpoint_writes,
    adopt_earlier_checkpoints,
    repair_save_folder,
    resume_checkpoint,
)
from llmshearing.callbacks import CheckpointMetadata, DomainLossMonitor, DynamicLoading, LossGuard, MetricsFile
from llmshearing.config import ConfigError, RunConfig, load_config, to_plain
from llmshearing.data import (
    DomainTokenDataset,
    build_eval_dataloader,
    build_train_dataloader,
    calibration_batch,
    load_manifest,
    resolve_domains,
)
from llmshearing.models import ComposerCausalLM, build_hf_model
from llmshearing.models.adapters import adapter_for
from llmshearing.models.families import resolve_hf_config
from llmshearing.parallel import from_rank_zero, together

__all__ = ["build_trainer", "finished", "train_from_yaml"]

log = logging.getLogger(__name__)


def _precision(cfg: RunConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "amp_bf16" if torch.cuda.is_available() else "fp32"


def _cpu_autocast(cfg: RunConfig) -> bool:
    """bf16 autocast on the CPU: asked for by ``device: cpu`` *and* ``precision: amp_bf16`` together (Composer's own
    mixed precision is CUDA-only; the model applies ``torch.autocast("cpu")`` itself). A GPU YAML's amp_bf16 on a
    machine without a GPU (``device: auto``) stays an error: that is a wrong machine, not a request."""
    return cfg.device == "cpu" and _precision(cfg) == "amp_bf16"


def _device(cfg: RunConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "gpu" if torch.cuda.is_available() else "cpu"


def _distillation(cfg: RunConfig, manifest: dict, student) -> dict[str, Any]:
    """The teacher and loss settings of ``cfg.distillation`` (empty without it), checked before training."""
    if cfg.distillation is None:
        return {}
    from llmshearing.distillation import check_tokenizers_agree, load_teacher

    d = cfg.distillation
    path = d.teacher or cfg.model.pretrained
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(d.dtype) or (
        torch.bfloat16 if _device(cfg) == "gpu" else torch.float32)
    device = torch.device("cuda", torch.cuda.current_device()) if _device(cfg) == "gpu" else None
    teacher = load_teacher(path, dtype=dtype, attn_implementation=cfg.model.attn_implementation, device=device)
    if path != cfg.model.pretrained:  # the pruning source shares the student's tokenizer by construction
        check_tokenizers_agree(path, cfg.tokenizer or manifest["tokenizer"]["path"],
                               teacher.model.config.vocab_size, student.config.vocab_size)
    elif teacher.model.config.vocab_size != student.config.vocab_size:
        raise ConfigError("distillation: the teacher's and the student's vocabularies differ in size")
    log.info("distilling from %s (%.2fM parameters, %s): %s KL (tau %s) + %s CE", path,
             teacher.num_parameters() / 1e6, dtype, d.kd_weight, d.temperature, d.ce_weight)
    return dict(teacher=teacher, temperature=d.temperature, kd_weight=d.kd_weight, ce_weight=d.ce_weight,
                chunk_tokens=d.chunk_tokens)


def _provenance(pretrained: Optional[str]) -> Optional[dict[str, Any]]:
    """The ``llmshearing.json`` of a source that is itself an llmshearing export (pruned, then trained further)."""
    if pretrained is None:
        return None
    from llmshearing.models.gguf import resolve_pretrained

    path = Path(resolve_pretrained(pretrained)) / "llmshearing.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _run_info(cfg: RunConfig, manifest: dict, source_config) -> dict[str, Any]:
    """Provenance of the run for its exports: package version and commit, seed, resolved config, data identity."""
    import hashlib
    import subprocess

    import llmshearing

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(llmshearing.__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    manifest_file = Path(cfg.data.local) / "manifest.json"
    dtype = getattr(source_config, "dtype", None) if cfg.model.pretrained else None
    return {
        "llmshearing_version": llmshearing.__version__, "commit": commit, "seed": cfg.seed,
        "config": to_plain(cfg),
        "data": {"path": cfg.data.local, "domains": list(manifest.get("domains", {})),
                 "manifest_sha256": hashlib.sha256(manifest_file.read_bytes()).hexdigest() if manifest_file.is_file()
                 else None, "tokenizer": manifest.get("tokenizer")},
        "source_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
    }


def _save_resolved_config(cfg: RunConfig) -> None:
    """``<run folder>/config.yaml``: the run's config after includes, variables and overrides (rank 0, atomic)."""
    if cfg.save_folder is None or dist.get_global_rank() != 0:
        return
    from omegaconf import OmegaConf

    run_dir = Path(os.path.dirname(cfg.save_folder.rstrip("/")) or ".")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg))))
    tmp.replace(run_dir / "config.yaml")


def _select_one_shot(cfg: RunConfig, domains: list[str], source_config, rank0_loads: bool) -> torch.nn.Module:
    """The dense target model chosen in one shot (``pruning.method``: activation, magnitude or random) from the
    source: rank 0 loads the source, scores it (activation importance on ``pruning.calibration_sequences`` training
    sequences, on the GPU when there is one) and materialises the kept units; the selection goes to every rank, so
    ranks that load the source themselves materialise the same model and empty ranks build its shape on meta."""
    from llmshearing.models.families import describe_shape
    from llmshearing.pruning import materialize, resolve_target
    from llmshearing.pruning.baselines import select_masks
    from llmshearing.pruning.materialize import pruned_config

    p = cfg.pruning
    target = resolve_target(describe_shape(source_config), p.target, ["layer", "head", "intermediate", "hidden"])
    if p.method == "activation" and dist.get_world_size() > 1:
        # streaming builds a dataset with barriers over every rank: all ranks open the train split here, and rank 0's
        # calibration below reads the one already built (rank 0 alone at those barriers hung the run)
        DomainTokenDataset(cfg.data.local, "train", domains, cfg.data.max_seq_len, remote=cfg.data.remote)
    source = None
    if not rank0_loads:  # every rank reads the source (and materialises the same model from it below)
        source = together("loading the source", lambda: build_hf_model(cfg.model))

    def select():  # rank 0 alone; its failure stops every rank at once, not after dist_timeout
        nonlocal source
        if source is None:
            source = build_hf_model(cfg.model)
        calibration = None
        if p.method == "activation":
            calibration = calibration_batch(cfg.data.local, p.calibration_sequences, cfg.data.max_seq_len, domains,
                                            remote=cfg.data.remote)
        scorer = source.to("cuda") if _device(cfg) == "gpu" and p.method == "activation" else source
        chosen = select_masks(scorer, target, p.method, seed=cfg.seed, calibration=calibration)
        source = scorer.to("cpu")
        log.info("one-shot %s selection: %s -> %s", p.method, describe_shape(source_config), target)
        return type(chosen)(**{k: v.cpu() for k, v in chosen.__dict__.items()})

    masks = from_rank_zero(f"loading the source and selecting its {p.method} masks", select)

    def build() -> torch.nn.Module:
        nonlocal source
        if source is None:  # an empty rank: the target's shape, weights from rank 0 by broadcast
            config = pruned_config(source_config, masks)
            config._attn_implementation = cfg.model.attn_implementation
            config.dtype = torch.float32
            with torch.device("meta"):
                return adapter_for(source_config).model_cls(config)
        out = materialize(source, masks)
        source = None
        return out

    small = together("materialising the selected model", build)
    if cfg.model.gradient_checkpointing:
        small.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return small


def _check_save_folder(cfg: RunConfig) -> None:
    """A folder with an earlier run's checkpoints is continued (autoresume) or overwritten (save_overwrite) only
    when asked: otherwise Composer would fail later with "...or set overwrite=True" (a key this config calls
    save_overwrite)."""
    if cfg.save_folder is None or cfg.autoresume or cfg.save_overwrite:
        return
    from llmshearing.checkpointing import earlier_checkpoints

    found = earlier_checkpoints(cfg.save_folder, 0)
    if found:
        raise ConfigError(
            f"save_folder {cfg.save_folder} already holds checkpoints of a run (latest {found[-1].name}): "
            "autoresume=true continues that run, save_overwrite=true starts over in the folder, or give another "
            "variables.run_dir")


def _metrics_path(cfg: RunConfig) -> Optional[str]:
    if cfg.metrics_file != "auto":
        return cfg.metrics_file
    return None if cfg.save_folder is None else os.path.join(os.path.dirname(cfg.save_folder.rstrip("/")) or ".", "metrics.jsonl")


def _wandb_logger(kwargs: dict[str, Any]) -> LoggerDestination:
    """Composer's ``WandBLogger``, fitted to current wandb: Composer 0.32 asks the run for ``get_url()`` (wandb >= 0.22
    names it ``url``), and autoresume asks every logger for a remote checkpoint, which wandb cannot answer offline
    (``WANDB_MODE=offline``) or without an API key: there it means "none", not a failed run."""
    from composer.loggers import WandBLogger
    from wandb.sdk.wandb_run import Run

    if not hasattr(Run, "get_url"):
        Run.get_url = lambda self: self.url

    class Logger(WandBLogger):
        def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False,
                          progress_bar: bool = True) -> None:
            import wandb

            if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
                raise FileNotFoundError(f"wandb is {os.environ['WANDB_MODE']}: no remote checkpoint {remote_file_name}")
            try:
                return super().download_file(remote_file_name, destination, overwrite, progress_bar)
            except (wandb.errors.UsageError, wandb.errors.CommError) as e:
                raise FileNotFoundError(f"wandb has no checkpoint {remote_file_name} to give ({e})") from e

    return Logger(**kwargs)


def _loggers(cfg: RunConfig) -> list[LoggerDestination]:
    out: list[LoggerDestination] = []
    path = _metrics_path(cfg)
    if path:
        out.append(MetricsFile(path))
    for name, kwargs in cfg.loggers.items():
        kwargs = dict(kwargs or {})
        if name == "wandb":
            out.append(_wandb_logger(kwargs))
        elif name == "mlflow":
            from composer.loggers import MLFlowLogger

            out.append(MLFlowLogger(**kwargs))
        elif name == "tensorboard":
            from composer.loggers import TensorboardLogger

            out.append(TensorboardLogger(**kwargs))
    return out


def _check_vocab(manifest: dict, model_config, data_root: str) -> None:
    n_tok = manifest["tokenizer"]["vocab_size"]
    n_model = model_config.vocab_size
    if n_tok > n_model:
        raise ConfigError(
            f"the data in {data_root} was tokenized with a {n_tok}-token vocabulary "
            f"({manifest['tokenizer']['path']}) but the model's vocab_size is {n_model}; "
            "prepare the data with the model's own tokenizer"
        )


def _run_tokenizer(cfg: RunConfig) -> Optional[str]:
    """The tokenizer this run's model reads text with: ``tokenizer``, else the source's own (if it has one)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.model.pretrained:
        from llmshearing.models.gguf import resolve_pretrained

        path = Path(resolve_pretrained(cfg.model.pretrained))
        if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return str(path)
    return None


def _check_tokenizer(cfg: RunConfig, manifest: dict) -> None:
    """The data must be tokenized as the model reads text: the tokenizer's vocabulary size and its encodings of a few
    probe texts (recorded in the manifest) must match the run's tokenizer. A model without one (random init) is only
    held to the vocabulary size (``_check_vocab``)."""
    from llmshearing.data.tokenizer import fingerprint, load_tokenizer

    path = _run_tokenizer(cfg)
    recorded = manifest["tokenizer"]
    if path is None:
        return
    tok = load_tokenizer(path)
    fix = (f"prepare the data with this model's tokenizer (python data_prep/prepare_data.py --tokenizer {path} ...), "
           "or train with the tokenizer the data was made with")
    if len(tok) != recorded["vocab_size"]:
        raise ConfigError(f"the data in {cfg.data.local} was tokenized with {recorded['path']} (vocabulary "
                          f"{recorded['vocab_size']}), this run's tokenizer {path} has {len(tok)} tokens; {fix}")
    if "fingerprint" in recorded and fingerprint(tok) != recorded["fingerprint"]:
        raise ConfigError(f"the data in {cfg.data.local} was tokenized with {recorded['path']}, which encodes text "
                          f"differently from this run's tokenizer {path} (same vocabulary size); {fix}")


def build_trainer(cfg: RunConfig, extra_callbacks: Sequence[Callback] = ()) -> Trainer:
    """Everything a run needs, validated before any training step.

    Args:
        cfg: the validated run config.
        extra_callbacks: more callbacks (tests, benchmarks).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cpu_bf16 = _cpu_autocast(cfg)
    if _device(cfg) == "cpu" and _precision(cfg) != "fp32" and not cpu_bf16:
        raise ConfigError(f"precision={cfg.precision} needs a GPU (Composer trains on the CPU in fp32 only); on this "
                          "machine set precision=fp32 (or device=cpu precision=amp_bf16 for bf16 autocast on the CPU)")
    device = get_device(_device(cfg))
    dist.initialize_dist(device, timeout=cfg.dist_timeout)
    if dist.get_world_size() > 1:
        from llmshearing.parallel import node_signal_files_of_their_own

        node_signal_files_of_their_own()  # nodes sharing a save folder (Composer 0.32 gives them one name)
    reproducibility.seed_all(cfg.seed)  # same initial weights and masks on every rank
    fsdp = None
    if cfg.fsdp is not None:
        from llmshearing.parallel import plan_fsdp

        fsdp = plan_fsdp(cfg.fsdp, "cuda" if _device(cfg) == "gpu" else "cpu", cpu_bf16=cpu_bf16)

    def check() -> tuple:  # every rank; one that fails (its node cannot read the data or source) stops them all
        _check_save_folder(cfg)
        manifest = load_manifest(cfg.data.local, cfg.data.remote)
        domains, proportions = resolve_domains(cfg.data, manifest)
        if cfg.dynamic_loading is not None and cfg.dynamic_loading.reference_losses is not None:
            if len(cfg.dynamic_loading.reference_losses) != len(domains):
                raise ConfigError(
                    f"dynamic_loading.reference_losses has {len(cfg.dynamic_loading.reference_losses)} values but the "
                    f"run has {len(domains)} domains {domains}; give one per domain, in the same order"
                )
        if cfg.global_train_batch_size % dist.get_world_size():
            raise ConfigError(
                f"global_train_batch_size={cfg.global_train_batch_size} is not divisible by the "
                f"{dist.get_world_size()} processes"
            )
        if cfg.pruning is not None and cfg.pruning.mask_samples > 1:
            from llmshearing.config import check_mask_samples

            check_mask_samples(cfg, dist.get_world_size())
        if "ep" in cfg.max_duration:
            raise ConfigError(
                f"max_duration={cfg.max_duration!r}: training data is an endless mixture, give a duration in "
                "batches ('3200ba') or tokens ('1000000tok')"
            )

        if cfg.eval_subset_num_batches > 0 and dist.get_world_size() > 1:
            log.warning(
                "eval_subset_num_batches=%d counts batches per process, so %d processes evaluate on %dx the sequences "
                "of one; use data.eval_sequences_per_domain for an evaluation set that does not depend on world size",
                cfg.eval_subset_num_batches, dist.get_world_size(), dist.get_world_size(),
            )

        source_config = resolve_hf_config(cfg.model)[0]  # config.json only: checks before any weights load
        if cfg.pruning is not None:  # family, features and target
            from llmshearing.algorithms.l0_pruning import L0Pruning

            L0Pruning.validate(cfg.pruning, source_config)
        _check_vocab(manifest, source_config, cfg.data.local)
        _check_tokenizer(cfg, manifest)
        return manifest, domains, proportions, source_config

    manifest, domains, proportions, source_config = together("checking the config, data and source", check)
    # With fsdp.sync_module_states (shipped) rank 0 alone reads the source; the others build it on the meta device
    # and receive their shards by broadcast when Composer wraps the model (8 ranks x a 27 GB fp32 7B would not fit
    # a node's host memory).
    rank0_loads = fsdp is not None and fsdp.rank0_loads
    learned = cfg.pruning is not None and cfg.pruning.method == "learned"
    if cfg.pruning is not None and not learned:  # one-shot selection: the run trains the dense target model
        hf_model = _select_one_shot(cfg, domains, source_config, rank0_loads)
    else:  # a rank that cannot read the source stops every rank, not only its node
        empty = rank0_loads and dist.get_global_rank() != 0
        hf_model = together("building the model", lambda: build_hf_model(cfg.model, empty=empty))
    teacher = together("loading the teacher", lambda: _distillation(cfg, manifest, hf_model))
    model = ComposerCausalLM(hf_model, domains=domains, cpu_autocast=cpu_bf16, **teacher)

    train_loader = build_train_dataloader(
        cfg.data, manifest, domains, proportions, cfg.global_train_batch_size, seed=cfg.seed
    )
    eval_loader = build_eval_dataloader(cfg.data, manifest, domains, cfg.device_eval_batch_size)
    metric_names = list(model.get_metrics(is_train=False))
    evaluators = [Evaluator(label="eval", dataloader=eval_loader, metric_names=metric_names)]
    if learned and cfg.pruning.eval_target:
        # the top-k-to-target model (what materialisation produces), beside the expected-mask one dynamic loading reads
        target_loader = build_eval_dataloader(cfg.data, manifest, domains, cfg.device_eval_batch_size)
        from llmshearing.algorithms.l0_pruning import L0Pruning

        evaluators.append(Evaluator(label=L0Pruning.TARGET_LABEL, dataloader=target_loader, metric_names=metric_names))

    optimizer = DecoupledAdamW(
        model.parameters(),
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
    )
    scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=cfg.scheduler.t_warmup, alpha_f=cfg.scheduler.alpha_f)

    from llmshearing.algorithms import GlobalGradNorm

    algorithms: list[Algorithm] = [GlobalGradNorm(cfg.grad_clip_norm)]  # also averages the replicated masks' grads
    callbacks: list[Callback] = [
        CheckpointMetadata(hf_model.config, cfg.tokenizer or manifest["tokenizer"]["path"], domains,
                           source=cfg.model.pretrained, provenance=_provenance(cfg.model.pretrained),
                           stage="pruning" if learned else f"{cfg.pruning.method}_selection" if cfg.pruning else
                           "continued_pretraining" if cfg.model.pretrained else "training",
                           distillation=None if cfg.distillation is None else
                           (cfg.distillation.teacher or cfg.model.pretrained),
                           run={**_run_info(cfg, manifest, source_config),
                                **({"selected_from": source_config.to_dict()} if cfg.pruning and not learned else {})}),
        DomainLossMonitor(),
        LossGuard(cfg.save_folder),
        LRMonitor(),
        SpeedMonitor(window_size=10),
    ]
    if learned:
        from llmshearing.algorithms.l0_pruning import L0Pruning

        def calibration() -> torch.Tensor:
            return calibration_batch(cfg.data.local, cfg.pruning.calibration_sequences, cfg.data.max_seq_len, domains,
                                     remote=cfg.data.remote)

        algorithms.append(
            L0Pruning.from_config(cfg.pruning, hf_model.config, seed=cfg.seed, save_folder=cfg.save_folder,
                                  calibration=calibration)
        )
    if cfg.dynamic_loading is not None:
        callbacks.append(
            DynamicLoading(
                sampler=train_loader.batch_sampler,
                domains=domains,
                update=cfg.dynamic_loading.update,
                reference_losses=cfg.dynamic_loading.reference_losses,
                smoothing=cfg.dynamic_loading.smoothing,
            )
        )
    callbacks.extend(extra_callbacks)

    # EvalSampler pads with indices the metrics never count (domain_id -1), so Composer's own de-padding,
    # which it warns it cannot do without the sampler's dataset length, is not needed.
    warnings.filterwarnings("ignore", message="DistributedSampler's dataset does not have length defined")
    install_atomic_checkpoint_writes()

    def prepare_run_folder() -> None:  # rank 0 alone; the others wait for it, and stop at once if it fails
        _save_resolved_config(cfg)
        if cfg.save_folder and cfg.autoresume:  # a run that continues this folder
            repair_save_folder(cfg.save_folder)

    from_rank_zero("writing the run's config.yaml and repairing its save folder", prepare_run_folder)
    ckpt = resume_checkpoint(cfg.save_folder, cfg.load_path, cfg.autoresume)
    if ckpt is not None:
        check_checkpoint_file(ckpt, hf_model.config.to_dict())

    microbatch: Any = cfg.device_train_microbatch_size
    if microbatch == "auto" and _device(cfg) == "cpu":
        microbatch = cfg.global_train_batch_size // dist.get_world_size()
    parallelism = {"fsdp": fsdp.config} if fsdp is not None else None

    trainer = Trainer(
        run_name=cfg.run_name,
        seed=cfg.seed,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=evaluators,
        max_duration=cfg.max_duration,
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=_loggers(cfg),
        precision="fp32" if cpu_bf16 else _precision(cfg),  # CPU bf16: the model autocasts itself
        device=device,
        device_train_microbatch_size=microbatch,
        parallelism_config=parallelism,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        load_path=cfg.load_path,
        autoresume=cfg.autoresume,
        console_log_interval=cfg.console_log_interval,
        progress_bar=cfg.progress_bar,
        log_to_console=True,
        python_log_level=None,
    )
    if cfg.autoresume and cfg.save_folder and cfg.save_num_checkpoints_to_keep >= 0 and trainer._checkpoint_saver:
        n = adopt_earlier_checkpoints(trainer._checkpoint_saver, cfg.save_folder, dist.get_global_rank())
        if n:
            log.info("%d checkpoints of earlier attempts count towards save_num_checkpoints_to_keep=%d", n,
                     cfg.save_num_checkpoints_to_keep)
    trainer.logger.log_hyperparameters({"run_config": to_plain(cfg)})
    trainer.fsdp_plan = fsdp  # what the fsdp block became (None without one)
    if cfg.eval_first:
        _evaluate_before_training(trainer)
    return trainer


def _evaluate_before_training(trainer: Trainer) -> None:
    """``fit()`` evaluates once before the first step of a run that starts at batch 0 (the step-0 point of every
    loss curve; dynamic loading and the masks do not change on it). Composer evaluates only after steps."""
    fit = trainer.fit

    def fit_after_evaluating(*args: Any, **kwargs: Any) -> None:
        if int(trainer.state.timestamp.batch) == 0 and not getattr(trainer, "_llmshearing_evaluated_first", False):
            trainer._llmshearing_evaluated_first = True
            trainer.eval()
        return fit(*args, **kwargs)

    trainer.fit = fit_after_evaluating


def finished(trainer: Trainer) -> Optional[str]:
    """Why there is nothing to train (the run resumed at or past ``max_duration``), or None."""
    state = trainer.state
    if state.max_duration is None:
        return None
    done = state.timestamp.get(state.max_duration.unit)
    if done < state.max_duration:
        return None
    where = f" from {state.load_path}" if state.load_path else ""
    return (f"this run is finished: it resumed{where} at {int(state.timestamp.batch)} batches, max_duration is "
            f"{state.max_duration}. To train longer raise max_duration; to start again use another save_folder "
            "(variables.run_dir) or autoresume=false save_overwrite=true")


def train_from_yaml(path: str, overrides: Sequence[str] = (), fit: bool = True) -> Trainer:
    """Load ``path`` with ``key=value`` overrides, build the trainer and (by default) train; a run that resumes
    already finished is not trained again (logged).

    Returns:
        The trainer, after ``fit()`` when ``fit``.
    """
    cfg = load_config(path, overrides)
    trainer = build_trainer(cfg)
    if fit:
        reason = finished(trainer)
        if reason:
            log.info(reason)
        else:
            trainer.fit()
    return trainer


TRAIN_HELP = """usage: composer train.py <config.yaml> [key=value ...] [--debug]
       python train.py <config.yaml> [key=value ...]        (one process)
       bash scripts/launch.sh <config.yaml> [key=value ...]  (a node's GPUs, or several nodes)

Trains one stage (pruning, continued pre-training or pre-training) as the YAML describes; key=value overrides any
key (dotted: pruning.target.hidden_size=2560, data.domains=[cc,wiki]). Paths come from the YAML's variables:
variables.source=<model folder, Hub id or .gguf> variables.data=<prepared data> variables.run_dir=<run folder>.

  yamls/prune_2.7b.yaml, prune_1.3b.yaml, prune_llama3_8b_gqa.yaml, ...   GPU pruning (8 GPUs, FSDP)
  yamls/continue_pretrain_2.7b.yaml, ...                                 GPU continued pre-training
  yamls/prune/cpu.yaml, yamls/continue_pretrain/tiny_cpu.yaml            CPU configs

Every key: README "Configuration reference". A configuration error is reported on one line before anything loads
(exit 2); --debug shows its traceback. A run resumes from <run_dir>/checkpoints with autoresume=true (the YAMLs'
default); a finished run says so and exits 0."""


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``composer train.py <yaml> [key=value ...] [--debug]``.

    A configuration error (the config, the model family or target, the data's manifest: everything checked
    before the first step) is one line naming the problem and the fix, exit status 2; ``--debug`` shows the
    traceback. Errors during training are never shortened.
    """
    import sys

    from llmshearing.cli import one_line, user_errors

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help"):
        print(TRAIN_HELP)
        raise SystemExit(0 if args else 2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        trainer = build_trainer(load_config(args[0], args[1:]))
    except user_errors() as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        print("(configuration checked before training; nothing was trained. --debug shows the traceback)",
              file=sys.stderr)
        raise SystemExit(2) from None
    reason = finished(trainer)
    if reason:
        print(reason)
        trainer.close()
        return
    trainer.fit()
