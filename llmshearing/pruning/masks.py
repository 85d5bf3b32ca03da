"""Hard-concrete (L0) masks over layers, heads / KV groups, FFN channels and hidden dims, with the Lagrangian.

Hard-concrete gate (Louizos et al. 2018), per entry with learnable ``log_alpha``::

    u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1)                      beta = 2/3, l = -0.1, r = 1.1
    P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))

Initialisation and bounds follow the reference implementation (METHOD.md, "What the reference code actually
does"): ``log_alpha`` starts at ``ln 100 = 4.6`` (P(z = 1) ~ 0.95, P(z = 0) ~ 0.002: pruning starts from the
intact source, not from a model scaled by noise) and is clamped to ``[ln 0.01, ln 100]`` after every optimizer
step (with mask lr 1.0 an unbounded ``log_alpha`` and its lambda run away and the run misses the target).
``pruning.init: importance`` instead spreads the initial values by an importance ranking (``init_from_scores``);
``pruning.init: target`` places them by the ranking so that the expected sizes start at the target (``init_at_target``).

Deterministic masks keep, per row, the units with the largest ``log_alpha`` at their test-time value
``sigmoid(log_alpha / beta * 0.8)`` (the reference's) and zero the rest. How many are kept:

| mode | kept per row | used for |
| --- | --- | --- |
| ``target`` | the target number (top-k) | materialisation, export, the ``eval_target`` evaluation |
| ``expected`` | ``n - round(expected number of zeros)`` | evaluation during pruning (what dynamic loading sees) |

so every layer of a ``target`` model has the same shape, and an ``expected`` model is the one the gates
currently describe (the reference's ``eval_target_model=false``).

Grouped-query attention: a source with ``G`` KV groups of ``q = H / G`` query heads each is pruned to
``(H_t, G_t)`` with a ``kv_group`` gate (L, G) when ``G_t < G`` and a within-group ``head`` gate
(L, G, q) when ``H_t / G_t < q``; a query head survives when its group and itself do, and every kept
group keeps ``H_t / G_t`` heads, so the result is a standard GQA model. For a multi-head source the
``head`` gate is (L, H) and a head's K/V go with it.

Lagrangian (per structure, on the expected *kept fraction* ``s_hat_r`` of every row ``r`` -- a layer's FFN
channels, a KV group's heads -- against the ramped target ``t``; as the reference, the mean over rows of the
per-row penalty, so no layer can over- or under-keep while the average meets the target)::

    L_c = mean_r [ lambda_1 * (s_hat_r - t) + lambda_2 * (s_hat_r - t) ** 2 ]

maximised over the lambdas (gradient ascent), minimised over the model and ``log_alpha``. Or, with
``pruning.constraint: projection``, no multipliers: after every optimizer step each row's ``log_alpha`` is shifted
by one scalar so that its expected kept count equals the ramped target (``project_``): the masks learn the order
of the units from the loss alone, and the sizes never leave the target (the multipliers oscillate around it,
+-7% over 100 steps on SmolLM2, docs/results.md).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from llmshearing.models.families import count_params

__all__ = ["DeterministicMasks", "HardConcrete", "LOG_ALPHA_MAX", "LOG_ALPHA_MIN", "ShearingMasks", "descending_order"]


def descending_order(values: torch.Tensor) -> torch.Tensor:
    """Indices that sort each row of ``values`` from largest to smallest, ties in index order. Every ranking of units
    (top-k of the masks, importance inits, one-shot selection) goes through here: a stable sort keeps the same units
    on the CPU (export) as on a GPU (evaluation during training); the default sort breaks ties differently on each
    (units tied at the clamp are common at convergence)."""
    return values.argsort(dim=-1, descending=True, stable=True)

LIMIT_L, LIMIT_R = -0.1, 1.1
# The reference's bounds on log_alpha: [ln 0.01, ln 100]. The upper one is also the default start.
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
TEST_TIME_SCALE = 0.8  # test-time value sigmoid(log_alpha / beta * 0.8), as the reference
WEAK_VALUE = 0.1  # a kept unit whose test-time value is below this is (nearly) dead capacity
MODES = ("target", "expected")


class HardConcrete(nn.Module):
    """A tensor of hard-concrete gates whose last dimension is one row of prunable units.

    Args:
        shape: gate tensor shape, e.g. ``(L, m)`` for FFN channels of every layer.
        keep: target number of kept units per row (for top-k).
        init_log_alpha: initial ``log_alpha`` (plus noise of sd 0.01, then clamped to the bounds).
        temperature: beta.
        log_alpha_min: the lower clamp (the reference's ln 0.01; lower: a unit pushed down counts ~0 in the
            expected size instead of P(z != 0) = 0.047, so near-dead units cannot fill the kept slots).
    """

    def __init__(self, shape: tuple[int, ...], keep: int, init_log_alpha: float = LOG_ALPHA_MAX,
                 temperature: float = 2.0 / 3.0, log_alpha_min: float = LOG_ALPHA_MIN) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.keep = keep
        self.temperature = temperature
        self.log_alpha_min = log_alpha_min
        # A little noise breaks ties for top-k; a fixed generator keeps initialisation identical on every rank.
        noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(1234 + sum(self.shape))) * 1e-2
        self.log_alpha = nn.Parameter((init_log_alpha + noise).clamp(log_alpha_min, LOG_ALPHA_MAX))

    @property
    def n(self) -> int:
        return self.shape[-1]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(self.log_alpha_min, LOG_ALPHA_MAX)

    @property
    def threshold(self) -> float:
        """The ``log_alpha`` at which P(z != 0) = 1/2."""
        return self.temperature * math.log(-LIMIT_L / LIMIT_R)

    def prob_nonzero(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - self.threshold)

    def sample(self, u: torch.Tensor) -> torch.Tensor:
        """A training sample of the gates from uniform noise ``u`` of the gates' shape."""
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def test_values(self) -> torch.Tensor:
        """Test-time value of every unit (kept or not): ``sigmoid(log_alpha / beta * 0.8)``."""
        return torch.sigmoid(self.log_alpha / self.temperature * TEST_TIME_SCALE)

    def kept_per_row(self, mode: str = "target") -> torch.Tensor:
        """Units kept in each row (shape ``shape[:-1]``): the target, or ``n - round(expected zeros)``."""
        rows = self.shape[:-1]
        if mode == "target":
            return torch.full(rows, self.keep, dtype=torch.long, device=self.log_alpha.device)
        if mode != "expected":
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        zeros = torch.round(self.n - self.prob_nonzero().detach().sum(-1)).long()
        return self.n - zeros

    def deterministic(self, mode: str = "target") -> tuple[torch.Tensor, torch.Tensor]:
        """(test-time values with non-kept entries zeroed, boolean keep mask): the largest ``log_alpha`` of each
        row are kept, as many as :meth:`kept_per_row` says."""
        la = self.log_alpha.detach()
        order = descending_order(la)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(self.n, device=la.device).expand_as(order))
        keep = rank < self.kept_per_row(mode)[..., None]
        return self.test_values() * keep, keep

    @torch.no_grad()
    def init_from_scores(self, scores: torch.Tensor, spread: float) -> None:
        """Start from an importance ranking: in each row the best unit at ``LOG_ALPHA_MAX``, the worst ``spread``
        below it, linear in rank between (higher score = more important)."""
        if tuple(scores.shape) != self.shape:
            raise ValueError(f"importance scores of shape {tuple(scores.shape)} for gates of shape {self.shape}")
        order = descending_order(scores.to(self.log_alpha.device).float())
        frac = torch.arange(self.n, device=order.device, dtype=torch.float32) / max(self.n - 1, 1)
        rank_frac = torch.empty_like(frac.expand_as(order)).scatter_(-1, order, frac.expand_as(order).contiguous())
        self.log_alpha.copy_((LOG_ALPHA_MAX - spread * rank_frac).clamp(self.log_alpha_min, LOG_ALPHA_MAX))

    @torch.no_grad()
    def init_at_target(self, scores: torch.Tensor, spread: float) -> None:
        """Start *at* the target from an importance ranking: ``log_alpha`` linear in rank with slope ``spread`` per
        row (best to worst), centred so that the row's expected kept count ``sum P(z != 0)`` equals the target
        ``keep`` (within the clamp). The target's top-k units sit above the gate's threshold (P(z != 0) = 1/2),
        the rest below; the constraint starts satisfied with the gates out of saturation, so the multipliers do
        not wind up during a ramp (see ``pruning.init`` in the configuration)."""
        if tuple(scores.shape) != self.shape:
            raise ValueError(f"importance scores of shape {tuple(scores.shape)} for gates of shape {self.shape}")
        order = descending_order(scores.to(self.log_alpha.device).float())
        pos = (self.keep - 0.5 - torch.arange(self.n, device=order.device, dtype=torch.float32)) / self.n
        placed = (self.threshold + spread * pos).expand_as(order).contiguous()  # by rank, not yet clamped
        self.log_alpha.copy_(torch.empty_like(placed).scatter_(-1, order, placed))
        self.project_(self.keep)  # shifted (and clamped) so that every row expects the target's count

    @torch.no_grad()
    def project_(self, count: float, iters: int = 48) -> None:
        """Shift every row's ``log_alpha`` by one scalar of its own, within the clamp, so that the row's expected
        kept count ``sum P(z != 0)`` equals ``count`` (``pruning.constraint: projection``). A shift keeps the
        order within a row, so what the masks learned -- which units rank above which -- is untouched; only where
        the row's threshold lies moves. A count outside what the clamp allows (``n P(z != 0)`` at its bounds)
        ends at the nearest bound. ``log_alpha`` need not be clamped before (``init_at_target`` places a line)."""
        la = self.log_alpha.detach()
        # shifts beyond these put the whole row at the lower / upper bound
        lo = (self.log_alpha_min - la.amax(-1, keepdim=True)) - 1.0
        hi = (LOG_ALPHA_MAX - la.amin(-1, keepdim=True)) + 1.0
        for _ in range(iters):  # the count rises with the shift: bisection, all rows at once
            mid = (lo + hi) / 2
            below = torch.sigmoid((la + mid).clamp(self.log_alpha_min, LOG_ALPHA_MAX) - self.threshold) \
                .sum(-1, keepdim=True) < count
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        self.log_alpha.copy_((la + (lo + hi) / 2).clamp(self.log_alpha_min, LOG_ALPHA_MAX))


