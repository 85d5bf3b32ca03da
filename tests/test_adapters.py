"""Family adapters: each describes its model completely, and anything outside them is refused by name
(by the Python API and before training), never with a bare KeyError."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmshearing.config import ConfigError, PruningConfig, TargetShape
from llmshearing.models.adapters import ADAPTERS, UnsupportedModel, adapter_for
from llmshearing.models.families import FAMILIES, describe_shape
from tests.helpers import TINY_CONFIGS, make_tiny_model

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
# families transformers has and the engine does not (yet): config class, model class, extra fields
OTHERS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8)),
}


def test_registry():
    assert set(ADAPTERS) == set(FAMILIES) == {"llama", "mistral", "qwen2"}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_adapter_names_every_tensor_of_the_model(name):
    model = make_tiny_model(name)
    names = adapter_for(model.config).tensor_names(model.config)
    have = set(model.state_dict())
    if model.config.tie_word_embeddings:
        have.add("lm_head.weight")
    assert names == have


def _other(family: str):
    config_name, model_name, extra = OTHERS[family]
    fields = dict(SMALL, **extra)
    if family == "gpt_neox":
        fields["rotary_pct"] = 1.0
    config = getattr(transformers, config_name)(**fields)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("family", sorted(OTHERS))
def test_unsupported_families_are_refused_by_name(family):
    from llmshearing.algorithms import L0Pruning
    from llmshearing.pruning import ShearingMasks, attach_masks, materialize, resolve_target

    model = _other(family)
    with pytest.raises(UnsupportedModel, match=rf"model family '{family}' is not supported.*supported: llama"):
        adapter_for(model.config)
    target = TargetShape(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=24)
    with pytest.raises(ConfigError, match=rf"'{family}' is not supported"):
        L0Pruning.from_config(PruningConfig(target=target), model.config)
    prune = ["layer", "head", "intermediate", "hidden"]
    src = describe_shape(model.config)
    masks = ShearingMasks(src, resolve_target(src, target, prune), prune)
    with pytest.raises(UnsupportedModel, match="not supported"):
        attach_masks(model, masks)
    with pytest.raises(UnsupportedModel, match="not supported"):
        materialize(model, masks.deterministic())


def test_unsupported_features_are_refused_before_training():
    from llmshearing.algorithms import L0Pruning

    config = transformers.LlamaConfig(**SMALL, mlp_bias=True)
    target = TargetShape(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=24)
    with pytest.raises(ConfigError, match="mlp_bias=True"):
        L0Pruning.from_config(PruningConfig(target=target), config)


def test_loading_an_unsupported_family_does_not_advise_an_invalid_family(tmp_path):
    from llmshearing.config import ModelConfig
    from llmshearing.models.families import build_hf_model

    _other("qwen3").save_pretrained(tmp_path / "q3")
    with pytest.raises(ValueError, match="'qwen3' model but model.family='llama'; its family is not supported") as e:
        build_hf_model(ModelConfig(family="llama", pretrained=str(tmp_path / "q3")))
    assert "set model.family=qwen3" not in str(e.value)
