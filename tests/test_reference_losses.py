"""Reference losses (scaling-law fit, measured) and per-domain evaluation of exported models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmshearing.config import load_config
from llmshearing.data import DomainTokenDataset, load_manifest
from llmshearing.evaluate import domain_losses
from llmshearing.models import ComposerCausalLM
from llmshearing.reference_losses import fit_scaling_law, main as ref_main
from tests.helpers import REPO


def test_scaling_law_fit_recovers_known_parameters():
    truth = dict(E=1.69, A=406.4, alpha=0.34)
    sizes = np.array([7e6, 4e7, 3e8, 7e9, 7e10])
    losses = truth["E"] + truth["A"] / sizes ** truth["alpha"]
    law = fit_scaling_law(sizes, losses)
    assert abs(law.E - truth["E"]) < 1e-3 and abs(law.alpha - truth["alpha"]) < 1e-3
    want = truth["E"] + truth["A"] / 1.3e9 ** truth["alpha"]
    assert abs(law(1.3e9) - want) < 1e-4
    # noisy points: still a good prediction, and the loss falls with size
    noisy = losses + np.random.default_rng(0).normal(0, 0.003, size=losses.shape)
    law = fit_scaling_law(sizes, noisy)
    assert abs(law(1.3e9) - want) < 0.03 and law(1e9) > law(1e10)


def test_scaling_law_needs_three_sizes():
    with pytest.raises(ValueError, match="at least 3 distinct model sizes"):
        fit_scaling_law([1e9, 7e9], [2.0, 1.8])


def test_fit_command_prints_an_override_the_config_accepts(tmp_path, capsys):
    rows = ["params,cc,github", *(f"{n},{1.7 + 400 / n**0.34:.6f},{0.6 + 90 / n**0.3:.6f}" for n in (7e8, 7e9, 1.3e10, 7e10))]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    assert ref_main(["fit", "--csv", str(tmp_path / "l.csv"), "--target-params", "2.7e9"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("dynamic_loading.reference_losses=")][0]
    values = [float(v) for v in line.split("=[")[1].rstrip("]").split(",")]
    assert values == pytest.approx([1.7 + 400 / 2.7e9**0.34, 0.6 + 90 / 2.7e9**0.3], abs=2e-3)
    cfg = load_config(REPO / "yamls" / "prune_2.7b.yaml", ["variables.data=/x", "variables.run_dir=/y", "variables.source=/z", line,
                                                            "data.domains=[cc,github]", "data.proportions=[0.5,0.5]"])
    assert cfg.dynamic_loading.reference_losses == pytest.approx(values)


def test_measured_losses_match_the_trainer_metrics(mds_data, tmp_path, capsys):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    domains = list(load_manifest(mds_data)["domains"])
    got = domain_losses(model, mds_data, batch_size=5, max_sequences_per_domain=7, split="val")

    # the same numbers through the Composer model's eval metrics, batch by batch over each domain
    wrapped = ComposerCausalLM(model, domains=domains)
    metrics = wrapped.get_metrics(is_train=False)
    ds = DomainTokenDataset(mds_data, "val", domains, 64)  # what training evaluates; `measure` reads it too
    with torch.no_grad():
        for d, (off, n) in enumerate(zip(ds.offsets, ds.sizes)):
            items = [ds[int(i)] for i in range(off, off + min(n, 7))]
            batch = {"input_ids": torch.stack([x["input_ids"] for x in items]),
                     "domain_id": torch.tensor([x["domain_id"] for x in items])}
            out = wrapped.eval_forward(batch)
            for m in metrics.values():
                wrapped.update_metric(batch, out, m)
    for d in domains:
        assert got[d] == pytest.approx(float(metrics[f"LanguageCrossEntropy_{d}"].compute()), abs=1e-5)
    assert got["all"] == pytest.approx(float(metrics["LanguageCrossEntropy"].compute()), abs=1e-5)
    assert all(abs(v - math.log(512)) < 0.5 for v in got.values())  # a random model is near uniform
    test = domain_losses(model, mds_data, batch_size=5, max_sequences_per_domain=7)  # reported results: test split
    assert all(test[d] != got[d] for d in domains)

    model.save_pretrained(tmp_path / "hf")
    assert ref_main(["measure", "--model", str(tmp_path / "hf"), "--data", mds_data,
                     "--max-sequences-per-domain", "7", "--batch-size", "5"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == "dynamic_loading.reference_losses=[" + ",".join(f"{got[d]:.4f}" for d in domains) + "]"


def test_vocabulary_mismatch_is_refused(mds_data):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="512-token vocabulary but the model has 100"):
        domain_losses(model, mds_data)
