"""The calibration study: which calibration data keeps which capability after pruning.

For every entry (each single source, the uniform mix of those sources, Self-Cal, SGS and IGSP) and every sparsity:
build the calibration set → its OIT metrics under the dense model → prune a fresh copy of the dense model with
fused SparseGPT → evaluate a capability suite → retention against the dense model. Then the Spearman rank
correlation (ρ and p, scipy) of every metric against every dimension's retention and the total, across entries.

Every step's result is cached under ``<out>/cache/`` with an atomic write (temporary file + rename), in a file
whose name carries a hash of everything that determines it (model, entry, n, seqlen, seed, generator options,
sparsity, pruning and evaluation settings). A study killed at any point therefore resumes where it stopped,
without redoing or losing finished work, and a changed setting never reuses a stale result. ``study.json`` is
rewritten after each finished run (``"complete": false`` until the end); ``report.md`` and the plots are written
at the end (or on demand with :func:`write_report`).

Usage::

    from calibprune.study import run_study
    study = run_study("smollm2-135m", sparsities=[0.6], n=32, seqlen=256, out_dir="results/smollm2-135m")
    study["spearman"]["0.6"]["sources"]["perplexity"]["general"]  # {"rho": ..., "p": ..., "n": ...}
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._io import atomic_write_text
from .calibration import CalibrationSet, build_calibration, igsp, self_cal, sgs
from .calibration.sources import check_available, list_sources, resolve_data_dir
from .evaluation.benchmarks import DIMENSIONS
from .evaluation.capabilities import evaluate, resolve_plan, retention
from .metrics import information_metrics
from .provenance import provenance

log = logging.getLogger(__name__)

__all__ = ["CONSTRUCTED", "METRICS", "PAPER", "StudySpec", "plan_study", "run_study", "spearman_table",
           "write_report"]

#: constructed calibration sets, in the order they run (after the single sources)
CONSTRUCTED: tuple[str, ...] = ("mix", "self-cal", "sgs", "igsp")
_GENERATORS: dict[str, Callable[..., CalibrationSet]] = {"self-cal": self_cal, "sgs": sgs, "igsp": igsp}

#: OIT metrics correlated with retention (keys of :func:`calibprune.metrics.information_metrics`)
METRICS: tuple[str, ...] = ("perplexity", "ngram_aggregation", "top10_mass", "ngram_diversity", "token_entropy",
                            "vocab_coverage", "zipf_slope")
TARGETS: tuple[str, ...] = (*DIMENSIONS, "total")

#: what arXiv 2606.03328 reports for LLaMA-3.1-8B, SparseGPT 60 % unstructured, 15 sources
PAPER: dict[str, Any] = {
    "model": "LLaMA-3.1-8B", "sparsity": 0.6, "n_sources": 15,
    "spearman_perplexity": {"general": 0.71, "math": -0.53, "code": -0.59},
    "total_retention_pct": {"mix": 58.8, "best single (MetaMathQA)": 50.0, "c4": 40.0},
    "igsp_minus": {"self-cal": 2.4, "sgs": 4.8},
}

_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# Specification and validation (everything checked before any work starts)
# ---------------------------------------------------------------------------------------------------------------


class StudySpec(dict):
    """The resolved, validated study settings (a plain dict, so it serialises as is)."""


def _parse_list(value: str | Iterable[Any] | None) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan_study(model: str, *, sources: str | Sequence[str] = "all", constructed: str | Sequence[str] = CONSTRUCTED,
               sparsities: float | Sequence[float] = (0.6,), n: int = 64, seqlen: int = 512, seed: int = 0,
               suite: str = "lite", limit: int | None = None, benchmarks: Sequence[str] | None = None,
               eval_overrides: Mapping[str, Mapping[str, Any]] | None = None, blocksize: int = 128,
               percdamp: float = 0.01, data_dir: str | os.PathLike | None = None,
               data_source: str = "offline", gen_batch_size: int = 16,
               generator_options: Mapping[str, Mapping[str, Any]] | None = None,
               out_dir: str | os.PathLike | None = None) -> StudySpec:
    """Validate a study request and resolve it; reads no model and no calibration data.

    ``sources``: ``"all"`` (every registered source loadable with ``data_source``: with ``"offline"`` those whose
    files are in the data dir), a comma-separated string or a list of names; ``constructed``: any of
    :data:`CONSTRUCTED` (``"none"`` or ``[]`` for none). ``generator_options`` passes keyword arguments to
    ``self_cal`` / ``sgs`` / ``igsp`` by entry name (e.g. ``{"igsp": {"pool_factor": 3.0}}``), and
    ``eval_overrides`` per-benchmark options to :func:`calibprune.evaluate` (e.g. ``{"mmlu": {"limit": 100}}``).

    Raises ``ValueError`` (unknown source / constructed set / benchmark / suite / option, bad numbers, fewer than
    3 entries to correlate) or ``FileNotFoundError`` (missing offline file, naming where it looked).
    """
    if data_source not in ("auto", "offline", "hub"):
        raise ValueError(f"data_source must be 'auto', 'offline' or 'hub', got {data_source!r}")
    resolved_dir = resolve_data_dir(data_dir)
    if sources == "all" or sources == ["all"]:
        names = list_sources(offline_only=data_source == "offline", data_dir=resolved_dir)
        if not names:
            raise FileNotFoundError(f"sources='all' found no source with offline files (data dir: {resolved_dir}); "
                                    "set CALIBPRUNE_DATA_DIR or pass data_dir=")
    else:
        names = _parse_list(sources) or []
    if len(set(names)) != len(names):
        raise ValueError(f"sources repeat a name: {names}")
    modes = {name: check_available(name, data_dir=resolved_dir, source=data_source) for name in names}

    if constructed in ("none", None):
        constructed = []
    built = _parse_list(constructed) or []
    for name in built:
        if name not in CONSTRUCTED:
            raise ValueError(f"unknown constructed set {name!r}; known: {', '.join(CONSTRUCTED)}")
    if "mix" in built and len(names) < 2:
        raise ValueError("the uniform mix needs at least 2 sources")
    gen_opts = {k: dict(v) for k, v in (generator_options or {}).items()}
    for name, opts in gen_opts.items():
        if name not in _GENERATORS:
            raise ValueError(f"generator_options for {name!r}; generators are {', '.join(_GENERATORS)}")
        allowed = {p for p in inspect.signature(_GENERATORS[name]).parameters
                   if p not in ("model", "tokenizer", "n", "seqlen", "seed", "progress", "cache", "cache_dir")}
        bad = set(opts) - allowed
        if bad:
            raise ValueError(f"unknown option(s) {sorted(bad)} for {name}; allowed: {sorted(allowed)}")

    if isinstance(sparsities, (int, float)):
        sparsities = [sparsities]
    sparsities = [float(s) for s in (_parse_list(sparsities) or [])]
    if not sparsities:
        raise ValueError("no sparsity given")
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {s}")
    if len(set(sparsities)) != len(sparsities):
        raise ValueError(f"sparsities repeat a value: {sparsities}")
    for label, value, low in (("n", n, 1), ("seqlen", seqlen, 8), ("blocksize", blocksize, 1),
                              ("gen_batch_size", gen_batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    if "mix" in built and n < len(names):
        raise ValueError(f"n={n} is smaller than the {len(names)} sources of the uniform mix")
    entries = names + built
    if len(entries) < 3:
        raise ValueError(f"a Spearman study needs at least 3 entries, got {entries}")

    benchmarks = _parse_list(benchmarks)
    plan = resolve_plan(suite, limit=limit, benchmarks=benchmarks, overrides=eval_overrides,
                        data_dir=resolved_dir)  # validates suite, benchmarks and options; loads the documents
    return StudySpec(
        format=_FORMAT, model=str(model), sources=names, source_modes=modes, constructed=built, entries=entries,
        sparsities=sparsities, n=n, seqlen=seqlen, seed=seed, suite=suite, limit=limit,
        benchmarks=list(plan["options"]), eval_options=plan["options"],
        eval_overrides={k: dict(v) for k, v in (eval_overrides or {}).items()}, method="sparsegpt (fused)",
        blocksize=blocksize, percdamp=percdamp, data_dir=str(resolved_dir) if resolved_dir else None,
        data_source=data_source, gen_batch_size=gen_batch_size, generator_options=gen_opts,
        out_dir=str(out_dir if out_dir is not None else Path("results") / _slug(Path(str(model)).name)))


# ---------------------------------------------------------------------------------------------------------------
# Atomic cache files
# ---------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _read_json(path: Path, key: str) -> dict[str, Any] | None:
    """A cached result, or ``None`` when absent, unreadable or made for other settings."""
    if not path.is_file():
        return None
    try:
        blob = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None
    if blob.get("key") != key:
        return None
    return blob


def _save_calibration(calib: CalibrationSet, path: Path) -> None:
    """Write ``<path>.pt`` + ``<path>.json`` so that a ``.pt`` on disk always has its provenance beside it.

    ``CalibrationSet.save`` writes each file atomically, the ``.json`` first, so two runs of the same study that
    build the same set at once both succeed (a fixed temporary name here used to make them collide).
    """
    calib.save(path)


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------


def _calib_key(spec: Mapping[str, Any], entry: str, model_id: str) -> str:
    parts: dict[str, Any] = {"model": model_id, "entry": entry, "n": spec["n"], "seqlen": spec["seqlen"],
                             "seed": spec["seed"], "data_source": spec["data_source"]}
    if entry == "mix":
        parts["sources"] = spec["sources"]
    if entry in _GENERATORS:
        parts["options"] = spec["generator_options"].get(entry, {})
        parts["batch_size"] = spec["gen_batch_size"]
    return _hash(parts)


def _build(entry: str, spec: Mapping[str, Any], model, tokenizer, cache_dir: Path) -> CalibrationSet:
    n, seqlen, seed = spec["n"], spec["seqlen"], spec["seed"]
    if entry in _GENERATORS:
        opts = {"batch_size": spec["gen_batch_size"], **spec["generator_options"].get(entry, {})}
        if entry == "sgs":
            opts.setdefault("data_dir", spec["data_dir"])
            opts.setdefault("data_source", spec["data_source"])
        return _GENERATORS[entry](model, tokenizer, n=n, seqlen=seqlen, seed=seed, cache_dir=cache_dir / "pools",
                                  **opts)
    sources = spec["sources"] if entry == "mix" else entry
    return build_calibration(tokenizer, sources, n=n, seqlen=seqlen, seed=seed, data_dir=spec["data_dir"],
                             data_source=spec["data_source"])


def _metrics(calib: CalibrationSet, model) -> dict[str, Any]:
    """Set-level OIT metrics plus the mean of the per-sample values; the dense forward runs once."""
    per = information_metrics(calib, model=model, per_sample=True)
    out: dict[str, Any] = information_metrics(calib, vocab_size=model.config.vocab_size)
    # rows have equal length, so the set perplexity (exp of the mean NLL over all tokens) is the geometric mean
    out["perplexity"] = float(torch.exp(torch.log(per["perplexity"]).mean()))
    out["per_sample_mean"] = {k: float(v.mean()) for k, v in per.items() if isinstance(v, torch.Tensor)}
    return out


def _summarise_eval(result: Mapping[str, Any]) -> dict[str, Any]:
    return {name: {k: b.get(k) for k in ("dimension", "metric", "value", "n", "seconds")}
            for name, b in result["benchmarks"].items()}


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def spearman_table(rows: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = METRICS,
                   targets: Sequence[str] = TARGETS) -> dict[str, dict[str, dict[str, Any]]]:
    """Spearman ρ and two-sided p of every metric against every target across ``rows``.

    ``rows``: ``{entry: {"metrics": {metric: value}, "retention": {target: value}}}``. Entries with a missing or
    non-finite value are left out of that pair; fewer than 3 points or a constant column gives ``rho = None``.
    """
    try:
        from scipy.stats import spearmanr
    except ImportError as exc:  # pragma: no cover - scipy ships with the study extra
        raise ImportError("the study's Spearman statistics need scipy: pip install 'calibprune[study]'") from exc
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


def _spearman_section(entries: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in spec["sparsities"]:
        key = _skey(s)
        rows_all = {e: {"metrics": v["metrics"], "retention": {**v["runs"][key]["dimensions"],
                                                               "total": v["runs"][key]["total"]}}
                    for e, v in entries.items() if key in v.get("runs", {})}
        rows_src = {e: r for e, r in rows_all.items() if e in spec["sources"]}
        out[key] = {"sources": spearman_table(rows_src), "all": spearman_table(rows_all)}
    return out


def _skey(s: float) -> str:
    return f"{s:g}"


# ---------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------


def run_study(model: str, *, out_dir: str | os.PathLike | None = None, report: bool = True, plots: bool = True,
              progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Run (or resume) the study and return the ``study.json`` content; see the module docstring.

    ``model``: anything :func:`calibprune.load_model` takes. ``settings``: the keywords of :func:`plan_study`
    (sources, constructed, sparsities, n, seqlen, seed, suite, limit, benchmarks, eval_overrides, blocksize,
    percdamp, data_dir, data_source, gen_batch_size, generator_options). Writes ``<out_dir>/study.json`` (and
    ``report.md`` + plots when ``report``); intermediate results live in ``<out_dir>/cache``.
    """
    from .models import load_model
    from .pruning import prune_sparsegpt_fused

    spec = plan_study(model, out_dir=out_dir, **settings)
    if report and plots:
        _require_matplotlib()
    out = Path(spec["out_dir"])
    cache = out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    log.info("study of %s: %d entries x %d sparsities, n=%d seqlen=%d, suite %s -> %s", spec["model"],
             len(spec["entries"]), len(spec["sparsities"]), spec["n"], spec["seqlen"], spec["suite"], out)

    loaded, tokenizer = load_model(spec["model"])
    loaded.eval()
    from .evaluation.capabilities import model_fingerprint

    model_id = model_fingerprint(loaded)
    dense_state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
    eval_kwargs = {"limit": spec["limit"], "benchmarks": spec["benchmarks"], "data_dir": spec["data_dir"],
                   "overrides": spec["eval_overrides"] or None}

    t0 = time.perf_counter()
    dense = evaluate(loaded, tokenizer, spec["suite"], cache_dir=cache / "eval",
                     cache_key=f"{_slug(spec['model'])}-dense", **eval_kwargs)
    log.info("dense evaluation ready (%.0f s)", time.perf_counter() - t0)

    study: dict[str, Any] = {"format": _FORMAT, "complete": False, "config": dict(spec), "model_fingerprint": model_id,
                             "dense": _summarise_eval(dense), "entries": {}, "paper": PAPER}
    total_runs = len(spec["entries"]) * len(spec["sparsities"])
    bar = tqdm(total=total_runs, desc="study", unit="run", disable=not progress)
    try:
        for entry in spec["entries"]:
            record = _run_entry(entry, spec, loaded, tokenizer, dense_state, dense, model_id, cache, bar,
                                prune_sparsegpt_fused, eval_kwargs)
            study["entries"][entry] = record
            study["spearman"] = _spearman_section(study["entries"], spec)
            study["provenance"] = provenance()
            _write_json(out / "study.json", study)
    finally:
        bar.close()
        loaded.load_state_dict(dense_state)
    study["complete"] = True
    study["spearman"] = _spearman_section(study["entries"], spec)
    study["provenance"] = provenance()
    _write_json(out / "study.json", study)
    if report:
        write_report(study, out, plots=plots)
    return study


