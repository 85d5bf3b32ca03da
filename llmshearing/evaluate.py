"""Per-domain loss / perplexity of any Hugging Face causal LM on a prepared evaluation split, and generation.

    python -m llmshearing.evaluate --model runs/quickstart/final_hf --data runs/quickstart/data
    python -m llmshearing.evaluate --model runs/quickstart/final_hf --generate "def fibonacci(n):"

The loss of a domain is the token-averaged next-token cross-entropy over its held-out sequences,
the same quantity training logs as ``LanguageCrossEntropy_<domain>``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llmshearing.data.dataset import DomainTokenDataset, load_manifest
from llmshearing.data.loaders import _round_robin
from llmshearing.models.composer_causal_lm import token_cross_entropy

__all__ = ["domain_losses", "generate", "load_model"]


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A Hugging Face model directory through plain transformers (no project code involved)."""
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory (no config.json); export a checkpoint first with "
            "`python scripts/export_hf.py --checkpoint <checkpoint.pt> --output <dir>`"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.no_grad()
def domain_losses(
    model: torch.nn.Module,
    data: str | Path,
    domains: Optional[Sequence[str]] = None,
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    max_sequences_per_domain: Optional[int] = None,
) -> dict[str, float]:
    """Token-averaged eval loss per domain (and ``"all"`` over every token) of ``model`` on ``data``'s eval split.

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
    ds = DomainTokenDataset(str(data), "eval", domains, seq_len, manifest=manifest)
    order = _round_robin(ds.sizes, ds.offsets, max_sequences_per_domain)
    device = next(model.parameters()).device
    sums, counts = np.zeros(len(domains)), np.zeros(len(domains))
    for start in range(0, len(order), batch_size):
        items = [ds[i] for i in order[start : start + batch_size]]
        ids = torch.stack([it["input_ids"] for it in items]).to(device)
        dom = torch.tensor([it["domain_id"] for it in items])
        logits = model(input_ids=ids).logits
        loss, valid = token_cross_entropy(logits, {"input_ids": ids})
        per_seq = (loss * valid).sum(1).double().cpu().numpy()
        n_seq = valid.sum(1).double().cpu().numpy()
        np.add.at(sums, dom.numpy(), per_seq)
        np.add.at(counts, dom.numpy(), n_seq)
    out = {d: float(s / c) for d, s, c in zip(domains, sums, counts)}
    out["all"] = float(sums.sum() / counts.sum())
    return out


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--data", help="prepared dataset root (data_prep/prepare_data.py output)")
    p.add_argument("--domains", nargs="*", help="domains to evaluate (default: all)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the data's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-sequences-per-domain", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the losses to this JSON file")
    p.add_argument("--generate", metavar="PROMPT", help="generate a continuation of PROMPT")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args(argv)
    if not args.data and not args.generate:
        p.error("give --data (per-domain loss) and/or --generate PROMPT")
    if args.data:
        model = load_model(args.model, args.device)
        losses = domain_losses(model, args.data, args.domains, args.seq_len, args.batch_size,
                               args.max_sequences_per_domain)
        print("| domain | loss | perplexity |\n|---|---|---|")
        for d, v in losses.items():
            print(f"| {d} | {v:.4f} | {math.exp(v):.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps(losses, indent=2))
    if args.generate:
        print(generate(args.model, args.generate, args.max_new_tokens, args.temperature))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
