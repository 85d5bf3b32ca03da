"""A transformers causal LM as a Composer model, with per-domain language-model losses.

Batches are ``{"input_ids": (B, T) long, "domain_id": (B,) long}`` (and optionally ``labels``
with -100 for ignored positions). The loss is next-token cross-entropy averaged over tokens.

Per-domain losses:

- evaluation: one :class:`DomainCrossEntropy` metric per domain (``LanguageCrossEntropy_<domain>``)
  plus the overall ``LanguageCrossEntropy``; the token losses are computed once per batch in
  :meth:`ComposerCausalLM.eval_forward` and shared by all metrics.
- training: :meth:`ComposerCausalLM.loss` accumulates detached per-domain sums across microbatches
  (no second forward pass), which :class:`~llmshearing.callbacks.domain_loss_monitor.DomainLossMonitor`
  reduces across ranks and logs once per batch; with distillation, the KL to the teacher likewise.

With a teacher (:mod:`llmshearing.distillation`) the training loss is ``kd_weight * KL + ce_weight * CE`` (means
over the counted positions); evaluation is cross-entropy either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torchmetrics import Metric
from transformers import PreTrainedModel

from llmshearing.distillation import Teacher, chunked_kl

__all__ = ["ComposerCausalLM", "DomainCrossEntropy", "token_cross_entropy"]


def token_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token cross-entropy.

    Args:
        logits: (B, T, V) model outputs.
        batch: holds ``input_ids`` (B, T) and optionally ``labels`` (B, T) with -100 = ignore.

    Returns:
        ``(loss, valid)``, both (B, T-1): the loss of predicting token t+1 from position t (0 where
        ignored), and whether the position counts.

    Without gradients (evaluation) the fp32 upcast and log-softmax are taken one sequence at a time: an evaluation
    batch of 8 x 4096 positions over LLaMA-3's 128K vocabulary would otherwise hold ~34 GB of fp32 copies at once.
    """
    labels = batch.get("labels", batch["input_ids"])
    targets = labels[:, 1:]  # (B, T-1)
    shifted = logits[:, :-1, :]  # (B, T-1, V)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)).float(), targets.reshape(-1), ignore_index=-100,
                               reduction="none").view_as(targets)  # (B, T-1)
    else:
        loss = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for b in range(shifted.size(0)):
            loss[b] = F.cross_entropy(shifted[b].float(), targets[b], ignore_index=-100, reduction="none")
    return loss, targets != -100