@dataclass
class DeterministicMasks:
    """Final masks: kept units and the values folded into the weights.

    Shapes (source sizes): ``layer`` (L,), ``hidden`` (d,), ``intermediate`` (L, m), ``head`` (L, H)
    and ``kv_group`` (L, G) values; the ``*_keep`` booleans of the same shapes.
    """

    layer: torch.Tensor
    layer_keep: torch.Tensor
    hidden: torch.Tensor
    hidden_keep: torch.Tensor
    intermediate: torch.Tensor
    intermediate_keep: torch.Tensor
    head: torch.Tensor
    head_keep: torch.Tensor
    kv_keep: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.__dict__.items()}

    @classmethod
    def selection(cls, masks: dict[str, torch.Tensor]) -> "DeterministicMasks":
        """The kept units of ``masks`` (a ``to_dict``) with every kept value at 1: the selection alone, with no
        learned scale folded into the weights (e.g. learned masks put on the source's own weights)."""
        values = {k: masks[f"{k}_keep"].float() for k in ("layer", "hidden", "intermediate", "head")}
        return cls(**{**masks, **values})

    def weak_kept(self) -> dict[str, int]:
        """Kept units whose value is below 0.1, per structure: folded into the weights they are (nearly) dead."""
        pairs = {"layer": (self.layer, self.layer_keep), "hidden": (self.hidden, self.hidden_keep),
                 "intermediate": (self.intermediate, self.intermediate_keep), "head": (self.head, self.head_keep)}
        return {k: int((keep & (v < WEAK_VALUE)).sum()) for k, (v, keep) in pairs.items()}


