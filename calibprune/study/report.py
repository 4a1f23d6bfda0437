"""``report.md`` (and PNG plots) from a ``study.json``: verdict table first, then the numbers it rests on."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..evaluation.benchmarks import DIMENSIONS
from .aggregate import METRICS, skey
from .plan import PAPER, TARGETS

__all__ = ["require_matplotlib", "write_report"]


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError("the study report's plots need matplotlib: pip install 'calibprune[study]' "
                          "(or pass plots=False / --no-plots)") from exc


def _pct(x: Any, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pts(x: Any, digits: int = 1) -> str:
    """A value already in percentage points."""
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _cell(summary: Mapping[str, Any] | None) -> str:
    """``mean ± sd [se]`` (points); ``sd`` only with >= 2 seeds."""
    if not summary:
        return "–"
    out = _pts(summary["mean"])
    if summary.get("sd") is not None:
        out += f" ± {_pts(summary['sd'])}"
    if summary.get("se") is not None:
        out += f" [{_pts(summary['se'])}]"
    return out


def _interval(d: Mapping[str, Any] | None, digits: int = 1) -> str:
    """``estimate (lo, hi)`` of a difference already in percentage points."""
    if not d:
        return "–"
    return f"{d['estimate']:+.{digits}f} ({d['lo']:+.{digits}f}, {d['hi']:+.{digits}f})"


def _verdict_table(study: Mapping[str, Any]) -> list[str]:
    lines = ["## Verdict", "",
             "Each claim of the paper (arXiv 2606.03328, LLaMA-3.1-8B, SparseGPT 60%) against this study at 95% "
             "confidence: *confirmed* when the interval lies on the claimed side of 0, *contradicted* when it lies on "
             "the other side, *inconclusive* otherwise. Differences are total-retention points (mean over seeds); "
             "their intervals hold seed-to-seed and item-sampling variance (Welch–Satterthwaite t). ρ intervals are "
             "bootstrap over sources and items. The paper column holds the paper's SparseGPT figure on every row: on "
             "the rows of another pruner the claim tested is the same sign, not that pruner's value in the paper.", "",
             "| claim | quantity | paper | this study (95% interval) | verdict |", "|---|---|---|---|---|"]
    verdicts = study.get("verdicts", {})
    if not verdicts:
        return ["## Verdict", "", "No claim of the paper applies to these entries (a claim needs its entries: the "
                "single sources for ρ, mix / C4 for the mix claims, IGSP / Self-Cal / SGS for IGSP's).", ""]
    for claim, v in verdicts.items():
        digits = 2 if claim.startswith("ρ") else 1
        paper = "–" if v.get("paper") is None else f"{v['paper']:+.{digits}f}"
        est = f"{v['estimate']:+.{digits}f}"
        ci = "" if v.get("lo") is None else f" ({v['lo']:+.{digits}f}, {v['hi']:+.{digits}f})"
        extra = f", p = {v['p']:.2g}" if v.get("p") is not None else ""
        lines.append(f"| {claim} | {v['quantity']} | {paper} | {est}{ci}{extra} | **{v['verdict']}** |")
    return lines + [""]


def _paper_lines() -> list[str]:
    sp, tot, igsp = PAPER["spearman_perplexity"], PAPER["total_retention_pct"], PAPER["igsp_minus"]
    return [f"Paper reference values ({PAPER['model']}, sparsity {PAPER['sparsity']}, {PAPER['n_sources']} sources): "
            "Spearman ρ(perplexity, ·) " + ", ".join(f"{d} {v:+.2f}" for d, v in sp.items())
            + "; total retention " + ", ".join(f"{e} {v:.1f}%" for e, v in tot.items())
            + "; IGSP − " + ", ".join(f"{e} {v:+.1f}" for e, v in igsp.items()) + " points.", ""]


def _dense_table(study: Mapping[str, Any]) -> list[str]:
    lines = ["## Dense model (" + study.get("eval_dtype", "") + f", {study.get('split', 'test').upper()} items)", "",
             "Accuracy beside chance, with how many standard errors it sits above chance (a benchmark within 2 SE "
             "of chance is flagged and should not be read as a capability); `acc_cn` = chance-normalised accuracy, "
             "`margin` = mean gold log-likelihood margin over the other choices; NLL per token for the likelihood "
             "benchmarks. **primary** is the score whose retention enters the dimension.", "",
             "| benchmark | dimension | items | primary | acc | chance | (acc − chance) / SE | acc_cn | margin | NLL | "
             "seconds | flag |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, b in study["dense"].items():
        sc = b["scores"]
        flag = "near chance: not counted" if b.get("near_chance") else ""
        lines.append(f"| {name} | {b['dimension']} | {b['n']} | {b['primary']} | {_num(sc.get('acc'))} | "
                     f"{_num(b.get('chance'))} | {_num(b.get('above_chance_se'), 1)} | {_num(sc.get('acc_cn'))} | "
                     f"{_num(sc.get('margin'))} | {_num(sc.get('nll'))} | {b['seconds']:.0f} | {flag} |")
    return lines + [""]


def _dtype_table(study: Mapping[str, Any]) -> list[str]:
    check = study.get("dtype_check")
    if not check:
        return []
    low = check["dtype"]
    lines = [f"## Scoring precision: fp32 vs {low}", "",
             f"The dense model and the first pruned run (`{check['run']}`) were scored in both precisions on the same "
             f"items. Dense scores, with the 95% paired-bootstrap interval of ({low} − fp32):", "",
             f"| benchmark | score | fp32 | {low} | {low} − fp32 (95%) |", "|---|---|---|---|---|"]
    for name, row in check["dense"].items():
        for score, v in row.items():
            lines.append(f"| {name} | {score} | {v['float32']:.4f} | {v['low']:.4f} | "
                         f"({v['diff_lo']:+.4f}, {v['diff_hi']:+.4f}) |")
    lines += ["", "Retention of that pruned run (%), both precisions:", "",
              "| target | fp32 | " + low + " |", "|---|---|---|"]
    for t, v in check["retention"].items():
        lines.append(f"| {t} | {_pct(v['float32'])} | {_pct(v['low'])} |")
    return lines + [""]


def _section(study: Mapping[str, Any], pruner: str, key: str) -> list[str]:
    entries = {e: v for e, v in study["entries"].items() if key in v["runs"].get(pruner, {})}
    if not entries:
        return []
    runs = {e: v["runs"][pruner][key] for e, v in entries.items()}
    ranked = sorted(entries, key=lambda e: -runs[e]["total"]["mean"])
    lines = [f"## {pruner}, sparsity {key}", "", "### Retention (%): mean ± sd over seeds [item-sampling SE]", "",
             "| entry | kind | seeds | " + " | ".join(TARGETS) + " | calib ppl | 4-gram agg |",
             "|---" * (len(TARGETS) + 5) + "|"]
    for e in ranked:
        r, m = runs[e], entries[e]["metrics"]["mean"]
        lines.append(f"| {e} | {entries[e]['kind']} | {','.join(map(str, r['seeds']))} | "
                     + " | ".join(_cell(r["dimensions"].get(d)) for d in DIMENSIONS)
                     + f" | **{_cell(r['total'])}** | {_num(m.get('perplexity'), 1)} | "
                     f"{_num(m.get('ngram_aggregation'))} |")
    ses = {t: max((runs[e]["dimensions"].get(t, {}).get("se") or 0.0) for e in runs) for t in DIMENSIONS}
    lines += ["", "Largest item-sampling SE of a dimension's retention over these entries: "
              + ", ".join(f"{d} {_pts(v)}" for d, v in ses.items()) + " points.", ""]
    diffs = study["differences"].get(pruner, {}).get(key, {})
    if diffs.get("pairs"):
        best = f"; best single = {diffs['best_single']}" if diffs.get("best_single") else ""
        lines += [f"### Differences (points, 95% interval){best}", "",
                  "| difference | seeds | total | " + " | ".join(DIMENSIONS) + " |",
                  "|---" * (len(DIMENSIONS) + 3) + "|"]
        unknown, lent = False, set()
        for label, d in diffs["pairs"].items():
            seeds = "/".join(map(str, d["total"]["n_seeds"]))
            mark = "†" if d["total"].get("seed_variance_unknown") else ""
            if d.get("seed_variance_from", pruner) != pruner:  # every entry one seed: another pruner's variance
                mark = "‡"
                lent.add(d["seed_variance_from"])
            unknown = unknown or mark == "†"
            lines.append(f"| {label} | {seeds} | **{_interval(d['total'])}**{mark} | "
                         + " | ".join(_interval(d["dimensions"].get(x)) for x in DIMENSIONS) + " |")
        if unknown:
            lines += ["", "† One seed per side and no multi-seed entry to borrow a seed variance from: the interval "
                      "holds item-sampling variance only, so it is too narrow by the unmeasured seed-to-seed "
                      "variance."]
        if lent:
            lines += ["", f"‡ Every {pruner} entry ran one seed: the seed variance in these intervals is the pooled "
                      f"seed variance of {', '.join(sorted(lent))}'s multi-seed entries at this sparsity (an "
                      "assumption: calibration seeds move both pruners' retention about as much)."]
        lines.append("")
    sp = study["spearman"].get(pruner, {}).get(key, {})
    if sp.get("sources"):
        lines += [f"### Spearman ρ over the {sp['n_sources']} single sources: ρ (95% bootstrap interval), p", "",
                  "| metric | " + " | ".join(TARGETS) + " |", "|---" * (len(TARGETS) + 1) + "|"]
        for metric in METRICS:
            row = sp["sources"].get(metric)
            if not row:
                continue
            cells = []
            for t in TARGETS:
                c = row.get(t, {})
                if c.get("rho") is None:
                    cells.append("–")
                else:
                    ci = "" if c.get("lo") is None else f" ({c['lo']:+.2f}, {c['hi']:+.2f})"
                    cells.append(f"{c['rho']:+.2f}{ci}, {c['p']:.2g}")
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    benches = list(study["dense"])
    lines += ["### Per-benchmark retention of the primary score (%), mean over seeds", "",
              "| entry | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
    for e in ranked:
        lines.append(f"| {e} | " + " | ".join(_pts(runs[e]["benchmarks"][b]["mean"]) for b in benches) + " |")
    lines += ["", "### Accuracy beside the continuous scores: retention (%) of acc / acc_cn / margin", "",
              "| entry | " + " | ".join(b for b in benches if study["dense"][b]["kind"] == "choice") + " |",
              "|---" * (1 + sum(study["dense"][b]["kind"] == "choice" for b in benches)) + "|"]
    for e in ranked:
        sec = runs[e]["secondary"]
        lines.append(f"| {e} | " + " | ".join(
            " / ".join(_pts(sec[b].get(s), 0) for s in ("acc", "acc_cn", "margin"))
            for b in benches if study["dense"][b]["kind"] == "choice") + " |")
    return lines + [""]


def _plot(study: Mapping[str, Any], out: Path, pruner: str, key: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    entries = [e for e, v in study["entries"].items() if key in v["runs"].get(pruner, {})]
    runs = {e: study["entries"][e]["runs"][pruner][key] for e in entries}
    grid = [[(runs[e]["dimensions"].get(t, {}) if t != "total" else runs[e]["total"]).get("mean", math.nan)
             for t in TARGETS] for e in entries]
    fig, ax = plt.subplots(figsize=(1.3 * len(TARGETS) + 2.5, 0.42 * len(entries) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(TARGETS)), TARGETS)
    ax.set_yticks(range(len(entries)), entries)
    flat = [v for row in grid for v in row if math.isfinite(v)]
    mid = (min(flat) + max(flat)) / 2 if flat else 0.0
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < mid else "black")
    fig.colorbar(im, ax=ax, label="retention (%, pruned / dense), mean over seeds")
    ax.set_title(f"{study['config']['model']}: {pruner} {key}, retention (%)")
    fig.tight_layout()
    names = [f"heatmap_{pruner}_s{key}.png"]
    fig.savefig(out / names[0], dpi=120)
    plt.close(fig)

    sp = study["spearman"].get(pruner, {}).get(key, {}).get("sources", {}).get("perplexity", {})
    fig, axes = plt.subplots(1, len(DIMENSIONS), figsize=(4.2 * len(DIMENSIONS), 4), squeeze=False)
    for ax, dim in zip(axes[0], DIMENSIONS):
        for e in entries:
            x = study["entries"][e]["metrics"]["mean"].get("perplexity")
            y = runs[e]["dimensions"].get(dim)
            if x is None or y is None:
                continue
            single = study["entries"][e]["kind"] == "source"
            err = y["sd"] if y.get("sd") is not None else y.get("se")
            ax.errorbar(x, y["mean"], yerr=err, fmt="o" if single else "*", ms=5 if single else 10,
                        color="tab:blue" if single else "tab:red", capsize=2)
            ax.annotate(e, (x, y["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        cell = sp.get(dim, {})
        rho = "n/a" if cell.get("rho") is None else f"{cell['rho']:+.2f} [{cell['lo']:+.2f}, {cell['hi']:+.2f}]" \
            if cell.get("lo") is not None else f"{cell['rho']:+.2f}"
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("calibration perplexity (dense model)")
        ax.set_ylabel(f"{dim} retention (%)")
        ax.set_title(f"{dim}: ρ {rho}", fontsize=10)
    fig.suptitle(f"{pruner} {key}: calibration perplexity vs retention (● single sources, ρ over these; ★ "
                 "constructed; bars: sd over seeds, else item SE)", fontsize=10)
    fig.tight_layout()
    names.append(f"scatter_perplexity_{pruner}_s{key}.png")
    fig.savefig(out / names[1], dpi=120)
    plt.close(fig)
    return names


def write_report(study: Mapping[str, Any], out_dir: str | os.PathLike, *, plots: bool = True) -> Path:
    """Write ``report.md`` (and the PNG plots) for a ``study.json`` of format 2; returns the report's path."""
    if study.get("format") != 2:
        raise ValueError(f"write_report reads study.json format 2, got format {study.get('format')!r} (format-1 "
                         "studies were written by calibprune before the study suite; their report.md stays valid)")
    out = Path(out_dir)
    cfg = study["config"]
    prov = study.get("provenance", {})
    progress = study.get("progress", {})
    state = "complete" if study.get("complete") else (
        f"INCOMPLETE: {progress.get('done', '?')} of {progress.get('planned', '?')} runs"
        + (f", about {progress['eta_s'] / 3600:.1f} h of runs left" if progress.get("eta_s") else ""))
    lines = [f"# Calibration study: {cfg['model']}", "",
             f"Generated by `calibprune study` ({state}). calibprune {prov.get('versions', {}).get('calibprune')}, "
             f"git `{prov.get('git_revision')}`, {prov.get('created')}; runs on {study.get('device', 'cpu')}, "
             f"report written on {prov.get('device')}.", "",
             "| setting | value |", "|---|---|",
             f"| entries | {len(cfg['sources'])} single sources + {', '.join(cfg['constructed']) or 'none'}"
             + (f"; variants {', '.join(cfg['variants'])}" if cfg.get("variants") else "") + " |",
             f"| calibration | n = {cfg['n']} × seqlen = {cfg['seqlen']} tokens; "
             + (f"seeds {cfg['seeds']} for {', '.join(cfg['seeded'])}, seed {cfg['seeds'][0]} for the rest |"
                if cfg["seeded"] and len(cfg["seeds"]) > 1 else f"seed {cfg['seeds'][0]} |"),
             f"| pruning | {', '.join(cfg['pruners'])}"
             + (f" (the first for every entry; the others for {', '.join(cfg['pruner_entries'])})"
                if len(cfg["pruners"]) > 1 and cfg["pruner_entries"] else "")
             + f", unstructured, sparsity {', '.join(map(skey, cfg['sparsities']))} |",
             f"| evaluation | study suite, {study.get('split', 'test').upper()} items, scored in "
             f"{study.get('eval_dtype')}: " + ", ".join(f"{b} ({d['n']})" for b, d in study["dense"].items()) + " |",
             f"| statistics | {cfg['n_boot']} paired bootstrap replicates; 95% intervals |", "",
             "Retention of a benchmark: its primary score pruned / dense (accuracy, chance-normalised accuracy or "
             "margin), or dense / pruned perplexity (WikiText-2, LAMBADA target NLL, the Code / Math likelihood "
             "proxies); dimension = mean of its benchmarks; total = mean of the four dimensions.", ""]
    lines += _verdict_table(study)
    lines += _dense_table(study)
    lines += _dtype_table(study)
    for pruner in cfg["pruners"]:
        for s in cfg["sparsities"]:
            key = skey(s)
            sec = _section(study, pruner, key)
            lines += sec
            if sec and plots:
                names = _plot(study, out, pruner, key)
                lines += ["### Plots", ""] + [f"![{n}]({n})" for n in names] + [""]
    lines += _paper_lines()
    notes = out / "notes.md"
    if notes.is_file():  # hand-written discussion, kept across regenerations
        lines += [notes.read_text().rstrip(), ""]
    if not study.get("complete"):
        lines += ["_The study is not finished: these tables hold the runs completed so far._", ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))
