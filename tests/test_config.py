"""Configuration: every shipped YAML validates; bad keys and values fail with a message that names them."""

from __future__ import annotations


import pytest

from llmshearing.config import ConfigError, load_config, load_yaml
from tests.helpers import REPO

RUN_YAMLS = sorted(p for p in (REPO / "yamls").rglob("*.yaml") if not {"models", "parts"} & set(p.parts))
VARS = ["variables.data=/data", "variables.run_dir=/runs", "variables.source=/models/src", "variables.tokenizer=/tok",
        "variables.reference_losses=[3.0,3.0,3.0]"]



@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: str(p.relative_to(REPO / "yamls")))
def test_every_shipped_yaml_validates(path):
    extra = {  # configs whose target is given on the command line
        **{name: [f"pruning.target.{k}={v}" for k, v in
                  dict(num_hidden_layers=1, hidden_size=8, num_attention_heads=1, intermediate_size=8).items()]
           for name in ("activation_cpu.yaml",)},
        "cpu.yaml": [f"pruning.target.{k}={v}" for k, v in
                     dict(num_hidden_layers=1, hidden_size=8, num_attention_heads=1, intermediate_size=8).items()],
        "continue_pretrain_smollm2.yaml": ["variables.reference_losses=[2.0,1.0,2.0,2.0,2.0,2.0,2.0]"],  # 7 domains
        "activation_smollm2.yaml": ["variables.reference_losses=[2.0,1.0,2.0,2.0,2.0,2.0,2.0]"],
        "prune_custom.yaml": [*(f"pruning.target.{k}={v}" for k, v in dict(
            num_hidden_layers=1, hidden_size=8, num_attention_heads=1, num_key_value_heads=1,
            intermediate_size=8).items()), "data.domains=[web,code]", "data.proportions=[0.5,0.5]",
            "dynamic_loading.reference_losses=[2.0,1.0]"],  # the template: what a user fills in
    }.get(path.name, [])
    cfg = load_config(path, VARS + extra)
    assert cfg.max_duration and cfg.global_train_batch_size > 0


def test_the_custom_template_names_every_key_a_user_must_fill():
    import re

    with pytest.raises(ConfigError, match=re.escape("pruning.target.num_hidden_layers is required (prune_custom.yaml "
                                                    "leaves it ???)")):
        load_config(REPO / "yamls" / "prune_custom.yaml", VARS)


def test_model_description_yamls_build_configs():
    from llmshearing.models.families import build_config, count_params, describe_shape

    found = {}
    for path in sorted((REPO / "yamls" / "models").glob("*.yaml")):
        model = load_yaml(path, ["variables.source=null"])["model"]
        config = build_config(model["family"], dict(model["config"]))
        found[path.stem] = count_params(describe_shape(config), config=config)
    assert 6.6e9 < found["llama2_7b"] < 6.8e9
    assert 7.9e9 < found["llama3_8b"] < 8.1e9
    assert found["smollm2_135m"] == 134_515_008  # what transformers counts for the GGUF model (tied once)
    assert found["pythia_410m"] == 405_334_016  # Pythia-410M's published count
    assert 1.71e9 < found["qwen3_1.7b"] < 1.73e9


@pytest.mark.parametrize("name, params", [("prune_pythia_410m", 162_322_944), ("prune_qwen3_1.7b", 596_049_920),
                                          ("prune_llama3_8b_gqa", None), ("prune_2.7b", None),
                                          ("select/activation_pythia_410m", 162_322_944),
                                          ("select/activation_qwen3_1.7b", 596_049_920)])
def test_shipped_pruning_targets_pass_the_family_check_before_training(name, params):
    """The family's target check (L0Pruning.from_config, run before training) accepts every shipped target;
    Pythia-410M -> 160M and Qwen3-1.7B -> 0.6B land on the published sizes."""
    from llmshearing.algorithms import L0Pruning
    from llmshearing.models.families import build_config, count_params

    cfg = load_config(REPO / "yamls" / f"{name}.yaml", VARS)
    config = build_config(cfg.model.family, dict(cfg.model.config))
    algo = L0Pruning.from_config(cfg.pruning, config)
    n = count_params({**algo.source, **algo.target}, config=config)
    assert params is None or n == params


LEARNED = sorted(p for p in (REPO / "yamls").glob("prune_*.yaml") if p.name != "prune_custom.yaml")


