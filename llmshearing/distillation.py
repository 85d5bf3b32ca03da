"""Logit distillation from a frozen teacher (Minitron's recovery): forward KL(teacher || student) on the logits.

The teacher is a transformers ``*ForCausalLM`` held *beside* the student, never inside it: it is not a submodule
of the Composer model, so it is not in checkpoints, in the optimizer or under FSDP's wrapping of the student; it
is in eval mode, its parameters do not require gradients, and its forward runs under ``torch.no_grad``. On GPUs it
is replicated on every rank in bf16 (a 7B teacher is 13.5 GB; the README's memory plan counts it): each rank
distils its own micro-batches, so ranks never exchange teacher activations.

Memory is bounded in the vocabulary: the teacher runs its decoder to the final hidden states only (B, T, d) and
its LM head is applied ``chunk_tokens`` tokens at a time, each chunk's KL computed under activation checkpointing
(recomputed in the backward pass), so besides the student's own logits (which cross-entropy training holds too)
at most one chunk of teacher logits and one of student probabilities exist at a time: with LLaMA-3's 128k
vocabulary and 4096 tokens a chunk, 2 GB in fp32 instead of 16 GB per 8 x 4096-token micro-batch.

With temperature ``tau``: ``KL = tau^2 * sum_v p_t(v) (log p_t(v) - log q_s(v))``, ``p_t = softmax(teacher / tau)``,
``q_s = softmax(student / tau)``, per position; the loss is ``kd_weight * mean KL + ce_weight * mean CE`` over the
positions cross-entropy counts (Minitron: KD only, tau = 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

__all__ = ["Teacher", "check_tokenizers_agree", "chunked_kl", "load_teacher"]

log = logging.getLogger(__name__)

# texts whose encodings must agree between teacher and student tokenizers (code, numbers, accents, whitespace)
from llmshearing.data.tokenizer import PROBE_TEXTS as SAMPLE_TEXTS  # noqa: E402  (one list of probe texts)


def chunked_kl(student_logits: torch.Tensor, teacher_hidden: torch.Tensor,
               teacher_head: Callable[[torch.Tensor], torch.Tensor], temperature: float = 1.0,
               chunk_tokens: int = 4096) -> torch.Tensor:
    """Per-position ``tau^2 KL(teacher || student)``, (B, T), with the teacher's logits made a chunk at a time.

    Args:
        student_logits: (B, T, V), requires grad.
        teacher_hidden: (B, T, d) the teacher's final hidden states (no grad).
        teacher_head: hidden (N, d) -> teacher logits (N, V).
        temperature: tau.
        chunk_tokens: positions per chunk.
    """
    B, T, V = student_logits.shape
    s = student_logits.reshape(B * T, V)
    h = teacher_hidden.reshape(B * T, -1)
    tau = float(temperature)

    def piece(s_chunk: torch.Tensor, h_chunk: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            log_p = F.log_softmax(teacher_head(h_chunk).float() / tau, dim=-1)
        log_q = F.log_softmax(s_chunk.float() / tau, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1) * (tau * tau)

    out = []
    for start in range(0, B * T, chunk_tokens):
        s_c, h_c = s[start : start + chunk_tokens], h[start : start + chunk_tokens]
        if s_c.requires_grad:  # recomputed in the backward pass: one chunk of V-wide temporaries at a time
            out.append(checkpoint(piece, s_c, h_c, use_reentrant=False))
        else:
            out.append(piece(s_c, h_c))
    return torch.cat(out).view(B, T)


class Teacher:
    """A frozen teacher: final hidden states of a batch, and its LM head for :func:`chunked_kl`.

    Deliberately not an ``nn.Module``: assigning it to the Composer model never registers it, so it stays out of
    ``state_dict()``, ``parameters()`` and FSDP.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        model.eval()
        model.requires_grad_(False)
        model.config.use_cache = False
        self.model = model
        self.softcap: Optional[float] = getattr(model.config, "final_logit_softcapping", None)

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> Teacher:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(input_ids=input_ids.to(self.device), use_cache=False).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden.to(self.device))
        if self.softcap:  # Gemma 2's final soft-capping, as its forward applies it
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def num_parameters(self) -> int:
        return self.model.num_parameters()


def load_teacher(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                 device: Optional[torch.device] = None) -> Teacher:
    """The teacher at ``path`` (a Hugging Face directory, a ``.gguf`` file or a GGUF short name), on ``device``.

    On a GPU the weights are read straight onto it (``device_map``, with accelerate installed: the ``gpu`` extra), so a
    node's ranks, which all load at once, do not each hold a host copy (8 x 13.5 GB for a bf16 LLaMA2-7B); without
    accelerate the model is read on the host and then moved."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from llmshearing.models.gguf import resolve_pretrained

    resolved = resolve_pretrained(path)
    if not (Path(resolved) / "config.json").is_file():
        raise FileNotFoundError(f"distillation.teacher={path!r} is not a Hugging Face model directory (no config.json)")
    direct = device is not None and device.type == "cuda" and importlib.util.find_spec("accelerate") is not None
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, attn_implementation=attn_implementation,
                                                 **({"device_map": {"": str(device)}} if direct else {}))
    if device is not None and not direct:
        if device.type == "cuda":
            log.warning("teacher read on the host, then moved to %s: install accelerate (the gpu extra) to read it "
                        "onto the GPU directly", device)
        model.to(device)
    log.info("teacher %s: %.2fM parameters, frozen", path, model.num_parameters() / 1e6)
    return Teacher(model)


def check_tokenizers_agree(teacher_tokenizer: str, student_tokenizer: str, teacher_vocab: int,
                           student_vocab: int) -> None:
    """Raise ``ValueError`` unless the two tokenizers give the same ids (vocabulary sizes and sample encodings):
    KL over logits compares distributions token id by token id."""
    from llmshearing.data.tokenizer import load_tokenizer

    if teacher_vocab != student_vocab:
        raise ValueError(f"distillation: the teacher's vocabulary has {teacher_vocab} entries, the student's "
                         f"{student_vocab}: logits cannot be compared; use a teacher of the student's tokenizer")
    try:
        t = load_tokenizer(teacher_tokenizer)
    except (OSError, ValueError) as e:
        raise ValueError(f"distillation: no tokenizer could be loaded from the teacher {teacher_tokenizer} ({e}); "
                         "save the teacher's tokenizer in its directory, so that the two can be compared") from None
    s = load_tokenizer(student_tokenizer)
    for text in SAMPLE_TEXTS:
        a, b = t(text, add_special_tokens=False)["input_ids"], s(text, add_special_tokens=False)["input_ids"]
        if a != b:
            raise ValueError(f"distillation: the teacher's tokenizer ({teacher_tokenizer}) and the run's "
                             f"({student_tokenizer}) encode {text!r} differently ({a[:8]}... vs {b[:8]}...); "
                             "the teacher must share the student's tokenizer")
