"""Data: preparation into MDS shards, per-domain datasets and the dynamic domain batch sampler."""

from llmshearing.data.dataset import DomainTokenDataset, load_manifest
from llmshearing.data.loaders import build_eval_dataloader, build_train_dataloader, calibration_batch, resolve_domains
from llmshearing.data.sampler import DomainBatchSampler, DomainExhausted

__all__ = [
    "DomainBatchSampler",
    "DomainExhausted",
    "DomainTokenDataset",
    "build_eval_dataloader",
    "build_train_dataloader",
    "calibration_batch",
    "load_manifest",
    "resolve_domains",
]
