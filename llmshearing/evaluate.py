"""Per-domain loss / perplexity of any Hugging Face causal LM on a prepared held-out split, and generation.

    python -m llmshearing.evaluate --model runs/quickstart/final_hf --data runs/quickstart/data
    python -m llmshearing.evaluate --model runs/quickstart/final_hf --generate "def fibonacci(n):"
    python -m llmshearing.evaluate --model src=<dir> --model sheared=<dir> --tasks shearing_offline --data <prepared>

The loss of a domain is the token-averaged next-token cross-entropy over its held-out sequences,
the same quantity training logs as ``LanguageCrossEntropy_<domain>`` (training evaluates the ``val``
split; this reports on ``test`` unless told otherwise).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llmshearing.data.dataset import DomainTokenDataset, load_manifest
from llmshearing.data.loaders import _round_robin
from llmshearing.data.prepare import PACKING
from llmshearing.models.composer_causal_lm import token_cross_entropy

log = logging.getLogger(__name__)

__all__ = ["domain_losses", "generate", "load_model", "paired_difference", "sequence_documents", "sequence_losses"]


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A Hugging Face model directory through plain transformers (no project code involved); a GGUF source
    (``.gguf`` file or short name) is converted once into the cache first."""
    from transformers import AutoModelForCausalLM

    from llmshearing.models.gguf import resolve_pretrained

    path = resolve_pretrained(str(path))
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory (no config.json); export a checkpoint first with "
            "`python scripts/export_hf.py --checkpoint <checkpoint.pt> --output <dir>`"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.no_grad()
