"""Study statistics against hand computations and scipy: scores, paired bootstrap, intervals, Spearman, verdicts."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from calibprune.evaluation.study_suite import score_retention, score_terms, score_value
from calibprune.study.statistics import (
    bootstrap_counts,
    diff_interval,
    pooled_seed_variance,
    replicate_retentions,
    seed_summary,
    spearman_interval,
    verdict,
    welch_df,
)


def _choice(correct, margin, k):
    return {"items": list(range(len(correct))), "correct": list(correct), "margin": list(margin), "k": list(k)}


def _nll(nll, ntok):
    return {"items": list(range(len(nll))), "nll": list(nll), "ntok": list(ntok)}


# --- scores --------------------------------------------------------------------------------------------------------

def test_scores_by_hand():
    rec = _choice([1, 0, 1, 1, 0], [0.5, -0.2, 1.0, 0.3, -0.6], [4, 4, 2, 4, 4])
    assert score_value(rec, "acc") == pytest.approx(3 / 5)
    chance = [0.25, 0.25, 0.5, 0.25, 0.25]
    assert score_value(rec, "acc_cn") == pytest.approx(
        sum(c - h for c, h in zip([1, 0, 1, 1, 0], chance)) / sum(1 - h for h in chance))
    # with a fixed k the chance-normalised accuracy is (acc - c) / (1 - c)
    fixed = _choice([1, 0, 1, 1], [0, 0, 0, 0], [4, 4, 4, 4])
    assert score_value(fixed, "acc_cn") == pytest.approx((0.75 - 0.25) / 0.75)
    assert score_value(rec, "margin") == pytest.approx(np.mean([0.5, -0.2, 1.0, 0.3, -0.6]))
    compact = dict(rec, correct="10110")  # the runs/ form
    assert score_value(compact, "acc") == score_value(rec, "acc")
    nll = _nll([10.0, 30.0], [5, 10])
    assert score_value(nll, "nll") == pytest.approx(40 / 15)  # token-weighted
    assert score_retention("nll", 2.0, 2.0 + math.log(4)) == pytest.approx(0.25)  # dense ppl / pruned ppl
    assert score_retention("acc", 0.5, 0.4) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown score"):
        score_terms(rec, "f1")


# --- paired bootstrap ----------------------------------------------------------------------------------------------

def test_bootstrap_counts_are_resamples():
    w = bootstrap_counts(7, 50, np.random.default_rng(0))
    assert w.shape == (50, 7) and (w.sum(1) == 7).all() and (w >= 0).all()
    with pytest.raises(ValueError):
        bootstrap_counts(0, 5, np.random.default_rng(0))


def test_replicate_point_values_by_hand():
    dense = {"a": _choice([1, 1, 0, 1], [1, 2, -1, 1], [4] * 4), "b": _nll([4.0, 6.0], [2, 2]),
             "c": _choice([1, 0, 1, 1], [1, 1, 1, 1], [2] * 4)}
    run = {"a": _choice([1, 0, 0, 1], [0.5, 1, -1, 0.5], [4] * 4), "b": _nll([5.0, 7.0], [2, 2]),
           "c": _choice([1, 1, 1, 1], [1, 1, 1, 1], [2] * 4)}
    rep = replicate_retentions(dense, {"r": run}, {"a": "acc", "b": "nll", "c": "acc_cn"},
                               {"a": "general", "b": "general", "c": "commonsense"}, n_boot=0)
    p = rep.point["r"]
    assert p["a"] == pytest.approx((2 / 4) / (3 / 4))
    assert p["b"] == pytest.approx(math.exp(10 / 4 - 12 / 4))
    assert p["c"] == pytest.approx(((1.0 - 0.5) / 0.5) / ((0.75 - 0.5) / 0.5))
    assert p["general"] == pytest.approx((p["a"] + p["b"]) / 2) and p["commonsense"] == pytest.approx(p["c"])
    assert p["total"] == pytest.approx((p["general"] + p["commonsense"]) / 2)
    assert rep.boot == {}
    # an excluded benchmark keeps its own retention but leaves its dimension (and the total)
    ex = replicate_retentions(dense, {"r": run}, {"a": "acc", "b": "nll", "c": "acc_cn"},
                              {"a": "general", "b": "general", "c": "commonsense"}, n_boot=0, exclude=["c"]).point["r"]
    assert ex["c"] == pytest.approx(p["c"]) and "commonsense" not in ex and ex["total"] == pytest.approx(p["general"])


def test_bootstrap_se_matches_binomial_formula():
    # dense always right: retention replicates are the pruned accuracy's, whose SE is sqrt(p(1-p)/n)
    rng = np.random.default_rng(3)
    n, p = 400, 0.3
    pruned = (rng.random(n) < p).astype(int)
    dense = {"x": _choice([1] * n, [1.0] * n, [4] * n)}
    rep = replicate_retentions(dense, {"r": {"x": _choice(pruned, [0.0] * n, [4] * n)}}, {"x": "acc"},
                               {"x": "general"}, n_boot=20000, seed=1)
    phat = pruned.mean()
    assert rep.boot["x"].std(ddof=1) == pytest.approx(math.sqrt(phat * (1 - phat) / n), rel=0.03)
    s = seed_summary(rep, ["r"], "x")
    assert s["mean"] == pytest.approx(phat) and s["sd"] is None and s["se"] == pytest.approx(
        rep.boot["x"][:, 0].std(ddof=1))


def test_paired_difference_item_variance():
    """Items resampled jointly: identical runs differ by exactly 0; otherwise var(mean of d_i)."""
    rng = np.random.default_rng(5)
    n = 300
    a = (rng.random(n) < 0.5).astype(int)
    b = a.copy()
    flip = rng.choice(n, 30, replace=False)
    b[flip] = 1 - b[flip]
    dense = {"x": _choice([1] * n, [1.0] * n, [2] * n)}  # dense constant: retention = accuracy
    runs = {"a": {"x": _choice(a, [0.0] * n, [2] * n)}, "a2": {"x": _choice(a, [0.0] * n, [2] * n)},
            "b": {"x": _choice(b, [0.0] * n, [2] * n)}}
    rep = replicate_retentions(dense, runs, {"x": "acc"}, {"x": "general"}, n_boot=20000, seed=2)
    same = diff_interval(rep, ["a"], ["a2"], "x")
    assert same["estimate"] == 0 and same["se_item"] == 0 and same["lo"] == same["hi"] == 0
    d = diff_interval(rep, ["a"], ["b"], "x")
    diffs = a - b
    assert d["estimate"] == pytest.approx(diffs.mean())
    assert d["se_item"] == pytest.approx(diffs.std() / math.sqrt(n), rel=0.03)
    # unpaired resampling would be far wider: the shared items cancel
    assert d["se_item"] < 0.5 * math.sqrt(a.var() / n + b.var() / n)


def test_seed_interval_is_welch():
    """No item replicates: the interval of a difference of seed means is Welch's t interval."""
    a = [0.50, 0.53, 0.58]
    b = [0.41, 0.40, 0.47, 0.44]
    dense = {"x": _nll([1.0], [1])}
    runs = {}
    for i, v in enumerate(a + b):
        runs[f"r{i}"] = {"x": _nll([1.0 - math.log(v)], [1])}  # retention exp(d - p) = v
    rep = replicate_retentions(dense, runs, {"x": "nll"}, {"x": "general"}, n_boot=0)
    d = diff_interval(rep, [f"r{i}" for i in range(3)], [f"r{i}" for i in range(3, 7)], "x")
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d["estimate"] == pytest.approx(np.mean(a) - np.mean(b))
    assert (d["lo"], d["hi"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    assert d["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3))
    assert welch_df([(va, 2), (vb, 3)]) == pytest.approx(d["df"])
    assert welch_df([(0.0, 2)], 1.0) == math.inf


def test_one_seed_borrows_pooled_variance():
    groups = [[0.5, 0.52, 0.56], [0.3, 0.33]]
    var, df = pooled_seed_variance(groups)
    assert df == 3 and var == pytest.approx((np.var(groups[0], ddof=1) * 2 + np.var(groups[1], ddof=1)) / 3)
    assert pooled_seed_variance([[0.1], [0.2]]) == (None, 0)
    dense = {"x": _nll([1.0], [1])}
    vals = {"a0": 0.6, "b0": 0.5, "b1": 0.55, "b2": 0.45}
    runs = {k: {"x": _nll([1.0 - math.log(v)], [1])} for k, v in vals.items()}
    rep = replicate_retentions(dense, runs, {"x": "nll"}, {"x": "general"}, n_boot=0)
    d = diff_interval(rep, ["a0"], ["b0", "b1", "b2"], "x", pooled=(var, df))
    vb = np.var([0.5, 0.55, 0.45], ddof=1) / 3
    assert d["borrowed_seed_variance"] and d["se"] == pytest.approx(math.sqrt(var + vb))
    assert d["df"] == pytest.approx((var + vb) ** 2 / (var ** 2 / df + vb ** 2 / 2))
    alone = diff_interval(rep, ["a0"], ["b0", "b1", "b2"], "x")
    assert alone["seed_variance_unknown"] and alone["se"] == pytest.approx(math.sqrt(vb))


# --- Spearman ------------------------------------------------------------------------------------------------------

def test_spearman_point_matches_scipy_and_interval_by_loop():
    x = [12.0, 3.5, 40.0, 7.0, 25.0, 1.0, 9.0, 18.0]
    y = [0.5, 0.9, 0.1, 0.7, 0.2, 0.6, 0.55, 0.3]
    out = spearman_interval(x, y, n_boot=300, seed=4)
    ref = stats.spearmanr(x, y)
    assert out["rho"] == pytest.approx(ref.statistic) and out["p"] == pytest.approx(ref.pvalue)
    # the same replicates by a plain loop over scipy
    rng = np.random.default_rng(4)
    idx = rng.integers(0, len(x), size=(300, len(x)))
    rhos = []
    for row in idx:
        xs, ys = np.asarray(x)[row], np.asarray(y)[row]
        if len(set(xs)) > 1 and len(set(ys)) > 1:
            rhos.append(stats.spearmanr(xs, ys).statistic)
    lo, hi = np.quantile(rhos, [0.025, 0.975])
    assert (out["lo"], out["hi"]) == pytest.approx((lo, hi)) and out["n_boot"] == len(rhos)


def test_spearman_interval_edge_cases():
    mono = spearman_interval([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5], n_boot=200)
    assert mono["rho"] == pytest.approx(1.0) and mono["lo"] == pytest.approx(1.0) and mono["hi"] == pytest.approx(1.0)
    assert spearman_interval([1, 2], [3, 4])["rho"] is None
    assert spearman_interval([1, 2, 3], [5, 5, 5])["rho"] is None
    with pytest.raises(ValueError, match="points"):
        spearman_interval([1, 2, 3], [1, 2])
    # item replicates of y move the interval: y_boot[b] replaces y in replicate b
    y_boot = np.tile(np.array([0.5, 0.4, 0.3, 0.2, 0.1]), (200, 1))
    flipped = spearman_interval([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5], y_boot)
    assert flipped["rho"] == pytest.approx(1.0) and flipped["hi"] == pytest.approx(-1.0)


# --- verdicts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lo,hi,sign,expected", [
    (0.1, 0.5, 1, "confirmed"), (-0.5, -0.1, 1, "contradicted"), (-0.1, 0.4, 1, "inconclusive"),
    (-0.5, -0.1, -1, "confirmed"), (0.1, 0.5, -1, "contradicted"), (0.0, 0.3, 1, "inconclusive"),
    (None, 0.3, 1, "inconclusive"), (math.nan, 0.3, -1, "inconclusive"),
], ids=["pos-confirmed", "pos-contradicted", "pos-straddles", "neg-confirmed", "neg-contradicted", "touches-zero",
        "missing", "nan"])
def test_verdict(lo, hi, sign, expected):
    assert verdict(lo, hi, sign) == expected


def test_verdict_bad_sign():
    with pytest.raises(ValueError, match="sign"):
        verdict(0.1, 0.2, 0)
