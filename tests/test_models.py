"""Models: loading through the project gives transformers' own logits; checkpoints round-trip exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmshearing.config import ModelConfig
from llmshearing.models import ComposerCausalLM, build_hf_model
from llmshearing.models.families import count_params, describe_shape
from tests.helpers import TINY_CONFIGS, make_tiny_model, save_tiny_model


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    family, _ = TINY_CONFIGS[name]
    path = save_tiny_model(name, tmp_path / name)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = ComposerCausalLM(build_hf_model(ModelConfig(family=family, pretrained=str(path)))).eval()
    ids = torch.randint(0, reference.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = ours({"input_ids": ids})
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_save_reload_round_trip_is_exact(name, tmp_path):
    family, _ = TINY_CONFIGS[name]
    model = make_tiny_model(name)
    model.save_pretrained(tmp_path / "a")
    reloaded = build_hf_model(ModelConfig(family=family, pretrained=str(tmp_path / "a")))
    sd_a, sd_b = model.state_dict(), reloaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for key in ("rope_scaling", "rope_theta", "num_key_value_heads", "vocab_size"):
        assert getattr(reloaded.config, key, None) == getattr(model.config, key, None), key


def test_family_mismatch_is_a_clear_error(tmp_path):
    path = save_tiny_model("mistral_gqa", tmp_path / "m")
    with pytest.raises(ValueError, match="family"):
        build_hf_model(ModelConfig(family="llama", pretrained=str(path)))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_hf_model(ModelConfig(family="llama", pretrained=str(tmp_path)))


@pytest.mark.parametrize("name", ["llama2_mha", "llama3_gqa", "mistral_gqa", "qwen2_bias"])
def test_param_count_formula(name):
    """The config-free LLaMA-like count (every family's own count: tests/test_adapters.py)."""
    model = make_tiny_model(name)
    cfg = model.config
    n = count_params(describe_shape(cfg), tie_word_embeddings=cfg.tie_word_embeddings,
                     qkv_bias=cfg.model_type == "qwen2")
    assert n == model.num_parameters()


def test_loss_is_next_token_cross_entropy_and_domains_accumulate():
    model = ComposerCausalLM(make_tiny_model("llama2_mha"), domains=["a", "b"])
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "domain_id": torch.tensor([0, 1, 1])}
    logits = model(batch)
    loss = model.loss(logits, batch)
    ref = model.model(input_ids=ids, labels=ids).loss
    assert torch.allclose(loss, ref, atol=1e-6)
    sums, counts = model.pop_train_domain_sums()
    assert counts.tolist() == [8.0, 16.0]
    assert torch.allclose(sums.sum() / counts.sum(), loss.double(), atol=1e-6)
    assert model.pop_train_domain_sums()[1].sum() == 0  # reset after pop
