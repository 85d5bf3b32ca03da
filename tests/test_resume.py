"""Crash and resume: runs killed with SIGKILL mid-step (between backward and optimizer step), mid-evaluation and mid-checkpoint-write, restarted with
autoresume, end exactly where an uninterrupted run ends (model, masks, lambdas, proportions, data order)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import REPO, run_traced

KILLS = ["mid:6", "eval:8", "save:12"]  # killed 3 times: resumes from 4, 4, then 8


def _common(data, *extra):
    return [f"variables.data={data}", "variables.vocab_size=512", "data.max_seq_len=64", "max_duration=16ba",
            "eval_interval=4ba", "save_interval=4ba", "global_train_batch_size=8", "device_train_microbatch_size=8",
            "console_log_interval=1000ba", "data.eval_sequences_per_domain=8", "autoresume=true",
            "dynamic_loading.update=doremi", "dynamic_loading.reference_losses=[4.0,4.0,4.0]", *extra]


def _source(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    model.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


# Continued pre-training's kills (mid-step, mid-save) are in test_distillation.py (its distilled run is one) and,
# under FSDP, pruning's in test_fsdp.py; this is the single-process pruning run, with a kill mid-evaluation too.
@pytest.mark.slow  # ~60 s on 2 cores: three SIGKILLed and resumed runs and the uninterrupted one
@pytest.mark.parametrize("stage", ["prune"])
def test_killed_runs_resume_to_exactly_the_uninterrupted_result(stage, mds_data, tmp_path):
    if stage == "prune":
        yaml, extra = REPO / "yamls" / "prune" / "tiny_cpu.yaml", []
    else:
        yaml = REPO / "yamls" / "continue_pretrain" / "tiny_cpu.yaml"
        extra = [f"variables.source={_source(tmp_path)}", "variables.reference_losses=[4.0,4.0,4.0]"]
    ref = run_traced(tmp_path / "ref.pt", yaml, _common(mds_data, f"variables.run_dir={tmp_path}/ref", *extra))
    run = _common(mds_data, f"variables.run_dir={tmp_path}/crashy", *extra)
    for kill in KILLS:
        run_traced(tmp_path / "crashy.pt", yaml, run, kill_at=kill)
    ckpts = tmp_path / "crashy" / "checkpoints"
    assert any(p.name.startswith(".partial-") for p in ckpts.iterdir())  # the write killed mid-way
    assert (ckpts / "latest-rank0.pt").resolve().name == "ep0-ba8-rank0.pt"  # ...is not the latest
    out = run_traced(tmp_path / "crashy.pt", yaml, run)

    first = out["first_batch"]
    assert first == 8 and len(out["batches"]) == 8
    assert out["batches"] == ref["batches"][first:]
    assert out["proportions"] == ref["proportions"][first:]
    assert ref["proportions"][-1] != ref["proportions"][0]  # doremi really moved them
    assert out["losses"] == ref["losses"][first:]
    assert out["tensors"].keys() == ref["tensors"].keys()
    if stage == "prune":
        assert any("lambdas" in k for k in out["tensors"]) and any("log_alpha" in k for k in out["tensors"])
    for k, t in ref["tensors"].items():
        assert torch.equal(out["tensors"][k], t), k
    assert not any(p.name.startswith(".partial-") for p in ckpts.iterdir())
