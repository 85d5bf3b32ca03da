"""Dynamic batch loading as the README states it: Algorithm 1's update, ``constant`` leaves the mixture alone,
and an update lands exactly ``num_workers x prefetch_factor`` batches after the batch it was made at."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from torch.utils.data import DataLoader

from llmshearing.callbacks.dynamic_loading import DynamicLoading, doremi_update
from llmshearing.data import DomainBatchSampler, DomainTokenDataset, load_manifest

W, EVAL, REF = [0.5, 0.3, 0.2], [3.0, 2.5, 4.0], [2.8, 2.7, 3.5]
# by hand: delta = max(eval - ref, 0) = (0.2, 0, 0.5); alpha = w * exp(delta) with e^0.2 = 1.2214027581601699,
# e^0.5 = 1.6487212707001282: (0.61070138, 0.3, 0.32974425), sum 1.24044563; normalised: (0.49232751, 0.24184986,
# 0.26582263); smoothed (1 - 1e-4) w + 1e-4 / 3:
EXPECTED = [0.49230828, 0.24185772, 0.26583400]


def test_doremi_update_matches_hand_computed_values():
    assert doremi_update(W, EVAL, REF) == pytest.approx(EXPECTED, abs=1e-8)
    # a domain below its reference is not pushed down below its previous share by its own delta
    assert doremi_update(W, [1.0, 1.0, 1.0], REF) == pytest.approx((1 - 1e-4) * np.array(W) + 1e-4 / 3, abs=1e-12)


class _Logger:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metrics(self, metrics: dict) -> None:
        self.logged.update(metrics)


def _eval_state(batch: int, label: str = "eval", losses=EVAL) -> SimpleNamespace:
    values = {f"LanguageCrossEntropy_{d}": v for d, v in zip("abc", losses)}
    return SimpleNamespace(eval_metrics={"eval": {}, "eval_target": {}}, eval_metric_values=values,
                           dataloader_label=label, timestamp=SimpleNamespace(batch=batch))


@pytest.mark.parametrize("update", ["doremi", "constant"])
def test_callback_applies_the_update_or_keeps_the_mixture(update):
    sampler = DomainBatchSampler([100, 100, 100], [0, 100, 200], W, 4, seed=0, lag=3, domains=list("abc"))
    it = iter(sampler)
    for _ in range(10):
        next(it)
    cb = DynamicLoading(sampler, list("abc"), update=update, reference_losses=REF)
    logger = _Logger()
    cb.eval_end(_eval_state(batch=7), logger)  # 7 consumed, 3 prefetched (the lag)
    expected = EXPECTED if update == "doremi" else W
    assert sampler.proportions == pytest.approx(expected, abs=1e-8)
    assert sampler.proportions_at(9) == pytest.approx(W) and sampler.proportions_at(10) == pytest.approx(expected)
    assert logger.logged["dynamic_loading/effective_batch"] == 10
    assert [logger.logged[f"dynamic_loading/weight_{d}"] for d in "abc"] == pytest.approx(expected, abs=1e-8)
    assert logger.logged["dynamic_loading/excess_loss_c"] == pytest.approx(0.5)
    # another evaluator ending (pruning's eval_target, with its own losses) changes nothing
    cb.eval_end(_eval_state(batch=8, label="eval_target", losses=[9.0, 1.0, 1.0]), logger)
    assert sampler.proportions == pytest.approx(expected, abs=1e-8) and len(cb.history) == 1


@pytest.mark.parametrize("workers,prefetch", [(0, 2), (1, 2), (2, 2), (2, 3)])
def test_an_update_takes_effect_exactly_lag_batches_later(mds_data, workers, prefetch, caplog):
    """``lag = num_workers * prefetch_factor`` (0 without workers): an update made after n consumed batches
    applies from batch n + lag on, which is the first batch the DataLoader has not yet asked for."""
    manifest = load_manifest(mds_data)
    domains = list(manifest["domains"])
    ds = DomainTokenDataset(mds_data, "train", domains, 64, manifest=manifest)
    lag = workers * prefetch
    sampler = DomainBatchSampler(ds.sizes, ds.offsets, [1.0, 0.0, 0.0], 4, seed=0, lag=lag)
    kw = dict(num_workers=workers, prefetch_factor=prefetch) if workers else {}
    loader = DataLoader(ds, batch_sampler=sampler, **kw)
    seen, n_update = [], 3
    with caplog.at_level(logging.WARNING, logger="llmshearing.data.sampler"):
        for n, batch in enumerate(loader):
            seen.append(set(batch["domain_id"].tolist()))
            if n == n_update:
                effective = sampler.set_proportions([0.0, 0.0, 1.0], consumed_batches=n + 1)
            if n == n_update + lag + 3:
                break
    assert effective == n_update + 1 + lag
    assert all(s == {0} for s in seen[:effective]) and all(s == {2} for s in seen[effective:])
    assert "already drawn" not in caplog.text  # the lag was exactly what the loader had prefetched
