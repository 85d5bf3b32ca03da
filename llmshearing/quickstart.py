"""The recipe at toy scale on CPU with no downloads (``bash scripts/quickstart.sh``).

Embedded corpus (Python's own sources, docstrings and language reference as three domains) ->
small SentencePiece tokenizer -> MDS shards -> pre-train a small source LLaMA -> prune it to half
its size with learned masks -> export Hugging Face models -> print a table. Artefacts are cached
in ``--out``: a second run reuses the corpus, data and the trained source model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from llmshearing.data.embedded_corpus import build_embedded_corpus
from llmshearing.data.prepare import MANIFEST, prepare_dataset
from llmshearing.data.train_tokenizer import train_tokenizer
from llmshearing.export import export_checkpoint
from llmshearing.trainer import train_from_yaml

log = logging.getLogger("llmshearing.quickstart")
REPO = Path(__file__).resolve().parents[1]


def _losses(trainer) -> dict[str, float]:
    return {k.replace("LanguageCrossEntropy", "loss").strip("_") or "loss": float(v)
            for k, v in trainer.state.eval_metric_values.items() if k.startswith("LanguageCrossEntropy")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--source-steps", type=int, default=600)
    p.add_argument("--prune-steps", type=int, default=300)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    t0 = time.time()

    corpus = out / "corpus"
    if not corpus.exists():
        build_embedded_corpus(corpus, max_chars_per_domain=1_500_000)
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(corpus, tok, vocab_size=args.vocab_size)
    data = out / "data"
    if not (data / MANIFEST).exists():
        prepare_dataset(corpus, data, str(tok), 128, eval_fraction=0.05, max_doc_chars=4000, workers=2)
    common = [f"variables.data={data}", f"variables.vocab_size={args.vocab_size}", f"tokenizer={tok}",
              "console_log_interval=100ba", "progress_bar=false"]

    source = out / "source_hf"
    if not (source / "config.json").exists():
        run = out / "pretrain"
        trainer = train_from_yaml(str(REPO / "yamls/pretrain/tiny_cpu.yaml"), common + [
            f"variables.run_dir={run}", f"max_duration={args.source_steps}ba", f"eval_interval={args.source_steps}ba",
            f"save_interval={args.source_steps}ba", "eval_subset_num_batches=-1", "data.eval_sequences_per_domain=64"])
        (out / "source_losses.json").write_text(json.dumps(_losses(trainer)))
        trainer.close()
        export_checkpoint(run / "checkpoints" / "latest-rank0.pt", source, tokenizer=str(tok), overwrite=True)
    source_losses = json.loads((out / "source_losses.json").read_text())

    run = out / "prune"
    trainer = train_from_yaml(str(REPO / "yamls/prune/tiny_cpu.yaml"), common + [
        f"variables.run_dir={run}", f"variables.source={source}", f"max_duration={args.prune_steps}ba",
        f"eval_interval={args.prune_steps // 3}ba", f"save_interval={args.prune_steps}ba", "autoresume=false",
        "save_overwrite=true", "eval_subset_num_batches=-1", "data.eval_sequences_per_domain=64"])
    pruned_losses = _losses(trainer)
    trainer.close()
    pruned = export_checkpoint(run / "checkpoints" / "latest-rank0.pt", out / "pruned_hf", tokenizer=str(tok),
                               overwrite=True)

    from transformers import AutoModelForCausalLM

    n_src = AutoModelForCausalLM.from_pretrained(source).num_parameters()
    n_pruned = AutoModelForCausalLM.from_pretrained(pruned).num_parameters()
    rows = [("source", n_src, source_losses), ("pruned (learned masks, before continued pre-training)", n_pruned, pruned_losses)]
    domains = sorted(k for k in source_losses if k != "loss")
    print("\n| model | params | eval loss | " + " | ".join(domains) + " |")
    print("|---|---|---|" + "---|" * len(domains))
    for name, n, losses in rows:
        print(f"| {name} | {n / 1e6:.2f}M | {losses['loss']:.3f} | " + " | ".join(f"{losses[d]:.3f}" for d in domains) + " |")
    print(f"\nexported: {source} and {pruned}   ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
