"""Pruning: masked model == materialised model == exported Hugging Face model; gates; targets."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmshearing.config import ConfigError, TargetShape
from llmshearing.models.families import FAMILIES, describe_shape
from llmshearing.pruning import HardConcrete, ShearingMasks, attach_masks, materialize, resolve_target
from tests.helpers import TINY_CONFIGS, make_tiny_model

ALL = ["layer", "head", "intermediate", "hidden"]
CASES = {
    "mha": ("llama2_mha", TargetShape(2, 24, 2, None, 20)),
    "gqa_drop_groups": ("llama3_gqa", TargetShape(2, 40, 4, 1, 50)),
    "gqa_heads_in_groups": ("llama3_gqa", TargetShape(2, 40, 4, 2, 50)),
    "gqa_both": ("llama3_gqa", TargetShape(2, 40, 2, 1, 50)),
    "qwen2_bias": ("qwen2_bias", TargetShape(1, 24, 2, 1, 20)),
    "mistral": ("mistral_gqa", TargetShape(1, 16, 2, 1, 32)),
    "llama_mlp_bias": ("llama_mlp_bias", TargetShape(1, 24, 2, 1, 20)),
    "qwen3": ("qwen3_gqa", TargetShape(2, 24, 2, 1, 20)),
    "phi3": ("phi3_gqa", TargetShape(1, 24, 2, 1, 20)),
    "gemma3": ("gemma3_tied", TargetShape(2, 24, 2, 1, 20)),
    "gemma2": ("gemma2_tied", TargetShape(1, 24, 2, 1, 20)),
    "olmo2": ("olmo2", TargetShape(1, 24, 2, 1, 20)),
    "pythia": ("pythia", TargetShape(1, 16, 2, None, 40)),
}


def _masked(name, target, seed=0):
    model = make_tiny_model(name)
    src = describe_shape(model.config)
    masks = ShearingMasks(src, resolve_target(src, target, ALL), ALL)
    with torch.no_grad():  # spread the gates so that soft values (not just 0/1) are folded
        for g in masks.gates.values():
            g.log_alpha.copy_(torch.randn(g.shape, generator=torch.Generator().manual_seed(seed)) * 2 + 1.5)
    attach_masks(model, masks)
    return model.eval(), masks


@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_materialised_and_exported_models_agree(case, tmp_path):
    name, target = CASES[case]
    model, masks = _masked(name, target)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    det = masks.deterministic()
    assert not torch.all(det.hidden[det.hidden_keep] == 1), "test should fold soft mask values"
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        small = materialize(model, det)
        dense = small(input_ids=ids).logits
    shape = describe_shape(small.config)
    want = resolve_target(describe_shape(model.config), target, ALL)
    assert {k: shape[k] for k in want} == want
    assert (masked - dense).abs().max().item() <= 1e-4
    small.save_pretrained(tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        exported = plain(input_ids=ids).logits
    assert (masked - exported).abs().max().item() <= 1e-4


def test_hooks_match_an_explicit_mask_reference():
    """Layer + intermediate masks via hooks equal zeroing the same weights by hand."""
    model = make_tiny_model("llama2_mha")
    src = describe_shape(model.config)
    target = resolve_target(src, TargetShape(3, 32, 4, None, 24), ["intermediate"])
    masks = ShearingMasks(src, target, ["intermediate"])
    det = masks.deterministic()
    ref = make_tiny_model("llama2_mha")
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            layer.mlp.down_proj.weight.mul_(det.intermediate[i][None, :])
    plain = make_tiny_model("llama2_mha").eval()
    hooks = attach_masks(model, masks)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6)
    hooks.remove()  # the model is itself again
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_sampled_masks_train_every_gate():
    """In training mode every gate's log-alpha gets a finite, non-zero gradient from the LM loss."""
    model, masks = _masked(*CASES["gqa_both"])
    model.train()
    masks.train()
    ids = torch.randint(0, 100, (2, 12))
    for sample in range(4):  # a gate clipped at 0 or 1 in one sample has no gradient from it
        masks.sample = sample
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)).backward()
    assert set(masks.gates) == {"layer", "hidden", "intermediate", "kv_group", "head"}
    for name, g in masks.gates.items():
        assert torch.isfinite(g.log_alpha.grad).all() and g.log_alpha.grad.abs().sum() > 0, name


