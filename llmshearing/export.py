"""Composer checkpoint (pruning or continued pre-training) -> Hugging Face model directory.

A pruning checkpoint holds the source weights and the mask log-alphas; it is materialised to the
target shape (deterministic top-k masks, values folded into the weights). A training checkpoint
is exported as is. Every checkpoint tensor must be mapped: an unknown key or a shape that does not
fit is an error, never silently dropped. The checkpoint is memory-mapped and tensors are read one
at a time. The directory is written under a temporary name and renamed when complete; an
existing directory is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedModel
from transformers.modeling_utils import no_init_weights

from llmshearing.models.adapters import adapter_for
from llmshearing.models.families import describe_shape
from llmshearing.pruning.masks import ShearingMasks
from llmshearing.pruning.materialize import prune_state_dict, pruned_config

__all__ = ["export_checkpoint", "load_composer_checkpoint"]

log = logging.getLogger(__name__)

_MODEL_PREFIX = "model."  # ComposerCausalLM.model
_MASK_PREFIX = "masks."  # ComposerCausalLM.masks (added by L0Pruning)


def load_composer_checkpoint(path: str | Path) -> dict[str, Any]:
    """The ``state`` of a Composer checkpoint: a file (memory-mapped: tensors are read when touched), a sharded
    checkpoint folder (FSDP ``state_dict_type: sharded``; its model, callbacks and algorithms are read whole, the
    optimizer is not), or a save folder (its ``latest-rank0.pt``)."""
    from llmshearing.checkpointing import is_sharded_checkpoint

    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        latest = path / "latest-rank0.pt"
        if not latest.exists():
            raise FileNotFoundError(f"{path} is a folder without latest-rank0.pt and is not a complete sharded "
                                    "checkpoint (no .metadata); give a checkpoint file or folder")
        path = latest.resolve()
    if is_sharded_checkpoint(path):
        return _load_sharded(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; give a checkpoint file (ep<E>-ba<N>-rank0.pt), a "
                                "sharded checkpoint folder (ep<E>-ba<N>/) or the run's save folder")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise ValueError(
            f"could not read checkpoint {path}: {type(e).__name__}: {e}. The file is corrupted or not a Composer "
            "checkpoint; use an earlier checkpoint of the run"
        ) from e
    if not isinstance(ckpt, dict) or "state" not in ckpt or "model" not in ckpt["state"]:
        raise ValueError(f"{path} is not a Composer checkpoint (no state.model)")
    return ckpt["state"]


def _load_sharded(path: Path) -> dict[str, Any]:
    """``state.model`` / ``callbacks`` / ``algorithms`` of a torch.distributed.checkpoint folder, in one process
    (no process group): each tensor is assembled whole from the ranks' shards."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    keys = {k for k in FileSystemReader(str(path)).read_metadata().state_dict_metadata
            if k.split(".")[:2] in (["state", "model"], ["state", "callbacks"], ["state", "algorithms"])}
    if not any(k.startswith("state.model.") for k in keys):
        raise ValueError(f"{path} is not a Composer checkpoint (no state.model)")
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process reads every shard
        warnings.simplefilter("ignore")
        return _load_state_dict_from_keys(keys=keys, checkpoint_id=str(path))["state"]


def _metadata(state: dict[str, Any]) -> dict[str, Any]:
    meta = (state.get("callbacks") or {}).get("CheckpointMetadata")
    if not meta:
        raise ValueError("the checkpoint has no CheckpointMetadata (model config); was it written by llmshearing?")
    return meta


def _pruning_state(state: dict[str, Any]) -> Optional[dict[str, Any]]:
    for name, algo_state in state.get("algorithms") or []:
        if name == "L0Pruning":
            return algo_state
    return None


