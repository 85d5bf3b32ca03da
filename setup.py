"""Installable package for the llmshearing recipe."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements(name: str) -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-r"))]


setup(
    name="llmshearing",
    version="0.1.0",
    description="Sheared LLaMA: targeted structured pruning and dynamic batch loading as a Composer recipe",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llmshearing", "llmshearing.*"]),
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={
        "dev": ["pytest>=8"],
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],  # .gguf sources (llmshearing.models.gguf)
        # lm-evaluation-harness (llmshearing.evaluate --tasks): an unpinned lm_eval pulls huggingface_hub 2.x, which
        # transformers 4.57 refuses; this set resolves and runs with the pinned stack (README, "Evaluation")
        "eval": ["lm_eval==0.4.13", "huggingface_hub>=0.34,<1.0", "datasets>=4,<6", "accelerate>=1.0"],
        "gpu": ["flash-attn>=2.5", "accelerate>=1.0"],  # accelerate: a distillation teacher read onto each GPU
        # a Hugging Face dataset as data prep's input (llmshearing.data.hf_source); the hub pin as for the eval extra
        "hf": ["datasets>=4,<6", "huggingface_hub>=0.34,<1.0"],
        "wandb": ["wandb>=0.17"],  # loggers: {wandb: {project: ...}} (README, "Logging")
        "loggers": ["wandb", "mlflow", "tensorboard"],
        "plots": ["matplotlib"],
    },
)
