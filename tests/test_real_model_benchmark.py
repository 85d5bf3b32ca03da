"""benchmarks/real_model.py on a tiny source: every arm reads the same number of training tokens (pruning +
recovery, from the trainer), the report carries the paired comparisons, and a finished stage is not run again."""

from __future__ import annotations

import json

import pytest

from tests.helpers import save_tiny_cpu_source


@pytest.mark.slow  # ~8 short training runs
def test_every_arm_reads_the_same_tokens_and_the_report_compares_them(corpus_dir, small_tokenizer, tmp_path):
    from benchmarks.real_model import main
    from llmshearing.data.tokenizer import load_tokenizer

    src = save_tiny_cpu_source(tmp_path / "src")
    load_tokenizer(small_tokenizer).save_pretrained(src)
    args = ["--source", str(src), "--data", str(corpus_dir), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--seeds", "0", "--ablation-seeds", "--seq-len", "64", "--batch", "4",
            "--budget", "6", "--prune-steps", "4", "--improved-prune-steps", "2", "--eval-sequences", "6",
            "--calibration", "4", "--prune-yaml", "yamls/prune/cpu.yaml",
            "--target", "num_hidden_layers=2", "hidden_size=48", "num_attention_heads=2", "num_key_value_heads=2",
            "intermediate_size=86"]
    assert main(args) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    results = out["results"]
    assert set(results) == {"activation", "random", "learned", "improved", "learned on source"}
    tokens = {arm: r["0"]["tokens"] for arm, r in results.items()}
    assert set(tokens.values()) == {6 * 4 * 64}, tokens  # B x batch x sequence, whatever the split
    assert results["learned"]["0"]["selection"]["batches"] == 4 and results["improved"]["0"]["selection"]["batches"] == 2
    assert results["learned on source"]["0"]["recovery"]["batches"] == 2  # B - P: its selection cost the P steps
    flops = {arm: r["0"]["flops"] for arm, r in results.items()}
    assert flops["learned"] > flops["activation"] > 0  # pruning steps run the whole source
    report = (tmp_path / "out.md").read_text()
    assert "vs activation" in report and "-> " in report and "df 0" in report  # one seed: no verdict beyond "none"
    assert "Kept units that differ from activation's selection" in report
    # a second run reuses every stage (nothing trains again)
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    n_stages = len(state["stages"])
    assert main(args) == 0
    assert len(json.loads((tmp_path / "work" / "state.json").read_text())["stages"]) == n_stages
    # a changed setting is a new stage, not a stale hit
    assert main([*args, "--budget", "5"]) == 0
    assert len(json.loads((tmp_path / "work" / "state.json").read_text())["stages"]) > n_stages