def _write_card(out: Path, meta: dict[str, Any], state: dict[str, Any], src_config, config, params: int,
                checkpoint: str | Path, name: Optional[str] = None) -> None:
    """``llmshearing.json`` (provenance) and ``README.md`` (model card) of an export (module ``model_card``)."""
    from llmshearing.model_card import build_card, last_eval_losses, provenance_of, write_provenance
    from llmshearing.models.families import count_params

    selected_from = (meta.get("run") or {}).get("selected_from")  # a one-shot selection's source, before it
    if selected_from:
        src_config = type(src_config)(**{k: v for k, v in selected_from.items()
                                         if k not in ("model_type", "transformers_version")})
    prov = provenance_of(meta, state, describe_shape(src_config), describe_shape(config), params,
                         int(count_params(describe_shape(src_config), config=src_config)))
    write_provenance(out, prov)
    ckpt = Path(checkpoint)
    run_dir = (ckpt if ckpt.is_dir() else ckpt.parent).resolve().parent
    (out / "README.md").write_text(build_card(prov, src_config.model_type, last_eval_losses(run_dir / "metrics.jsonl"),
                                              name=name))


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    tokenizer: Optional[str] = None,
    overwrite: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write a Hugging Face model directory from a Composer checkpoint (see module docstring).

    Args:
        checkpoint: Composer checkpoint file, sharded checkpoint folder, or a save folder (its ``latest-rank0.pt``).
        output: model directory to write.
        tokenizer: tokenizer to save alongside (default: the one recorded in the checkpoint, if it exists).
        overwrite: replace an existing ``output``.
        dtype: dtype of the saved weights (default: the source's declared dtype, recorded at training; float32 for
            a model trained from random initialisation or a GGUF source, which is dequantised to fp32).

    Returns:
        ``output``.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; choose another directory or pass --overwrite to replace it")
    state = load_composer_checkpoint(checkpoint)
    meta = _metadata(state)
    family = meta["hf_config"]["model_type"]
    adapter = adapter_for(family)
    config_cls, model_cls = adapter.config_cls, adapter.model_cls
    src_cfg_dict = {k: v for k, v in meta["hf_config"].items() if k not in ("model_type", "transformers_version")}
    src_config = config_cls(**src_cfg_dict)
    weights: dict[str, torch.Tensor] = state["model"]

    hf_keys = {k[len(_MODEL_PREFIX) :] for k in weights if k.startswith(_MODEL_PREFIX)}
    mask_keys = {k for k in weights if k.startswith(_MASK_PREFIX)}
    unknown = set(weights) - {_MODEL_PREFIX + k for k in hf_keys} - mask_keys
    if unknown:
        raise ValueError(f"checkpoint tensors that map to nothing: {sorted(unknown)[:10]}")

    def get(name: str) -> torch.Tensor:
        key = _MODEL_PREFIX + name
        if key not in weights:
            raise KeyError(f"the checkpoint has no tensor {key!r} that the {family} export needs")
        return weights[key].to(torch.float32)

    pruning = _pruning_state(state)
    if pruning is not None:
        masks = ShearingMasks(pruning["source"], pruning["target"], pruning["prune"])
        mask_sd = {k[len(_MASK_PREFIX) :]: v for k, v in weights.items() if k.startswith(_MASK_PREFIX)}
        masks.load_state_dict(mask_sd, strict=True)
        det = masks.deterministic()
        config = pruned_config(src_config, det)
        tensors = prune_state_dict(get, src_config, det, tied=bool(src_config.tie_word_embeddings))
        adapter.check(src_config)
        used = adapter.tensor_names(src_config)
    else:
        config = src_config
        tensors = {k: get(k) for k in hf_keys}
        used = hf_keys
    unused = hf_keys - used - ({"lm_head.weight"} if src_config.tie_word_embeddings else set())
    if unused:
        raise ValueError(f"checkpoint tensors the export did not map: {sorted(unused)[:10]}")

    # Training never uses the KV cache (the forward says so); an export generates with it, as the source did
    # (checkpoints written before this was fixed recorded the training setting, use_cache false).
    config.use_cache = True
    with no_init_weights():
        model: PreTrainedModel = model_cls(config)
    model.generation_config.use_cache = True
    expected = model.state_dict()
    for name, t in tensors.items():
        if name not in expected:
            raise ValueError(f"exported tensor {name!r} has no place in {model_cls.__name__}")
        if tuple(expected[name].shape) != tuple(t.shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit {tuple(expected[name].shape)} of {config}")
    missing = set(expected) - set(tensors) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise ValueError(f"no checkpoint tensor for {sorted(missing)[:10]}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    if dtype is None:
        declared = (meta.get("run") or {}).get("source_dtype")
        dtype = getattr(torch, declared) if declared in ("float32", "bfloat16", "float16") else torch.float32
    model = model.to(dtype)

    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    _write_card(tmp, meta, state, src_config, config, model.num_parameters(), checkpoint, name=output.name)
    tok_path = tokenizer or meta.get("tokenizer")
    if tok_path and Path(tok_path).exists():
        from llmshearing.data.tokenizer import load_tokenizer

        load_tokenizer(str(tok_path)).save_pretrained(tmp)
    elif tok_path:
        log.warning("tokenizer %s not found; exported the model without tokenizer files", tok_path)
    if output.exists():
        shutil.rmtree(output)
    tmp.replace(output)
    log.info("exported %s (%s) to %s", family, describe_shape(config), output)
    return output

