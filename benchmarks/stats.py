"""Statistics of the method comparisons: seeds as the unit of replication, test sequences clustered by document.

- A comparison of arms A and B is paired: per seed, the difference of their test losses on the same sequences.
  Its mean over seeds has a between-seed standard error with ``n_seeds - 1`` degrees of freedom, and a test-set
  sampling error: the seed-averaged per-sequence differences, clustered by the document each sequence comes from
  (consecutive sequences of one document are not independent; a long document can be a quarter of a domain).
- The two errors add in quadrature; ``t = diff / se`` is compared with the t distribution's two-sided 95% point
  at the seeds' degrees of freedom (4.30 for 3 seeds): a verdict names the lower arm only when ``|t|`` exceeds it.
- Scratch crossover: the tokens a from-scratch model needs to reach a loss, interpolated in log tokens between
  budgets trained with the *same* seeds (a curve of seed means, and seed by seed); "not reached" when the largest
  budget's loss is still above it, "at most" the smallest budget when that one already reaches it.
- Worst-domain excess: each arm's worst domain per seed; its test error holds those domains fixed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np

__all__ = ["T_975", "clustered_se", "combined_se", "compare", "crossover", "seed_matched_crossover", "t_critical",
           "verdict", "worst_excess_compare"]

# two-sided 95% points of Student's t (scipy.stats.t.ppf(0.975, df)); df > 30: the normal's 1.96 is within 4%
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}


def t_critical(df: int) -> float:
    """The two-sided 95% point of Student's t with ``df`` degrees of freedom (the next smaller tabulated df)."""
    if df < 1:
        return math.inf
    return T_975[max(k for k in T_975 if k <= df)] if df <= 30 else 1.96


def clustered_se(d: np.ndarray, clusters: np.ndarray) -> float:
    """Standard error of ``mean(d)`` when the values of one cluster are correlated (cluster-robust, with the
    ``G / (G - 1)`` small-sample factor). NaN with fewer than 2 clusters: the set cannot tell its own error."""
    d = np.asarray(d, dtype=np.float64)
    clusters = np.asarray(clusters)
    ids = np.unique(clusters)
    g, n = len(ids), len(d)
    if g < 2 or n == 0:
        return float("nan")
    resid = d - d.mean()
    sums = np.array([resid[clusters == c].sum() for c in ids])
    return float(math.sqrt(g / (g - 1) * (sums ** 2).sum()) / n)


def verdict(diff: float, se: float, df: int, lower: str = "A", higher: str = "B") -> str:
    """``"<lower> lower"`` / ``"<higher> lower"`` when ``|diff / se| > t_critical(df)``, else ``"none"``; no verdict
    from one seed (``df`` 0: the seed-to-seed spread is unknown, whatever the test error says)."""
    if df < 1:
        return "no verdict (1 seed)"
    if not (math.isfinite(diff) and math.isfinite(se)) or se <= 0:
        return "undetermined"
    if abs(diff / se) <= t_critical(df):
        return "none"
    return f"{lower} lower" if diff < 0 else f"{higher} lower"


def combined_se(se_seed: float, se_test: float, n_seeds: int) -> float:
    """The between-seed and test-set errors in quadrature; the test part alone with one seed; NaN if a needed
    part is unknown (never dropped)."""
    return math.sqrt(se_test ** 2 + (se_seed ** 2 if n_seeds > 1 else 0.0))


