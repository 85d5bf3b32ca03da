"""Models: loading through the project gives transformers' own logits; checkpoints round-trip exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmshearing.config import ModelConfig
from llmshearing.models import ComposerCausalLM, build_hf_model
from llmshearing.models.composer_causal_lm import token_cross_entropy
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


def test_a_batch_retried_after_out_of_memory_logs_only_the_attempt_that_finished():
    """Composer re-runs BEFORE_TRAIN_BATCH when it retries a batch after a CUDA OOM (device_train_microbatch_size:
    auto): the failed attempt's per-domain sums are dropped there."""
    from types import SimpleNamespace

    from llmshearing.callbacks import DomainLossMonitor

    model = ComposerCausalLM(make_tiny_model("llama2_mha"), domains=["a", "b"])
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "domain_id": torch.tensor([0, 1, 1])}
    logged = {}
    logger = SimpleNamespace(log_metrics=logged.update)
    state = SimpleNamespace(model=model)
    monitor = DomainLossMonitor()
    monitor.before_train_batch(state, logger)
    model.loss(model(batch), batch)  # the attempt that ran out of memory half-way
    monitor.before_train_batch(state, logger)  # the retry
    loss = model.loss(model(batch), batch)
    monitor.batch_end(state, logger)
    assert logged["metrics/train/tokens_a"] == 8 and logged["metrics/train/tokens_b"] == 16
    with torch.no_grad():
        per_token, _ = token_cross_entropy(model(batch), batch)
    assert abs(logged["metrics/train/LanguageCrossEntropy_a"] - per_token[0].mean().item()) < 1e-6
    assert loss.item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluation_cross_entropy_one_sequence_at_a_time_equals_the_batched_one(dtype, monkeypatch):
    """Without gradients the fp32 upcast is taken per sequence (memory); the values are the same bits."""
    import llmshearing.models.composer_causal_lm as ccl

    rows = []
    original = ccl.F.cross_entropy

    def counting(x, *args, **kwargs):
        rows.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(ccl.F, "cross_entropy", counting)
    logits = torch.randn(3, 17, 501, generator=torch.Generator().manual_seed(0)).to(dtype)
    ids = torch.randint(0, 501, (3, 17), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, 5:] = -100
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        evaluated, valid = token_cross_entropy(logits, batch)
    assert rows == [16, 16, 16]  # one sequence of T-1 positions at a time
    trained, _ = token_cross_entropy(logits.clone().requires_grad_(), batch)
    assert rows[3:] == [48]
    assert torch.equal(evaluated, trained.detach()) and evaluated.dtype == torch.float32
    assert valid[1, 4:].logical_not().all() and valid[0].all()
