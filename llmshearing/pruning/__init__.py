"""Targeted structured pruning: hard-concrete masks, hooks that apply them, materialisation."""

from llmshearing.pruning.hooks import MaskHooks, attach_masks
from llmshearing.pruning.masks import DeterministicMasks, HardConcrete, ShearingMasks
from llmshearing.pruning.materialize import materialize, prune_state_dict, pruned_config
from llmshearing.pruning.target import resolve_target

__all__ = [
    "DeterministicMasks",
    "HardConcrete",
    "MaskHooks",
    "ShearingMasks",
    "attach_masks",
    "materialize",
    "prune_state_dict",
    "pruned_config",
    "resolve_target",
]
