"""Train a small SentencePiece (LLaMA-style BPE) tokenizer on a RedPajama-style folder.

Small vocabularies keep CPU-scale experiments about the layers rather than the embedding. The
result is saved as a Hugging Face ``LlamaTokenizerFast`` directory, loadable by ``load_tokenizer``
and ``AutoTokenizer``. Given the split seed and fractions that data prep will use, it trains on the
training split only, so no held-out text shapes the vocabulary.
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import sentencepiece as spm

from llmshearing.data.prepare import iter_documents

__all__ = ["train_tokenizer"]

log = logging.getLogger(__name__)


def train_tokenizer(input_dir: str | Path, output_dir: str | Path, vocab_size: int = 4096, max_chars: int = 20_000_000,
                    seed: int = 0, val_fraction: float = 0.0, test_fraction: float = 0.0) -> Path:
    """Train a BPE SentencePiece model on the ``text`` of every JSON line under ``input_dir``.

    Args:
        input_dir: folder of ``<domain>/*.jsonl`` files.
        output_dir: Hugging Face tokenizer directory to write.
        vocab_size: vocabulary size (including ``<unk>``, ``<s>``, ``</s>``).
        max_chars: stop reading text after this many characters (spread over domains in order).
        seed, val_fraction, test_fraction: the split that ``prepare_dataset`` will make (the same keyword
            arguments); documents it will hold out are skipped.
    """
    from transformers import LlamaTokenizerFast

    texts, total, skipped = [], 0, 0
    for _, split, text in iter_documents(input_dir, seed, val_fraction, test_fraction):
        if split != "train":
            skipped += 1
            continue
        if text.strip():
            texts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise ValueError(f"no text found under {input_dir} to train a tokenizer on")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=1 << 20,
            input_sentence_size=200_000,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
        sp_path = Path(tmp) / "tokenizer.model"
        sp_path.write_bytes(model.getvalue())
        tok = LlamaTokenizerFast(vocab_file=str(sp_path), from_slow=True, legacy=True, add_prefix_space=True)
        tok.save_pretrained(out)
    log.info("trained a %d-token tokenizer on %d characters of training documents (%d held-out documents "
             "skipped) -> %s", vocab_size, total, skipped, out)
    return out