def _run_entry(entry: str, spec: Mapping[str, Any], model, tokenizer, dense_state, dense, model_id: str,
               cache: Path, bar, prune, eval_kwargs) -> dict[str, Any]:
    kind = "source" if entry in spec["sources"] else entry
    ckey = _calib_key(spec, entry, model_id)
    calib_path = cache / "calib" / f"{entry}-{ckey}.pt"
    metrics_path = cache / "metrics" / f"{entry}-{ckey}.json"
    timings: dict[str, float] = {}

    calib: CalibrationSet | None = None

    def get_calib() -> CalibrationSet:
        nonlocal calib
        if calib is None:
            if calib_path.is_file() and calib_path.with_suffix(".json").is_file():
                calib = CalibrationSet.load(calib_path)
                log.info("%s: calibration set from cache (%s)", entry, calib_path.name)
            else:
                model.load_state_dict(dense_state)
                t = time.perf_counter()
                calib = _build(entry, spec, model, tokenizer, cache)
                timings["build_s"] = time.perf_counter() - t
                _save_calibration(calib, calib_path)
                log.info("%s: built %d x %d in %.1f s", entry, calib.n, calib.seqlen, timings["build_s"])
            if tuple(calib.ids.shape) != (spec["n"], spec["seqlen"]):
                raise RuntimeError(f"{entry}: calibration set has shape {tuple(calib.ids.shape)}, expected "
                                   f"({spec['n']}, {spec['seqlen']})")
        return calib

    cached_metrics = _read_json(metrics_path, ckey)
    if cached_metrics is None:
        c = get_calib()
        model.load_state_dict(dense_state)
        t = time.perf_counter()
        metrics = _metrics(c, model)
        timings["metrics_s"] = time.perf_counter() - t
        cached_metrics = {"key": ckey, "entry": entry, "metrics": metrics, "timings": dict(timings),
                          "calibration": _calib_summary(c)}
        _write_json(metrics_path, cached_metrics)
    record: dict[str, Any] = {"kind": kind, "metrics": cached_metrics["metrics"],
                              "calibration": cached_metrics["calibration"], "timings": cached_metrics["timings"],
                              "runs": {}}

    for s in spec["sparsities"]:
        key = _skey(s)
        rkey = _hash({"calib": ckey, "sparsity": s, "blocksize": spec["blocksize"], "percdamp": spec["percdamp"],
                      "suite": spec["suite"], "eval": spec["eval_options"], "dense": _summarise_values(dense)})
        run_path = cache / "runs" / f"{entry}-s{key}-{rkey}.json"
        run = _read_json(run_path, rkey)
        if run is None:
            bar.set_postfix_str(f"{entry} @ {key}")
            c = get_calib()
            model.load_state_dict(dense_state)
            t = time.perf_counter()
            rep = prune(model, c, sparsity=s, blocksize=spec["blocksize"], percdamp=spec["percdamp"])
            prune_s = time.perf_counter() - t
            t = time.perf_counter()
            pruned = evaluate(model, tokenizer, spec["suite"], **eval_kwargs)
            eval_s = time.perf_counter() - t
            r = retention(pruned, dense)
            run = {"key": rkey, "entry": entry, "sparsity": s, "achieved_sparsity": rep.sparsity,
                   "dimensions": r["dimensions"], "total": r["total"],
                   "benchmarks": {k: {"pruned": v["pruned"], "retention": v["retention"]}
                                  for k, v in r["benchmarks"].items()},
                   "timings": {"prune_s": prune_s, "eval_s": eval_s},
                   "created": provenance()["created"]}
            _write_json(run_path, run)
            log.info("%s @ %s: total retention %.3f (%s) prune %.0f s, eval %.0f s", entry, key, run["total"],
                     ", ".join(f"{d} {v:.3f}" for d, v in run["dimensions"].items()), prune_s, eval_s)
        else:
            log.info("%s @ %s: cached (%s)", entry, key, run_path.name)
        record["runs"][key] = {k: run[k] for k in ("achieved_sparsity", "dimensions", "total", "benchmarks",
                                                   "timings")}
        bar.update(1)
    return record


