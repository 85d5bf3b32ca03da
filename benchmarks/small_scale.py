"""The small-scale setting shared by the CPU method benchmarks, with its expensive artefacts cached.

Data: the embedded corpus (Python's code, docstrings and language reference; present on any machine;
code and docstrings from disjoint source files), split by document into train / val / test (10% / 15%
held out), with a 2048-token SentencePiece tokenizer trained on the training split only, sequences of 128.
Training evaluates, and dynamic loading and any tuning read, ``val``; results are reported on ``test``.
Source: ``yamls/pretrain/small_cpu.yaml`` (1.33M parameters) trained for 2000 batches of 32 x 128 tokens
(8.2M tokens, ~6 tokens per parameter, ~10 minutes on 2 cores) and exported. Everything lands in ``--cache``
and is reused by later runs, so the source is trained once (METHOD.md: shearing can only pay off from a
well-trained source).

    python -m benchmarks.small_scale --cache runs/benchmarks/cache     # builds the cache only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import REPO  # noqa: E402

VOCAB = 2048
SEQ_LEN = 128
SOURCE_STEPS = 2000
CORPUS_CHARS = 6_000_000
SPLIT = dict(seed=0, val_fraction=0.10, test_fraction=0.15)
TEST_SEQUENCES = 4096  # per domain, at most: the reported test set, every test sequence of the three domains (2114 /
# 284 / 215; fixed before any run; see replication.py)
VAL_SEQUENCES = 1024  # per domain, at most: the validation sequences that set reference losses and choose rates


def common_overrides(cache: Path) -> list[str]:
    return [f"variables.data={cache / 'data'}", f"variables.vocab_size={VOCAB}", f"tokenizer={cache / 'tokenizer'}",
            "console_log_interval=250ba", "progress_bar=false", "data.eval_sequences_per_domain=128"]


def eval_losses(model_dir: Path, data: Path, split: str = "test") -> dict[str, float]:
    """Per-domain (and ``all``) loss of an exported model on the same held-out sequences (``TEST_SEQUENCES`` per
    domain at most) of ``split``: ``test`` for reported results, ``val`` for tuning."""
    from llmshearing.evaluate import domain_losses, load_model

    return domain_losses(load_model(model_dir), data, batch_size=64, max_sequences_per_domain=TEST_SEQUENCES,
                         split=split)


def ensure_data(cache: Path) -> Path:
    from llmshearing.data.embedded_corpus import build_embedded_corpus
    from llmshearing.data.prepare import MANIFEST, PACKING, prepare_dataset
    from llmshearing.data.train_tokenizer import train_tokenizer

    corpus, tok, data = cache / "corpus", cache / "tokenizer", cache / "data"
    if not corpus.exists():
        build_embedded_corpus(corpus, max_chars_per_domain=CORPUS_CHARS)
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(corpus, tok, vocab_size=VOCAB, **SPLIT)  # training documents only
    if not (data / MANIFEST).exists():
        prepare_dataset(corpus, data, str(tok), SEQ_LEN, **SPLIT, max_doc_chars=4000, workers=2, overwrite=True,
                        progress=False)
    elif any(json.loads((data / MANIFEST).read_text()).get(k) != v for k, v in PACKING.items()):
        raise SystemExit(f"{cache} holds data prepared before a cut document was packed as one document with its "
                         f"pieces tokenized in context, and a source trained on it: give a new --cache (the default "
                         f"is runs/benchmarks/cache_v5) or delete {cache}")
    return data


def ensure_source(cache: Path) -> Path:
    """The trained source model (Hugging Face directory), trained and exported on first use."""
    from llmshearing.export import export_checkpoint
    from llmshearing.trainer import train_from_yaml

    ensure_data(cache)
    source = cache / "source_hf"
    if (source / "config.json").exists():
        return source
    run = cache / "source_run"
    trainer = train_from_yaml(str(REPO / "yamls/pretrain/small_cpu.yaml"), common_overrides(cache) + [
        f"variables.run_dir={run}", f"max_duration={SOURCE_STEPS}ba"])
    losses = {k: float(v) for k, v in trainer.state.eval_metric_values.items()}
    trainer.close()
    export_checkpoint(run / "checkpoints" / "latest-rank0.pt", source, tokenizer=str(cache / "tokenizer"), overwrite=True)
    (cache / "source_losses.json").write_text(json.dumps(losses, indent=2))
    return source


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="runs/benchmarks/cache_v5")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(ensure_source(Path(args.cache).resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