@pytest.mark.parametrize("learned", LEARNED, ids=lambda p: p.stem)
def test_every_shipped_pruning_yaml_has_a_one_shot_twin_of_the_same_source_and_target(learned):
    """One-shot activation selection is a pruning mode of the recipe beside the learned masks: for every shipped
    ``prune_<size>.yaml``, ``select/activation_<size>.yaml`` prunes the same source (family and config) to the same
    target, at the same sequence length, and trains for as many tokens as the learned recipe's pruning plus its
    continued pre-training (48,000 steps of 2^20 tokens, ``parts/continue_pretrain_common.yaml``)."""
    twin = REPO / "yamls" / "select" / f"activation_{learned.stem.removeprefix('prune_')}.yaml"
    assert twin.is_file(), f"{twin.name} is missing"
    extra = ["variables.reference_losses=[2.0,1.0,2.0,2.0,2.0,2.0,2.0]"]
    a, b = load_config(learned, VARS + extra), load_config(twin, VARS + extra)
    assert (a.pruning.method, b.pruning.method) == ("learned", "activation")
    assert b.pruning.calibration_sequences > 0
    assert (a.model.family, dict(a.model.config), a.pruning.target, a.data.max_seq_len) == (
        b.model.family, dict(b.model.config), b.pruning.target, b.data.max_seq_len)

    def tokens(cfg) -> int:
        assert cfg.max_duration.endswith("ba")
        return int(cfg.max_duration[:-2]) * cfg.global_train_batch_size * cfg.data.max_seq_len

    assert tokens(b) == tokens(a) + 48_000 * 2**20, (tokens(a), tokens(b))


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


BASE = """
model: {family: llama, config: {hidden_size: 8}}
data: {local: /d}
max_duration: 10ba
global_train_batch_size: 2
"""


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'data.max_seq_lne'.*did you mean 'data.max_seq_len'"):
        load_config(_write(tmp_path, BASE + "\n"), ["data.max_seq_lne=5"])


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'optimiser'"):
        load_config(_write(tmp_path, BASE + "optimiser: {lr: 1}\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match="global_train_batch_size must be an integer"):
        load_config(_write(tmp_path, BASE), ["global_train_batch_size=lots"])


def test_the_distributed_timeout_is_a_setting_and_must_be_positive(tmp_path):
    assert load_config(_write(tmp_path, BASE), ["dist_timeout=1800"]).dist_timeout == 1800
    for bad in ("0", "-5"):
        with pytest.raises(ConfigError, match=f"dist_timeout={float(bad)}: give a finite number of seconds > 0"):
            load_config(_write(tmp_path, BASE), [f"dist_timeout={bad}"])


def test_proportions_must_sum_to_one(tmp_path):
    with pytest.raises(ConfigError, match="sum to 0.9"):
        load_config(_write(tmp_path, BASE), ["data.domains=[a,b]", "data.proportions=[0.5,0.4]"])


def test_proportions_count_must_match_domains(tmp_path):
    with pytest.raises(ConfigError, match="3 values but data.domains has 2"):
        load_config(_write(tmp_path, BASE), ["data.domains=[a,b]", "data.proportions=[0.5,0.25,0.25]"])


def test_reference_losses_count_must_match_domains(tmp_path):
    with pytest.raises(ConfigError, match="reference_losses has 1 values but data.domains has 2"):
        load_config(_write(tmp_path, BASE + "dynamic_loading: {reference_losses: [1.0]}\n"), ["data.domains=[a,b]"])


def test_includes_merge_in_order_and_cycles_are_reported(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    child = tmp_path / "child.yaml"
    child.write_text("includes: [base.yaml]\nmax_duration: 20ba\n")
    cfg = load_config(child)
    assert cfg.max_duration == "20ba" and cfg.model.config == {"hidden_size": 8}
    (tmp_path / "a.yaml").write_text("includes: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("includes: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_variable_is_reported(tmp_path):
    text = BASE.replace("{local: /d}", '{local: "${variables.data}"}') + "variables:\n  data: ???\n"
    with pytest.raises(ConfigError, match=r"variables.data is required .*data.local refers to it.* variables.data="):
        load_config(_write(tmp_path, text))


def test_invalid_yaml_names_the_file_and_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variables:\n  a: 1\nvariables:\n  b: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML: .*duplicate key variables"):
        load_config(bad)