def sequence_losses(
    model: torch.nn.Module,
    data: str | Path,
    split: str = "test",
    domains: Optional[Sequence[str]] = None,
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    max_sequences_per_domain: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """Mean next-token loss of every evaluated sequence, per domain, in a fixed order (the same for any model,
    so two models' arrays pair up sequence by sequence: see :func:`paired_difference`).

    Raises:
        ValueError: the data's vocabulary does not fit the model's, or a domain is unknown or empty.
    """
    manifest = load_manifest(str(data))
    n_tok, n_model = manifest["tokenizer"]["vocab_size"], model.config.vocab_size
    if n_tok > n_model:
        raise ValueError(
            f"{data} was tokenized with a {n_tok}-token vocabulary but the model has {n_model}; "
            "evaluate on data prepared with the model's own tokenizer"
        )
    domains = list(domains) if domains else list(manifest["domains"])
    seq_len = seq_len or manifest["seq_len"]
    ds = DomainTokenDataset(str(data), split, domains, seq_len, manifest=manifest)
    order = _round_robin(ds.sizes, ds.offsets, max_sequences_per_domain)
    device = next(model.parameters()).device
    out: dict[int, list[float]] = {k: [] for k in range(len(domains))}
    for start in range(0, len(order), batch_size):
        items = [ds[i] for i in order[start : start + batch_size]]
        ids = torch.stack([it["input_ids"] for it in items]).to(device)
        logits = model(input_ids=ids).logits
        loss, valid = token_cross_entropy(logits, {"input_ids": ids})
        per_seq = ((loss * valid).sum(1) / valid.sum(1)).double().cpu().numpy()
        for it, v in zip(items, per_seq):
            out[it["domain_id"]].append(float(v))
    return {d: np.asarray(out[k]) for k, d in enumerate(domains)}


def sequence_documents(
    data: str | Path,
    split: str = "test",
    domains: Optional[Sequence[str]] = None,
    max_sequences_per_domain: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """The document each evaluated sequence starts in, per domain, in :func:`sequence_losses`' order (documents are
    packed ``[BOS] tokens [EOS]`` in order: see :func:`starting_documents`). Sequences of one document are
    correlated: cluster by these ids. A domain whose split is the tail of one long document
    (``document_disjoint: false``) has one id for all."""
    manifest = load_manifest(str(data))
    eos = manifest["tokenizer"].get("eos_token_id")
    if eos is None:
        raise ValueError(f"{data}: the manifest records no end-of-document token; documents cannot be told apart")
    bos = manifest["tokenizer"].get("bos_token_id")
    if manifest.get("max_doc_chars") and manifest.get("document_marks") != PACKING["document_marks"]:
        log.warning("%s was prepared with max_doc_chars=%s by an llmshearing that marked every piece of a cut "
                    "document with its own BOS/EOS: the ids here are pieces, not documents, so standard errors "
                    "clustered by them are too small; prepare the data again for document ids", data,
                    manifest["max_doc_chars"])
    domains = list(domains) if domains else list(manifest["domains"])
    ds = DomainTokenDataset(str(data), split, domains, manifest["seq_len"], manifest=manifest)
    out = {}
    for k, d in enumerate(domains):
        n = int(ds.sizes[k]) if max_sequences_per_domain is None else min(int(ds.sizes[k]), max_sequences_per_domain)
        seqs = [ds[int(ds.offsets[k]) + i]["input_ids"].numpy() for i in range(n)]
        out[d] = starting_documents(seqs, eos, bos)
    return out


def starting_documents(sequences: Sequence[np.ndarray], eos: int, bos: Optional[int] = None) -> np.ndarray:
    """Index of the document each of consecutive ``sequences`` (cut from one stream of ``[BOS] tokens [EOS]``
    documents) starts in: the end-of-document tokens before its first token. When BOS and EOS are the same token
    (SmolLM2's ``<|endoftext|>``) each document holds two of them, BOS then EOS, so the count is halved: a sequence
    that starts on a document's BOS belongs to that document, not to a document of its own."""
    per_document = 2 if bos is not None and bos == eos else 1
    marks = [int((np.asarray(s) == eos).sum()) for s in sequences]
    before = np.concatenate([[0], np.cumsum(marks)[:-1]]).astype(np.int64) if marks else np.zeros(0, np.int64)
    return before // per_document


def domain_losses(
    model: torch.nn.Module,
    data: str | Path,
    domains: Optional[Sequence[str]] = None,
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    max_sequences_per_domain: Optional[int] = None,
    split: str = "test",
) -> dict[str, float]:
    """Token-averaged loss per domain (and ``"all"`` over every token) of ``model`` on ``data``'s ``split``
    (``test`` for reported results; ``val`` for anything that tunes, such as reference losses)."""
    per = sequence_losses(model, data, split, domains, seq_len, batch_size, max_sequences_per_domain)
    out = {d: float(v.mean()) for d, v in per.items()}  # every sequence has the same number of tokens
    out["all"] = float(np.concatenate(list(per.values())).mean())
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, block: int = 8) -> tuple[float, float]:
    """Mean of ``a - b`` over paired sequences and its standard error.

    Consecutive sequences of a domain come from the same or neighbouring documents and are correlated, so
    the error is the batch-means estimate over blocks of ``block`` consecutive sequences, or the plain
    per-sequence one when that is larger (it is with fewer than ~4 blocks' worth of correlation).
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), float("nan")
    se = d.std(ddof=1) / np.sqrt(len(d))
    n_blocks = len(d) // block
    if n_blocks >= 2:
        means = d[: n_blocks * block].reshape(n_blocks, block).mean(1)
        se = max(se, means.std(ddof=1) / np.sqrt(n_blocks))
    return float(d.mean()), float(se)


@torch.no_grad()
def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
    """Generate a continuation of ``prompt`` with plain transformers (greedy when ``temperature == 0``)."""
    from transformers import AutoTokenizer

    model = load_model(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    inputs = tok(prompt, return_tensors="pt")
    kwargs = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id, **kwargs)
    return tok.decode(ids[0], skip_special_tokens=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from llmshearing.cli import run

    return run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from llmshearing.cli import parser

    p = parser(__doc__, prog="python -m llmshearing.evaluate")
    p.add_argument("--model", required=True, action="append",
                   help="Hugging Face model directory, or NAME=DIR; repeat to compare models side by side (--tasks)")
    p.add_argument("--data", help="prepared dataset root (data_prep/prepare_data.py output)")
    p.add_argument("--split", default="test", choices=["val", "test"],
                   help="held-out split: test (reported results, default) or val (what training tuned on)")
    p.add_argument("--domains", nargs="*", help="domains to evaluate (default: all)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the data's)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--max-sequences-per-domain", type=int,
                   help="evaluate the first N sequences of each domain (default: all of them)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    p.add_argument("--json", help="also write the losses to this JSON file")
    p.add_argument("--generate", metavar="PROMPT", help="generate a continuation of PROMPT")
    p.add_argument("--max-new-tokens", type=int, default=64, help="with --generate: tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="with --generate: 0 is greedy")
    p.add_argument("--tasks", nargs="*", default=None,
                   help="lm-evaluation-harness tasks: shearing_offline (built from --data's test split, no network), "
                        "paper (the paper's list), or any lm-eval task name (needs the eval extra)")
    p.add_argument("--harness-json", help="write the lm-eval results of every model to this JSON file")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many documents per task")
    p.add_argument("--task-sequences", type=int, default=32, help="test sequences per domain in the offline tasks")
    args = p.parse_args(argv)
    if not args.data and not args.generate and not args.tasks:
        p.error("give --data (per-domain loss), --tasks (lm-evaluation-harness) and/or --generate PROMPT")
    models = dict(m.split("=", 1) if "=" in m else (Path(m).name, m) for m in args.model)
    if args.tasks:
        from llmshearing.harness import markdown_table, run_harness

        results = run_harness(models, args.tasks, args.data, args.batch_size,
                              "cuda" if args.device.startswith("cuda") else "cpu", args.limit, args.task_sequences)
        print(markdown_table(results))
        if args.harness_json:
            Path(args.harness_json).write_text(json.dumps({"models": models, "tasks": args.tasks, "limit": args.limit,
                                                           "results": results}, indent=2))
        return 0
    if len(models) > 1:
        p.error("several --model are compared with --tasks; give one model for --data / --generate")
    args.model = next(iter(models.values()))
    if args.data:
        model = load_model(args.model, args.device)
        losses = domain_losses(model, args.data, args.domains, args.seq_len, args.batch_size,
                               args.max_sequences_per_domain, split=args.split)
        tail = set(load_manifest(str(args.data)).get("not_document_disjoint", []))
        cap = f"first {args.max_sequences_per_domain}" if args.max_sequences_per_domain else "all"
        print(f"{args.split} split, {cap} sequences of each domain; loss in nats/token")
        print("| domain | loss | perplexity |\n|---|---|---|")
        for d, v in losses.items():
            print(f"| {d}{' *' if d in tail else ''} | {v:.4f} | {math.exp(v):.2f} |")
        if tail & set(losses):
            print("* held out as the tail of the domain's documents (too few documents for a document-level split): "
                  "training read the same documents' earlier text")
        if args.json:
            Path(args.json).write_text(json.dumps(losses, indent=2))
    if args.generate:
        print(generate(args.model, args.generate, args.max_new_tokens, args.temperature))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
