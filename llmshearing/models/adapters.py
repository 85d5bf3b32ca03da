"""Family adapters: where each prunable structure lives in a transformers model, and how it is cut.

Hooks (``llmshearing.pruning.hooks``), materialisation (``llmshearing.pruning.materialize``) and export
(``llmshearing.export``) read a :class:`FamilyAdapter`; none of them switches on ``model_type``. Adding a
family is one adapter (plus its parity test), as long as its blocks are of a form the engine knows.

Units a weight's rows or columns are indexed by:

| unit | size | mask that selects it |
| --- | --- | --- |
| ``hidden`` | d | ``z_hidden`` (the residual stream) |
| ``q`` | H x head_dim | ``z_head`` (query heads; with GQA, heads within their KV groups) |
| ``kv`` | G x head_dim | the kept KV groups (GQA) or heads (MHA) |
| ``ffn`` | m | ``z_int`` |

A projection whose rows are ``hidden`` writes into the residual stream: its output carries the layer mask and
the hidden mask (folded into its rows on materialisation). The input units of such a writer carry the mask of
that unit (``z_head`` for ``q``, ``z_int`` for ``ffn``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = ["ADAPTERS", "FamilyAdapter", "Projection", "UnsupportedModel", "adapter_for", "supported_families"]

UNITS = ("hidden", "q", "kv", "ffn")


class UnsupportedModel(ValueError):
    """A model family or feature the pruning engine cannot handle (raised before any training)."""


@dataclass(frozen=True)
class Projection:
    """One ``nn.Linear`` of a decoder layer.

    Args:
        path: attribute path under the layer (``self_attn.q_proj``).
        rows: unit of the output features (see the module docstring).
        cols: unit of the input features.
        bias: whether the family's config gives it a bias (a function of the config).
    """

    path: str
    rows: str
    cols: str
    bias: Callable[[PretrainedConfig], bool] = lambda config: False

    def __post_init__(self) -> None:
        assert self.rows in UNITS and self.cols in UNITS, (self.rows, self.cols)

    @property
    def writes_residual(self) -> bool:
        return self.rows == "hidden"


def _attention_bias(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "attention_bias", False))


def _llama_unsupported(config: PretrainedConfig) -> list[str]:
    problems = []
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True (biases on gate/up/down_proj are not pruned or folded yet)")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={config.pretraining_tp} (set it to 1: it only splits the same matmuls)")
    return problems


LLAMA_PROJECTIONS = (
    Projection("self_attn.q_proj", "q", "hidden", _attention_bias),
    Projection("self_attn.k_proj", "kv", "hidden", _attention_bias),
    Projection("self_attn.v_proj", "kv", "hidden", _attention_bias),
    Projection("self_attn.o_proj", "hidden", "q", _attention_bias),
    Projection("mlp.gate_proj", "ffn", "hidden"),
    Projection("mlp.up_proj", "ffn", "hidden"),
    Projection("mlp.down_proj", "hidden", "ffn"),
)


@dataclass(frozen=True)
class FamilyAdapter:
    """Declarative description of one transformers family of pre-norm decoder blocks with RMSNorm.

    Args:
        model_type: the config's ``model_type``.
        config_cls, model_cls: the transformers classes.
        projections: the layer's linear maps.
        norms: per-layer RMSNorm paths (pre-norms: they read the residual stream).
        embed, layers, final_norm, lm_head: paths from the ``*ForCausalLM``.
        norm_eps: attribute of the norm modules holding epsilon.
        norm_weight_offset: ``o`` of a norm that scales by ``o + weight`` (0 for LLaMA's ``weight``).
        unsupported: config -> list of features the engine cannot prune (empty: fine).
        notes: what the family is (for messages and docs).
    """

    model_type: str
    config_cls: type[PretrainedConfig]
    model_cls: type[PreTrainedModel]
    projections: tuple[Projection, ...] = LLAMA_PROJECTIONS
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    norm_eps: str = "variance_epsilon"
    norm_weight_offset: float = 0.0
    unsupported: Callable[[PretrainedConfig], list[str]] = field(default=lambda config: [])
    notes: str = ""

    # -- modules of a live model ------------------------------------------------------------------------
    def get(self, root: nn.Module, path: str) -> nn.Module:
        return root.get_submodule(path)

    def decoder_layers(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        return enumerate(self.get(model, self.layers))

    # -- tensor names (state dicts, checkpoints) ----------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."

    def tensor_names(self, config: PretrainedConfig) -> set[str]:
        """Every parameter name of a model of ``config`` (``lm_head.weight`` included even when tied)."""
        names = {f"{self.embed}.weight", f"{self.final_norm}.weight", f"{self.lm_head}.weight"}
        for i in range(config.num_hidden_layers):
            p = self.layer_prefix(i)
            for proj in self.projections:
                names.add(p + proj.path + ".weight")
                if proj.bias(config):
                    names.add(p + proj.path + ".bias")
            names.update(p + n + ".weight" for n in self.norms)
        return names

    def check(self, config: PretrainedConfig) -> None:
        """Raise :class:`UnsupportedModel` naming every feature of ``config`` the engine cannot prune."""
        problems = self.unsupported(config)
        if problems:
            raise UnsupportedModel(
                f"{self.model_type} model with " + "; ".join(problems) + ": not supported by the pruning engine. "
                f"Supported: {supported_families()}"
            )


ADAPTERS: dict[str, FamilyAdapter] = {
    a.model_type: a
    for a in (
        FamilyAdapter("llama", LlamaConfig, LlamaForCausalLM, unsupported=_llama_unsupported,
                      notes="LLaMA-1/2/3 (MHA or GQA, llama3 rope scaling, optional attention bias)"),
        FamilyAdapter("mistral", MistralConfig, MistralForCausalLM, notes="Mistral (GQA, sliding window)"),
        FamilyAdapter("qwen2", Qwen2Config, Qwen2ForCausalLM,
                      projections=tuple(
                          Projection(p.path, p.rows, p.cols, lambda c: True) if p.rows in ("q", "kv") else p
                          for p in LLAMA_PROJECTIONS),
                      notes="Qwen2 / Qwen2.5 (GQA, q/k/v bias)"),
    )
}


def supported_families() -> str:
    return ", ".join(f"{k} ({a.notes})" for k, a in ADAPTERS.items())


def adapter_for(config_or_type: PretrainedConfig | str, check: bool = True) -> FamilyAdapter:
    """The adapter of a config (or ``model_type``), with a clear error for anything unsupported."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    adapter: Optional[FamilyAdapter] = ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModel(
            f"model family {model_type!r} is not supported by the pruning engine; supported: {supported_families()}"
        )
    if check and not isinstance(config_or_type, str):
        adapter.check(config_or_type)
    return adapter
