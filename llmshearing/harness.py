"""lm-evaluation-harness for sheared models: the paper's downstream tasks, and an offline task set built from a
prepared dataset's *test* split (no network).

Offline tasks (written as lm-eval task YAMLs over local JSON-lines files in a temporary folder):

| task | what | metric |
| --- | --- | --- |
| ``shearing_ppl_<domain>`` | rolling log-likelihood of whole test sequences, decoded to text | word / byte perplexity, bits per byte |
| ``shearing_continuation_<domain>`` | a passage (the first half of a test sequence) and 4 continuations: its own next tokens and those of 3 other test sequences of the domain; pick the true one | accuracy (chance 0.25), length-normalised accuracy |
| ``shearing_offline`` | the group of all of them | |

The paper's tasks (``--tasks paper``): ARC-easy/challenge, HellaSwag, PIQA, WinoGrande, SciQ, LogiQA, BoolQ,
LAMBADA, NQ, MMLU (need the network for their datasets). Requires the ``eval`` extra: ``pip install -e '.[eval]'``.

    python -m llmshearing.evaluate --model source=models/src --model sheared=models/sheared \\
        --tasks shearing_offline --data /data/rp_mds --harness-json runs/eval.json
"""

from __future__ import annotations

import importlib.util
import json
import random
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["PAPER_TASKS", "build_offline_tasks", "run_harness", "markdown_table"]

PAPER_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "sciq", "logiqa", "boolq",
               "lambada_openai", "nq_open", "mmlu"]
OFFLINE_GROUP = "shearing_offline"


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError("lm-evaluation-harness is not installed: pip install -e '.[eval]' (it pins lm_eval 0.4.13 "
                          "with a huggingface_hub that transformers 4.57 accepts)")


def _test_texts(data: str | Path, domain: str, n: int) -> list[list[int]]:
    from llmshearing.data import DomainTokenDataset, load_manifest

    manifest = load_manifest(str(data))
    ds = DomainTokenDataset(str(data), "test", [domain], manifest["seq_len"], manifest=manifest)
    return [ds[i]["input_ids"].tolist() for i in range(min(n, len(ds)))]


def build_offline_tasks(data: str | Path, out: str | Path, sequences: int = 32, continuation_tokens: int = 32,
                        seed: int = 0, domains: Optional[Sequence[str]] = None) -> list[str]:
    """Write the offline task YAMLs and data under ``out``; returns the task names (the group is
    ``shearing_offline``). Texts are decoded with the dataset's tokenizer from its test split."""
    from llmshearing.data import load_manifest
    from llmshearing.data.tokenizer import load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(str(data))
    tok = load_tokenizer(manifest["tokenizer"]["path"])
    rng = random.Random(seed)
    names = []
    for d in domains or list(manifest["domains"]):
        seqs = _test_texts(data, d, sequences)
        if len(seqs) < 4:
            continue
        ppl = [{"text": tok.decode(s, skip_special_tokens=True)} for s in seqs]
        half = len(seqs[0]) // 2
        items = []
        for i, s in enumerate(seqs):
            others = rng.sample([j for j in range(len(seqs)) if j != i], 3)
            conts = [s[half : half + continuation_tokens]] + [seqs[j][half : half + continuation_tokens] for j in others]
            order = list(range(4))
            rng.shuffle(order)
            items.append({"passage": tok.decode(s[:half], skip_special_tokens=True),
                          "choices": [tok.decode(conts[k], skip_special_tokens=True) for k in order],
                          "label": order.index(0)})
        for kind, rows in (("ppl", ppl), ("continuation", items)):
            path = out / f"{kind}_{d}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            name = f"shearing_{kind}_{d}"
            common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
                      "test_split": "test"}
            if kind == "ppl":
                cfg = {**common, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                       "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}
            else:
                cfg = {**common, "output_type": "multiple_choice", "doc_to_text": "passage",
                       "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
                       "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                       {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
            (out / f"{name}.yaml").write_text(json.dumps(cfg, indent=1))  # JSON is YAML
            names.append(name)
    (out / f"{OFFLINE_GROUP}.yaml").write_text(json.dumps({"group": OFFLINE_GROUP, "task": names}, indent=1))
    return names


def run_harness(models: dict[str, str], tasks: Sequence[str], data: Optional[str] = None, batch_size: int = 8,
                device: str = "cpu", limit: Optional[int] = None, sequences: int = 32) -> dict[str, Any]:
    """lm-eval ``simple_evaluate`` of every model on ``tasks`` (``shearing_offline`` needs ``data``; ``paper`` expands
    to the paper's list). Returns ``{model: {task: {metric: value}}}``."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [t for name in tasks for t in (PAPER_TASKS if name == "paper" else [name])]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        include = None
        if any(t.startswith("shearing_") for t in tasks):
            if data is None:
                raise ValueError("the offline tasks are built from a prepared dataset's test split: give --data")
            names = build_offline_tasks(data, tmp, sequences=sequences)
            tasks = [t for name in tasks for t in (names if name == OFFLINE_GROUP else [name])]
            include = tmp
        manager = TaskManager(include_path=include)
        for label, path in models.items():
            out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32", tasks=list(tasks),
                                          task_manager=manager, batch_size=batch_size, device=device, limit=limit,
                                          log_samples=False)
            # "acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr"; non-numeric entries (aliases) dropped
            results[label] = {t: {k.split(",")[0]: v for k, v in r.items() if isinstance(v, (int, float))}
                              for t, r in out["results"].items()}
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """One row per task and metric, one column per model."""
    models = list(results)
    rows = sorted({(t, m) for r in results.values() for t, ms in r.items() for m in ms if not m.endswith("_stderr")})
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for t, m in rows:
        cells = []
        for name in models:
            v = results[name].get(t, {}).get(m)
            se = results[name].get(t, {}).get(f"{m}_stderr")
            cells.append("" if v is None else f"{v:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) else ""))
        lines.append(f"| {t} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
