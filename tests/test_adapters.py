"""Family adapters: each describes its model completely, parameter counts follow from it, and anything outside
them is refused by name (by the Python API and before training), never with a bare KeyError."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmshearing.config import ConfigError, ModelConfig, PruningConfig, TargetShape
from llmshearing.models.adapters import ADAPTERS, UnsupportedModel, adapter_for
from llmshearing.models.families import FAMILIES, build_hf_model, count_params, describe_shape
from tests.helpers import TINY_CONFIGS, make_tiny_model

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
# families transformers has and the engine does not: config class, model class, extra fields
OTHERS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=2)),
    "falcon": ("FalconConfig", "FalconForCausalLM", {}),
}
FAMILY_NAMES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gemma2", "olmo2", "gpt_neox"}


def test_registry():
    assert set(ADAPTERS) == set(FAMILIES) == FAMILY_NAMES
    assert {family for family, _ in TINY_CONFIGS.values()} == FAMILY_NAMES  # every family has a parity case


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_adapter_names_and_counts_every_tensor_of_the_model(name):
    model = make_tiny_model(name)
    adapter = adapter_for(model.config)
    names = adapter.tensor_names(model.config)
    have = set(model.state_dict())
    if model.config.tie_word_embeddings:
        have.add(f"{adapter.lm_head}.weight")
    assert names == have
    assert count_params(describe_shape(model.config), config=model.config) == model.num_parameters()


def _other(family: str):
    config_name, model_name, extra = OTHERS[family]
    config = getattr(transformers, config_name)(**dict(SMALL, **extra))
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
    src = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
           "intermediate_size": 48, "head_dim": 8, "vocab_size": 64}
    masks = ShearingMasks(src, resolve_target(src, target, prune), prune)
    with pytest.raises(UnsupportedModel, match="not supported"):
        attach_masks(model, masks)
    with pytest.raises(UnsupportedModel, match="not supported"):
        materialize(model, masks.deterministic())


REFUSED = {
    # name: (config, target, the message's words)
    "llama pretraining_tp": (lambda: transformers.LlamaConfig(**SMALL, pretraining_tp=2),
                             TargetShape(1, 16, 2, 1, 24), "pretraining_tp=2"),
    "pythia hidden without heads": (lambda: transformers.GPTNeoXConfig(**SMALL),
                                    TargetShape(1, 16, 4, None, 24), "hidden_size must be num_attention_heads x 8 = 32"),
    "pythia without attention bias": (lambda: transformers.GPTNeoXConfig(**SMALL, attention_bias=False),
                                      TargetShape(1, 16, 2, None, 24), "attention_bias=False"),
    "gemma with another activation": (lambda: transformers.Gemma3TextConfig(**SMALL, hidden_activation="silu"),
                                      TargetShape(1, 16, 2, 1, 24), "hidden_activation=silu"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_configurations_are_refused_before_training(case):
    from llmshearing.algorithms import L0Pruning

    make_config, target, words = REFUSED[case]
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        L0Pruning.from_config(PruningConfig(target=target), make_config())


def test_loading_a_checkpoint_of_another_family_names_the_right_fix(tmp_path):
    make_tiny_model("qwen3_gqa").save_pretrained(tmp_path / "q3")
    with pytest.raises(ValueError, match="'qwen3' model but model.family='llama'; set model.family=qwen3"):
        build_hf_model(ModelConfig(family="llama", pretrained=str(tmp_path / "q3")))
    ModelConfig(family="qwen3", pretrained=str(tmp_path / "q3"))  # ... which the config accepts
    _other("gpt2").save_pretrained(tmp_path / "g2")
    with pytest.raises(ValueError, match="'gpt2' model but model.family='llama'; its family is not supported") as e:
        build_hf_model(ModelConfig(family="llama", pretrained=str(tmp_path / "g2")))
    assert "set model.family" not in str(e.value)


def test_a_post_norm_layer_gate_scales_the_write_instead_of_being_normalised_away():
    """Gemma 2's post-norms made a layer gate of 0.5 equal to 1 when the gate sat before the norm."""
    from llmshearing.pruning import ShearingMasks, attach_masks, resolve_target

    model = make_tiny_model("gemma2_tied")
    with torch.no_grad():  # writes well above the norm's epsilon, as in a trained model
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(20)
    src = describe_shape(model.config)
    masks = ShearingMasks(src, resolve_target(src, TargetShape(1, 32, 4, 2, 48), ["layer"]), ["layer"])
    attach_masks(model, masks)
    ids = torch.arange(10)[None]
    logits = {}
    for value in (1.0, 0.5):
        masks.refresh = lambda training, v=value: masks.__dict__.__setitem__(  # noqa: B023 - a fixed gate value
            "z", {"layer": torch.tensor([v, 1.0])})
        with torch.no_grad():
            logits[value] = model(input_ids=ids).logits
    assert (logits[1.0] - logits[0.5]).abs().max() > 1e-2  # gated before the norm: 3e-7


def test_qwen2_export_keeps_max_window_layers_consistent_with_its_layer_types():
    from llmshearing.pruning import ShearingMasks, materialize, resolve_target

    config = transformers.Qwen2Config(**dict(SMALL, num_hidden_layers=4), use_sliding_window=True, sliding_window=4,
                                      max_window_layers=2)
    model = transformers.Qwen2ForCausalLM(config).eval()
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    src = describe_shape(config)
    masks = ShearingMasks(src, resolve_target(src, TargetShape(3, 32, 4, 2, 48), ["layer"]), ["layer"])
    det = masks.deterministic()
    det.layer_keep[:] = torch.tensor([False, True, True, True])  # drop a full-attention layer
    small = materialize(model, det)
    assert small.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert small.config.max_window_layers == 1
    rebuilt = transformers.Qwen2Config(**{k: v for k, v in small.config.to_dict().items() if k != "layer_types"})
    assert rebuilt.layer_types == small.config.layer_types  # the two fields say the same
