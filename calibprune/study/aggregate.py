"""Build ``study.json`` from the dense record and the finished runs: seed aggregates, intervals, Spearman, verdicts.

Pure functions of the committed ``runs/`` files (no model), so a report can be rebuilt anywhere. The statistics
are in :mod:`.statistics`; this module decides *what* is compared:

- per entry, pruner and sparsity: every dimension's (and the total's) retention as mean over seeds, ``sd`` over
  seeds and the item-sampling standard error ``se`` of that mean, all in percentage points (``"unit":
  "points"``; differences and their intervals too);
- the differences the paper reports (mix − best single, mix − C4, best single − C4, IGSP − Self-Cal,
  IGSP − SGS, Self-Cal − SGS) and IGSP − each IGSP variant (the ablations), with 95% intervals; in a study of
  variants alone (IGSP's design on DEV), each variant − the first variant (the base). A one-seed entry's seed
  variance is the pooled one of its pruner's multi-seed entries, or, for a pruner that ran every entry with one
  seed (Wanda in the study), the first such pruner's at that sparsity (``seed_variance_from``);
- Spearman ρ of every OIT metric against every target over the single sources, with bootstrap intervals;
- ``verdicts``: each claim of the paper → confirmed / contradicted / inconclusive with its numbers.

"Best single" is the single source with the highest mean total retention, chosen on the same data it is then
compared with; that selection favours it, so "mix > best single" is judged conservatively.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.study_suite import near_chance, resolve_suite, score_retention, score_value
from ..provenance import provenance
from .plan import FORMAT, PAPER, TARGETS
from .records import expand_record, read_json
from .statistics import (
    Replicates,
    diff_interval,
    pooled_seed_variance,
    replicate_retentions,
    seed_summary,
    spearman_interval,
    spearman_table,
    verdict,
)

__all__ = ["METRICS", "build_study", "run_retentions", "skey"]

#: OIT metrics correlated with retention (keys of :func:`calibprune.metrics.information_metrics`)
METRICS: tuple[str, ...] = ("perplexity", "ngram_aggregation", "top10_mass", "ngram_diversity", "token_entropy",
                            "vocab_coverage", "zipf_slope")


def skey(s: float) -> str:
    return f"{s:g}"


_POINT_KEYS = ("mean", "sd", "se", "estimate", "lo", "hi", "se_seed", "se_item")


def _points(summary: dict[str, Any]) -> dict[str, Any]:
    """A seed summary or an interval with its retention-valued fields in percentage points (× 100)."""
    out = dict(summary)
    for k in _POINT_KEYS:
        if isinstance(out.get(k), float):
            out[k] = 100 * out[k]
    if "values" in out:
        out["values"] = [100 * v for v in out["values"]]
    out["unit"] = "points"
    return out


def _suite(spec: Mapping[str, Any]):
    return resolve_suite(spec["benchmarks"], spec["eval_overrides"] or None)


def run_retentions(spec: Mapping[str, Any], dense: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]], *,
                   n_boot: int, seed: int = 0) -> Replicates:
    """Paired replicates of the given runs' retentions (all on the dense model's items)."""
    suite = _suite(spec)
    dense_recs = {b: dense["benchmarks"][b] for b in suite}
    run_recs = {rid: {b: expand_record(r["benchmarks"][b], dense_recs[b]) for b in suite} for rid, r in runs.items()}
    return replicate_retentions(dense_recs, run_recs, {b: s.primary for b, s in suite.items()},
                                {b: s.dimension for b, s in suite.items()}, n_boot=n_boot, seed=seed,
                                exclude=excluded(spec, dense))


def excluded(spec: Mapping[str, Any], dense: Mapping[str, Any]) -> list[str]:
    """Benchmarks on which the dense model is within 2 SE of chance: reported, not counted in their dimension."""
    return [b for b, s in _suite(spec).items() if near_chance(dense["benchmarks"][b], s.kind)]


def _dense_table(spec: Mapping[str, Any], dense: Mapping[str, Any]) -> dict[str, Any]:
    """Dense scores per benchmark with chance, the accuracy's standard error and the above-chance flag."""
    out = {}
    for name, bench in _suite(spec).items():
        rec = dense["benchmarks"][name]
        row: dict[str, Any] = {"dimension": bench.dimension, "kind": bench.kind, "primary": bench.primary,
                               "n": rec["n"], "scores": rec["scores"], "seconds": rec["seconds"],
                               "tokens": rec["tokens"]}
        if bench.kind == "choice":
            acc, chance, n = rec["scores"]["acc"], rec["scores"]["chance"], rec["n"]
            se = math.sqrt(max(acc * (1 - acc), 1e-12) / n)
            row |= {"chance": chance, "acc_se": se, "above_chance_se": (acc - chance) / se,
                    "near_chance": near_chance(rec, bench.kind)}
        out[name] = row
    return out


