"""Batch sampler that draws each global batch's domains from the *current* domain proportions.

Why a batch sampler: in the reference code, proportions lived in the dataset, which each
dataloader worker copies at start-up, so workers never saw updates and the recipe had to run
with one data process. Here the main process decides every global batch (which domain each
sequence comes from and which sequence of that domain) and workers only fetch by index, so any
``num_workers`` and ``prefetch_factor`` work.

Determinism and exact resume:

- The domains of global batch ``j`` are drawn with an RNG seeded by ``(seed, j)`` from the
  proportions in force for batch ``j``; within a domain, sequences are taken in the order of a
  seeded permutation per ``(domain, epoch)``, each once until the domain is exhausted.
- A proportion update made after ``n`` consumed batches takes effect at batch ``n + lag``,
  where ``lag = num_workers * prefetch_factor`` is the number of batches the dataloader has drawn
  ahead. The schedule of updates is part of the state, so the batches depend only on the seed and
  the update history, never on timing: a resumed run sees exactly the batches an uninterrupted
  run would, and every rank agrees.
- Every rank draws the same global batch and takes its own contiguous slice, so the global batches
  are identical for any world size with the same global batch size.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DistributedSampler

__all__ = ["DomainBatchSampler", "DomainExhausted"]

log = logging.getLogger(__name__)


class DomainExhausted(RuntimeError):
    """A domain ran out of unseen sequences and ``on_exhausted='stop'``."""


class DomainBatchSampler(DistributedSampler):
    """Yields this rank's slice of each global batch, as global dataset indices.

    It is a :class:`~torch.utils.data.DistributedSampler` by type only (Composer requires one for
    multi-process training and calls ``set_epoch``); it shards batches itself and does not use the
    base class's index arithmetic, so the base ``__init__`` is deliberately not called.

    Args:
        sizes: sequences per domain.
        offsets: global index of each domain's first sequence.
        proportions: initial sampling proportions (sum to 1).
        global_batch_size: sequences per global batch (all ranks).
        rank: this process's rank.
        world_size: number of ranks; must divide ``global_batch_size``.
        seed: seed of domain draws and within-domain orders.
        on_exhausted: ``repeat`` (new permutation, with a warning) or ``stop`` (raise :class:`DomainExhausted`).
        lag: batches between an update and its effect (``num_workers * prefetch_factor``).
        domains: domain names, for messages.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        offsets: Sequence[int],
        proportions: Sequence[float],
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        on_exhausted: str = "repeat",
        lag: int = 0,
        domains: Sequence[str] | None = None,
    ) -> None:
        if global_batch_size % world_size:
            raise ValueError(
                f"global_train_batch_size={global_batch_size} is not divisible by the {world_size} ranks; "
                "choose a multiple of the number of processes"
            )
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.k = len(self.sizes)
        self.domains = list(domains) if domains is not None else [str(i) for i in range(self.k)]
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // world_size
        self.rank = rank
        self.num_replicas = world_size
        self.seed = seed
        self.epoch = 0
        self.on_exhausted = on_exhausted
        self.lag = lag
        self._schedule: list[tuple[int, np.ndarray]] = [(0, self._check(proportions))]
        self._positions = np.zeros(self.k, dtype=np.int64)
        self._epochs = np.zeros(self.k, dtype=np.int64)
        self._next_batch = 0
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        # (positions, epochs) before drawing batch j, for batches drawn but maybe not yet consumed.
        self._snapshots: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _check(self, proportions: Sequence[float]) -> np.ndarray:
        w = np.asarray(proportions, dtype=np.float64)
        if w.shape != (self.k,):
            raise ValueError(f"got {w.size} proportions for {self.k} domains {self.domains}")
        if (w < 0).any() or not np.isfinite(w).all() or abs(w.sum() - 1.0) > 1e-6:
            raise ValueError(f"proportions must be finite, >= 0 and sum to 1; got {w.tolist()}")
        return w / w.sum()

    # -- proportions ---------------------------------------------------------------------------------
    def proportions_at(self, batch: int) -> np.ndarray:
        """The proportions in force for global batch ``batch``."""
        starts = [s for s, _ in self._schedule]
        return self._schedule[bisect.bisect_right(starts, batch) - 1][1]

    @property
    def proportions(self) -> np.ndarray:
        """The latest proportions (in force now or after the lag)."""
        return self._schedule[-1][1]

    def set_proportions(self, proportions: Sequence[float], consumed_batches: int) -> int:
        """Schedule new proportions; returns the first batch index they apply to."""
        w = self._check(proportions)
        start = consumed_batches + self.lag if consumed_batches >= 0 else 0
        if start < self._next_batch:  # only if more batches were prefetched than the lag allows
            log.warning(
                "proportion update for batch %d lands at batch %d: %d batches were already drawn",
                start, self._next_batch, self._next_batch,
            )
            start = self._next_batch
        self._schedule = [(s, p) for s, p in self._schedule if s < start] + [(start, w)]
        return start

    # -- drawing -------------------------------------------------------------------------------------
    def _perm(self, d: int) -> np.ndarray:
        epoch = int(self._epochs[d])
        cached = self._perms.get(d)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, 7919, d, epoch])
            dtype = np.int32 if self.sizes[d] < 2**31 else np.int64
            cached = (epoch, rng.permutation(self.sizes[d]).astype(dtype))
            self._perms[d] = cached
        return cached[1]

    def draw_global_batch(self) -> list[int]:
        """Draw the next global batch (all ranks' samples), advancing the state."""
        j = self._next_batch
        self._snapshots[j] = (self._positions.copy(), self._epochs.copy())
        while len(self._snapshots) > self.lag + 64:
            self._snapshots.popitem(last=False)
        rng = np.random.default_rng([self.seed, j])
        domains = rng.choice(self.k, size=self.global_batch_size, p=self.proportions_at(j))
        batch = []
        for d in domains:
            if self._positions[d] >= self.sizes[d]:
                if self.on_exhausted == "stop":
                    raise DomainExhausted(
                        f"domain {self.domains[d]!r} has no unseen sequences left after {self._epochs[d] + 1} "
                        f"pass(es) over its {self.sizes[d]} sequences; prepare more data, shorten the run or set "
                        "data.on_exhausted=repeat"
                    )
                self._epochs[d] += 1
                self._positions[d] = 0
                log.warning(
                    "domain %r exhausted at batch %d; starting pass %d over its %d sequences",
                    self.domains[d], j, self._epochs[d] + 1, self.sizes[d],
                )
            batch.append(int(self.offsets[d] + self._perm(d)[self._positions[d]]))
            self._positions[d] += 1
        self._next_batch += 1
        return batch

    def __len__(self) -> int:
        raise TypeError("DomainBatchSampler is endless; give max_duration in batches or tokens")

    def set_epoch(self, epoch: int) -> None:
        """No-op: the stream of batches is endless and depends only on the seed and batch index."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.per_rank
        while True:
            yield self.draw_global_batch()[lo : lo + self.per_rank]

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self, num_samples: int) -> dict[str, Any]:
        """State as of ``num_samples`` consumed samples (global), ignoring batches only prefetched."""
        consumed = num_samples // self.global_batch_size
        if consumed == self._next_batch:
            positions, epochs = self._positions, self._epochs
        elif consumed in self._snapshots:
            positions, epochs = self._snapshots[consumed]
        else:
            raise RuntimeError(
                f"cannot checkpoint the sampler at batch {consumed}: it has drawn {self._next_batch} batches and "
                f"keeps snapshots for {list(self._snapshots)[:1]}..{list(self._snapshots)[-1:]}"
            )
        return {
            "next_batch": consumed,
            "positions": positions.tolist(),
            "epochs": epochs.tolist(),
            "schedule": [(s, p.tolist()) for s, p in self._schedule],
            "seed": self.seed,
            "sizes": self.sizes.tolist(),
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sizes"] != self.sizes.tolist():
            raise ValueError(
                f"checkpoint was written for domain sizes {state['sizes']}, this dataset has {self.sizes.tolist()}; "
                "resume with the same prepared data"
            )
        if state["global_batch_size"] != self.global_batch_size:
            raise ValueError(
                f"checkpoint used global_train_batch_size={state['global_batch_size']}, this run "
                f"{self.global_batch_size}; resume with the same global batch size"
            )
        self.seed = state["seed"]
        self._next_batch = int(state["next_batch"])
        self._positions = np.asarray(state["positions"], dtype=np.int64)
        self._epochs = np.asarray(state["epochs"], dtype=np.int64)
        self._schedule = [(int(s), np.asarray(p, dtype=np.float64)) for s, p in state["schedule"]]
        self._snapshots.clear()
        self._perms.clear()
