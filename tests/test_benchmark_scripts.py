"""The GPU throughput check runs its real code path on CPU in dry-run mode (the GPU run is a benchmark)."""

from __future__ import annotations

import json

import pytest

from benchmarks.gpu_throughput import flops_per_token
from benchmarks.gpu_throughput import main as gpu_main


def test_gpu_check_dry_run_measures_both_loops(tmp_path):
    assert gpu_main(["--dry-run", "--out", str(tmp_path / "g.json")]) == 0
    res = json.loads((tmp_path / "g.json").read_text())
    assert set(res["cases"]) == {"continue_pretrain_1.3b", "prune_7b_width"}
    for case in res["cases"].values():
        assert case["tokens_per_s"] > 0 and len(case["step_times"]) == 4
    smoke = res["pruning_smoke"]  # prune -> save -> export -> plain transformers, at the target shape
    assert smoke["exported_shape"]["num_key_value_heads"] == 1 and smoke["loss"] > 0


def test_flops_per_token_of_the_1_3b_shape():
    # 24 layers x (4 d^2 + 3 d m) + V d = 1.21B + 65.5M; 6 N + 6 L d T
    shape = dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=16, intermediate_size=5504)
    n = 24 * (4 * 2048**2 + 3 * 2048 * 5504) + 32000 * 2048
    assert flops_per_token(shape, 32000, 4096) == 6 * n + 6 * 24 * 2048 * 4096


def test_gpu_check_halves_the_micro_batch_on_out_of_memory_and_reports_other_failures(tmp_path, monkeypatch):
    import benchmarks.gpu_throughput as g

    def fake_run_case(name, case, data, work, args):
        if name == "prune_7b_width":
            raise ValueError("bad shape")
        if case["micro"] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"tokens_per_s": 1.0, "mfu": 0.5, "micro_batch": case["micro"], "step_seconds": 1.0,
                "peak_memory_gib": None, "work": str(work)}

    monkeypatch.setattr(g, "run_case", fake_run_case)
    assert g.main(["--dry-run", "--no-smoke", "--out", str(tmp_path / "g.json")]) == 1  # a failed case fails it
    res = json.loads((tmp_path / "g.json").read_text())["cases"]
    cpt, prune = res["continue_pretrain_1.3b"], res["prune_7b_width"]
    assert cpt["micro_batch"] == 2 and cpt["out_of_memory_at_micro_batch"] == [4]
    assert prune["error"] == "ValueError: bad shape" and "fake_run_case" in prune["traceback"]