class DomainCrossEntropy(Metric):
    """Token-averaged cross-entropy over the sequences of one domain (or all, with ``domain_id=None``).

    Args:
        domain_id: the domain whose sequences count; ``None`` counts every sequence.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, domain_id: Optional[int] = None, dist_sync_on_step: bool = False) -> None:
        super().__init__(dist_sync_on_step=dist_sync_on_step)
        self.domain_id = domain_id
        self.add_state("sum_loss", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, token_loss: tuple[torch.Tensor, torch.Tensor], domain_ids: torch.Tensor) -> None:
        loss, valid = token_loss  # (B, T-1) each
        # domain_id -1 marks evaluation padding (loaders.EvalSampler): never counted
        keep = domain_ids >= 0 if self.domain_id is None else domain_ids == self.domain_id
        valid = valid & keep[:, None]
        self.sum_loss += (loss * valid).sum().to(torch.float64)
        self.num_tokens += valid.sum()

    def compute(self) -> torch.Tensor:
        if self.num_tokens == 0:
            return torch.tensor(float("nan"))
        return (self.sum_loss / self.num_tokens).float()


class ComposerCausalLM(ComposerModel):
    """Wraps a transformers ``*ForCausalLM`` for the Composer ``Trainer``.

    Args:
        model: the transformers model (its ``forward`` is used unchanged).
        domains: data domain names, indexed by the batches' ``domain_id``.
        teacher: a frozen teacher to distil from (kept outside the module tree: see :class:`Teacher`).
        temperature, kd_weight, ce_weight, chunk_tokens: the distillation loss (``DistillationConfig``).
        cpu_autocast: run forward, loss and evaluation under ``torch.autocast("cpu", dtype=torch.bfloat16)``
            (``device: cpu`` + ``precision: amp_bf16``): bf16 matmuls on the CPU, fp32 weights and optimizer, as
            Composer's amp_bf16 does on GPUs.
    """

    def __init__(self, model: PreTrainedModel, domains: Sequence[str] = (), teacher: Optional[Teacher] = None,
                 temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 chunk_tokens: int = 4096, cpu_autocast: bool = False) -> None:
        super().__init__()
        self.model = model
        self.cpu_autocast = cpu_autocast
        self.domains = list(domains)
        self.teacher = teacher  # not an nn.Module: never registered, never checkpointed
        self.temperature, self.kd_weight, self.ce_weight, self.chunk_tokens = temperature, kd_weight, ce_weight, chunk_tokens
        self._flops_params: Optional[int] = None
        self._teacher_flops_params: Optional[int] = None
        self._reset_train_domain_sums()
        # FSDP and activation checkpointing wrap each decoder layer (Composer reads these from the child module).
        layer_names = set(getattr(model, "_no_split_modules", None) or [])
        model.fsdp_wrap_fn = lambda module: type(module).__name__ in layer_names
        model.activation_checkpointing_fn = lambda module: type(module).__name__ in layer_names

    # -- training ----------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_autocast)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        with self._autocast():
            return self.model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        with self._autocast():
            return self._loss(outputs, batch)

    def _loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        if self.teacher is None:
            loss, valid = token_cross_entropy(outputs, batch)
            if self.domains and "domain_id" in batch:
                self._accumulate_train_domains(loss.detach(), valid, batch["domain_id"])
            return (loss * valid).sum() / valid.sum().clamp(min=1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.ce_weight > 0):  # logged either way
            ce, valid = token_cross_entropy(outputs, batch)
        if self.teacher.device != outputs.device:
            self.teacher.to(outputs.device)
        hidden = self.teacher.hidden(batch["input_ids"])
        kl = chunked_kl(outputs, hidden, self.teacher.head, self.temperature, self.chunk_tokens)[:, :-1]  # (B, T-1)
        kl = kl * valid
        if self.domains and "domain_id" in batch:
            self._accumulate_train_domains(ce.detach(), valid, batch["domain_id"], kl.detach())
        n = valid.sum().clamp(min=1)
        total = self.kd_weight * kl.sum() / n
        if self.ce_weight > 0:
            total = total + self.ce_weight * (ce * valid).sum() / n
        return total

    def _reset_train_domain_sums(self) -> None:
        # Plain attributes (not buffers): they are logging state, not model state, and stay out of checkpoints.
        self.train_domain_loss_sum = torch.zeros(len(self.domains), dtype=torch.float64)
        self.train_domain_tokens = torch.zeros(len(self.domains), dtype=torch.float64)
        self.train_domain_kd_sum = torch.zeros(len(self.domains), dtype=torch.float64)

    def _accumulate_train_domains(self, loss: torch.Tensor, valid: torch.Tensor, domain_ids: torch.Tensor,
                                  kl: Optional[torch.Tensor] = None) -> None:
        k = len(self.domains)
        device = loss.device
        if self.train_domain_loss_sum.device != device:
            self.train_domain_loss_sum = self.train_domain_loss_sum.to(device)
            self.train_domain_tokens = self.train_domain_tokens.to(device)
            self.train_domain_kd_sum = self.train_domain_kd_sum.to(device)

        def per_domain(per_seq: torch.Tensor) -> torch.Tensor:
            return torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, domain_ids, per_seq.to(torch.float64))

        self.train_domain_loss_sum += per_domain((loss * valid).sum(dim=1))
        self.train_domain_tokens += per_domain(valid.sum(dim=1))
        if kl is not None:
            self.train_domain_kd_sum += per_domain(kl.sum(dim=1))

    def pop_train_domain_sums(self) -> tuple[torch.Tensor, ...]:
        """The per-domain (cross-entropy sum, token count[, KL sum with a teacher]) accumulated since the last
        call; resets them."""
        out = (self.train_domain_loss_sum, self.train_domain_tokens)
        if self.teacher is not None:
            out = out + (self.train_domain_kd_sum,)
        self._reset_train_domain_sums()
        return out

    # -- evaluation --------------------------------------------------------------------------------
    def eval_forward(self, batch: dict[str, Any], outputs: Optional[Any] = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = outputs if outputs is not None else self.forward(batch)  # forward autocasts; the loss is fp32
        return token_cross_entropy(logits, batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train:
            return {}  # per-domain train losses come from the loss itself; see DomainLossMonitor
        metrics: dict[str, Metric] = {"LanguageCrossEntropy": DomainCrossEntropy(None)}
        for i, name in enumerate(self.domains):
            metrics[f"LanguageCrossEntropy_{name}"] = DomainCrossEntropy(i)
        return metrics

    def update_metric(self, batch: dict[str, Any], outputs: Any, metric: Metric) -> None:
        domain_ids = batch.get("domain_id")
        if domain_ids is None:
            domain_ids = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long, device=batch["input_ids"].device)
        metric.update(outputs, domain_ids)

    def flops_per_batch(self, batch: dict[str, Any]) -> int:
        """Model FLOPs of one training batch (6 N T plus attention; with a teacher, plus its forward: 2 N T plus
        attention), for Composer's SpeedMonitor."""
        bsz, seq = batch["input_ids"].shape
        if self._flops_params is None:  # called every batch by SpeedMonitor: count the parameters once
            self._flops_params = _matmul_params(self.model)
            self._teacher_flops_params = None if self.teacher is None else _matmul_params(self.teacher.model)
        flops = 6 * self._flops_params + 3 * _attention_flops(self.model.config, seq)
        if self._teacher_flops_params is not None:
            flops += 2 * self._teacher_flops_params + _attention_flops(self.teacher.model.config, seq)
        return int(bsz * seq * flops)


def _matmul_params(model: PreTrainedModel) -> int:
    """Weights a token multiplies: every parameter but the embedding lookup, plus the LM head even when it shares
    the embedding."""
    emb = model.get_input_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p is not emb)
    return n + (emb.numel() if getattr(model.config, "tie_word_embeddings", False) else 0)


def _attention_flops(config, seq: int) -> int:
    """Forward FLOPs per token of QK^T and AV over a causal sequence of ``seq`` (2 L H hd seq: halved for causality,
    doubled for the two matmuls)."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_attention_heads * hd * seq
