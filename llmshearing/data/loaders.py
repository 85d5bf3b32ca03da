"""Train and eval dataloaders over prepared per-domain data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch
from composer.utils import dist
from torch.utils.data import DataLoader, DistributedSampler

from llmshearing.config import ConfigError, DataConfig
from llmshearing.data.dataset import DomainTokenDataset, load_manifest
from llmshearing.data.sampler import DomainBatchSampler

__all__ = ["build_eval_dataloader", "build_train_dataloader", "calibration_batch", "resolve_domains"]


def resolve_domains(cfg: DataConfig, manifest: dict) -> tuple[list[str], list[float]]:
    """The run's domains and initial proportions (default: all domains, weighted by training tokens)."""
    domains = list(cfg.domains) if cfg.domains is not None else list(manifest["domains"])
    unknown = [d for d in domains if d not in manifest["domains"]]
    if unknown:
        have = list(manifest["domains"])
        raise ConfigError(
            f"data.domains {unknown} are not in the prepared dataset {cfg.local} (it has {have}); for this data "
            f"override data.domains=[{','.join(have)}], data.proportions=[...] and "
            "dynamic_loading.reference_losses=[...] (one value per domain, in that order)"
        )
    if cfg.proportions is not None:
        if len(cfg.proportions) != len(domains):
            raise ConfigError(
                f"data.proportions has {len(cfg.proportions)} values for {len(domains)} domains {domains}; "
                "give one proportion per domain, in the same order"
            )
        return domains, list(cfg.proportions)
    tokens = np.array([manifest["domains"][d]["train"]["tokens"] for d in domains], dtype=np.float64)
    return domains, (tokens / tokens.sum()).tolist()


def build_train_dataloader(
    cfg: DataConfig,
    manifest: dict,
    domains: list[str],
    proportions: list[float],
    global_batch_size: int,
    seed: int,
) -> DataLoader:
    """Training dataloader whose batches follow the (updatable) domain proportions.

    The :class:`DomainBatchSampler` is reachable as ``loader.batch_sampler`` (and
    ``loader.dataset.batch_sampler``, which Composer checkpoints through the dataset's state_dict).
    """
    dataset = DomainTokenDataset(cfg.local, "train", domains, cfg.max_seq_len, remote=cfg.remote, manifest=manifest)
    sampler = DomainBatchSampler(
        sizes=dataset.sizes,
        offsets=dataset.offsets,
        proportions=proportions,
        global_batch_size=global_batch_size,
        rank=dist.get_global_rank(),
        world_size=dist.get_world_size(),
        seed=seed,
        on_exhausted=cfg.on_exhausted,
        lag=cfg.num_workers * cfg.prefetch_factor,
        domains=domains,
    )
    dataset.batch_sampler = sampler
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=True if cfg.num_workers > 0 and _cuda() else False,
    )


def build_eval_dataloader(
    cfg: DataConfig, manifest: dict, domains: list[str], batch_size: int
) -> DataLoader:
    """Evaluation dataloader over the domains' validation sequences (at most ``eval_sequences_per_domain`` each).

    Training evaluates (and dynamic loading reads) the ``val`` split only; the ``test`` split is for reported
    results (``llmshearing.evaluate``), so nothing tuned during training has seen it."""
    max_samples = cfg.eval_sequences_per_domain
    dataset = DomainTokenDataset(cfg.local, "val", domains, cfg.max_seq_len, remote=cfg.remote, manifest=manifest)
    order = _round_robin(dataset.sizes, dataset.offsets, max_samples)
    return DataLoader(dataset, batch_size=batch_size, sampler=EvalSampler(order, len(dataset)), num_workers=0)


def calibration_batch(local: str, n: int, seq_len: int, domains: Optional[list[str]] = None, split: str = "train",
                      remote: Optional[str] = None) -> torch.Tensor:
    """``n`` token sequences (n, seq_len) for activation importance: the first sequences of each domain of the
    ``train`` split, taken in turn (the same on every rank and every run; held-out splits stay unseen)."""
    manifest = load_manifest(local, remote)
    domains = list(domains or manifest["domains"])
    dataset = DomainTokenDataset(local, split, domains, seq_len, remote=remote, manifest=manifest)
    order = _round_robin(dataset.sizes, dataset.offsets, -(-n // len(domains)))[:n]
    return torch.stack([dataset[i]["input_ids"] for i in order])


def _round_robin(sizes: np.ndarray, offsets: np.ndarray, per_domain: Optional[int]) -> list[int]:
    """Global indices alternating between domains, so any prefix (``eval_subset_num_batches``) covers all of them."""
    cols = [np.arange(o, o + (n if per_domain is None else min(n, per_domain))) for n, o in zip(sizes, offsets)]
    longest = max(len(c) for c in cols)
    return [int(c[i]) for i in range(longest) for c in cols if i < len(c)]


class EvalSampler(DistributedSampler):
    """Strided split of a fixed order over ranks, padded so every rank runs the same number of batches.

    A :class:`~torch.utils.data.DistributedSampler` by type (Composer requires one with several
    processes); the base ``__init__`` is deliberately not called.

    FSDP needs every rank in every forward, so ranks must see equally many samples; padding indices are
    ``>= n`` and the dataset marks them ``domain_id = -1``, which no metric counts. The evaluation is
    therefore exactly the same for any world size.
    """

    def __init__(self, order: list[int], n: int) -> None:
        self.order, self.n = order, n
        self.rank, self.world = dist.get_global_rank(), dist.get_world_size()
        self.num_replicas, self.epoch = self.world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.order) // self.world)

    def __iter__(self) -> Iterator[int]:
        for i in range(self.rank, len(self) * self.world, self.world):
            yield self.order[i] if i < len(self.order) else self.n + i  # >= n: padding


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