def test_memory_plan_separates_per_token_activations_from_the_scaled_weights():
    from benchmarks.memory_plan import measure

    d, m = 64, 160
    spec = dict(width=dict(hidden_size=d, num_attention_heads=4, num_key_value_heads=4, intermediate_size=m,
                           vocab_size=256),
                target=dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=2, intermediate_size=96))
    res = measure(spec, [32, 64])
    scaled_weights = 2 * 2 * (d * d + d * m)  # o_proj and down_proj, bf16, two copies each (see README)
    assert abs(res["layer_token_independent_bytes"] - scaled_weights) < 0.05 * scaled_weights
    # a SwiGLU layer saves about 24 B x d + 8 B x m per token in bf16
    per_token = res["layer_bytes_per_token_per_hidden"] * d
    assert abs(per_token - (24 * d + 8 * m)) < 0.1 * per_token
    assert 4 < res["outside_bytes_per_token_per_vocab"] < 8  # the fp32 log-softmax kept by the loss, and more


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_flops_per_token_matches_the_matmuls_of_the_model(kv_heads):
    """Counted with torch's FLOP counter on a real transformers model (eager attention: the score and value
    matmuls are bmm, the projections mm): 3 x the forward's linear FLOPs, plus 3 x half the attention's
    (the formula counts the causal half the kernels skip; eager attention computes the full square)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=kv_heads,
                 intermediate_size=96)
    vocab, T, B = 256, 32, 2
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, attn_implementation="eager", **shape))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, vocab, (B, T)))
    counts = {name: {str(op): n for op, n in ops.items()} for name, ops in counter.get_flop_counts().items()}
    linear = counts["Global"].get("aten.mm", 0) + counts["Global"].get("aten.addmm", 0)
    # the layers' attention only (the rotary frequency table is a bmm too, outside the layers)
    attention = sum(ops.get("aten.bmm", 0) for name, ops in counts.items() if name.endswith("self_attn"))
    assert attention > 0 and linear > 0
    counted = 3 * (linear + attention / 2) / (B * T)
    assert flops_per_token(shape, vocab, T) == pytest.approx(counted, rel=1e-9)


def test_ratio_summary_calls_a_goal_met_only_when_the_interval_clears_it():
    from benchmarks.overhead import ratio_summary

    clear = ratio_summary([1.00, 1.01, 0.99, 1.00, 1.02], [1.0] * 5, goal=1.05)
    assert clear["verdict"] == "met" and clear["ci95"][0] <= clear["geomean"] <= clear["ci95"][1] < 1.05
    close = ratio_summary([1.00, 1.10, 0.98, 1.08, 1.04], [1.0] * 5, goal=1.05)
    assert close["verdict"].startswith("not resolved")
    assert ratio_summary([1.3, 1.31, 1.29], [1.0] * 3, goal=1.05)["verdict"] == "not met"


def test_paired_difference_standard_error():
    import numpy as np

    from llmshearing.evaluate import paired_difference

    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 1.0, 4000)
    b = a - 0.01 + rng.normal(0, 0.1, 4000)  # b is 0.01 lower; paired noise 0.1 per sequence
    m, se = paired_difference(a, b, block=8)
    assert abs(m - 0.01) < 4 * se and abs(se - 0.1 / np.sqrt(4000)) < 0.3 * se
    # correlated neighbours (each value repeated 8 times): the block estimate sees 500 values, not 4000
    noise = np.repeat(rng.normal(0, 0.1, 500), 8)
    _, se_blocked = paired_difference(noise, np.zeros(4000), block=8)
    assert abs(se_blocked - 0.1 / np.sqrt(500)) < 0.2 * se_blocked


def test_inference_benchmark_runs_and_compares_the_two_models(tmp_path):
    from benchmarks.inference import main as inference_main
    from tests.helpers import save_tiny_model

    big, small = save_tiny_model("llama3_gqa", tmp_path / "big"), save_tiny_model("mistral_gqa", tmp_path / "small")
    out = tmp_path / "inf.json"
    assert inference_main(["--model", f"source={big}", "--model", f"sheared={small}", "--batch", "1", "2",
                           "--prompt-len", "8", "--new-tokens", "4", "--repeats", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert res["source"]["batch2"]["generation_tokens_per_s"] > 0 and res["sheared"]["batch1"]["prefill_tokens_per_s"] > 0
    vs = res["sheared"]["vs_source"]
    assert vs["parameters_ratio"] == pytest.approx(res["source"]["parameters"] / res["sheared"]["parameters"])
    assert vs["batch2_generation_speedup"]["ci95"][0] <= vs["batch2_generation_speedup"]["median"]


@pytest.mark.parametrize("tied", [False, True])
def test_inference_flops_per_token_equal_torchs_count_of_a_forward(tied):
    """The benchmark's formula against an independent count: torch's FlopCounterMode over one full forward of T
    tokens (eager attention: scores and weighted values over all T x T pairs, as the formula's context T counts);
    a tied LM head is a matmul like an untied one."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.inference import forward_flops_per_token

    cfg = LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, tie_word_embeddings=tied, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    T = 10
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.zeros(1, T, dtype=torch.long), use_cache=False)
    rotary = 2 * (64 // 8 // 2) * T  # the rotary embedding's frequency matmul (positions x head_dim / 2), once
    assert counter.get_total_flops() == T * forward_flops_per_token(model.config, T) + rotary


@pytest.mark.parametrize("tied", [False, True])
def test_training_flops_count_the_lm_head_of_a_tied_model(tied):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmshearing.models import ComposerCausalLM

    shape = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=96)
    vocab, T, B = 256, 32, 2
    model = ComposerCausalLM(LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied, **shape)),
                             domains=["a"])
    got = model.flops_per_batch({"input_ids": torch.zeros(B, T, dtype=torch.long)})
    norms = B * T * 6 * 64 * (2 * 2 + 1)  # flops_per_batch also counts the RMSNorm weights as parameters
    assert got - norms == B * T * flops_per_token(shape, vocab, T)
