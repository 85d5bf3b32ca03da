"""Tokenizer loading: any Hugging Face tokenizer directory, or a bare SentencePiece ``.model`` file."""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizerFast, PreTrainedTokenizerBase

__all__ = ["PROBE_TEXTS", "fingerprint", "load_tokenizer", "token_dtype"]

# Texts whose encodings identify a tokenizer (code, numbers, accents, CJK / Cyrillic, whitespace): two tokenizers that
# encode all of them alike give the same ids for the purposes of training and distillation.
PROBE_TEXTS = [
    "The capital of France is Paris.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1905, Albert Einstein published four papers; E = mc^2 is one result.",
    "Café, naïve, Zürich — 東京 and Москва.",
    "   indented\ttabs and  double  spaces\n\n",
]


def fingerprint(tok: PreTrainedTokenizerBase) -> list[list[int]]:
    """The token ids of :data:`PROBE_TEXTS` (no special tokens): recorded in a dataset's manifest, compared with the
    model's tokenizer before training."""
    return [list(tok(text, add_special_tokens=False)["input_ids"]) for text in PROBE_TEXTS]


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
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
        if not any((p / n).is_file() for n in names) and not any(p.glob("*.tiktoken")):
            raise FileNotFoundError(
                f"{path} has no tokenizer (none of {', '.join(names)}): point the tokenizer (--tokenizer, tokenizer=) "
                "at a folder with one, usually the source model's")
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
        except (OSError, ValueError, TypeError) as e:
            raise FileNotFoundError(f"{path}: the tokenizer there cannot be loaded ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:300]})") from None
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
