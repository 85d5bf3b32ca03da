"""Family adapters: where each prunable structure lives in a transformers model, and how it is cut.

Hooks (``llmshearing.pruning.hooks``), materialisation (``llmshearing.pruning.materialize``), importance
scores (``llmshearing.pruning.importance``, ``baselines``), parameter counts and export (``llmshearing.export``)
read a :class:`FamilyAdapter`; none of them switches on ``model_type``. Adding a family is one adapter plus its
parity test (``tests/test_families.py``), as long as its blocks are built from the parts below.

Units a weight's rows or columns are indexed by:

| unit | size | mask that selects it |
| --- | --- | --- |
| ``hidden`` | d | ``z_hidden`` (the residual stream) |
| ``q`` | H x head_dim | ``z_head`` (query heads; with GQA, heads within their KV groups) |
| ``kv`` | G x head_dim | the kept KV groups (GQA) or heads (MHA) |
| ``ffn`` | m | ``z_int`` |
| ``qkv3`` | H x 3 head_dim | ``z_head``: GPT-NeoX's fused projection, per head ``[q_h, k_h, v_h]`` (MHA only) |

A fused projection lists its row segments in order (Phi-3's ``qkv_proj`` is ``("q", "kv", "kv")``, its
``gate_up_proj`` ``("ffn", "ffn")``). A projection whose rows are ``hidden`` writes into the residual stream: its
input units carry their mask (``z_head`` for ``q``, ``z_int`` for ``ffn``) and its output the layer and hidden
masks -- on its rows, or, when the family normalises the write first (a *post-norm*: Gemma 2/3, OLMo 2), after
that norm, so that a layer gate of 0.5 halves the write instead of being normalised away.

Norms come in two roles: a *pre-norm* reads the residual stream (its statistics are taken over the kept hidden
dims only, so that the materialised model's norm over ``d_t`` dims computes the same), a *post-norm* normalises
one writer's output before it is added to the residual stream (same statistics; it carries the writer's output
masks). RMSNorm (optionally scaling by ``offset + weight``, Gemma) and LayerNorm with bias (GPT-NeoX) are known.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

__all__ = ["ADAPTERS", "FamilyAdapter", "Projection", "UnsupportedModel", "adapter_for", "supported_families"]

UNITS = ("hidden", "q", "kv", "ffn", "qkv3")
STRUCTURES = ("layer", "hidden", "head", "intermediate")


class UnsupportedModel(ValueError):
    """A model family or feature the pruning engine cannot handle (raised before any training)."""


def _never(config: PretrainedConfig) -> bool:
    return False


@dataclass(frozen=True)
class Projection:
    """One ``nn.Linear`` of a decoder layer.

    Args:
        path: attribute path under the layer (``self_attn.q_proj``).
        rows: unit of the output features, or the units of a fused projection's row segments in order.
        cols: unit of the input features.
        bias: whether the family's config gives it a bias (a function of the config).
        post_norm: path of the norm that normalises this writer's output before the residual add (post-norm
            families); the output masks go after it.
    """

    path: str
    rows: Union[str, tuple[str, ...]]
    cols: str
    bias: Callable[[PretrainedConfig], bool] = _never
    post_norm: Optional[str] = None

    def __post_init__(self) -> None:
        assert all(u in UNITS for u in self.segments) and self.cols in UNITS, (self.rows, self.cols)
        assert self.post_norm is None or self.writes_residual, self

    @property
    def segments(self) -> tuple[str, ...]:
        return self.rows if isinstance(self.rows, tuple) else (self.rows,)

    @property
    def writes_residual(self) -> bool:
        return self.rows == "hidden"


@dataclass(frozen=True)
class Vector:
    """A per-layer parameter vector that is not a norm of the residual stream (q/k norms).

    Args:
        path: attribute path under the layer (``self_attn.q_norm``; its ``.weight`` is the tensor).
        unit: ``q`` / ``kv`` when it spans all heads (cut with them; OLMo 2), ``None`` when it is per head_dim
            and shared by all heads (copied unchanged; Qwen3, Gemma 3).
    """

    path: str
    unit: Optional[str] = None


def _attention_bias(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "attention_bias", False))


def _mlp_bias(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "mlp_bias", False))


def _always(config: PretrainedConfig) -> bool:
    return True


def _llama_unsupported(config: PretrainedConfig) -> list[str]:
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return [f"pretraining_tp={config.pretraining_tp} (set it to 1: it only splits the same matmuls)"]
    return []


def _llama_projections(qkv_bias: Callable[[PretrainedConfig], bool] = _attention_bias,
                       o_bias: Callable[[PretrainedConfig], bool] = _attention_bias,
                       post_norms: tuple[Optional[str], Optional[str]] = (None, None)) -> tuple[Projection, ...]:
    return (
        Projection("self_attn.q_proj", "q", "hidden", qkv_bias),
        Projection("self_attn.k_proj", "kv", "hidden", qkv_bias),
        Projection("self_attn.v_proj", "kv", "hidden", qkv_bias),
        Projection("self_attn.o_proj", "hidden", "q", o_bias, post_norm=post_norms[0]),
        Projection("mlp.gate_proj", "ffn", "hidden", _mlp_bias),
        Projection("mlp.up_proj", "ffn", "hidden", _mlp_bias),
        Projection("mlp.down_proj", "hidden", "ffn", _mlp_bias, post_norm=post_norms[1]),
    )


LLAMA_PROJECTIONS = _llama_projections()


@dataclass(frozen=True)
class FamilyAdapter:
    """Declarative description of one transformers family of decoder blocks.

    Args:
        model_type: the config's ``model_type``.
        config_cls, model_cls: the transformers classes.
        projections: the layer's linear maps.
        norms: per-layer pre-norm paths (they read the residual stream).
        vectors: other per-layer parameter vectors (q/k norms).
        embed, layers, final_norm, lm_head: paths from the ``*ForCausalLM``.
        norm_kind: ``rms`` (RMSNorm) or ``layer`` (LayerNorm with bias).
        norm_eps: attribute of the norm modules holding epsilon.
        norm_weight_offset: ``o`` of a norm that scales by ``o + weight`` (0 for LLaMA's ``weight``, 1 for Gemma).
        embed_scale: config -> the constant the embedding output is multiplied by (Gemma: sqrt(hidden_size));
            it changes with the pruned hidden size, so materialisation folds the ratio into the embedding.
        unprunable: config -> {structure: why it cannot be pruned in this family}.
        target_check: (source shape, full target shape) -> problems with the target in this family.
        unsupported: config -> list of features the engine cannot prune (empty: fine).
        notes: what the family is (for messages and docs).
    """

    model_type: str
    config_cls: type[PretrainedConfig]
    model_cls: type[PreTrainedModel]
    projections: tuple[Projection, ...] = LLAMA_PROJECTIONS
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    vectors: tuple[Vector, ...] = ()
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    norm_kind: str = "rms"
    norm_eps: str = "variance_epsilon"
    norm_weight_offset: float = 0.0
    embed_scale: Optional[Callable[[PretrainedConfig], float]] = None
    unprunable: Callable[[PretrainedConfig], dict[str, str]] = field(default=lambda config: {})
    target_check: Callable[[dict, dict], list[str]] = field(default=lambda source, target: [])
    unsupported: Callable[[PretrainedConfig], list[str]] = field(default=lambda config: [])
    notes: str = ""

    # -- modules of a live model ------------------------------------------------------------------------
    def get(self, root: nn.Module, path: str) -> nn.Module:
        return root.get_submodule(path)

    def decoder_layers(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        return enumerate(self.get(model, self.layers))

    @property
    def post_norms(self) -> tuple[str, ...]:
        return tuple(p.post_norm for p in self.projections if p.post_norm)

    @property
    def all_norms(self) -> tuple[str, ...]:
        """Every per-layer norm of the hidden size (pre- and post-norms)."""
        return self.norms + self.post_norms

    def norm_tensors(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.norm_kind == "layer" else ("weight",)

    # -- tensor names (state dicts, checkpoints) ----------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."

    def tensor_names(self, config: PretrainedConfig) -> set[str]:
        """Every parameter name of a model of ``config`` (``lm_head.weight`` included even when tied)."""
        names = {f"{self.embed}.weight", f"{self.lm_head}.weight"}
        names.update(f"{self.final_norm}.{t}" for t in self.norm_tensors())
        for i in range(config.num_hidden_layers):
            p = self.layer_prefix(i)
            for proj in self.projections:
                names.add(p + proj.path + ".weight")
                if proj.bias(config):
                    names.add(p + proj.path + ".bias")
            names.update(p + n + "." + t for n in self.all_norms for t in self.norm_tensors())
            names.update(p + v.path + ".weight" for v in self.vectors)
        return names

    def param_count(self, shape: dict[str, float], config: PretrainedConfig) -> float:
        """Parameters of a model of ``config``'s family and features at ``shape`` (``describe_shape`` fields;
        fractional, i.e. expected, sizes are fine). Tied embeddings count once."""
        d, L, m = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
        hd = shape["head_dim"]
        size = {"hidden": d, "q": shape["num_attention_heads"] * hd, "kv": shape["num_key_value_heads"] * hd,
                "ffn": m, "qkv3": 3 * shape["num_attention_heads"] * hd}
        per_layer = 0.0
        for proj in self.projections:
            rows = sum(size[u] for u in proj.segments)
            per_layer += rows * size[proj.cols] + (rows if proj.bias(config) else 0)
        per_layer += len(self.all_norms) * d * len(self.norm_tensors())
        per_layer += sum(size[v.unit] if v.unit else hd for v in self.vectors)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        emb = shape["vocab_size"] * d * (1 if tied else 2)
        return emb + L * per_layer + d * len(self.norm_tensors())

    def check(self, config: PretrainedConfig) -> None:
        """Raise :class:`UnsupportedModel` naming every feature of ``config`` the engine cannot prune."""
        problems = self.unsupported(config)
        if problems:
            raise UnsupportedModel(
                f"{self.model_type} model with " + "; ".join(problems) + ": not supported by the pruning engine. "
                f"Supported: {supported_families()}"
            )

    def check_target(self, config: PretrainedConfig, source: dict[str, int], target: dict[str, int],
                     prune: list[str]) -> None:
        """Raise :class:`UnsupportedModel` if ``target`` (full shape) needs a structure this family cannot prune
        or breaks one of the family's shape rules."""
        field_of = {"layer": ("num_hidden_layers",), "hidden": ("hidden_size",), "intermediate": ("intermediate_size",),
                    "head": ("num_attention_heads", "num_key_value_heads")}
        problems = []
        for structure, why in self.unprunable(config).items():
            changed = [f for f in field_of[structure] if target[f] != source[f]]
            if changed:
                problems.append(f"{structure} pruning ({', '.join(f'{f} {source[f]} -> {target[f]}' for f in changed)}) "
                                f"is not possible in {self.model_type}: {why}; keep "
                                + ", ".join(f"{f}={source[f]}" for f in changed))
        problems += self.target_check(source, target)
        if problems:
            raise UnsupportedModel("pruning.target: " + "; ".join(problems))


