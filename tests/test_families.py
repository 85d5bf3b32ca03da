"""Every supported family: masked == materialised == exported and reloaded by plain transformers, for each
structure set, at the exact target shape; a Composer pruning run of each family exports a model that equals its
masked model and generates. ``python -m benchmarks.family_parity`` prints the same grid as a table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmshearing.config import ConfigError, TargetShape
from llmshearing.models.adapters import UnsupportedModel
from llmshearing.models.families import describe_shape
from tests.helpers import REPO, TINY_CONFIGS, make_tiny_model

# the full target of each tiny model; a structure set prunes only its fields
FULL_TARGETS = {
    "llama2_mha": TargetShape(2, 24, 2, None, 20),
    "llama3_gqa": TargetShape(2, 40, 2, 1, 50),
    "mistral_gqa": TargetShape(1, 16, 2, 1, 32),
    "qwen2_bias": TargetShape(1, 24, 2, 1, 20),
    "llama_mlp_bias": TargetShape(1, 24, 2, 1, 20),
    "qwen3_gqa": TargetShape(2, 24, 2, 1, 20),
    "phi3_gqa": TargetShape(1, 24, 2, 1, 20),
    "gemma3_tied": TargetShape(2, 24, 2, 1, 20),
    "gemma2_tied": TargetShape(1, 24, 2, 1, 20),
    "olmo2": TargetShape(1, 24, 2, 1, 20),
    "pythia": TargetShape(1, 16, 2, None, 40),
}
STRUCTURE_SETS = {
    "layer": ["layer"], "head": ["head"], "intermediate": ["intermediate"], "hidden": ["hidden"],
    "head+hidden": ["head", "hidden"], "all": ["layer", "head", "intermediate", "hidden"],
    # GQA: every KV group kept, query heads pruned within the groups (``head`` above drops whole groups)
    "head_in_groups": ["head"],
}
_FIELDS = {"layer": ["num_hidden_layers"], "hidden": ["hidden_size"], "intermediate": ["intermediate_size"],
           "head": ["num_attention_heads", "num_key_value_heads"]}


def target_for(name: str, structures: list[str], within_groups: bool = False) -> TargetShape:
    shape = describe_shape(make_tiny_model(name).config)
    full = FULL_TARGETS[name]
    fields = {k: shape[k] for f in _FIELDS.values() for k in f}
    for s in structures:
        for k in _FIELDS[s]:
            if getattr(full, k) is not None:
                fields[k] = getattr(full, k)
    if shape["num_key_value_heads"] == shape["num_attention_heads"]:
        fields["num_key_value_heads"] = fields["num_attention_heads"]  # MHA stays MHA
    elif within_groups:  # one query head in each of the source's KV groups
        fields["num_key_value_heads"] = fields["num_attention_heads"] = shape["num_key_value_heads"]
    return TargetShape(**fields)


def parity(name: str, structures: str, out_dir, seed: int = 0) -> dict:
    """Max abs logit differences of a tiny model with random, partly fractional masks (log_alpha ~ N(1.5, 2)) vs
    its materialisation and vs the export reloaded by plain transformers; raises the family's refusal of the
    target."""
    from llmshearing.pruning.parity import masked_export_parity

    return masked_export_parity(make_tiny_model(name), target_for(name, STRUCTURE_SETS[structures], structures ==
                                "head_in_groups"), STRUCTURE_SETS[structures], out_dir, seed, loc=1.5, scale=2.0,
                                seq_len=13)[0]


# refused structure sets, with the words of the refusal
REFUSED = {("pythia", "head"): "hidden_size must be num_attention_heads x 8", ("pythia", "hidden"): "hidden_size must be",
           ("pythia", "head_in_groups"): "hidden_size must be"}


@pytest.mark.parametrize("structures", sorted(STRUCTURE_SETS))
@pytest.mark.parametrize("name", sorted(FULL_TARGETS))
def test_masked_materialised_and_exported_agree_per_family_and_structure_set(name, structures, tmp_path):
    if (name, structures) in REFUSED:
        with pytest.raises(UnsupportedModel, match=REFUSED[(name, structures)]):
            parity(name, structures, tmp_path / "hf")
        return
    r = parity(name, structures, tmp_path / "hf")
    assert r["exact_shape"]
    assert r["materialised"] <= 1e-4 and r["exported"] <= 1e-4, r
    assert r["tied"] == make_tiny_model(name).config.tie_word_embeddings


@pytest.mark.parametrize("method", ["activation", "magnitude"])
@pytest.mark.parametrize("name", sorted(FULL_TARGETS))
def test_one_shot_selection_of_each_family_builds_the_exact_target(name, method):
    """``pruning.method`` activation / magnitude (the one-shot twins of the learned YAMLs) on every family: the
    selection materialises at the target shape, runs, and keeps each layer's highest-scored FFN channels."""
    from llmshearing.pruning import materialize
    from llmshearing.pruning.baselines import select_masks
    from llmshearing.pruning.importance import activation_scores

    model = make_tiny_model(name).eval()
    target = target_for(name, STRUCTURE_SETS["all"])
    fields = {k: v for k, v in vars(target).items() if v is not None}
    ids = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    masks = select_masks(model, fields, method, calibration=ids if method == "activation" else None)
    small = materialize(model, masks)
    want = dict(fields, num_key_value_heads=target.num_key_value_heads or target.num_attention_heads)
    assert {k: v for k, v in describe_shape(small.config).items() if k in want} == want
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=ids[:1]).logits).all()
    if method == "activation":
        scores = activation_scores(model, ids)["intermediate"]
        kept_layers = [i for i, keep in enumerate(masks.layer_keep.tolist()) if keep]
        for i in kept_layers:
            kept = masks.intermediate_keep[i]
            assert scores[i][kept].min() >= scores[i][~kept].max()


