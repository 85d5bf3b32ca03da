"""The GPU throughput check runs its real code path on CPU in dry-run mode (the GPU run is a benchmark)."""

from __future__ import annotations

import json

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
