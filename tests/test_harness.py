"""lm-evaluation-harness: the offline tasks are built right from the test split (always tested); evaluating with
lm_eval runs when the ``eval`` extra is installed (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmshearing.harness import OFFLINE_GROUP, build_offline_tasks, markdown_table

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="the eval extra is absent")


def test_offline_tasks_are_built_from_the_test_split(mds_data, tmp_path):
    from llmshearing.data import DomainTokenDataset, load_manifest
    from llmshearing.data.tokenizer import load_tokenizer

    names = build_offline_tasks(mds_data, tmp_path, sequences=8, continuation_tokens=8)
    manifest = load_manifest(mds_data)
    domains = list(manifest["domains"])
    assert sorted(names) == sorted(f"shearing_{k}_{d}" for k in ("ppl", "continuation") for d in domains)
    group = json.loads((tmp_path / f"{OFFLINE_GROUP}.yaml").read_text())
    assert group == {"group": OFFLINE_GROUP, "task": names}
    tok = load_tokenizer(manifest["tokenizer"]["path"])
    d = domains[0]
    test = DomainTokenDataset(mds_data, "test", [d], manifest["seq_len"], manifest=manifest)
    items = [json.loads(x) for x in (tmp_path / f"continuation_{d}.jsonl").read_text().splitlines()]
    assert len(items) == min(8, len(test))
    for i, item in enumerate(items):
        ids = test[i]["input_ids"].tolist()
        half = len(ids) // 2
        assert item["passage"] == tok.decode(ids[:half], skip_special_tokens=True)
        assert item["choices"][item["label"]] == tok.decode(ids[half : half + 8], skip_special_tokens=True)
        assert len(item["choices"]) == 4
    labels = [it["label"] for it in items]
    assert len(set(labels)) > 1  # the true continuation is not always in the same place
    cfg = json.loads((tmp_path / f"shearing_ppl_{d}.yaml").read_text())
    assert cfg["output_type"] == "loglikelihood_rolling" and cfg["dataset_kwargs"]["data_files"]["test"].endswith(".jsonl")


def test_a_missing_harness_names_the_extra(monkeypatch):
    import llmshearing.harness as h

    monkeypatch.setattr(h.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install -e '.\[eval\]'"):
        h.require_lm_eval()


def test_markdown_table_has_one_column_per_model():
    table = markdown_table({"a": {"t": {"acc": 0.5, "acc_stderr": 0.1}}, "b": {"t": {"acc": 0.75}}})
    assert table.splitlines()[0] == "| task | metric | a | b |"
    assert table.splitlines()[2] == "| t | acc | 0.5000 ± 0.1000 | 0.7500 |"


@needs_lm_eval
def test_lm_eval_runs_the_offline_tasks_on_an_export(mds_data, small_tokenizer, tmp_path, monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmshearing.data.tokenizer import load_tokenizer
    from llmshearing.harness import run_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=128)).save_pretrained(tmp_path / "m")
    load_tokenizer(small_tokenizer).save_pretrained(tmp_path / "m")
    res = run_harness({"tiny": str(tmp_path / "m")}, [OFFLINE_GROUP], mds_data, batch_size=4, sequences=6)
    tasks = res["tiny"]
    cont = [t for t in tasks if t.startswith("shearing_continuation_")]
    ppl = [t for t in tasks if t.startswith("shearing_ppl_")]
    assert cont and ppl
    assert all(0.0 <= tasks[t]["acc"] <= 1.0 for t in cont)
    assert all(tasks[t]["word_perplexity"] > 1.0 for t in ppl)