def _gemma_scale(config: PretrainedConfig) -> float:
    return math.sqrt(config.hidden_size)


def _neox_target(source: dict, target: dict) -> list[str]:
    # GPT-NeoX derives head_size = hidden_size / num_attention_heads: the target must keep that ratio
    hd = source["head_dim"]
    if target["hidden_size"] != target["num_attention_heads"] * hd:
        return [f"gpt_neox computes head_size = hidden_size / num_attention_heads, so hidden_size must be "
                f"num_attention_heads x {hd} = {target['num_attention_heads'] * hd}, not {target['hidden_size']} "
                f"(prune hidden and heads together, e.g. Pythia-410M -> 160M: 12 heads, hidden 768)"]
    return []


def _neox_unsupported(config: PretrainedConfig) -> list[str]:
    return [] if getattr(config, "attention_bias", True) else ["attention_bias=False (all Pythia models have it)"]


def _gemma_unsupported(config: PretrainedConfig) -> list[str]:
    if getattr(config, "hidden_activation", None) not in (None, "gelu_pytorch_tanh", "gelu"):
        return [f"hidden_activation={config.hidden_activation}"]
    return []


_GEMMA3 = FamilyAdapter(
    "gemma3_text", Gemma3TextConfig, Gemma3ForCausalLM,
    projections=_llama_projections(post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    norms=("input_layernorm", "pre_feedforward_layernorm"),
    vectors=(Vector("self_attn.q_norm"), Vector("self_attn.k_norm")),
    norm_eps="eps", norm_weight_offset=1.0, embed_scale=_gemma_scale, unsupported=_gemma_unsupported,
    notes="Gemma 3 text (pre- and post-norms, per-head q/k norms, embeddings x sqrt(d), tied)")

ADAPTERS: dict[str, FamilyAdapter] = {
    a.model_type: a
    for a in (
        FamilyAdapter("llama", LlamaConfig, LlamaForCausalLM, projections=_llama_projections(),
                      unsupported=_llama_unsupported,
                      notes="LLaMA-1/2/3 (MHA or GQA, llama3 rope scaling, attention and MLP biases)"),
        FamilyAdapter("mistral", MistralConfig, MistralForCausalLM, notes="Mistral (GQA, sliding window)"),
        FamilyAdapter("qwen2", Qwen2Config, Qwen2ForCausalLM,
                      projections=_llama_projections(qkv_bias=_always, o_bias=_never),
                      notes="Qwen2 / Qwen2.5 (GQA, q/k/v bias)"),
        FamilyAdapter("qwen3", Qwen3Config, Qwen3ForCausalLM,
                      vectors=(Vector("self_attn.q_norm"), Vector("self_attn.k_norm")),
                      notes="Qwen3 (GQA, per-head q/k RMSNorm)"),
        FamilyAdapter("phi3", Phi3Config, Phi3ForCausalLM,
                      projections=(
                          Projection("self_attn.qkv_proj", ("q", "kv", "kv"), "hidden"),
                          Projection("self_attn.o_proj", "hidden", "q"),
                          Projection("mlp.gate_up_proj", ("ffn", "ffn"), "hidden"),
                          Projection("mlp.down_proj", "hidden", "ffn"),
                      ),
                      notes="Phi-3 (fused qkv_proj and gate_up_proj)"),
        _GEMMA3,
        dataclasses.replace(_GEMMA3, model_type="gemma2", config_cls=Gemma2Config, model_cls=Gemma2ForCausalLM,
                            vectors=(), notes="Gemma 2 (pre- and post-norms, embeddings x sqrt(d), logit soft-capping, "
                                              "tied)"),
        FamilyAdapter("olmo2", Olmo2Config, Olmo2ForCausalLM,
                      projections=_llama_projections(
                          post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
                      norms=(), vectors=(Vector("self_attn.q_norm", "q"), Vector("self_attn.k_norm", "kv")),
                      norm_eps="variance_epsilon",
                      notes="OLMo 2 (post-norms only, q/k RMSNorm over all heads)"),
        FamilyAdapter("gpt_neox", GPTNeoXConfig, GPTNeoXForCausalLM,
                      projections=(
                          Projection("attention.query_key_value", "qkv3", "hidden", _always),
                          Projection("attention.dense", "hidden", "q", _always),
                          Projection("mlp.dense_h_to_4h", "ffn", "hidden", _always),
                          Projection("mlp.dense_4h_to_h", "hidden", "ffn", _always),
                      ),
                      embed="gpt_neox.embed_in", layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
                      lm_head="embed_out", norm_kind="layer", norm_eps="eps",
                      target_check=_neox_target, unsupported=_neox_unsupported,
                      notes="GPT-NeoX / Pythia (fused per-head qkv, parallel residual, LayerNorm, partial rotary)"),
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
