"""Statistics of the calibration study: paired item bootstrap, seed aggregates, intervals, Spearman, verdicts.

Sources of noise and how each is handled:

- **Item sampling** (which benchmark items were drawn). Every run is scored on the same TEST items as the dense
  model, and every replicate of the bootstrap resamples the items of each benchmark *once for all runs*
  (multinomial counts ``W [B, n]``). A score is a ratio of sums (:func:`calibprune.evaluation.study_suite.score_terms`),
  so its replicates are ``(W @ num) / (W @ den)`` for all runs at once. Retention replicates follow by the score's
  retention rule against the dense replicate on the same resampled items; differences between entries are
  differences of replicates (paired).
  A replicate in which a ratio is undefined (dense score 0 on the resampled items) is NaN and left out of the
  spreads; with hundreds of items this does not happen.
- **Calibration sampling** (which windows / generations a seed drew). Entries run with several seeds; the entry's
  value is the mean over seeds and ``sd`` the sample standard deviation over seeds (ddof = 1).

Interval of a difference of two entries' seed means, A − B:

    V = s_A²/S_A + s_B²/S_B + V_item,    V_item = var over replicates of (Ā_b − B̄_b)

with a Student-t quantile at the Welch–Satterthwaite degrees of freedom
``ν = V² / (Σ (s_i²/S_i)² / (S_i − 1))`` (the item part is taken as known exactly, i.e. infinite df). An entry
that ran one seed borrows the pooled seed variance of the multi-seed entries (and their pooled df) and says so;
which entries lend it (the same pruner's, else an earlier pruner's at that sparsity) is :mod:`.aggregate`'s choice.

Spearman ρ over sources: the point value and p are scipy's; the 95% interval is a percentile bootstrap that
resamples sources (with replacement) and, in the same replicate, items (so measurement noise is inside it).

A verdict on a signed claim: ``confirmed`` when the 95% interval lies entirely on the claimed side of 0,
``contradicted`` when it lies entirely on the other side, ``inconclusive`` otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..evaluation.study_suite import score_retention, score_terms

__all__ = ["Replicates", "bootstrap_counts", "diff_interval", "pooled_seed_variance", "replicate_retentions",
           "spearman_interval", "spearman_table", "verdict", "welch_df"]

VERDICTS = ("confirmed", "contradicted", "inconclusive")


def bootstrap_counts(n_items: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n_items]`` fp64 multinomial counts: each row is one resample of the items with replacement."""
    if n_items < 1 or n_boot < 1:
        raise ValueError(f"need n_items >= 1 and n_boot >= 1, got {n_items}, {n_boot}")
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_boot).astype(np.float64)


@dataclass
class Replicates:
    """Retentions of every run: ``point[run][target]`` on all items and ``boot[target]`` ``[B, R]`` replicates.

    ``targets`` are the benchmarks, the dimensions and ``"total"``; ``runs`` orders the columns of ``boot``.
    """

    runs: list[str]
    point: dict[str, dict[str, float]]
    boot: dict[str, np.ndarray]


