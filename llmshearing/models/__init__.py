"""Models: transformers' own implementations of each LLaMA-family architecture, wrapped for Composer."""

from llmshearing.models.composer_causal_lm import ComposerCausalLM, DomainCrossEntropy
from llmshearing.models.families import FAMILIES, build_hf_model, describe_shape

__all__ = ["FAMILIES", "ComposerCausalLM", "DomainCrossEntropy", "build_hf_model", "describe_shape"]
