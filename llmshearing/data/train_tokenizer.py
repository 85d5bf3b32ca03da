"""Train a small SentencePiece (LLaMA-style BPE) tokenizer on a RedPajama-style folder.

Small vocabularies keep CPU-scale experiments about the layers rather than the embedding. The
result is saved as a Hugging Face ``LlamaTokenizerFast`` directory, loadable by ``load_tokenizer``
and ``AutoTokenizer``.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path

import sentencepiece as spm

from llmshearing.data.prepare import SUFFIXES, _open_text

__all__ = ["train_tokenizer"]

log = logging.getLogger(__name__)


def train_tokenizer(input_dir: str | Path, output_dir: str | Path, vocab_size: int = 4096, max_chars: int = 20_000_000) -> Path:
    """Train a BPE SentencePiece model on the ``text`` of every JSON line under ``input_dir``.

    Args:
        input_dir: folder of ``<domain>/*.jsonl`` files.
        output_dir: Hugging Face tokenizer directory to write.
        vocab_size: vocabulary size (including ``<unk>``, ``<s>``, ``</s>``).
        max_chars: stop reading text after this many characters (spread over domains in order).
    """
    from transformers import LlamaTokenizerFast

    texts, total = [], 0
    for path in sorted(p for p in Path(input_dir).rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)):
        with _open_text(path) as fh:
            for line in fh:
                try:
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(text, str) and text.strip():
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
    log.info("trained a %d-token tokenizer on %d characters -> %s", vocab_size, total, out)
    return out
