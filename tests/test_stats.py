"""The comparison statistics of the benchmarks (benchmarks/stats.py) and the document clusters of a split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.stats import clustered_se, compare, crossover, t_critical, verdict


def test_t_critical_is_students_for_the_seeds_degrees_of_freedom():
    assert t_critical(2) == pytest.approx(4.303)  # 3 seeds
    assert t_critical(4) == pytest.approx(2.776)
    assert t_critical(27) == pytest.approx(2.060)  # the next smaller tabulated df: conservative
    assert t_critical(500) == 1.96 and t_critical(0) == math.inf


def test_clustered_se_equals_the_plain_se_for_singletons_and_grows_with_correlated_clusters():
    rng = np.random.default_rng(0)
    d = rng.normal(size=200)
    plain = d.std(ddof=1) / math.sqrt(len(d))
    assert clustered_se(d, np.arange(200)) == pytest.approx(plain, rel=1e-9)  # G/(G-1) = n/(n-1): the same
    shared = np.repeat(rng.normal(size=10), 20) + 0.1 * rng.normal(size=200)  # 10 documents of 20 sequences
    docs = np.repeat(np.arange(10), 20)
    assert clustered_se(shared, docs) > 3 * clustered_se(shared, np.arange(200))
    assert math.isnan(clustered_se(d, np.zeros(200)))  # one document: the set cannot tell its own error


def test_compare_pairs_seeds_adds_the_test_error_and_uses_the_seeds_df():
    docs = np.repeat(np.arange(8), 4)
    base = np.linspace(3, 4, 32)
    a = {s: base - 0.10 + 0.01 * s for s in range(3)}
    b = {s: base.copy() for s in range(3)}
    r = compare(a, b, docs)
    assert r["diff"] == pytest.approx(-0.09) and r["df"] == 2 and r["n_seeds"] == 3
    assert r["se_seed"] == pytest.approx(np.std([-0.10, -0.09, -0.08], ddof=1) / math.sqrt(3))
    assert r["se_test"] == pytest.approx(0.0, abs=1e-12)  # the same shift on every sequence
    assert r["t"] == pytest.approx(r["diff"] / r["se_seed"])
    assert verdict(r["diff"], r["se"], r["df"], "A", "B") == "A lower"  # |t| = 15.6 > 4.30
    assert verdict(-0.09, 0.025, 2) == "none"  # |t| = 3.6: "beats" at 2 SE would have been claimed
    assert verdict(0.09, 0.01, 2, "A", "B") == "B lower"
    one = compare({0: base}, {0: base - 0.01 + 0.001 * np.sin(np.arange(32))}, docs)  # one seed: the test error alone
    assert one["df"] == 0 and one["se"] == pytest.approx(one["se_test"]) and abs(one["t"]) > 10
    assert verdict(one["diff"], one["se"], one["df"]) == "no verdict (1 seed)"  # however large t is
    assert math.isnan(compare(a, b, np.zeros(32))["se"])  # one document: the test error is unknown, so is the total
    assert verdict(-0.09, float("nan"), 2) == "undetermined"


def test_crossover_interpolates_in_log_tokens_and_says_when_not_reached_or_already_reached():
    budgets, losses = [1e6, 2e6, 4e6], [4.0, 3.6, 3.4]
    assert crossover(budgets, losses, 3.6) == (pytest.approx(2e6), "between")
    mid, where = crossover(budgets, losses, 3.5)
    assert mid == pytest.approx(math.exp((math.log(2e6) + math.log(4e6)) / 2)) and where == "between"
    assert crossover(budgets, losses, 4.5) == (pytest.approx(1e6), "at most")  # an upper bound, not "1.00x"
    assert crossover(budgets, losses, 3.3) == (None, "beyond")


def test_seed_matched_crossover_pairs_scratch_and_arm_by_seed_not_by_position():
    from benchmarks.stats import seed_matched_crossover

    # scratch seed 2 missing at the largest budget: only seeds 0 and 1 are on every budget
    curves = {1e6: {0: 4.0, 1: 4.2, 2: 9.0}, 2e6: {0: 3.6, 1: 3.8, 2: 9.0}, 4e6: {0: 3.4, 1: 3.6}}
    arm = {1: 3.8, 0: 3.6, 2: 0.0}
    r = seed_matched_crossover(curves, arm)
    assert r["seeds"] == [0, 1]
    assert r["curve"] == [(1e6, pytest.approx(4.1)), (2e6, pytest.approx(3.7)), (4e6, pytest.approx(3.5))]
    assert r["target"] == pytest.approx(3.7)  # the arm's mean over the same seeds (seed 2's 0.0 left out)
    assert r["tokens"] == pytest.approx(2e6) and r["where"] == "between"
    assert r["per_seed"][0] == (pytest.approx(2e6), "between") and r["per_seed"][1] == (pytest.approx(2e6), "between")
    assert seed_matched_crossover({1e6: {0: 4.0}}, {1: 3.0}) is None


def test_worst_excess_compare_takes_each_arms_worst_domain_and_its_test_error():
    from benchmarks.stats import worst_excess_compare

    ref = {"x": 1.0, "y": 1.0}
    docs = {"x": np.repeat(np.arange(8), 4), "y": np.repeat(np.arange(8), 4)}

    def arm(x_shift, y_shift, seed):
        r = np.random.default_rng(seed)
        return {"x": 1.0 + x_shift + 0.1 * r.standard_normal(32), "y": 1.0 + y_shift + 0.1 * r.standard_normal(32)}

    a = {s: arm(0.5, 0.1, s) for s in range(3)}  # A is worst on x (~+0.5)
    b = {s: arm(0.0, 0.3, 10 + s) for s in range(3)}  # B is worst on y (~+0.3)
    r = worst_excess_compare(a, b, ref, docs)
    assert all(p == ("x", "y") for p in r["worst"].values())
    want = np.mean([(a[s]["x"].mean() - 1) - (b[s]["y"].mean() - 1) for s in range(3)])
    assert r["diff"] == pytest.approx(want) and r["df"] == 2
    # the test error is both domains' (A's x less B's y): more than either one alone
    vx = np.mean([a[s]["x"] for s in range(3)], axis=0)
    vy = np.mean([b[s]["y"] for s in range(3)], axis=0)
    assert r["se_test"] == pytest.approx(math.hypot(clustered_se(vx, docs["x"]), clustered_se(vy, docs["y"])))
    assert r["se"] == pytest.approx(math.hypot(r["se_seed"], r["se_test"]))


@pytest.mark.parametrize("bos,eos", [(1, 1), (2, 1), (None, 1)])
def test_starting_documents_name_the_document_of_each_sequences_first_token(bos, eos):
    """Ground truth from the packing itself: documents of random lengths packed [BOS] tokens [EOS] (BOS == EOS is
    SmolLM2's case, where counting end tokens alone split each document in two), cut into sequences."""
    from llmshearing.evaluate import starting_documents

    rng = np.random.default_rng(0)
    stream, owner = [], []
    for doc in range(40):
        body = list(rng.integers(3, 100, size=int(rng.integers(1, 30))))
        toks = ([bos] if bos is not None else []) + body + [eos]
        stream += toks
        owner += [doc] * len(toks)
    for seq_len in (3, 7, 16):
        n = len(stream) // seq_len
        seqs = [np.asarray(stream[i * seq_len:(i + 1) * seq_len]) for i in range(n)]
        assert list(starting_documents(seqs, eos, bos)) == [owner[i * seq_len] for i in range(n)]


def test_sequence_documents_follow_sequence_losses_order(mds_data):
    from llmshearing.evaluate import sequence_documents, sequence_losses

    docs = sequence_documents(mds_data, "test", max_sequences_per_domain=20)
    for ids in docs.values():
        assert list(ids) == sorted(ids) and ids[0] == 0  # documents in order
    assert any(len(set(ids.tolist())) > 1 for ids in docs.values())
    from tests.helpers import make_tiny_model

    model = make_tiny_model("llama2_mha", vocab_size=512)
    losses = sequence_losses(model, mds_data, "test", max_sequences_per_domain=20)
    assert {d: len(v) for d, v in losses.items()} == {d: len(v) for d, v in docs.items()}
