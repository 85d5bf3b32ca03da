"""Per-domain MDS token datasets, read through mosaicml-streaming, with random access by global index.

One :class:`~streaming.StreamingDataset` holds one ``Stream`` per domain (local directory, or a remote
object-store prefix cached locally), so shard download, caching and integrity checks are streaming's.
The project never iterates it in streaming's own order: the :class:`~llmshearing.data.sampler.DomainBatchSampler`
decides, in the main process, which global sample indices make up each batch (that is what lets
domain proportions change mid-run with any number of workers), and workers only fetch by index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from streaming import Stream, StreamingDataset

from llmshearing.data.prepare import MANIFEST, SPLITS, read_manifest

__all__ = ["DomainTokenDataset", "load_manifest"]

log = logging.getLogger(__name__)


def load_manifest(local: str, remote: Optional[str] = None) -> dict:
    """Read ``manifest.json`` from ``local``, fetching it from ``remote`` first when given and missing.

    Every process that finds it missing (the ranks of a node start together) fetches its own copy under a name of
    its own and renames it into place: no process reads another's half-written file, and identical copies replacing
    each other are harmless. No collective: ranks of other nodes, or of a node whose cache has it, skip the fetch.
    """
    path = Path(local) / MANIFEST
    if remote is not None and not path.is_file():
        import uuid

        from streaming.base.storage import CloudDownloader

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MANIFEST}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            # streaming's own downloaders (s3://, gs://, oci://, hf://, a local path, ...): the same as the shards
            CloudDownloader.direct_download(f"{remote.rstrip('/')}/{MANIFEST}", str(tmp), timeout=60)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return read_manifest(local)


# One StreamingDataset per (dataset version, split, domains) and process. streaming never frees a dataset's
# shared memory while the process lives, and every new StreamingDataset opens (and keeps) a handle on every
# earlier one's while it looks for a free name: building one per evaluation leaked thousands of file
# descriptors over a benchmark. Reads are by index, so one instance serves every user in the process.
_STREAMING: dict[tuple, StreamingDataset] = {}


def _streaming_dataset(local: str, remote: Optional[str], split: str, domains: tuple[str, ...]) -> StreamingDataset:
    # the manifest's and local shard indexes' contents name the dataset's version (a dataset prepared again from
    # other inputs or settings, compression included, has another); not time stamps, which every rank's fetch of
    # the same remote manifest renews
    version = hashlib.sha1((Path(local) / MANIFEST).read_bytes())
    for d in domains if remote is None else ():  # a remote's indexes arrive with the dataset: its manifest names it
        index = Path(local) / split / d / "index.json"
        version.update(index.read_bytes() if index.is_file() else b"")  # none: streaming says what is missing
    version = version.hexdigest()
    key = (str(Path(local).resolve()), remote, split, domains, version)
    if key not in _STREAMING:
        streams = [
            Stream(
                local=str(Path(local) / split / d),
                remote=None if remote is None else f"{remote.rstrip('/')}/{split}/{d}",
            )
            for d in domains
        ]
        with _registering_shared_memory():
            _STREAMING[key] = StreamingDataset(streams=streams, shuffle=False, batch_size=1, replication=None)
    return _STREAMING[key]


# Where runs on one machine take turns registering shared memory: beside the names it protects (a node's /dev/shm;
# ranks of one job on other nodes have their own), readable by every user (a run cannot create the file, or open it
# to write, when another user made it: read-only is enough for a lock).
_REGISTRY_LOCK = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()) / "llmshearing_streaming.lock"
_REGISTRY_WAIT_S = 120.0


def _open_registry_lock() -> Optional[int]:
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            fd = os.open(_REGISTRY_LOCK, flags, 0o666)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)  # past the umask, for the next user's runs (fails harmlessly on another's file)
        return fd
    return None


@contextlib.contextmanager
def _registering_shared_memory() -> Iterator[None]:
    """One run on this machine at a time registers its datasets' shared memory.

    streaming names a dataset's shared memory by the first free prefix number, which every rank finds by probing, and
    the local leader then creates: two runs that start together (a sweep of single-GPU jobs on one node) find the same
    number and the later one fails with ``FileExistsError: '/000000_locals'``. Each node's local leader takes an
    exclusive lock, then every rank waits at a barrier, so all of a run's ranks probe while no other run on their node
    registers. A lock not free within two minutes (a run stuck holding it; two multi-node runs that wait on each
    other's nodes) is skipped with a warning, leaving streaming's own behaviour."""
    import torch.distributed as tdist
    from streaming.base.world import World

    fd = _open_registry_lock() if World.detect().is_local_leader else None
    locked = False
    if fd is not None:
        deadline = time.monotonic() + _REGISTRY_WAIT_S
        while not locked:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("%s was held for %.0f s by another run; registering streaming's shared memory without "
                                "it (runs that start at the same moment may collide)", _REGISTRY_LOCK, _REGISTRY_WAIT_S)
                    break
                time.sleep(0.05)
    try:
        if tdist.is_available() and tdist.is_initialized():
            tdist.barrier()  # the other ranks probe for a free name only once their node's leader holds the lock
        yield
    finally:
        if fd is not None:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class DomainTokenDataset(torch.utils.data.Dataset):
    """Fixed-length token sequences of several domains, addressed by one global index.

    Global indices are laid out domain after domain, in ``domains`` order. Items are
    ``{"input_ids": (max_seq_len,) long, "domain_id": int, "sample_index": int}``.

    Args:
        local: prepared dataset root (see :mod:`llmshearing.data.prepare`).
        split: ``train``, ``val`` (evaluated during training) or ``test`` (for reported results).
        domains: domains, in the order that defines ``domain_id``.
        max_seq_len: sequence length to return (a prefix of the stored sequences).
        remote: optional remote root of the same layout (``local`` is then the cache).
        manifest: the dataset manifest, if already read.
    """

    def __init__(
        self,
        local: str,
        split: str,
        domains: Sequence[str],
        max_seq_len: int,
        remote: Optional[str] = None,
        manifest: Optional[dict] = None,
    ) -> None:
        manifest = manifest or load_manifest(local, remote)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; a prepared dataset has {list(SPLITS)}")
        known = list(manifest["domains"])
        missing = [d for d in domains if d not in known]
        if missing:
            raise ValueError(
                f"domains {missing} are not in the prepared dataset {local} (it has {known}); "
                "fix data.domains or prepare those domains"
            )
        if max_seq_len > manifest["seq_len"]:
            raise ValueError(
                f"data.max_seq_len={max_seq_len} is longer than the prepared sequences ({manifest['seq_len']} "
                f"tokens in {local}); lower data.max_seq_len or re-run data prep with --seq-len {max_seq_len}"
            )
        self.domains = list(domains)
        self.split = split
        self.max_seq_len = max_seq_len
        counts = [manifest["domains"][d][split]["sequences"] for d in self.domains]
        empty = [d for d, n in zip(self.domains, counts) if n == 0]
        if empty:
            raise ValueError(
                f"the {split} split of domains {empty} is empty in {local}; re-run data prep with more text, a "
                "larger --val-fraction / --test-fraction"
            )
        self._streaming = _streaming_dataset(local, remote, split, tuple(self.domains))
        self.sizes = np.asarray(self._streaming.samples_per_stream, dtype=np.int64)
        self.offsets = np.asarray(self._streaming.sample_offset_per_stream, dtype=np.int64)
        if self.sizes.tolist() != counts:
            raise ValueError(
                f"{local}/{split}: the MDS indexes hold {self.sizes.tolist()} sequences per domain but the manifest "
                f"says {counts}; the dataset is incomplete or was modified — prepare it again"
            )

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def domain_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right") - 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        padding = index >= n  # evaluation padding (see loaders.EvalSampler): a real sample, counted by no metric
        index = int(index) % n
        tokens = self._streaming[index]["tokens"][: self.max_seq_len]
        return {
            "input_ids": torch.from_numpy(tokens.astype(np.int64)),
            "domain_id": -1 if padding else self.domain_of(index),
            "sample_index": index,
        }

    # Composer saves the train dataset's state with the checkpoint and restores it on resume; the
    # position lives in the batch sampler, attached by ``build_train_dataloader``.
    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        sampler = getattr(self, "batch_sampler", None)
        return {} if sampler is None else sampler.state_dict(num_samples)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = getattr(self, "batch_sampler", None)
        if sampler is not None and state:
            sampler.load_state_dict(state)

    def __getstate__(self) -> dict[str, Any]:
        # Workers only fetch samples; they never need the sampler (and must not drag its arrays along).
        state = dict(self.__dict__)
        state.pop("batch_sampler", None)
        return state