def _secondary(spec, dense, runs_for_entry) -> dict[str, dict[str, float]]:
    """Per benchmark, the seed-mean retention of every reported score (not only the primary one)."""
    out: dict[str, dict[str, float]] = {}
    for name, bench in _suite(spec).items():
        d = dense["benchmarks"][name]
        vals: dict[str, list[float]] = {}
        for r in runs_for_entry:
            rec = expand_record(r["benchmarks"][name], d)
            for score in bench.scores:
                vals.setdefault(score, []).append(float(score_retention(score, score_value(d, score),
                                                                        score_value(rec, score))))
        out[name] = {s: float(np.mean(v)) for s, v in vals.items()}
    return out


def _mean_metrics(runs_for_entry) -> dict[str, Any]:
    """OIT metrics averaged over the entry's calibration seeds (one calibration set per seed)."""
    by_seed = {r["seed"]: r["metrics"] for r in runs_for_entry}
    keys = [k for k, v in next(iter(by_seed.values())).items() if isinstance(v, (int, float))]
    mean = {k: float(np.mean([m[k] for m in by_seed.values()])) for k in keys}
    sd = {k: float(np.std([m[k] for m in by_seed.values()], ddof=1)) for k in keys} if len(by_seed) > 1 else {}
    return {"mean": mean, "sd": sd, "seeds": sorted(by_seed)}


def _pairs(entries: Mapping[str, Any], spec: Mapping[str, Any], best: str | None) -> list[tuple[str, str, str]]:
    """(label, A, B) differences to report, when both entries ran."""
    pairs = []
    if best is not None:
        pairs += [("mix − best single", "mix", best), ("best single − c4", best, "c4")]
    pairs += [("mix − c4", "mix", "c4"), ("igsp − self-cal", "igsp", "self-cal"), ("igsp − sgs", "igsp", "sgs"),
              ("self-cal − sgs", "self-cal", "sgs")]
    variants = list(spec["variants"])
    if "igsp" in entries:  # the study: IGSP against each of its ablations
        pairs += [(f"igsp − {v}", "igsp", v) for v in variants]
    elif variants:  # a design study (variants only): each variant against the first, its base
        pairs += [(f"{v} − {variants[0]}", v, variants[0]) for v in variants[1:]]
    return [(label, a, b) for label, a, b in pairs if a in entries and b in entries and a != b]


#: claims of the paper: (key, kind, arguments, sign, paper value)
CLAIMS: tuple[tuple[str, str, tuple[str, ...], int, float | None], ...] = (
    ("ρ(perplexity, general) > 0", "rho", ("perplexity", "general"), +1, PAPER["spearman_perplexity"]["general"]),
    ("ρ(perplexity, code) < 0", "rho", ("perplexity", "code"), -1, PAPER["spearman_perplexity"]["code"]),
    ("ρ(perplexity, math) < 0", "rho", ("perplexity", "math"), -1, PAPER["spearman_perplexity"]["math"]),
    ("mix > best single", "diff", ("mix − best single",), +1,
     PAPER["total_retention_pct"]["mix"] - PAPER["total_retention_pct"]["best single (MetaMathQA)"]),
    ("best single > c4", "diff", ("best single − c4",), +1,
     PAPER["total_retention_pct"]["best single (MetaMathQA)"] - PAPER["total_retention_pct"]["c4"]),
    ("mix > c4", "diff", ("mix − c4",), +1, PAPER["total_retention_pct"]["mix"] - PAPER["total_retention_pct"]["c4"]),
    ("igsp > self-cal", "diff", ("igsp − self-cal",), +1, PAPER["igsp_minus"]["self-cal"]),
    ("self-cal > sgs", "diff", ("self-cal − sgs",), +1,
     PAPER["igsp_minus"]["sgs"] - PAPER["igsp_minus"]["self-cal"]),
    ("igsp > sgs", "diff", ("igsp − sgs",), +1, PAPER["igsp_minus"]["sgs"]),
)


