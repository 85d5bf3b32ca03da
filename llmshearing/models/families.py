"""Supported model families and how to build or load them.

Every family is the transformers implementation itself (no re-implementation), so parity with the
Hub and export to Hugging Face format hold by construction. A family is one
:class:`~llmshearing.models.adapters.FamilyAdapter` (where each structure lives and how it is cut), which
the pruning hooks, materialisation and export read; ``FAMILIES`` is the (config class, model class) view.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from llmshearing.models.adapters import ADAPTERS, adapter_for, supported_families
from llmshearing.models.gguf import resolve_pretrained

if TYPE_CHECKING:
    from llmshearing.config import ModelConfig

log = logging.getLogger(__name__)

# model_type -> (config class, model class)
FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    k: (a.config_cls, a.model_cls) for k, a in ADAPTERS.items()
}

# Config fields that define the shape; pruning changes exactly these.
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def head_dim(config: PretrainedConfig) -> int:
    """Per-head dimension, explicit or implied by hidden_size / num_attention_heads."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def describe_shape(config: PretrainedConfig) -> dict[str, int]:
    """The pruning-relevant shape of a transformers config."""
    shape = {k: int(getattr(config, k)) for k in SHAPE_FIELDS if getattr(config, k, None) is not None}
    shape.setdefault("num_key_value_heads", shape["num_attention_heads"])
    shape["head_dim"] = head_dim(config)
    shape["vocab_size"] = int(config.vocab_size)
    return shape


def count_params(shape: dict[str, float], tie_word_embeddings: bool = False, qkv_bias: bool = False,
                 config: PretrainedConfig | None = None) -> float:
    """Parameter count of a model of ``shape`` (accepts fractional, i.e. expected, sizes).

    With ``config``, the count of that config's family and features (its adapter's ``param_count``: fused,
    biased and norm parameters included, tied embeddings once); without, a LLaMA-like model with the given
    embedding tying and q/k/v biases.
    """
    if config is not None:
        return adapter_for(config).param_count(shape, config)
    d, L, m = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    hq, hkv, hd, v = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"], shape["vocab_size"]
    attn = d * hd * (2 * hq + 2 * hkv) + (hd * (hq + 2 * hkv) if qkv_bias else 0)
    mlp = 3 * d * m
    per_layer = attn + mlp + 2 * d
    emb = v * d * (1 if tie_word_embeddings else 2)
    return emb + L * per_layer + d


def build_config(family: str, fields: dict[str, Any]) -> PretrainedConfig:
    """A transformers config of ``family`` from plain fields."""
    config_cls, _ = FAMILIES[family]
    return config_cls(**fields)


def resolve_hf_config(cfg: ModelConfig) -> tuple[PretrainedConfig, Path | None]:
    """The transformers config ``cfg`` describes (read from the checkpoint's config.json, no weights loaded),
    checked against ``cfg.family`` and ``cfg.config``; and the checkpoint directory (None: a random model).

    Raises:
        ValueError: the checkpoint is of another family, or disagrees with ``cfg.config``.
    """
    if cfg.pretrained is None:
        config = build_config(cfg.family, dict(cfg.config))
        config._attn_implementation = cfg.attn_implementation
        return config, None
    path = Path(resolve_pretrained(cfg.pretrained))  # a .gguf source is converted once into the cache
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.pretrained={cfg.pretrained!r} is not a Hugging Face checkpoint directory (no config.json); "
            "point it at a directory written by save_pretrained / downloaded from the Hub, or at a .gguf file"
        )
    config = AutoConfig.from_pretrained(path)
    if config.model_type != cfg.family:
        fix = (f"set model.family={config.model_type}" if config.model_type in ADAPTERS
               else f"its family is not supported (supported: {supported_families()})")
        raise ValueError(
            f"model.pretrained holds a {config.model_type!r} model but model.family={cfg.family!r}; {fix}"
        )
    for key, want in cfg.config.items():
        have = getattr(config, key, None)
        if have != want:
            raise ValueError(
                f"model.config.{key}={want!r} disagrees with the checkpoint's {key}={have!r} "
                f"({path / 'config.json'}); remove the override or fix it"
            )
    return config, path


def build_hf_model(cfg: ModelConfig, empty: bool = False) -> PreTrainedModel:
    """Load a Hugging Face checkpoint directory or build a randomly initialised model.

    Weights are kept in fp32 (Composer's mixed precision casts on the fly; the optimizer keeps fp32
    master weights).

    Args:
        cfg: the model section of the run config.
        empty: build the architecture on the meta device, without weights (a rank that receives its shards of
            rank 0's weights by broadcast under FSDP: nothing is read from disk and no host memory is used).

    Raises:
        ValueError: the checkpoint is of another family, or disagrees with ``cfg.config``.
    """
    model_cls = adapter_for(cfg.family).model_cls
    config, path = resolve_hf_config(cfg)
    if empty:
        config._attn_implementation = cfg.attn_implementation
        config.dtype = torch.float32  # what from_pretrained(dtype=float32) records on rank 0
        with torch.device("meta"):
            model = model_cls(config)
    elif path is None:
        model = model_cls(config)
    else:
        model = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("model %s: %s, %.2fM parameters%s", cfg.family, describe_shape(model.config), model.num_parameters() / 1e6,
             " (empty: weights arrive from rank 0)" if empty else "")
    return model
