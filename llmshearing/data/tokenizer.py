"""Tokenizer loading: any Hugging Face tokenizer directory, or a bare SentencePiece ``.model`` file."""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizerFast, PreTrainedTokenizerBase

__all__ = ["load_tokenizer", "token_dtype"]


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer.

    Args:
        path: a Hugging Face tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``), a
            SentencePiece ``.model`` file (LLaMA-1/2 style; loaded as ``LlamaTokenizerFast``), or a GGUF source
            (``.gguf`` file or short name, see :mod:`llmshearing.models.gguf`).

    Raises:
        FileNotFoundError: nothing usable at ``path``.
    """
    from llmshearing.models.gguf import resolve_pretrained

    p = Path(resolve_pretrained(path))  # a GGUF model's tokenizer: converted once; any other path unchanged
    if p.is_file() and p.suffix == ".model":
        # legacy=True + add_prefix_space reproduces SentencePiece's own encoding (and the Hub's LLaMA-2
        # tokenizer) exactly; the default fast conversion drops the leading "▁" of every text.
        tok = LlamaTokenizerFast(
            vocab_file=str(p), from_slow=True, legacy=True, add_prefix_space=True, add_bos_token=True, add_eos_token=False
        )
    elif p.is_dir():
        tok = AutoTokenizer.from_pretrained(str(p))
    else:
        raise FileNotFoundError(
            f"tokenizer {path!r} not found: give a Hugging Face tokenizer directory or a SentencePiece .model file"
        )
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path!r} has no EOS token; documents are packed with EOS separators")
    return tok


def vocab_size(tok: PreTrainedTokenizerBase) -> int:
    """Number of token ids the tokenizer can emit (base vocabulary plus added tokens)."""
    return len(tok)


def token_dtype(n_vocab: int) -> str:
    """Smallest unsigned dtype that holds every token id."""
    return "uint16" if n_vocab <= 65536 else "uint32"