def test_every_tiny_config_has_a_target():
    assert set(FULL_TARGETS) >= set(TINY_CONFIGS)


# -- a real Composer pruning run of each newly supported family ------------------------------------------------
E2E = ["qwen3_gqa", "phi3_gqa", "gemma3_tied", "olmo2", "pythia"]


@pytest.mark.parametrize("name", E2E)
def test_a_composer_pruning_run_of_each_family_exports_its_masked_model(name, mds_data, small_tokenizer, tmp_path):
    from llmshearing.config import load_config
    from llmshearing.evaluate import generate
    from llmshearing.export import export_checkpoint
    from llmshearing.trainer import build_trainer
    family = TINY_CONFIGS[name][0]
    model = make_tiny_model(name, vocab_size=512)
    source = tmp_path / "source"
    model.save_pretrained(source)
    target = target_for(name, STRUCTURE_SETS["all"])
    domains = json.loads((Path(mds_data) / "manifest.json").read_text())["domains"]
    overrides = [f"variables.data={mds_data}", f"variables.run_dir={tmp_path / 'run'}", f"variables.source={source}",
                 f"tokenizer={small_tokenizer}", f"model.family={family}", "model.attn_implementation=eager",
                 "variables.reference_losses=[" + ",".join("5.0" for _ in domains) + "]",
                 "max_duration=4ba", "eval_interval=2ba", "save_interval=4ba", "global_train_batch_size=4",
                 "device_train_microbatch_size=4", "data.max_seq_len=64", "data.eval_sequences_per_domain=4",
                 "progress_bar=false"]
    overrides += [f"pruning.target.{k}={v}" for k, v in vars(target).items() if v is not None]
    trainer = build_trainer(load_config(REPO / "yamls" / "prune" / "cpu.yaml", overrides))
    trainer.fit()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    model = trainer.state.model
    model.eval()
    with torch.no_grad():
        masked = model({"input_ids": ids})
    trainer.close()
    out = export_checkpoint(tmp_path / "run" / "checkpoints" / "latest-rank0.pt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.model_type == family
    want = {k: v for k, v in vars(target).items() if v is not None}
    assert {k: getattr(hf.config, k, None) or hf.config.num_attention_heads for k in want} == want
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - masked).abs().max().item() <= 1e-4
    text = generate(out, "def ", max_new_tokens=4)
    assert text.startswith("def") and len(text) > len("def ")


def test_an_unsupported_target_fails_before_training(mds_data, small_tokenizer, tmp_path, monkeypatch):
    import llmshearing.trainer
    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer

    def no_weights(cfg):
        raise AssertionError("the weights were loaded before the target was checked")

    monkeypatch.setattr(llmshearing.trainer, "build_hf_model", no_weights)
    make_tiny_model("pythia", vocab_size=512).save_pretrained(tmp_path / "source")
    overrides = [f"variables.data={mds_data}", f"variables.run_dir={tmp_path / 'run'}",
                 f"variables.source={tmp_path / 'source'}", f"tokenizer={small_tokenizer}", "model.family=gpt_neox",
                 "variables.reference_losses=[5.0,5.0,5.0]", "pruning.target.num_hidden_layers=1",
                 "pruning.target.hidden_size=24", "pruning.target.num_attention_heads=2",
                 "pruning.target.intermediate_size=40", "data.max_seq_len=64"]
    with pytest.raises(ConfigError, match="hidden_size must be num_attention_heads x 8 = 16, not 24"):
        build_trainer(load_config(REPO / "yamls" / "prune" / "cpu.yaml", overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()
