"""Hard-concrete (L0) masks over layers, heads / KV groups, FFN channels and hidden dims, with the Lagrangian.

Hard-concrete gate (Louizos et al. 2018), per entry with learnable ``log_alpha``::

    u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1)                      beta = 2/3, l = -0.1, r = 1.1
    P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))

Deterministic masks (evaluation, materialisation) keep exactly the target number of entries with
the largest ``log_alpha`` per row (top-k) at value ``clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)``
and zero the rest, so every layer keeps the same shape.

Grouped-query attention: a source with ``G`` KV groups of ``q = H / G`` query heads each is pruned to
``(H_t, G_t)`` with a ``kv_group`` gate (L, G) when ``G_t < G`` and a within-group ``head`` gate
(L, G, q) when ``H_t / G_t < q``; a query head survives when its group and itself do, and every kept
group keeps ``H_t / G_t`` heads, so the result is a standard GQA model. For a multi-head source the
``head`` gate is (L, H) and a head's K/V go with it.

Lagrangian (per structure, on the expected *kept fraction* ``s_hat`` against the ramped target ``t``)::

    L_c = lambda_1 * (s_hat - t) + lambda_2 * (s_hat - t) ** 2

maximised over the lambdas (gradient ascent), minimised over the model and ``log_alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llmshearing.models.families import count_params

__all__ = ["DeterministicMasks", "HardConcrete", "ShearingMasks"]

LIMIT_L, LIMIT_R = -0.1, 1.1


class HardConcrete(nn.Module):
    """A tensor of hard-concrete gates whose last dimension is one row of prunable units.

    Args:
        shape: gate tensor shape, e.g. ``(L, m)`` for FFN channels of every layer.
        keep: target number of kept units per row (for top-k).
        droprate_init: initial probability of dropping a unit.
        temperature: beta.
    """

    def __init__(self, shape: tuple[int, ...], keep: int, droprate_init: float, temperature: float) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.keep = keep
        self.temperature = temperature
        mean = math.log(1 - droprate_init) - math.log(droprate_init)
        # A little noise breaks ties for top-k; a fixed generator keeps initialisation identical on every rank.
        noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(1234 + sum(self.shape))) * 1e-2
        self.log_alpha = nn.Parameter(mean + noise)

    @property
    def n(self) -> int:
        return self.shape[-1]

    def prob_nonzero(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-LIMIT_L / LIMIT_R))

    def sample(self, u: torch.Tensor) -> torch.Tensor:
        """A training sample of the gates from uniform noise ``u`` of the gates' shape."""
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def deterministic(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values with non-kept entries zeroed, boolean keep mask) using top-``keep`` per row."""
        values = (torch.sigmoid(self.log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)
        top = torch.topk(self.log_alpha, self.keep, dim=-1).indices
        keep = torch.zeros_like(self.log_alpha, dtype=torch.bool).scatter_(-1, top, True)
        return values * keep, keep


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


class ShearingMasks(nn.Module):
    """All gates and Lagrange multipliers of one pruning run.

    Args:
        source: source shape (``describe_shape`` of the source config).
        target: target shape with ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``intermediate_size``.
        prune: structures with gates (``layer``, ``head``, ``intermediate``, ``hidden``).
        droprate_init: initial drop probability.
        temperature: hard-concrete beta.
        seed: seed of the per-step gate noise (the noise of step t is a function of (seed, t) only, so
            every rank, and a resumed run, samples the same masks).
    """

    def __init__(
        self,
        source: dict[str, int],
        target: dict[str, int],
        prune: list[str],
        droprate_init: float = 0.5,
        temperature: float = 2.0 / 3.0,
        seed: int = 0,
        tie_word_embeddings: bool = False,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
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
            return HardConcrete(shape, keep, droprate_init, temperature)

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
        self.register_buffer("target_progress", torch.zeros(()), persistent=False)
        # The target ramps from the initial expected kept fraction (not from 1): the constraint then starts
        # satisfied and never pushes the gates *up* into saturation while the ramp begins.
        with torch.no_grad():
            self.start_fraction = {k: float(v) / self._full_and_target(k)[0] for k, v in self.expected_counts().items()}
        self.step = 0
        self.z: Optional[dict[str, torch.Tensor]] = None

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

    def expected_shape(self) -> dict[str, float]:
        """Expected architecture under the current gate probabilities (float sizes)."""
        e = {k: float(v) for k, v in self.expected_counts().items()}
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

    def expected_params(self) -> float:
        return count_params(self.expected_shape(), self.tie_word_embeddings, self.qkv_bias)

    def lagrangian(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over structures of ``l1 * (s_hat - t) + l2 * (s_hat - t)^2`` on kept fractions; and a log dict."""
        total = torch.zeros((), device=self.target_progress.device)
        logs: dict[str, float] = {}
        progress = float(self.target_progress)
        for name, count in self.expected_counts().items():
            full, tgt = self._full_and_target(name)
            start = self.start_fraction[name]
            t = start + progress * (tgt / full - start)  # ramped target fraction: start -> tgt/full
            gap = count / full - t
            lam = self.lambdas[name]
            total = total + lam[0] * gap + lam[1] * gap * gap
            logs[f"expected_{name}"] = float(count)
            logs[f"target_{name}"] = t * full
            logs[f"lambda1_{name}"] = float(lam[0])
            logs[f"lambda2_{name}"] = float(lam[1])
        return total, logs

    # -- masks for a forward pass --------------------------------------------------------------------
    def _noise(self, shape: tuple[int, ...], name: str, device: torch.device) -> torch.Tensor:
        key = (self.seed * 1_000_003 + self.step) * 97 + sorted(self.gates).index(name)
        u = torch.rand(shape, generator=torch.Generator().manual_seed(key), dtype=torch.float32)
        return u.clamp(1e-6, 1 - 1e-6).to(device)

    def refresh(self, training: bool) -> dict[str, torch.Tensor]:
        """Compute this forward's masks: sampled (training) or deterministic top-k (evaluation)."""
        self.z = self.sampled() if training else self.deterministic_z()
        return self.z

    def sampled(self) -> dict[str, torch.Tensor]:
        z = {name: g.sample(self._noise(g.shape, name, g.log_alpha.device)) for name, g in self.gates.items()}
        n_hidden = int(torch.count_nonzero(z["hidden"])) if "hidden" in z else self.d
        return self._hook_masks(z, n_hidden)

    def deterministic(self) -> DeterministicMasks:
        vals, keeps = {}, {}
        for name, g in self.gates.items():
            vals[name], keeps[name] = g.deterministic()
        dev = self.target_progress.device
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

    def deterministic_z(self) -> dict[str, torch.Tensor]:
        dm = self.deterministic()
        z = {"layer": dm.layer, "hidden": dm.hidden, "intermediate": dm.intermediate}
        z = {k: v for k, v in z.items() if k in self.gates}
        if "head" in self.gates or "kv_group" in self.gates:
            z["head"] = dm.head
        return self._hook_masks(z, self.target["hidden_size"] if "hidden" in self.gates else self.d)

    def _hook_masks(self, z: dict[str, torch.Tensor], n_hidden: int) -> dict[str, torch.Tensor]:
        """Masks as the hooks use them: only gated structures; ``head`` as (L, H); the kept hidden count."""
        out = {k: v for k, v in z.items() if k in ("layer", "hidden", "intermediate")}
        if self.gqa and ("kv_group" in z or (z.get("head") is not None and z["head"].dim() == 3)):
            dev = next(iter(z.values())).device
            g = z.get("kv_group", torch.ones(self.L, self.G, device=dev))
            h = z.get("head", torch.ones(self.L, self.G, self.q_src, device=dev))
            out["head"] = (g[..., None] * h).reshape(self.L, self.H)  # (L, G, q) -> (L, H)
        elif "head" in z:
            out["head"] = z["head"]
        if "hidden" in out:
            out["hidden_count"] = torch.tensor(float(max(n_hidden, 1)), device=out["hidden"].device)
        return out
