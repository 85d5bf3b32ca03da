"""Composer algorithms of the recipe (one per file)."""

from llmshearing.algorithms.l0_pruning import L0Pruning

__all__ = ["L0Pruning"]