def test_hard_concrete_sampling_matches_its_nonzero_probability():
    gate = HardConcrete((20000,), keep=5, init_log_alpha=0.0, temperature=2 / 3)
    with torch.no_grad():
        gate.log_alpha.fill_(-1.0)
    z = gate.sample(torch.rand(20000, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6))
    p = float(gate.prob_nonzero()[0])
    assert abs(float((z > 0).float().mean()) - p) < 0.02
    values, keep = gate.deterministic()
    assert int(keep.sum()) == 5 and int((values > 0).sum()) <= 5


def test_sampled_masks_depend_only_on_seed_step_and_sample():
    src = describe_shape(make_tiny_model("llama3_gqa").config)
    tgt = resolve_target(src, TargetShape(2, 40, 4, 1, 50), ALL)
    a, b = ShearingMasks(src, tgt, ALL, seed=3), ShearingMasks(src, tgt, ALL, seed=3)
    a.step = b.step = 11
    za, zb = a.refresh(training=True), b.refresh(training=True)
    assert za.keys() == zb.keys() and all(torch.equal(za[k], zb[k]) for k in za)
    b.step = 12
    assert not torch.equal(za["intermediate"], b.refresh(training=True)["intermediate"])
    b.step, b.sample = 11, 1  # another of the step's independent samples
    assert not torch.equal(za["intermediate"], b.refresh(training=True)["intermediate"])
    b.sample = 0
    assert torch.equal(za["intermediate"], b.refresh(training=True)["intermediate"])


def test_lagrangian_gradients_pull_expected_size_toward_target():
    src = describe_shape(make_tiny_model("llama2_mha").config)
    masks = ShearingMasks(src, resolve_target(src, TargetShape(3, 32, 4, None, 12), ["intermediate"]), ["intermediate"])
    masks.set_progress(1.0)
    with torch.no_grad():
        masks.lambdas["intermediate"].copy_(torch.tensor([1.0, 1.0]))
    loss, logs = masks.lagrangian()
    logs = {k: float(v) for k, v in logs.items()}  # device values are tensors
    loss.backward()
    assert logs["expected_intermediate"] > logs["target_intermediate"]
    assert (masks.gates["intermediate"].log_alpha.grad > 0).all()  # descent lowers log_alpha -> fewer channels
    assert masks.lambdas["intermediate"].grad[0] > 0  # ascent raises lambda_1 while above target


SRC_MHA = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8,
           "num_key_value_heads": 8, "head_dim": 8, "vocab_size": 100}
SRC_GQA = dict(SRC_MHA, num_key_value_heads=2)


@pytest.mark.parametrize(
    "source,target,prune,message",
    [
        (SRC_MHA, TargetShape(4, 128, 8, None, 96), ALL, "larger than the source"),
        (SRC_MHA, TargetShape(4, 64, 4, 2, 96), ALL, "must equal num_attention_heads"),
        (SRC_GQA, TargetShape(4, 64, 6, 4, 96), ALL, "larger than the source"),
        (SRC_GQA, TargetShape(4, 64, 3, 2, 96), ALL, "cannot be split evenly"),
        (SRC_GQA, TargetShape(4, 64, 6, 1, 96), ALL, "only 4"),
        (SRC_MHA, TargetShape(2, 64, 8, None, 96), ["head"], "'layer' is not in pruning.prune"),
    ],
)
def test_unreachable_targets_are_rejected_with_the_reason(source, target, prune, message):
    with pytest.raises(ConfigError, match=message):
        resolve_target(source, target, prune)


