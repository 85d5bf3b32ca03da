"""Distillation: the chunked KL equals the direct one (values and gradients); the teacher is frozen and never
checkpointed; runs log per-domain KD and CE; bad teachers fail before training; a distilled run resumes after
SIGKILL bit for bit and two processes train as one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llmshearing.callbacks.metrics_file import read_metrics
from llmshearing.config import ConfigError, load_config
from llmshearing.distillation import chunked_kl
from llmshearing.trainer import build_trainer
from tests.helpers import REPO, run_traced, save_tiny_cpu_source

CPT = REPO / "yamls" / "continue_pretrain" / "tiny_cpu.yaml"
PRUNE = REPO / "yamls" / "prune" / "tiny_cpu.yaml"


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_chunked_kl_equals_the_direct_kl_in_value_and_gradient(chunk, tau):
    gen = torch.Generator().manual_seed(0)
    B, T, d, V = 2, 9, 6, 50
    head = torch.nn.Linear(d, V, bias=False)
    hidden = torch.randn(B, T, d, generator=gen)
    student = torch.randn(B, T, V, generator=gen, requires_grad=True)
    got = chunked_kl(student, hidden, head, tau, chunk)
    with torch.no_grad():
        log_p = F.log_softmax(head(hidden) / tau, -1)
    direct = (log_p.exp() * (log_p - F.log_softmax(student / tau, -1))).sum(-1) * tau**2
    assert torch.allclose(got, direct, atol=1e-6)
    w = torch.randn(B, T, generator=gen)
    (g1,) = torch.autograd.grad((got * w).sum(), student)
    (g2,) = torch.autograd.grad((direct * w).sum(), student)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert head.weight.grad is None  # the teacher gets no gradient


def _common(data, run_dir, *extra):
    return [f"variables.data={data}", f"variables.run_dir={run_dir}", "variables.vocab_size=512",
            "data.max_seq_len=64", "global_train_batch_size=8", "device_train_microbatch_size=4",
            "console_log_interval=1000ba", "data.eval_sequences_per_domain=8", "progress_bar=false", *extra]


def test_a_distilled_pruning_run_logs_kd_per_domain_and_never_checkpoints_the_teacher(mds_data, tmp_path):
    src = save_tiny_cpu_source(tmp_path / "src")
    cfg = load_config(PRUNE, _common(mds_data, tmp_path / "run", f"variables.source={src}", "max_duration=4ba",
                                     "eval_interval=4ba", "save_interval=4ba", "distillation.ce_weight=0.5"))
    trainer = build_trainer(cfg)
    model = trainer.state.model
    teacher = model.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trainer.fit()
    trainer.close()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # frozen
    assert all(not any(p is q for q in teacher.parameters()) for p in model.parameters())
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    keys = list(ckpt["state"]["model"])
    assert keys and not any("teacher" in k for k in keys)
    assert sum(v.numel() for k, v in ckpt["state"]["model"].items() if k.startswith("model.")) == \
        sum(p.numel() for p in model.model.state_dict().values())
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    domains = model.domains
    for d in domains:
        kd, ce = logged[f"metrics/train/KD_{d}"], logged[f"metrics/train/LanguageCrossEntropy_{d}"]
        assert set(kd) == set(ce) and 1 in kd  # logged for every batch the domain is in
        assert 0 <= kd[1] < 0.05 * ce[1]  # the student starts as the teacher with masks near 1: KL near 0
    total = logged["loss/train/total"]
    assert total[1] > 0
    from llmshearing.plots import plot_run

    figures = {f.name for f in plot_run(tmp_path / "run", tmp_path / "plots")}
    assert "distillation.png" in figures


def test_the_kd_step_costs_one_teacher_forward_more_in_flops(mds_data, tmp_path):
    src = save_tiny_cpu_source(tmp_path / "src")
    common = _common(mds_data, tmp_path / "run", f"variables.source={src}", "variables.reference_losses=[4,4,4]",
                     "max_duration=1ba")
    plain = build_trainer(load_config(CPT, common)).state.model
    kd = build_trainer(load_config(CPT, common + [f"distillation.teacher={src}"])).state.model
    batch = {"input_ids": torch.zeros(2, 64, dtype=torch.long)}
    n = sum(p.numel() for p in plain.model.parameters())  # untied: every weight is a matmul but the embedding
    emb = plain.model.get_input_embeddings().weight.numel()
    extra = kd.flops_per_batch(batch) - plain.flops_per_batch(batch)
    attn = 2 * 2 * 4 * 16 * 64  # teacher forward attention: 2 L H hd T per token
    assert extra == 2 * 64 * (2 * (n - emb) + attn)


def test_bad_teachers_fail_before_training(mds_data, tmp_path):
    src = save_tiny_cpu_source(tmp_path / "src")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4))
    other.save_pretrained(tmp_path / "other")
    common = _common(mds_data, tmp_path / "run", f"variables.source={src}", "variables.reference_losses=[4,4,4]",
                     "max_duration=1ba")
    with pytest.raises(ConfigError, match="name the teacher"):
        load_config(CPT, common + ["distillation.kd_weight=1.0"])
    with pytest.raises(ValueError, match="vocabulary has 600 entries, the student's 512"):
        build_trainer(load_config(CPT, common + [f"distillation.teacher={tmp_path / 'other'}"]))
    with pytest.raises(ConfigError, match="both 0"):
        load_config(CPT, common + [f"distillation.teacher={src}", "distillation.kd_weight=0"])


@pytest.mark.slow
def test_a_killed_distilled_run_resumes_bit_for_bit(mds_data, tmp_path):
    src = save_tiny_cpu_source(tmp_path / "src")
    common = [o for o in _common(mds_data, None, f"variables.source={src}", "variables.reference_losses=[4.0,4.0,4.0]",
                                 f"distillation.teacher={src}", "max_duration=12ba", "eval_interval=4ba",
                                 "save_interval=4ba", "autoresume=true", "dynamic_loading.update=doremi")
              if not o.startswith("variables.run_dir=")]
    ref = run_traced(tmp_path / "ref.pt", CPT, common + [f"variables.run_dir={tmp_path}/ref"])
    crashy = common + [f"variables.run_dir={tmp_path}/crashy"]
    for kill in ("mid:6", "save:8"):
        run_traced(tmp_path / "crashy.pt", CPT, crashy, kill_at=kill)
    out = run_traced(tmp_path / "crashy.pt", CPT, crashy)
    assert out["first_batch"] == 4 and out["batches"] == ref["batches"][4:]
    assert out["losses"] == ref["losses"][4:] and out["proportions"] == ref["proportions"][4:]
    assert all(torch.equal(out["tensors"][k], t) for k, t in ref["tensors"].items())
    # several processes: tests/test_fsdp.py::
    # test_the_improved_learned_stage_with_distillation_under_fsdp_equals_one_process_and_keeps_the_teacher_out