def _summarise_values(result: Mapping[str, Any]) -> dict[str, float]:
    return {name: b["value"] for name, b in result["benchmarks"].items()}


def _calib_summary(calib: CalibrationSet) -> dict[str, Any]:
    prov = copy.deepcopy(calib.provenance)
    # generator provenance can hold whole per-sample lists; keep the scalars and short lists
    def trim(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: trim(v) for k, v in obj.items()}
        if isinstance(obj, list) and len(obj) > 32:
            return f"<{len(obj)} values>"
        return obj

    counts: dict[str, int] = {}
    for s in calib.row_sources:
        counts[s] = counts.get(s, 0) + 1
    return {"n": calib.n, "seqlen": calib.seqlen, "row_sources": counts, "provenance": trim(prov)}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError("the study report's plots need matplotlib: pip install 'calibprune[study]' "
                          "(or pass plots=False / --no-plots)") from exc


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pct(x: Any) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def _plot(study: Mapping[str, Any], out: Path, key: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    entries = [e for e, v in study["entries"].items() if key in v["runs"]]
    names: list[str] = []
    cols = list(TARGETS)
    grid = [[study["entries"][e]["runs"][key]["dimensions"].get(d, math.nan) if d != "total"
             else study["entries"][e]["runs"][key]["total"] for d in cols] for e in entries]
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2.5, 0.42 * len(entries) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(entries)), entries)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if math.isfinite(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < (min(map(min, grid)) + max(map(max, grid))) / 2 else "black")
    fig.colorbar(im, ax=ax, label="retention (pruned / dense)")
    ax.set_title(f"{study['config']['model']}: retention at sparsity {key} (%)")
    fig.tight_layout()
    name = f"heatmap_s{key}.png"
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    names.append(name)

    fig, axes = plt.subplots(1, len(DIMENSIONS), figsize=(4.2 * len(DIMENSIONS), 4), squeeze=False)
    sp = study.get("spearman", {}).get(key, {}).get("sources", {}).get("perplexity", {})
    for ax, dim in zip(axes[0], DIMENSIONS):
        for e in entries:
            x = study["entries"][e]["metrics"].get("perplexity")
            y = study["entries"][e]["runs"][key]["dimensions"].get(dim)
            if x is None or y is None or not math.isfinite(y):
                continue
            single = study["entries"][e]["kind"] == "source"
            ax.scatter(x, y, marker="o" if single else "*", s=30 if single else 90,
                       color="tab:blue" if single else "tab:red")
            ax.annotate(e, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        cell = sp.get(dim, {})
        rho = "n/a" if cell.get("rho") is None else f"{cell['rho']:+.2f} (p={cell['p']:.2g})"
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("calibration perplexity (dense model)")
        ax.set_ylabel(f"{dim} retention")
        ax.set_title(f"{dim}: Spearman ρ {rho}", fontsize=10)
    fig.suptitle(f"calibration perplexity vs retention, sparsity {key} (● single sources, ρ over these; "
                 "★ constructed)", fontsize=10)
    fig.tight_layout()
    name = f"scatter_perplexity_s{key}.png"
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    names.append(name)
    return names


def write_report(study: Mapping[str, Any], out_dir: str | os.PathLike, *, plots: bool = True) -> Path:
    """Write ``report.md`` (and the PNG plots) for a study result; returns the report's path."""
    out = Path(out_dir)
    cfg = study["config"]
    lines = [f"# Calibration study: {cfg['model']}", ""]
    lines += [
        f"Generated by `calibprune study` ({'complete' if study.get('complete') else 'INCOMPLETE, partial results'})."
        f" Provenance: calibprune {study.get('provenance', {}).get('versions', {}).get('calibprune')}, git "
        f"`{study.get('provenance', {}).get('git_revision')}`, {study.get('provenance', {}).get('created')}, "
        f"device {study.get('provenance', {}).get('device')}.", "",
        "| setting | value |", "|---|---|",
        f"| entries | {len(cfg['sources'])} single sources + {', '.join(cfg['constructed']) or 'none'} |",
        f"| calibration | n = {cfg['n']} samples × seqlen = {cfg['seqlen']} tokens, seed {cfg['seed']} |",
        f"| pruning | {cfg['method']}, unstructured, blocksize {cfg['blocksize']}, percdamp {cfg['percdamp']} |",
        f"| evaluation | suite `{cfg['suite']}`: "
        + ", ".join(f"{b} ({_opt(cfg['eval_options'][b])})" for b in cfg["benchmarks"]) + " |",
        "",
        "Retention: benchmark = pruned / dense (accuracy), dense ppl / pruned ppl (WikiText-2 and the NLL proxies "
        "`*_nll`); dimension = mean of its benchmarks; total = mean of the four dimensions. OIT metrics are "
        "computed on the whole calibration set (perplexity under the dense model).", "",
        "## Dense model", "", "| benchmark | dimension | metric | value | n |", "|---|---|---|---|---|"]
    for name, b in study["dense"].items():
        lines.append(f"| {name} | {b['dimension']} | {b['metric']} | {_fmt(b['value'], 4)} | {b.get('n') or '–'} |")
    lines.append("")
    for s in cfg["sparsities"]:
        key = _skey(s)
        entries = {e: v for e, v in study["entries"].items() if key in v["runs"]}
        if not entries:
            continue
        lines += [f"## Sparsity {key}", "", "### Retention (%) and OIT metrics", "",
                  "| entry | kind | " + " | ".join(TARGETS) + " | calib ppl | 4-gram agg | n-gram div | entropy "
                  "| vocab cov | Zipf |", "|---" * (len(TARGETS) + 8) + "|"]
        ranked = sorted(entries, key=lambda e: -_finite(entries[e]["runs"][key]["total"]))
        for e in ranked:
            v = entries[e]
            run = v["runs"][key]
            m = v["metrics"]
            lines.append(f"| {e} | {v['kind']} | " + " | ".join(_pct(run['dimensions'].get(d)) for d in DIMENSIONS)
                         + f" | **{_pct(run['total'])}** | {_fmt(m.get('perplexity'), 1)} | "
                         f"{_fmt(m.get('ngram_aggregation'))} | {_fmt(m.get('ngram_diversity'))} | "
                         f"{_fmt(m.get('token_entropy'), 2)} | {_fmt(m.get('vocab_coverage'), 4)} | "
                         f"{_fmt(m.get('zipf_slope'), 2)} |")
        lines.append("")
        se = _retention_se(study, key)
        if se:
            lines += ["Item-sampling standard error of a retention, median over entries (accuracy benchmarks: "
                      "√(p(1−p)/n) / dense accuracy per benchmark, combined over the dimension; perplexity and NLL "
                      "proxies are deterministic on their fixed items and add none): "
                      + ", ".join(f"{d} ±{100 * v:.1f}" for d, v in se.items())
                      + " points. Differences between entries smaller than about twice that are noise.", ""]
        bench_names = list(study["dense"])
        lines += ["### Per-benchmark retention (%)", "", "| entry | " + " | ".join(bench_names) + " |",
                  "|---" * (len(bench_names) + 1) + "|"]
        for e in ranked:
            b = entries[e]["runs"][key]["benchmarks"]
            lines.append(f"| {e} | " + " | ".join(_pct(b.get(n, {}).get("retention")) for n in bench_names) + " |")
        lines.append("")
        for subset, label in (("sources", "single sources only"), ("all", "all entries")):
            table = study.get("spearman", {}).get(key, {}).get(subset, {})
            if not table:
                continue
            n_pts = max((c["n"] for row in table.values() for c in row.values()), default=0)
            lines += [f"### Spearman ρ (p) of OIT metrics vs retention, {label} (n = {n_pts})", "",
                      "| metric | " + " | ".join(TARGETS) + " |", "|---" * (len(TARGETS) + 1) + "|"]
            for metric, row in table.items():
                lines.append(f"| {metric} | " + " | ".join(
                    "–" if row[t]["rho"] is None else f"{row[t]['rho']:+.2f} ({row[t]['p']:.2g})" for t in TARGETS)
                    + " |")
            lines.append("")
        if plots:
            names = _plot(study, out, key)
            lines += ["### Plots", ""] + [f"![{n}]({n})" for n in names] + [""]
        lines += _paper_comparison(study, key)
    notes = out / "notes.md"
    if notes.is_file():  # hand-written discussion, kept across regenerations
        lines += [notes.read_text().rstrip(), ""]
    if not study.get("complete"):
        lines += ["_The study is not finished: these tables hold the runs completed so far._", ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


def _retention_se(study: Mapping[str, Any], key: str) -> dict[str, float]:
    """Per dimension, the median over entries of the item-sampling standard error of its retention."""
    dense = study["dense"]
    per_dim: dict[str, list[float]] = {}
    for v in study["entries"].values():
        run = v["runs"].get(key)
        if run is None:
            continue
        for dim in DIMENSIONS:
            names = [b for b, d in dense.items() if d["dimension"] == dim]
            if not names:
                continue
            var = 0.0
            for b in names:
                d = dense[b]
                p = run["benchmarks"].get(b, {}).get("pruned")
                if d["metric"] in ("perplexity", "nll") or p is None or not d.get("n") or not d["value"]:
                    continue
                var += p * (1 - p) / d["n"] / d["value"] ** 2
            per_dim.setdefault(dim, []).append(math.sqrt(var) / len(names))
    return {d: sorted(v)[len(v) // 2] for d, v in per_dim.items() if v}


def _opt(opts: Mapping[str, Any]) -> str:
    if opts.get("max_windows") is not None:
        return f"{opts['max_windows']}×{opts.get('seqlen')} tokens"
    return f"{opts['limit']} items" if opts.get("limit") is not None else "all items"


def _finite(x: Any) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf


def _paper_comparison(study: Mapping[str, Any], key: str) -> list[str]:
    entries = study["entries"]
    runs = {e: v["runs"][key] for e, v in entries.items() if key in v["runs"]}
    total = {e: r["total"] for e, r in runs.items()}
    singles = {e: t for e, t in total.items() if entries[e]["kind"] == "source" and math.isfinite(t)}
    sp = study.get("spearman", {}).get(key, {}).get("sources", {}).get("perplexity", {})
    lines = [f"### Side by side with the paper (arXiv 2606.03328: {PAPER['model']}, SparseGPT "
             f"{PAPER['sparsity']:.0%}, {PAPER['n_sources']} sources)", "",
             "| quantity | paper | this study | same sign / order? |", "|---|---|---|---|"]
    for dim in DIMENSIONS:
        cell = sp.get(dim, {})
        ours, ref = cell.get("rho"), PAPER["spearman_perplexity"].get(dim)
        ours_s = "–" if ours is None else f"{ours:+.2f} (p = {cell['p']:.2g})"
        ref_s = "–" if ref is None else f"{ref:+.2f}"
        same = "–" if ours is None or ref is None else ("yes" if (ours > 0) == (ref > 0) else "no")
        lines.append(f"| ρ(calibration perplexity, {dim} retention) | {ref_s} | {ours_s} | {same} |")
    best = max(singles, key=singles.get) if singles else None
    paper_t = PAPER["total_retention_pct"]
    mix_vs_best = ""
    if "mix" in total and best is not None and math.isfinite(total["mix"]):
        mix_vs_best = "mix > best single: " + ("yes" if total["mix"] > singles[best] else "no")
    rows = [("uniform mix", paper_t["mix"], total.get("mix"), mix_vs_best),
            (f"best single source ({best or '–'})", paper_t["best single (MetaMathQA)"],
             singles.get(best) if best else None, ""),
            ("C4", paper_t["c4"], total.get("c4"), "")]
    for label, ref, ours, note in rows:
        lines.append(f"| total retention, {label} (%) | {ref:.1f} | {_pct(ours) if ours is not None else '–'} | "
                     f"{note} |")
    for other, ref in PAPER["igsp_minus"].items():
        if "igsp" in total and other in total:
            diff = 100 * (total["igsp"] - total[other])
            lines.append(f"| IGSP − {other} (total retention points) | {ref:+.1f} | {diff:+.1f} | "
                         f"{'yes' if diff > 0 else 'no'} |")
        else:
            lines.append(f"| IGSP − {other} (total retention points) | {ref:+.1f} | – | |")
    order = [e for e in ("mix", "igsp", "self-cal", "sgs", "c4") if e in total and math.isfinite(total[e])]
    order.sort(key=lambda e: -total[e])
    if order:
        lines += ["", "Ranking by total retention among mix / IGSP / Self-Cal / SGS / C4 here: "
                  + " > ".join(f"{e} ({_pct(total[e])})" for e in order)
                  + "; paper: mix (58.8) > … > C4 (40.0), IGSP > Self-Cal > SGS."]
    lines.append("")
    return lines