def replicate_retentions(dense: Mapping[str, Mapping[str, Any]], runs: Mapping[str, Mapping[str, Mapping[str, Any]]],
                         primary: Mapping[str, str], dimensions: Mapping[str, str], *, n_boot: int = 2000,
                         seed: int = 0, exclude: Sequence[str] = ()) -> Replicates:
    """Paired item-bootstrap replicates of every run's benchmark, dimension and total retention.

    Args:
        dense: ``{benchmark: per-item record}`` of the dense model.
        runs: ``{run id: {benchmark: per-item record}}`` on the same items (checked).
        primary: ``{benchmark: score}`` whose retention counts; ``dimensions``: ``{benchmark: dimension}``.
        n_boot: replicates (0: point values only, ``boot`` empty).
        exclude: benchmarks whose retention is computed and reported but not averaged into their dimension
            (e.g. those on which the dense model is near chance).

    Dimension retention = mean over its (not excluded) benchmarks; total = mean over the dimensions present.
    """
    rng = np.random.default_rng(seed)
    names = list(primary)
    run_ids = list(runs)
    point: dict[str, dict[str, float]] = {r: {} for r in run_ids}
    boot: dict[str, np.ndarray] = {}
    for name in names:
        d_items = list(dense[name]["items"])
        for r in run_ids:
            if list(runs[r][name]["items"]) != d_items:
                raise ValueError(f"run {r!r}, benchmark {name!r}: items differ from the dense model's")
        score = primary[name]
        d_num, d_den = score_terms(dense[name], score)
        terms = [score_terms(runs[r][name], score) for r in run_ids]
        num = np.stack([t[0] for t in terms], axis=1)  # [n, R]
        den = np.stack([t[1] for t in terms], axis=1)
        full = score_retention(score, np.array([d_num.sum() / d_den.sum()]), num.sum(0) / den.sum(0))
        for r, v in zip(run_ids, full):
            point[r][name] = float(v)
        if n_boot:
            w = bootstrap_counts(len(d_items), n_boot, rng)  # one resample of the items for all runs
            d_rep = (w @ d_num) / (w @ d_den)  # [B]
            with np.errstate(divide="ignore", invalid="ignore"):
                r_rep = score_retention(score, d_rep[:, None], (w @ num) / (w @ den))  # [B, R]
            # a replicate whose dense score is 0 has no ratio: NaN, left out of every spread below
            boot[name] = np.where(np.isfinite(r_rep), r_rep, np.nan)
    counted = [n for n in names if n not in set(exclude)]
    dims = list(dict.fromkeys(dimensions[n] for n in counted))
    for dim in dims:
        members = [n for n in counted if dimensions[n] == dim]
        for r in run_ids:
            point[r][dim] = float(np.mean([point[r][n] for n in members]))
        if n_boot:
            boot[dim] = np.mean([boot[n] for n in members], axis=0)
    for r in run_ids:
        point[r]["total"] = float(np.mean([point[r][d] for d in dims]))
    if n_boot:
        boot["total"] = np.mean([boot[d] for d in dims], axis=0)
    return Replicates(run_ids, point, boot)


def seed_summary(rep: Replicates, seed_runs: Sequence[str], target: str) -> dict[str, Any]:
    """Mean over seeds, sd over seeds (ddof = 1; ``None`` for one seed) and item-sampling ``se`` of the mean."""
    values = np.array([rep.point[r][target] for r in seed_runs])
    out: dict[str, Any] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                           "n_seeds": len(values), "values": [float(v) for v in values]}
    if target in rep.boot:
        cols = [rep.runs.index(r) for r in seed_runs]
        out["se"] = float(np.nanstd(rep.boot[target][:, cols].mean(1), ddof=1))
    return out


def welch_df(components: Sequence[tuple[float, float]], extra_var: float = 0.0) -> float:
    """Welch–Satterthwaite degrees of freedom of ``Σ c_i + extra_var``.

    ``components``: ``(c_i, ν_i)`` pairs, each a variance estimate (e.g. s²/S) with its degrees of freedom
    (S − 1); ``extra_var`` is a variance taken as known exactly. ``inf`` when no component is positive.
    """
    total = sum(c for c, _ in components) + extra_var
    den = sum(c * c / nu for c, nu in components if c > 0 and nu > 0)
    return math.inf if den == 0 else total * total / den


def pooled_seed_variance(groups: Sequence[Sequence[float]]) -> tuple[float | None, int]:
    """Pooled sample variance over groups with >= 2 values: (Σ (n_i − 1) s_i²) / Σ (n_i − 1), and its df."""
    ss, df = 0.0, 0
    for g in groups:
        if len(g) > 1:
            ss += float(np.var(g, ddof=1)) * (len(g) - 1)
            df += len(g) - 1
    return (ss / df, df) if df else (None, 0)


def _quantile(level: float, df: float) -> float:
    from scipy.stats import norm, t

    q = 0.5 + level / 2
    return float(norm.ppf(q)) if math.isinf(df) else float(t.ppf(q, df))