@pytest.mark.parametrize("case", ["mha", "gqa_both", "gqa_heads_in_groups"])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_one_shot_baselines_build_the_target_architecture(case, method):
    from llmshearing.pruning.baselines import select_masks

    name, target = CASES[case]
    model = make_tiny_model(name).eval()
    fields = {k: v for k, v in vars(target).items() if v is not None}
    small = materialize(model, select_masks(model, fields, method, seed=1))
    want = dict(fields, num_key_value_heads=target.num_key_value_heads or target.num_attention_heads)
    assert {k: getattr(small.config, k) for k in want} == want
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=torch.randint(0, 100, (1, 8))).logits).all()


def test_magnitude_keeps_the_heaviest_units():
    from llmshearing.pruning.baselines import select_masks

    model = make_tiny_model("llama2_mha")
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for i, blk in enumerate(model.model.layers):
            blk.self_attn.q_proj.weight[3 * hd : 4 * hd] *= 20  # head 3 of every layer
            blk.mlp.up_proj.weight[7] *= 20  # FFN channel 7
        model.model.embed_tokens.weight[:, 5] *= 20  # hidden dim 5
        model.model.layers[1].input_layernorm.weight.mul_(30)  # layer 1 outweighs the others
    masks = select_masks(model, dict(num_hidden_layers=1, hidden_size=8, num_attention_heads=1, intermediate_size=4))
    assert masks.layer_keep.tolist() == [False, True, False]
    assert masks.head_keep[:, 3].all() and masks.head_keep.sum(1).tolist() == [1, 1, 1]
    assert masks.intermediate_keep[:, 7].all() and bool(masks.hidden_keep[5])
    other = select_masks(model, dict(num_hidden_layers=1, hidden_size=8, num_attention_heads=1, intermediate_size=4),
                         "random", seed=3)
    assert other.intermediate_keep.sum(1).tolist() == [4, 4, 4]


def test_tied_source_stays_tied_with_the_hidden_mask_folded_into_the_final_norm(tmp_path):
    """E' = E * z_hidden and w' = w / z_hidden keep logits exact with one matrix for embedding and head."""
    from llmshearing.models.families import count_params

    family, fields = TINY_CONFIGS["llama3_gqa"]
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**fields, tie_word_embeddings=True, attn_implementation="eager")).eval()
    with torch.no_grad():
        model.model.norm.weight.add_(0.1 * torch.randn_like(model.model.norm.weight))
    src = describe_shape(model.config)
    masks = ShearingMasks(src, resolve_target(src, TargetShape(2, 40, 4, 1, 50), ALL), ALL)
    with torch.no_grad():
        for g in masks.gates.values():
            g.log_alpha.copy_(torch.randn(g.shape, generator=torch.Generator().manual_seed(1)) * 2 + 1.5)
    det = masks.deterministic()
    assert det.hidden_keep.sum() == 40 and not torch.all(det.hidden[det.hidden_keep] == 1)
    attach_masks(model, masks)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        small = materialize(model, det)
        dense = small(input_ids=ids).logits
    assert small.config.tie_word_embeddings
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()
    assert (masked - dense).abs().max().item() <= 1e-4
    unique = sum(p.numel() for p in small.parameters())  # shared parameters counted once
    assert unique == count_params(describe_shape(small.config), tie_word_embeddings=True)
    small.save_pretrained(tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert plain.config.tie_word_embeddings
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - masked).abs().max().item() <= 1e-4
    # a kept channel whose value is exactly 0 (possible in hand-made masks): zero in both, no division by zero
    kept = int(torch.nonzero(det.hidden_keep)[0])
    det.hidden[kept] = 0.0
    with torch.no_grad():
        zeroed = materialize(model, det)
    assert all(torch.isfinite(p).all() for p in zeroed.parameters())
    assert float(zeroed.model.norm.weight[0]) == 0.0 and zeroed.model.embed_tokens.weight[:, 0].abs().max() == 0
