"""Composer algorithms of the recipe (one per file)."""

from llmshearing.algorithms.global_grad_norm import GlobalGradNorm
from llmshearing.algorithms.l0_pruning import L0Pruning

__all__ = ["GlobalGradNorm", "L0Pruning"]