def diff_interval(rep: Replicates, runs_a: Sequence[str], runs_b: Sequence[str], target: str, *,
                  pooled: tuple[float | None, int] = (None, 0), level: float = 0.95) -> dict[str, Any]:
    """Estimate and ``level`` interval of (seed mean of A) − (seed mean of B) on ``target`` (see module docstring).

    ``pooled``: ``(variance, df)`` from :func:`pooled_seed_variance`, used for a side with one seed (without it,
    that side contributes no seed variance and ``seed_variance_unknown`` is set).
    """
    a = np.array([rep.point[r][target] for r in runs_a])
    b = np.array([rep.point[r][target] for r in runs_b])
    est = float(a.mean() - b.mean())
    components: list[tuple[float, float]] = []
    borrowed = unknown = False
    for vals in (a, b):
        if len(vals) > 1:
            components.append((float(vals.var(ddof=1)) / len(vals), len(vals) - 1))
        elif pooled[0] is not None:
            components.append((pooled[0], pooled[1]))
            borrowed = True
        else:
            unknown = True
    v_item = 0.0
    if target in rep.boot:
        ia = [rep.runs.index(r) for r in runs_a]
        ib = [rep.runs.index(r) for r in runs_b]
        d = rep.boot[target][:, ia].mean(1) - rep.boot[target][:, ib].mean(1)
        v_item = float(np.nanvar(d, ddof=1))
    v_seed = sum(c for c, _ in components)
    df = welch_df(components, v_item)
    se = math.sqrt(v_seed + v_item)
    half = _quantile(level, df) * se
    return {"estimate": est, "lo": est - half, "hi": est + half, "se": se, "se_seed": math.sqrt(v_seed),
            "se_item": math.sqrt(v_item), "df": df, "n_seeds": [len(a), len(b)], "level": level,
            "borrowed_seed_variance": borrowed, "seed_variance_unknown": unknown}


def _rank_rows(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as scipy.stats.rankdata."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(-1) / den, np.nan)


def spearman_interval(x: Sequence[float], y: Sequence[float], y_boot: np.ndarray | None = None, *,
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Spearman ρ of ``x`` vs ``y`` (scipy, with p) and a percentile bootstrap interval over the points.

    ``y_boot`` (optional, ``[B, n]``): item-bootstrap replicates of ``y``; replicate b then uses ``y_boot[b]`` on
    its resampled points, so the interval holds both the choice of sources and the measurement noise.
    Replicates where x or y is constant (ρ undefined) are dropped; their count is reported.
    """
    from scipy.stats import spearmanr

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    if n != len(y):
        raise ValueError(f"x has {n} points but y has {len(y)}")
    out: dict[str, Any] = {"rho": None, "p": None, "lo": None, "hi": None, "n": n, "n_boot": 0, "dropped": 0}
    if n < 3 or len(set(x.tolist())) < 2 or len(set(y.tolist())) < 2:
        return out
    res = spearmanr(x, y)
    out["rho"], out["p"] = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    if y_boot is not None:
        n_boot = y_boot.shape[0]
    idx = rng.integers(0, n, size=(n_boot, n))
    xs = x[idx]
    ys = (y_boot[np.arange(n_boot)[:, None], idx] if y_boot is not None else y[idx])
    rho = _pearson_rows(_rank_rows(xs), _rank_rows(ys))
    ok = np.isfinite(rho)
    if ok.sum() >= 10:
        alpha = (1 - level) / 2
        out["lo"], out["hi"] = (float(v) for v in np.quantile(rho[ok], [alpha, 1 - alpha]))
    out["n_boot"], out["dropped"] = int(ok.sum()), int((~ok).sum())
    return out


def verdict(lo: float | None, hi: float | None, sign: int) -> str:
    """``confirmed`` / ``contradicted`` / ``inconclusive`` for the claim "the quantity has sign ``sign``" (±1)."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if (sign > 0 and lo > 0) or (sign < 0 and hi < 0):
        return "confirmed"
    if (sign > 0 and hi < 0) or (sign < 0 and lo > 0):
        return "contradicted"
    return "inconclusive"


def spearman_table(rows: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], targets: Sequence[str]
                   ) -> dict[str, dict[str, dict[str, Any]]]:
    """Spearman ρ and two-sided p of every metric against every target across ``rows`` (no interval).

    ``rows``: ``{entry: {"metrics": {metric: value}, "retention": {target: value}}}``. Entries with a missing or
    non-finite value are left out of that pair; fewer than 3 points or a constant column gives ``rho = None``.
    """
    from scipy.stats import spearmanr

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in metrics:
        table[metric] = {}
        for target in targets:
            xs, ys = [], []
            for row in rows.values():
                x, y = row["metrics"].get(metric), row["retention"].get(target)
                if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and \
                        math.isfinite(y):
                    xs.append(float(x))
                    ys.append(float(y))
            cell: dict[str, Any] = {"rho": None, "p": None, "n": len(xs)}
            if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
                res = spearmanr(xs, ys)
                cell["rho"], cell["p"] = float(res.statistic), float(res.pvalue)
            table[metric][target] = cell
    return table