class ShearingMasks(nn.Module):
    """All gates and Lagrange multipliers of one pruning run.

    Args:
        source: source shape (``describe_shape`` of the source config).
        target: target shape with ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``intermediate_size``.
        prune: structures with gates (``layer``, ``head``, ``intermediate``, ``hidden``).
        init_log_alpha: initial ``log_alpha`` of every gate (default ``ln 100``, the reference's start).
        temperature: hard-concrete beta.
        seed: seed of the gate noise. The masks of a training forward are a function of (seed, step, sample) only,
            where ``sample`` numbers the independent mask samples of a step (``L0Pruning`` sets it from the global
            position of the micro-batch), so every world size, and a resumed run, samples the same masks.
        tie_word_embeddings, qkv_bias: features of a LLaMA-like source, for parameter counts.
        config: the source config: parameter counts of its own family and features (overrides the two above).
        log_alpha_min: every gate's lower clamp (see :class:`HardConcrete`).
    """

    def __init__(
        self,
        source: dict[str, int],
        target: dict[str, int],
        prune: list[str],
        init_log_alpha: float = LOG_ALPHA_MAX,
        temperature: float = 2.0 / 3.0,
        seed: int = 0,
        tie_word_embeddings: bool = False,
        qkv_bias: bool = False,
        config: Optional[PretrainedConfig] = None,
        log_alpha_min: float = LOG_ALPHA_MIN,
    ) -> None:
        super().__init__()
        self.config = config  # the source's: parameter counts of its family (None: LLaMA-like)
        self.source, self.target = dict(source), dict(target)
        self.seed = seed
        self.tie_word_embeddings, self.qkv_bias = tie_word_embeddings, qkv_bias
        L, d, m = source["num_hidden_layers"], source["hidden_size"], source["intermediate_size"]
        H, G = source["num_attention_heads"], source["num_key_value_heads"]
        Ht, Gt = target["num_attention_heads"], target["num_key_value_heads"]
        self.L, self.d, self.m, self.H, self.G = L, d, m, H, G
        self.q_src, self.q_tgt = H // G, Ht // Gt
        self.gqa = G != H

        def gate(shape: tuple[int, ...], keep: int) -> HardConcrete:
            return HardConcrete(shape, keep, init_log_alpha, temperature, log_alpha_min)

        gates: dict[str, HardConcrete] = {}
        if "layer" in prune and target["num_hidden_layers"] < L:
            gates["layer"] = gate((L,), target["num_hidden_layers"])
        if "hidden" in prune and target["hidden_size"] < d:
            gates["hidden"] = gate((d,), target["hidden_size"])
        if "intermediate" in prune and target["intermediate_size"] < m:
            gates["intermediate"] = gate((L, m), target["intermediate_size"])
        if "head" in prune:
            if self.gqa:
                if Gt < G:
                    gates["kv_group"] = gate((L, G), Gt)
                if self.q_tgt < self.q_src:
                    gates["head"] = gate((L, G, self.q_src), self.q_tgt)
            elif Ht < H:
                gates["head"] = gate((L, H), Ht)
        self.gates = nn.ModuleDict(gates)
        # lambdas[name] = (lambda_1, lambda_2); updated by gradient *ascent* (negative lr, see L0Pruning).
        self.lambdas = nn.ParameterDict({name: nn.Parameter(torch.zeros(2)) for name in gates})
        # where the masks live (moved with the module; no values, not in the state dict)
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)
        # how far the target ramp is (0: start sizes, 1: the target), kept on the host: reading it costs no device sync
        self.progress = 0.0
        self._set_start_fraction()
        self.step = 0
        self.sample = 0  # which of the step's independent mask samples a training forward draws
        self.enabled = True  # False: every forward sees the plain model (``disabled()``)
        self.eval_mode = "target"  # what a forward in eval mode uses (L0Pruning switches it per evaluator)
        self.z: Optional[dict[str, torch.Tensor]] = None

    def _set_start_fraction(self) -> None:
        # The target ramps from the initial expected kept fraction (not from 1): the constraint then starts
        # satisfied and never pushes the gates *up* into saturation while the ramp begins.
        with torch.no_grad():
            self.start_fraction = {k: float(v) / self._full_and_target(k)[0] for k, v in self.expected_counts().items()}

    def clamp_(self) -> None:
        """Bound every ``log_alpha`` to ``[log_alpha_min, ln 100]`` (after each optimizer step, as the reference)."""
        for g in self.gates.values():
            g.clamp_()

    def init_from_scores(self, scores: dict[str, torch.Tensor], spread: float, at_target: bool = False) -> None:
        """Seed each gate's ``log_alpha`` from importance scores of its shape (``HardConcrete.init_from_scores``,
        or ``init_at_target`` with ``at_target``); the target ramp then starts from the new expected sizes (with
        ``at_target``: the target, so the ramp is flat)."""
        for name, g in self.gates.items():
            (g.init_at_target if at_target else g.init_from_scores)(scores[name], spread)
        self._set_start_fraction()

    # -- sizes ---------------------------------------------------------------------------------------
    def _full_and_target(self, name: str) -> tuple[int, int]:
        s, t = self.source, self.target
        return {
            "layer": (s["num_hidden_layers"], t["num_hidden_layers"]),
            "hidden": (s["hidden_size"], t["hidden_size"]),
            "intermediate": (s["intermediate_size"], t["intermediate_size"]),
            "kv_group": (s["num_key_value_heads"], t["num_key_value_heads"]),
            "head": (self.q_src, self.q_tgt) if self.gqa else (s["num_attention_heads"], t["num_attention_heads"]),
        }[name]

    def expected_counts(self) -> dict[str, torch.Tensor]:
        """Expected kept units per row (e.g. channels per layer), averaged over rows, per structure."""
        out = {}
        for name, g in self.gates.items():
            p = g.prob_nonzero()
            out[name] = p.sum(-1).mean() if p.dim() > 1 else p.sum()
        return out

    def expected_shape(self, counts: Optional[dict[str, float]] = None) -> dict[str, float]:
        """Expected architecture under the current gate probabilities (float sizes); from ``counts``
        (``expected_counts`` already read to the host) when given."""
        e = {k: float(v) for k, v in (self.expected_counts() if counts is None else counts).items()}
        s = self.source
        kv = e.get("kv_group", s["num_key_value_heads"] if self.gqa else None)
        if self.gqa:
            heads = kv * e.get("head", self.q_src)
        else:
            heads = e.get("head", s["num_attention_heads"])
            kv = heads
        return {
            "num_hidden_layers": e.get("layer", s["num_hidden_layers"]),
            "hidden_size": e.get("hidden", s["hidden_size"]),
            "intermediate_size": e.get("intermediate", s["intermediate_size"]),
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": s["head_dim"],
            "vocab_size": s["vocab_size"],
        }

    def expected_params(self, shape: Optional[dict[str, float]] = None) -> float:
        """Parameters of the expected architecture (of ``shape``, an ``expected_shape``, when given)."""
        shape = self.expected_shape() if shape is None else shape
        return count_params(shape, self.tie_word_embeddings, self.qkv_bias, config=self.config)

    def set_progress(self, progress: float) -> None:
        """Where the target ramp is for the next forwards (0: the start sizes, 1: the target)."""
        self.progress = float(progress)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def ramped_target(self, name: str, progress: Optional[float] = None) -> float:
        """The ramped target kept count per row of structure ``name`` (at ``progress``; None: the current)."""
        full, tgt = self._full_and_target(name)
        start = self.start_fraction[name]
        progress = self.progress if progress is None else progress
        return (start + progress * (tgt / full - start)) * full

    def project_(self, progress: float) -> None:
        """Put every row's expected kept count on the target ramped to ``progress`` (``HardConcrete.project_``): the
        constraint met exactly after every step instead of through multipliers."""
        for name, g in self.gates.items():
            g.project_(self.ramped_target(name, progress))

    def lagrangian(self) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Sum over structures of the mean over rows of ``l1 * (s_hat_r - t) + l2 * (s_hat_r - t)^2`` on kept
        fractions; and a log dict, whose device values are detached tensors (it runs every micro-batch: reading
        them as floats here would wait for the device each time)."""
        total = torch.zeros((), device=self.device)
        logs: dict[str, torch.Tensor | float] = {}
        for name, g in self.gates.items():
            full, _ = self._full_and_target(name)
            t = self.ramped_target(name) / full  # ramped target fraction: start -> tgt/full
            rows = g.prob_nonzero().sum(-1)  # expected kept units of every row (a scalar for layer / hidden)
            gap = rows / full - t
            lam = self.lambdas[name]
            total = total + (lam[0] * gap + lam[1] * gap * gap).mean()
            logs[f"expected_{name}"] = rows.detach().mean()
            logs[f"target_{name}"] = t * full
            lam_now = lam.detach().clone()  # a copy: the optimizer updates the multipliers in place before the log
            logs[f"lambda1_{name}"] = lam_now[0]
            logs[f"lambda2_{name}"] = lam_now[1]
        return total, logs

    def weak_kept(self) -> dict[str, int]:
        """Per structure: units the target keeps whose test-time value is below 0.1 (nearly dead capacity)."""
        return {k: int(v) for k, v in self.weak_kept_counts().items()}

    def weak_kept_counts(self) -> dict[str, torch.Tensor]:
        """``weak_kept`` as device tensors (nothing read to the host)."""
        out = {}
        for name, g in self.gates.items():
            values, keep = g.deterministic("target")
            out[name] = (keep & (values < WEAK_VALUE)).sum()
        return out

    # -- masks for a forward pass --------------------------------------------------------------------
    def _noise(self, shape: tuple[int, ...], name: str, device: torch.device) -> torch.Tensor:
        key = np.random.SeedSequence([self.seed, self.step, self.sample, sorted(self.gates).index(name)])
        gen = torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        # drawn on the CPU (the same numbers on any device, GPU model and world size: CUDA's generator maps numbers
        # to elements by the GPU's number of multiprocessors for large tensors); to a GPU through pinned memory,
        # asynchronously (the device does not wait for the host, nor the host for the device)
        pinned = device.type == "cuda"
        u = torch.empty(shape, dtype=torch.float32, pin_memory=pinned).uniform_(generator=gen)
        return u.to(device, non_blocking=pinned).clamp_(1e-6, 1 - 1e-6)

    def refresh(self, training: bool) -> dict[str, torch.Tensor]:
        """Compute this forward's masks: sampled (training) or deterministic in ``eval_mode`` (evaluation); none
        while :meth:`disabled`."""
        if not self.enabled:
            self.z = {}
        else:
            self.z = self.sampled() if training else self.deterministic_z(self.eval_mode)
        return self.z

    @contextlib.contextmanager
    def disabled(self):
        """Forwards inside see the unmasked source (e.g. to score activation importance with the hooks attached)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def sampled(self) -> dict[str, torch.Tensor]:
        z = {name: g.sample(self._noise(g.shape, name, g.log_alpha.device)) for name, g in self.gates.items()}
        return self._hook_masks(z, torch.count_nonzero(z["hidden"]) if "hidden" in z else None)

    def deterministic(self, mode: str = "target") -> DeterministicMasks:
        """Masks of every structure (see the module docstring for ``mode``)."""
        vals, keeps = {}, {}
        for name, g in self.gates.items():
            vals[name], keeps[name] = g.deterministic(mode)
        dev = self.device
        L, d, m, H, G = self.L, self.d, self.m, self.H, self.G
        ones = lambda *s: torch.ones(s, device=dev)  # noqa: E731
        trues = lambda *s: torch.ones(s, dtype=torch.bool, device=dev)  # noqa: E731
        if self.gqa:
            g_val, g_keep = vals.get("kv_group", ones(L, G)), keeps.get("kv_group", trues(L, G))
            h_val = vals.get("head", ones(L, G, self.q_src))
            h_keep = keeps.get("head", trues(L, G, self.q_src))
            head = (g_val[..., None] * h_val).reshape(L, H)  # (L, G, q) -> (L, H)
            head_keep = (g_keep[..., None] & h_keep).reshape(L, H)
            kv_keep = g_keep
        else:
            head, head_keep = vals.get("head", ones(L, H)), keeps.get("head", trues(L, H))
            kv_keep = head_keep
        return DeterministicMasks(
            layer=vals.get("layer", ones(L)),
            layer_keep=keeps.get("layer", trues(L)),
            hidden=vals.get("hidden", ones(d)),
            hidden_keep=keeps.get("hidden", trues(d)),
            intermediate=vals.get("intermediate", ones(L, m)),
            intermediate_keep=keeps.get("intermediate", trues(L, m)),
            head=head,
            head_keep=head_keep,
            kv_keep=kv_keep,
        )

    def deterministic_z(self, mode: str = "target") -> dict[str, torch.Tensor]:
        dm = self.deterministic(mode)
        z = {"layer": dm.layer, "hidden": dm.hidden, "intermediate": dm.intermediate}
        z = {k: v for k, v in z.items() if k in self.gates}
        if "head" in self.gates or "kv_group" in self.gates:
            z["head"] = dm.head
        return self._hook_masks(z, dm.hidden_keep.sum() if "hidden" in self.gates else None)

    def _hook_masks(self, z: dict[str, torch.Tensor], n_hidden: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masks as the hooks use them: only gated structures; ``head`` as (L, H); the kept hidden count (a device
        tensor: no sync per forward), given when the hidden dimension is gated."""
        out = {k: v for k, v in z.items() if k in ("layer", "hidden", "intermediate")}
        if self.gqa and ("kv_group" in z or (z.get("head") is not None and z["head"].dim() == 3)):
            dev = next(iter(z.values())).device
            g = z.get("kv_group", torch.ones(self.L, self.G, device=dev))
            h = z.get("head", torch.ones(self.L, self.G, self.q_src, device=dev))
            out["head"] = (g[..., None] * h).reshape(self.L, self.H)  # (L, G, q) -> (L, H)
        elif "head" in z:
            out["head"] = z["head"]
        if "hidden" in out:
            out["hidden_count"] = n_hidden.to(torch.float32).clamp_min(1.0)
        return out
