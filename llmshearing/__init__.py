"""llmshearing: targeted structured pruning and dynamic batch loading (Sheared LLaMA) on Composer."""

__version__ = "0.1.0"
