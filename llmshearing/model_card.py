"""Provenance (``llmshearing.json``) and a Hugging Face model card (``README.md``) for every export.

``llmshearing.json`` records the base model and each stage that made the export (pruning: source and target shapes
and tokens; continued pre-training: tokens), carrying over the stages of a source that was itself an llmshearing
export. The card is Hub metadata (``base_model``, ``license`` when the source's is known, ``tags``,
``pipeline_tag``, ``library_name``) and a body: the shape before and after, parameter counts, tokens per stage, and
the run's last per-domain validation losses when its ``metrics.jsonl`` is at hand. It parses with
``huggingface_hub.ModelCard`` (:func:`validate_card`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

__all__ = ["build_card", "provenance_of", "validate_card", "KNOWN_LICENSES"]

# licenses of the sources the project ships short names for (their packages say so)
KNOWN_LICENSES = {"smollm2": "apache-2.0", "gemma3-270m": "gemma"}
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def _source_license(source: Optional[str]) -> Optional[str]:
    """The license in the source's own card (``README.md`` front matter), or a known short name's."""
    if source is None:
        return None
    if source in KNOWN_LICENSES:
        return KNOWN_LICENSES[source]
    card = Path(source) / "README.md"
    if card.is_file():
        m = re.match(r"^---\n(.*?)\n---", card.read_text(errors="replace"), re.S)
        if m:
            lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M)
            if lic:
                return lic.group(1).strip("'\"")
    return None


def provenance_of(meta: dict[str, Any], state: dict[str, Any], source_shape: dict[str, int],
                  shape: dict[str, int], params: int, source_params: int) -> dict[str, Any]:
    """``llmshearing.json`` of an export: the source's stages (if it was an llmshearing export) plus this one."""
    earlier = meta.get("source_provenance") or {}
    base = earlier.get("base_model") or meta.get("source")
    ts = state.get("timestamp") or {}
    ts = ts.get("Timestamp", ts)  # Composer nests it under the class name
    run = meta.get("run") or {}
    stage = {"stage": meta.get("stage", "training"), "tokens": int(ts.get("token", 0)), "batches": int(ts.get("batch", 0)),
             "from": meta.get("source"),
             "llmshearing_version": run.get("llmshearing_version"), "commit": run.get("commit"), "seed": run.get("seed"),
             "data": run.get("data"), "config": run.get("config"),
             "shape_before": {k: source_shape.get(k) for k in SHAPE_KEYS},
             "shape_after": {k: shape.get(k) for k in SHAPE_KEYS},
             "parameters_before": source_params, "parameters_after": params, "domains": meta.get("domains"),
             "distillation": meta.get("distillation")}
    return {"base_model": base, "license": earlier.get("license") or _source_license(meta.get("source")),
            "stages": [*earlier.get("stages", []), stage]}


def _hub_id(base: Optional[str]) -> Optional[str]:
    """``base_model`` metadata must be a Hub id (``org/name``); a local path or short name is named in the body."""
    if base and re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists():
        return base
    return None


_STAGE_WORDS = {"pruning": "targeted structured pruning with learned masks",
                "activation_selection": "one-shot structured pruning by activation importance with continued "
                                        "pre-training",
                "magnitude_selection": "one-shot structured pruning by weight magnitude with continued pre-training",
                "random_selection": "one-shot random structured pruning with continued pre-training",
                "continued_pretraining": "continued pre-training", "training": "training from random initialisation"}


def build_card(provenance: dict[str, Any], family: str, eval_losses: Optional[dict[str, float]] = None,
               name: Optional[str] = None) -> str:
    """The model card text (YAML front matter + markdown); ``name``: the model's (its folder's) name."""
    from huggingface_hub import ModelCardData

    stages = provenance["stages"]
    first, last = stages[0], stages[-1]
    data = ModelCardData(
        base_model=_hub_id(provenance.get("base_model")),
        license=provenance.get("license"),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["llmshearing", "structured-pruning", "sheared-llama", family,
              *(["distillation"] if any(s.get("distillation") for s in stages) else [])],
    )
    before, after = first["shape_before"], last["shape_after"]
    base = provenance.get("base_model")
    made = ", then ".join(_STAGE_WORDS.get(s["stage"], s["stage"].replace("_", " ")) for s in stages)
    origin = f"from `{base}`: {made}" if base else f"by {made}"
    title = name or f"{Path(str(base or 'model')).name}, sheared"
    ref = _hub_id(base) and name or name or "<this folder or Hub id>"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {title}",
        "",
        f"Made with llmshearing (LLM shearing, Xia et al., ICLR 2024) {origin}. It is a plain transformers model.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{ref}")',
        f'model = AutoModelForCausalLM.from_pretrained("{ref}")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
        "```",
        "",
        "| | layers | hidden | query heads | KV heads | FFN | parameters |",
        "|---|---|---|---|---|---|---|",
        f"| source | {before['num_hidden_layers']} | {before['hidden_size']} | {before['num_attention_heads']} | "
        f"{before['num_key_value_heads']} | {before['intermediate_size']} | {first['parameters_before'] / 1e6:.1f}M |",
        f"| this model | {after['num_hidden_layers']} | {after['hidden_size']} | {after['num_attention_heads']} | "
        f"{after['num_key_value_heads']} | {after['intermediate_size']} | {last['parameters_after'] / 1e6:.1f}M |",
        "",
        "| stage | tokens | steps | from |",
        "|---|---|---|---|",
        *(f"| {s['stage'].replace('_', ' ')} | {s['tokens']:,} | {s['batches']:,} | "
          f"{'`' + str(s['from']) + '`' if s.get('from') else 'random initialisation'} |" for s in stages),
    ]
    if eval_losses:
        lines += ["", "Validation loss per domain at the end of the last stage (nats/token, the run's own held-out "
                  "split):", "", "| domain | loss |", "|---|---|",
                  *(f"| {d} | {v:.3f} |" for d, v in eval_losses.items())]
    lines += ["", "Provenance (stages, tokens, package version and commit, seeds, run configs, data) in "
              "`llmshearing.json`."]
    return "\n".join(lines) + "\n"


def last_eval_losses(metrics_file: Path) -> Optional[dict[str, float]]:
    """The last logged ``metrics/eval/LanguageCrossEntropy_<domain>`` of a run's ``metrics.jsonl``."""
    if not metrics_file.is_file():
        return None
    from llmshearing.callbacks.metrics_file import read_metrics

    prefix = "metrics/eval/LanguageCrossEntropy_"
    logged = read_metrics(metrics_file)
    out = {k[len(prefix):]: v[max(v)] for k, v in logged.items() if k.startswith(prefix) and v}
    return out or None


def validate_card(path: Path) -> dict[str, Any]:
    """Parse a card with ``huggingface_hub.ModelCard`` (offline); returns its metadata. Raises on a bad card."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    meta = card.data.to_dict()
    missing = [k for k in ("pipeline_tag", "library_name", "tags") if not meta.get(k)]
    if missing:
        raise ValueError(f"model card {path} lacks {missing}")
    return meta


def write_provenance(out: Path, provenance: dict[str, Any]) -> None:
    (out / "llmshearing.json").write_text(json.dumps(provenance, indent=2) + "\n")
