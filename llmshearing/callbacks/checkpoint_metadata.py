"""Records what a checkpoint needs to be exported without the run's YAML: model config, tokenizer, domains."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Optional

from composer.core import Callback
from transformers import PretrainedConfig

__all__ = ["CheckpointMetadata", "check_same_shape"]


def check_same_shape(checkpoint_config: dict[str, Any], run_config: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every shape field where a checkpoint's model differs from this run's."""
    from llmshearing.models.families import SHAPE_FIELDS

    diff = {k: (checkpoint_config.get(k), run_config.get(k)) for k in SHAPE_FIELDS
            if checkpoint_config.get(k) != run_config.get(k)}
    if diff:
        raise ValueError(
            "the checkpoint is of a different model shape (checkpoint, this run): "
            + ", ".join(f"{k}={a} vs {b}" for k, (a, b) in diff.items())
            + "; resume with the same model config, or start a new run (another save_folder)"
        )


class CheckpointMetadata(Callback):
    """Stores the source model's transformers config, the tokenizer path and the domains in every checkpoint.

    Args:
        model_config: the transformers config of the trained (source) model.
        tokenizer: tokenizer path used for the data (copied into exports).
        domains: data domains of the run.
        source: ``model.pretrained`` as given (the model card's ``base_model`` when it is not an llmshearing export).
        provenance: the source's ``llmshearing.json`` when it is an llmshearing export (its own stages).
        stage: ``pruning``, ``continued_pretraining`` or ``training``.
        distillation: the teacher, when the run distils.
        run: what else an export's provenance records: package version and commit, seed, the resolved run config,
            the data's identity (manifest hash, domains, tokenizer) and the source's declared dtype.

    Logs nothing. On resume, a checkpoint of a different model shape is refused.
    """

    def __init__(self, model_config: PretrainedConfig, tokenizer: Optional[str], domains: Sequence[str],
                 source: Optional[str] = None, provenance: Optional[dict[str, Any]] = None,
                 stage: str = "training", distillation: Optional[str] = None,
                 run: Optional[dict[str, Any]] = None) -> None:
        self.model_config = model_config.to_dict()
        self.tokenizer = tokenizer
        self.domains = list(domains)
        self.source, self.provenance, self.stage, self.distillation = source, provenance, stage, distillation
        self.run = run or {}

    def state_dict(self) -> dict[str, Any]:
        # A fresh copy with JSON's string keys: a sharded checkpoint is loaded *into* the returned dict, which
        # must not be this callback's own (an int key 0 beside a loaded "0" made the next save fail).
        return json.loads(json.dumps(
            {"hf_config": self.model_config, "tokenizer": self.tokenizer, "domains": self.domains,
             "source": self.source, "source_provenance": self.provenance, "stage": self.stage,
             "distillation": self.distillation, "run": self.run}))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_shape(state.get("hf_config", {}), self.model_config)