def compare(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray], clusters: np.ndarray) -> dict[str, float]:
    """Paired comparison of two arms' per-sequence test losses (``{seed: losses}``, the same sequences in the same
    order for every seed and arm; seeds present in both count).

    Returns:
        ``diff`` (mean over seeds of mean(a - b)), ``se_seed`` (between seeds, NaN with one seed), ``se_test``
        (clustered by document, of the seed-averaged per-sequence differences), ``se`` (both in quadrature; the
        test part alone with one seed; NaN when the test part cannot be estimated), ``t``, ``df`` (seeds - 1)
        and ``n_seeds``.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common")
    per_seed = np.stack([np.asarray(a[s], np.float64) - np.asarray(b[s], np.float64) for s in seeds])  # (S, N)
    means = per_seed.mean(1)
    diff = float(means.mean())
    se_seed = float(means.std(ddof=1) / math.sqrt(len(seeds))) if len(seeds) > 1 else float("nan")
    se_test = clustered_se(per_seed.mean(0), clusters)
    se = combined_se(se_seed, se_test, len(seeds))
    return {"diff": diff, "se_seed": se_seed, "se_test": se_test, "se": se,
            "t": diff / se if se and math.isfinite(se) else float("nan"), "df": len(seeds) - 1, "n_seeds": len(seeds)}


def crossover(budgets: Sequence[float], losses: Sequence[float], target: float) -> tuple[Optional[float], str]:
    """Tokens at which a curve of (budget, loss) points, trained with the same seeds at every budget, first reaches
    ``target``, and where that is: ``"between"`` two budgets (linear in log tokens between the two that bracket it),
    ``"at most"`` the smallest budget (already at or below ``target`` there: the tokens are an upper bound),
    ``"beyond"`` the largest (still above ``target``: None, not reached), or ``"undetermined"`` (None: a loss is not
    finite)."""
    pts = sorted(zip(budgets, losses))
    if not pts or not all(math.isfinite(x) for x in (*losses, target)):
        return None, "undetermined" if pts else "beyond"  # a diverged run (NaN) reaches nothing and misses nothing
    if pts[0][1] <= target:
        return float(pts[0][0]), "at most"
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if l1 <= target < l0:
            w = (l0 - target) / (l0 - l1)
            return float(math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))), "between"
    return None, "beyond"


def seed_matched_crossover(curves: Mapping[float, Mapping[int, float]], arm: Mapping[int, float]) -> Optional[dict]:
    """Where scratch runs reach an arm's loss, with the seeds every budget and the arm have: ``curves`` maps a
    budget (tokens) to ``{seed: final loss}``, ``arm`` is ``{seed: loss}``. The curve of seed means against the arm's
    mean over the same seeds, and seed by seed (scratch seed s against the arm's seed s). None without a common seed.

    Returns:
        ``seeds``, ``curve`` ([(tokens, mean loss)]), ``target`` (the arm's mean), ``tokens`` and ``where`` (see
        :func:`crossover`), ``per_seed`` ({seed: (tokens, where)}).
    """
    seeds = sorted(set(arm).intersection(*(set(v) for v in curves.values())))
    if not seeds or not curves:
        return None
    budgets = sorted(curves)
    curve = [(float(t), float(np.mean([curves[t][s] for s in seeds]))) for t in budgets]
    target = float(np.mean([arm[s] for s in seeds]))
    tokens, where = crossover([t for t, _ in curve], [x for _, x in curve], target)
    per_seed = {s: crossover(budgets, [curves[t][s] for t in budgets], arm[s]) for s in seeds}
    return {"seeds": seeds, "curve": curve, "target": target, "tokens": tokens, "where": where, "per_seed": per_seed}


def worst_excess_compare(a: Mapping[int, Mapping[str, np.ndarray]], b: Mapping[int, Mapping[str, np.ndarray]],
                         reference: Mapping[str, float], documents: Mapping[str, np.ndarray]) -> dict:
    """Paired comparison of the worst domain's excess loss over ``reference`` (per domain): per seed, A's worst
    domain's mean loss minus its reference, less B's (each arm's worst domain, per seed). ``a`` / ``b``:
    ``{seed: {domain: per-sequence test losses}}``; ``documents``: each domain's sequences' document ids.

    The test-set error holds the worst domains fixed (as chosen): the metric's seed mean is then a sum over domains
    of means of per-sequence values (each seed's worst-domain losses of A, less B's), whose clustered errors add in
    quadrature across domains (their documents are distinct). Returns what :func:`compare` returns, plus
    ``worst`` ({seed: (A's worst domain, B's)})."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common")
    domains = list(reference)
    for d in domains:
        sizes = {len(documents[d])} | {len(a[s][d]) for s in seeds} | {len(b[s][d]) for s in seeds}
        if len(sizes) != 1:
            raise ValueError(f"domain {d!r}: the arms and the document ids cover different test sequences {sizes}")

    def worst(per: Mapping[str, np.ndarray]) -> str:
        return max(domains, key=lambda d: float(np.mean(per[d])) - reference[d])

    picks = {s: (worst(a[s]), worst(b[s])) for s in seeds}
    per_seed = np.array([(float(np.mean(a[s][da])) - reference[da]) - (float(np.mean(b[s][db])) - reference[db])
                         for s, (da, db) in picks.items()])
    diff = float(per_seed.mean())
    se_seed = float(per_seed.std(ddof=1) / math.sqrt(len(seeds))) if len(seeds) > 1 else float("nan")
    var_test = 0.0
    for d in domains:  # per sequence of d: the seed mean of A's losses where d is A's worst, less B's where it is B's
        v = np.zeros(len(documents[d]))
        for s, (da, db) in picks.items():
            if da == d:
                v += np.asarray(a[s][d], np.float64)
            if db == d:
                v -= np.asarray(b[s][d], np.float64)
        if np.any(v != 0):  # a domain no seed's worst is contributes exactly 0
            var_test += clustered_se(v / len(seeds), documents[d]) ** 2
    se_test = math.sqrt(var_test)
    se = combined_se(se_seed, se_test, len(seeds))
    return {"diff": diff, "se_seed": se_seed, "se_test": se_test, "se": se,
            "t": diff / se if se and math.isfinite(se) else float("nan"), "df": len(seeds) - 1,
            "n_seeds": len(seeds), "worst": picks}
