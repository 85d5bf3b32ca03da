"""Composer callbacks of the recipe (one per file)."""

from llmshearing.callbacks.checkpoint_metadata import CheckpointMetadata
from llmshearing.callbacks.domain_loss_monitor import DomainLossMonitor
from llmshearing.callbacks.dynamic_loading import DynamicLoading, doremi_update

__all__ = ["CheckpointMetadata", "DomainLossMonitor", "DynamicLoading", "doremi_update"]
