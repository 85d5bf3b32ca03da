"""Composer callbacks of the recipe (one per file)."""

from llmshearing.callbacks.checkpoint_metadata import CheckpointMetadata
from llmshearing.callbacks.domain_loss_monitor import DomainLossMonitor
from llmshearing.callbacks.dynamic_loading import DynamicLoading, doremi_update
from llmshearing.callbacks.loss_guard import LossGuard, NonFiniteLoss
from llmshearing.callbacks.metrics_file import MetricsFile, read_metrics

__all__ = ["CheckpointMetadata", "DomainLossMonitor", "DynamicLoading", "LossGuard", "MetricsFile", "NonFiniteLoss", "doremi_update", "read_metrics"]