def build_study(spec: Mapping[str, Any], dense: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]], *,
                out_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``study.json`` content for the finished ``runs`` (see the module docstring).

    The result does not depend on the order of ``runs``: they are taken sorted by run id (the order ``runs/``
    lists them in), since the bootstrap draws by position, so the study written when the last run finishes is
    the one ``--report-only`` rebuilds from ``runs/``.
    """
    runs = dict(sorted(runs.items()))

    study: dict[str, Any] = {"format": FORMAT, "config": dict(spec), "model_fingerprint": dense["model_fingerprint"],
                             "split": dense["split"], "eval_dtype": dense["dtype"],
                             "device": dense.get("device", "cpu"),  # where the runs ran (older studies: CPU)
                             "excluded_near_chance": excluded(spec, dense),
                             "dense": _dense_table(spec, dense), "entries": {}, "differences": {}, "spearman": {},
                             "verdicts": {}, "paper": PAPER, "provenance": provenance()}
    if out_dir is not None:
        check = read_json(Path(out_dir) / "runs" / "dtype_check.json")
        if check is not None:
            study["dtype_check"] = dtype_agreement(spec, check, n_boot=spec["n_boot"])
    for entry in spec["entries"]:
        mine = [r for r in runs.values() if r["entry"] == entry]
        if mine:
            study["entries"][entry] = {"kind": mine[0]["kind"], "calibration": mine[0]["calibration"],
                                       "metrics": _mean_metrics(mine), "runs": {}}
    seed_variance: dict[float, tuple[str, dict[str, tuple[float | None, int]]]] = {}
    for pruner in spec["pruners"]:
        for s in spec["sparsities"]:
            group = {rid: r for rid, r in runs.items() if r["pruner"] == pruner and r["sparsity"] == s}
            if not group:
                continue
            pooled = _section(study, spec, dense, group, pruner, s, seed_variance.get(s))
            if s not in seed_variance and pooled["total"][0] is not None:
                seed_variance[s] = (pruner, pooled)
    _verdicts(study, spec)
    return study


def _section(study, spec, dense, group, pruner: str, s: float,
             fallback: tuple[str, dict[str, tuple[float | None, int]]] | None) -> dict[str, tuple[float | None, int]]:
    """One pruner and sparsity: entry aggregates, differences, Spearman. Returns the pooled seed variance of its
    multi-seed entries; a pruner with none (every entry one seed) borrows ``fallback``'s, an earlier pruner's at the
    same sparsity, and its differences record whose (``seed_variance_from``)."""
    key = skey(s)
    rep = run_retentions(spec, dense, group, n_boot=spec["n_boot"])
    suite = _suite(spec)
    by_entry: dict[str, list[str]] = {}
    for rid, r in group.items():
        by_entry.setdefault(r["entry"], []).append(rid)
    for rids in by_entry.values():
        rids.sort(key=lambda rid: group[rid]["seed"])
    targets = list(suite) + [t for t in TARGETS]
    for entry, rids in by_entry.items():
        rec = {"seeds": [group[r]["seed"] for r in rids],
               "achieved_sparsity": float(np.mean([group[r]["achieved_sparsity"] for r in rids])),
               "dimensions": {t: _points(seed_summary(rep, rids, t)) for t in TARGETS
                              if t != "total" and t in rep.point[rids[0]]},
               "total": _points(seed_summary(rep, rids, "total")),
               "benchmarks": {b: _points(seed_summary(rep, rids, b)) for b in suite},
               "secondary": {b: {k: 100 * v for k, v in sc.items()}
                             for b, sc in _secondary(spec, dense, [group[r] for r in rids]).items()},
               "timings": {k: float(np.mean([group[r]["timings"].get(k, 0.0) for r in rids]))
                           for k in ("build_s", "metrics_s", "prune_s", "eval_s", "total_s")}}
        study["entries"][entry]["runs"].setdefault(pruner, {})[key] = rec
    entries = study["entries"]
    singles = [e for e in by_entry if e in spec["sources"]]
    best = max(singles, key=lambda e: (entries[e]["runs"][pruner][key]["total"]["mean"], e)) if singles else None
    pooled = {t: pooled_seed_variance([[rep.point[r][t] for r in rids] for rids in by_entry.values()])
              for t in targets if t in rep.point[next(iter(group))]}
    own, source = pooled, pruner
    if pooled["total"][0] is None and fallback is not None:
        source, pooled = fallback[0], {t: fallback[1].get(t, (None, 0)) for t in pooled}
    diffs = {}
    for label, a, b in _pairs(by_entry, spec, best):
        diffs[label] = {"a": a, "b": b, "seed_variance_from": source,
                        "total": _points(diff_interval(rep, by_entry[a], by_entry[b], "total",
                                                       pooled=pooled["total"])),
                        "dimensions": {d: _points(diff_interval(rep, by_entry[a], by_entry[b], d, pooled=pooled[d]))
                                       for d in TARGETS if d != "total" and d in pooled}}
    study["differences"].setdefault(pruner, {})[key] = {"best_single": best, "pairs": diffs}
    # Spearman over single sources: x = seed-mean metric, y = seed-mean retention (+ its item replicates)
    table: dict[str, dict[str, Any]] = {}
    if len(singles) >= 3:
        for metric in METRICS:
            xs = [entries[e]["metrics"]["mean"].get(metric) for e in singles]
            if any(x is None or not math.isfinite(x) for x in xs):
                continue
            table[metric] = {}
            for t in TARGETS:
                if t not in rep.boot:
                    continue
                ys = [_target_mean(entries[e]["runs"][pruner][key], t) for e in singles]
                y_boot = np.stack([rep.boot[t][:, [rep.runs.index(r) for r in by_entry[e]]].mean(1) for e in singles],
                                  axis=1) if rep.boot else None
                table[metric][t] = spearman_interval(xs, ys, y_boot, n_boot=spec["n_boot"] or 2000)
    rows_all = {e: {"metrics": entries[e]["metrics"]["mean"],
                    "retention": {t: _target_mean(entries[e]["runs"][pruner][key], t) for t in TARGETS}}
                for e in by_entry}
    study["spearman"].setdefault(pruner, {})[key] = {
        "sources": table, "all": spearman_table(rows_all, METRICS, TARGETS), "n_sources": len(singles)}
    return own


def _target_mean(rec: Mapping[str, Any], target: str) -> float:
    if target == "total":
        return rec["total"]["mean"]
    cell = rec["dimensions"].get(target)
    return math.nan if cell is None else cell["mean"]


def _verdicts(study: dict[str, Any], spec: Mapping[str, Any]) -> None:
    for pruner in spec["pruners"]:
        for s in spec["sparsities"]:
            key = skey(s)
            tag = "" if (pruner == spec["pruners"][0] and s == spec["sparsities"][0]) else f" [{pruner} {key}]"
            sp = study["spearman"].get(pruner, {}).get(key, {}).get("sources", {})
            diffs = study["differences"].get(pruner, {}).get(key, {}).get("pairs", {})
            for claim, kind, args, sign, paper in CLAIMS:
                if kind == "rho":
                    cell = sp.get(args[0], {}).get(args[1])
                    if cell is None or cell.get("rho") is None:
                        continue
                    study["verdicts"][claim + tag] = {
                        "verdict": verdict(cell["lo"], cell["hi"], sign), "quantity": f"Spearman ρ({args[0]}, "
                        f"{args[1]} retention) over {cell['n']} single sources", "estimate": cell["rho"],
                        "lo": cell["lo"], "hi": cell["hi"], "p": cell["p"], "paper": paper, "pruner": pruner,
                        "sparsity": s}
                else:
                    d = diffs.get(args[0])
                    if d is None:
                        continue
                    t = d["total"]
                    if t.get("seed_variance_unknown"):
                        note = "; item-sampling variance only (one seed per side, no seed variance to borrow)"
                    elif d.get("seed_variance_from", pruner) != pruner:  # every entry one seed: borrowed
                        note = f"; one seed per side, seed variance borrowed from {d['seed_variance_from']}"
                    else:
                        note = ""
                    study["verdicts"][claim + tag] = {
                        "verdict": verdict(t["lo"], t["hi"], sign),
                        "quantity": f"total retention, {d['a']} − {d['b']} (points){note}",
                        "estimate": t["estimate"], "lo": t["lo"], "hi": t["hi"],
                        "paper": paper, "n_seeds": t["n_seeds"], "pruner": pruner, "sparsity": s}


def dtype_agreement(spec: Mapping[str, Any], check: Mapping[str, Any], *, n_boot: int) -> dict[str, Any]:
    """fp32 vs low-precision scoring: dense scores side by side with the paired difference's 95% interval, and
    the first pruned run's benchmark / dimension / total retention computed both ways."""
    from ..evaluation.study_suite import score_terms
    from .statistics import bootstrap_counts

    suite = _suite(spec)
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {"run": check["run"], "dtype": check["dtype"], "dense": {}}
    for name, bench in suite.items():
        row = {}
        for score in bench.scores:
            a_num, a_den = score_terms(check["dense"]["float32"][name], score)
            b_num, b_den = score_terms(check["dense"]["low"][name], score)
            w = bootstrap_counts(len(a_num), max(n_boot, 200), rng)
            diff = (w @ b_num) / (w @ b_den) - (w @ a_num) / (w @ a_den)
            row[score] = {"float32": float(a_num.sum() / a_den.sum()), "low": float(b_num.sum() / b_den.sum()),
                          "diff_lo": float(np.quantile(diff, 0.025)), "diff_hi": float(np.quantile(diff, 0.975))}
        out["dense"][name] = row
    point = {label: run_retentions(spec, {"benchmarks": check["dense"][label]},
                                   {"r": {"benchmarks": check["pruned"][label]}}, n_boot=0).point["r"]
             for label in ("float32", "low")}
    out["retention"] = {t: {"float32": point["float32"][t], "low": point["low"][t]} for t in point["float32"]}
    return out
