"""Exports carry a model card that huggingface_hub parses and a provenance file across stages; uploads check
everything before creating anything (the dry run and the error paths: no network here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmshearing.config import load_config
from llmshearing.export import export_checkpoint
from llmshearing.hub import HubError, plan_upload, push_to_hub
from llmshearing.model_card import validate_card
from llmshearing.trainer import build_trainer
from tests.helpers import REPO, save_tiny_cpu_source


def _source(path):
    save_tiny_cpu_source(path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a source\n")
    return path


def _train(yaml, data, run, *extra):
    ov = [f"variables.data={data}", f"variables.run_dir={run}", "variables.vocab_size=512", "data.max_seq_len=64",
          "global_train_batch_size=8", "device_train_microbatch_size=8", "max_duration=2ba", "eval_interval=2ba",
          "save_interval=2ba", "data.eval_sequences_per_domain=4", "console_log_interval=1000ba", *extra]
    trainer = build_trainer(load_config(yaml, ov))
    trainer.fit()
    trainer.close()
    return run / "checkpoints" / "latest-rank0.pt"


@pytest.fixture(scope="module")
def exports(mds_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("publish")
    src = _source(tmp / "src")
    pruned = export_checkpoint(_train(REPO / "yamls/prune/tiny_cpu.yaml", mds_data, tmp / "prune",
                                      f"variables.source={src}"), tmp / "pruned")
    final = export_checkpoint(_train(REPO / "yamls/continue_pretrain/tiny_cpu.yaml", mds_data, tmp / "cpt",
                                     f"variables.source={pruned}", "variables.reference_losses=[4,4,4]"),
                              tmp / "final")
    return src, pruned, final


def test_the_card_parses_and_names_the_base_model_shapes_tokens_and_losses(exports):
    src, pruned, final = exports
    meta = validate_card(pruned / "README.md")
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert "llmshearing" in meta["tags"] and "llama" in meta["tags"] and meta["library_name"] == "transformers"
    assert "base_model" not in meta  # a local path is not a Hub id: named in the body instead
    text = (pruned / "README.md").read_text()
    assert f"`{src}`" in text and "| source | 2 | 64 | 4 | 4 | 172 |" in text and "| this model | 1 | 48 | 2 | 2 | 86 |" in text
    assert "| pruning | 1,024 | 2 |" in text  # 2 steps x 8 x 64 tokens
    assert "Validation loss per domain" in text
    prov = json.loads((pruned / "llmshearing.json").read_text())
    assert [s["stage"] for s in prov["stages"]] == ["pruning"] and prov["base_model"] == str(src)


def test_a_continued_export_carries_the_pruning_stage_over(exports):
    src, pruned, final = exports
    prov = json.loads((final / "llmshearing.json").read_text())
    assert [s["stage"] for s in prov["stages"]] == ["pruning", "continued_pretraining"]
    assert prov["base_model"] == str(src) and prov["license"] == "apache-2.0"
    assert prov["stages"][1]["from"] == str(pruned) and prov["stages"][1]["tokens"] == 1024
    text = (final / "README.md").read_text()
    assert "| pruning | 1,024 |" in text and "| continued pretraining | 1,024 |" in text
    assert "| source | 2 | 64 |" in text and "| this model | 1 | 48 |" in text  # the original source, first
    assert validate_card(final / "README.md")["license"] == "apache-2.0"


def test_the_dry_run_lists_the_upload_without_network(exports, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self: pytest.fail("dry run touched the network"))
    out = push_to_hub(exports[2], "me/sheared-tiny", private=True, revision="v1", dry_run=True)
    assert out.startswith("would upload") and "me/sheared-tiny@v1 (private)" in out
    for name in ("README.md", "config.json", "llmshearing.json", "model.safetensors", "tokenizer.json"):
        assert f"  {name}  " in out


def test_uploads_fail_clearly_before_anything_is_created(exports, tmp_path, monkeypatch):
    import huggingface_hub

    created = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: created.append(a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(exports[2], "me/x")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def offline(self):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", offline)
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub or no token.*nothing was uploaded"):
        push_to_hub(exports[2], "me/x")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(HubError, match=r"not a complete export \(missing \['README.md', '\*.safetensors'\]\)"):
        plan_upload(tmp_path / "half")
    assert created == []


def test_exports_generate_with_the_kv_cache_by_default(exports):
    """Training runs without the KV cache; an export must not carry that setting (SmolLM2 generating 128 tokens
    took 57 s without the cache, 6 s with it)."""
    import torch
    from transformers import AutoModelForCausalLM

    for path in exports[1:]:
        assert json.loads((path / "config.json").read_text())["use_cache"] is True
        gen = path / "generation_config.json"
        assert not gen.is_file() or json.loads(gen.read_text()).get("use_cache", True) is True
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        lengths = []
        model.model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                              with_kwargs=True)
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False)
        assert lengths == [4, 1, 1, 1], lengths  # after the prompt, one new token a step: the cache is used


def test_cards_say_what_each_export_went_through_and_how_to_use_it(exports):
    src, pruned, final = exports
    p_text, f_text = (pruned / "README.md").read_text(), (final / "README.md").read_text()
    assert "# pruned\n" in p_text and "# final\n" in f_text  # the export's own name, not "<source>, sheared"
    assert "targeted structured pruning with learned masks." in p_text and "continued pre-training" not in p_text
    assert "targeted structured pruning with learned masks, then continued pre-training." in f_text
    assert "AutoModelForCausalLM.from_pretrained(" in p_text and "model.generate(" in p_text


def test_provenance_names_version_commit_seed_config_and_data(exports, mds_data):
    import hashlib

    import llmshearing

    stage = json.loads((exports[2] / "llmshearing.json").read_text())["stages"][-1]
    assert stage["llmshearing_version"] == llmshearing.__version__ and stage["seed"] == 17
    assert stage["commit"] is None or len(stage["commit"]) == 40
    assert stage["config"]["max_duration"] == "2ba" and stage["config"]["model"]["pretrained"] == str(exports[1])
    want = hashlib.sha256((Path(mds_data) / "manifest.json").read_bytes()).hexdigest()
    assert stage["data"]["manifest_sha256"] == want and stage["data"]["domains"] == ["code", "docstrings", "reference"]
    assert stage["data"]["tokenizer"]["vocab_size"] == 512


def test_the_resolved_config_is_saved_in_the_run_folder(exports, tmp_path_factory):
    from omegaconf import OmegaConf

    run = next(p for p in tmp_path_factory.getbasetemp().glob("publish*/cpt"))
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.max_duration == "2ba" and cfg.dynamic_loading.reference_losses == [4, 4, 4]
    assert "includes" not in cfg and "???" not in (run / "config.yaml").read_text()


def test_the_export_dtype_is_the_sources_declared_one(mds_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = _source(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(src)  # a bf16 release, like the LLaMA-3 / SmolLM2 checkpoints on the Hub
    out = export_checkpoint(_train(REPO / "yamls/prune/tiny_cpu.yaml", mds_data, tmp_path / "prune",
                                   f"variables.source={src}"), tmp_path / "pruned")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    out32 = export_checkpoint(tmp_path / "prune" / "checkpoints", tmp_path / "pruned32", dtype=torch.float32)
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"
