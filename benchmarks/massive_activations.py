"""Which residual (hidden) channels of the source carry massive activations, and which recorded selections kept them.

A few residual channels of LLaMA-family models reach activations hundreds of times the typical one; a selection that
drops such a channel breaks every layer that reads it. This reads the source's hidden states on a few sequences of
the RedPajama sample (one per domain), ranks the channels by their peak absolute value over layers, positions and
sequences, and says for each finished arm of ``benchmarks/real_model.py`` (its records) whether it kept the top
ones, beside the arm's test loss.

    python -m benchmarks.massive_activations                 # SmolLM2-135M, the records in benchmarks/records/real_model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import REDPAJAMA, REPO
from benchmarks.real_model import _mean_loss, _unpack


def peak_activations(source: str, data: Path, seq_len: int, domains: list[str]) -> np.ndarray:
    """Per residual channel: the peak |hidden state| over every layer's output, position and sequence (one sequence
    of ``seq_len`` tokens from the first document long enough in each domain)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.data.tokenizer import load_tokenizer

    tok = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    rows = []
    for d in domains:
        for f in sorted((data / d).glob("*.jsonl")):
            ids = next((t for t in (tok(json.loads(line)["text"])["input_ids"] for line in f.open())
                        if len(t) >= seq_len), None)
            if ids is not None:
                rows.append(ids[:seq_len])
                break
    if not rows:
        raise SystemExit(f"no document of {seq_len} tokens in {data} ({', '.join(domains)})")
    with torch.no_grad():
        states = model(input_ids=torch.tensor(rows), output_hidden_states=True).hidden_states[1:]
    return torch.stack(states).abs().amax(dim=(0, 1, 2)).numpy()


def kept_hidden(record: dict) -> np.ndarray | None:
    """The hidden channels an arm's selection kept (from its record's packed bits)."""
    for entry in record["stages"].values():
        keep = _unpack(entry)["result"].get("keep")
        if keep and "hidden" in keep:
            return np.asarray(keep["hidden"], bool)
    return None


def test_loss(record: dict) -> float:
    """The arm's mean test loss after its recovery."""
    return next((_mean_loss(e["result"], "test") for k, e in record["stages"].items() if k.startswith("recover_")),
                float("nan"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="smollm2", help="a GGUF short name, .gguf file or Hugging Face directory")
    p.add_argument("--data", default=str(REDPAJAMA))
    p.add_argument("--records", default=str(REPO / "benchmarks" / "records" / "real_model"))
    p.add_argument("--domains", nargs="+", default=["arxiv", "book", "github", "wiki"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top", type=int, default=8, help="channels reported")
    args = p.parse_args(argv)
    import torch

    from llmshearing.models.gguf import resolve_pretrained

    torch.set_num_threads(1)
    peak = peak_activations(str(resolve_pretrained(args.source)), Path(args.data), args.seq_len, args.domains)
    order = np.argsort(-peak, kind="stable")[: args.top]
    print(f"Peak |hidden state| per residual channel over {len(args.domains)} sequences of {args.seq_len} tokens: "
          f"median {np.median(peak):.1f}; top {args.top}: "
          + ", ".join(f"{int(i)} ({peak[i]:.0f})" for i in order))
    print("\n| arm | test loss | " + " | ".join(f"ch {int(i)}" for i in order) + " |")
    print("|---|---|" + "---|" * len(order))
    for f in sorted(Path(args.records).glob("*.json")):
        rec = json.loads(f.read_text())
        keep = kept_hidden(rec)
        if keep is None:
            continue
        cells = " | ".join("kept" if keep[i] else "**dropped**" for i in order)
        print(f"| {rec['arm']}, seed {rec['seed']} | {test_loss(rec):.4f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
