"""Per-capability evaluation suites and retention of a pruned model relative to its dense parent.

Dimensions and benchmarks (ARCHITECTURE.md; registry in ``benchmarks.py``):

=============  ===================================================================================================
General        MMLU (acc), LAMBADA-OpenAI (acc), WikiText-2 raw test (perplexity)
Commonsense    HellaSwag, PIQA, ARC-e, ARC-c, OpenBookQA (acc_norm); WinoGrande (partial scoring), BoolQ (acc)
Code           HumanEval, MBPP: greedy pass@1 (``paper``); likelihood proxies ``humaneval_nll``, ``mbpp_nll``
Math           GSM8K (strict exact match), MATH (boxed answer match) (``paper``); proxies ``gsm8k_nll``, ``math_nll``
=============  ===================================================================================================

Suites:

- ``"lite"`` (CPU, a few minutes for a 135M model): MMLU + LAMBADA + WikiText-2 (short), HellaSwag + PIQA + ARC-e +
  WinoGrande, and the Code / Math likelihood proxies (a 135M model scores ~0 on the generative tasks), each on the
  first ``limit`` items (MMLU subjects are interleaved, so a prefix spans all 57 subjects);
- ``"paper"`` (GPU): every multiple-choice task in full, MMLU 5-shot (same-subject dev examples), WikiText-2 on
  2048-token windows, and the generative HumanEval / MBPP / GSM8K / MATH tasks (these execute generated code:
  ``allow_code_execution=True``).

Offline (default), calibprune's own lm-eval task configs read the files under the data dir
(``CALIBPRUNE_DATA_DIR``); with ``offline=False`` the standard lm-eval tasks (``hellaswag``, ``mmlu``, ``gsm8k``,
``minerva_math``, ...) are used, which need the Hugging Face hub.

Retention (the definitions we own; the paper does not publish them):

- benchmark, higher-is-better score (accuracy, exact match, pass@1): ``r = pruned / dense``;
- benchmark, perplexity: ``r = dense_ppl / pruned_ppl``;
- benchmark, NLL-per-token proxy: with ``ppl = exp(NLL)``, ``r = dense_ppl / pruned_ppl = exp(NLL_dense - NLL_pruned)``;
- dimension retention = mean of its benchmarks' retentions (benchmarks with an undefined ratio, e.g. a dense
  score of 0, are left out with a warning);
- total retention = mean of the four dimension retentions.

Usage::

    model, tok = calibprune.load_model("smollm2-135m")
    dense = evaluate(model, tok, "lite", cache_dir="runs/eval-cache", cache_key="smollm2-135m-dense")
    calibprune.prune_sparsegpt_fused(model, calib, sparsity=0.6)
    pruned = evaluate(model, tok, "lite")
    r = retention(pruned, dense)  # r["benchmarks"][name]["retention"], r["dimensions"], r["total"]

Small ``limit`` values make the ratios noisy (a 50-item accuracy has a standard error of ~7 points), and
near-chance accuracies (e.g. MMLU for a 135M model) make their ratios mostly noise; lm-eval reseeds Python,
NumPy and torch RNGs at each call.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write_text
from ..calibration.sources import DATA_DIR_ENV, resolve_data_dir
from ..fingerprint import model_fingerprint
from .benchmarks import BENCHMARKS, DIMENSIONS, Benchmark, data_revision, load_docs, render_lm_eval_task
from .perplexity import load_wikitext2_test, perplexity
from .proxies import solution_nll

log = logging.getLogger(__name__)

__all__ = ["SUITES", "evaluate", "retention", "resolve_plan", "model_fingerprint"]

#: benchmark -> default options per suite (``limit`` = items evaluated; ``None`` = all)
SUITES: dict[str, dict[str, dict[str, Any]]] = {
    # sized for ~18k scored/forwarded tokens: about 2-3 minutes for SmolLM2-135M on 2 shared CPU cores
    "lite": {
        "mmlu": {"limit": 20},
        "lambada": {"limit": 30},
        "wikitext2": {"seqlen": 512, "max_windows": 4},
        "hellaswag": {"limit": 12},
        "piqa": {"limit": 24},
        "arc_easy": {"limit": 16},
        "winogrande": {"limit": 24},
        "humaneval_nll": {"limit": 10, "max_length": 512},
        "mbpp_nll": {"limit": 10, "max_length": 512},
        "gsm8k_nll": {"limit": 10, "max_length": 512},
        "math_nll": {"limit": 10, "max_length": 512},
    },
    "paper": {
        "mmlu": {"limit": None, "num_fewshot": 5},
        "lambada": {"limit": None},
        "wikitext2": {"seqlen": 2048, "max_windows": None},
        "hellaswag": {"limit": None},
        "piqa": {"limit": None},
        "arc_easy": {"limit": None},
        "arc_challenge": {"limit": None},
        "winogrande": {"limit": None},
        "boolq": {"limit": None},
        "openbookqa": {"limit": None},
        "humaneval": {"limit": None},
        "mbpp": {"limit": None},
        "gsm8k": {"limit": None},
        "math": {"limit": None},
    },
}

_PROXY_DEFAULTS = {"max_length": 1024}
_CACHE_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------------------------------


def _benchmark_retention(metric: str, higher_is_better: bool, dense: float, pruned: float) -> float:
    if metric == "nll":
        return math.exp(dense - pruned)  # exp(NLL_d) / exp(NLL_p) = dense ppl / pruned ppl
    if not higher_is_better:
        return dense / pruned if pruned > 0 else math.nan
    return pruned / dense if dense > 0 else math.nan


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def retention(pruned: Mapping[str, Any], dense: Mapping[str, Any]) -> dict[str, Any]:
    """Retention of ``pruned`` relative to ``dense``, two results of :func:`evaluate`.

    Returns ``{benchmarks: {name: {dimension, metric, dense, pruned, retention}}, dimensions: {dim: float},
    total: float, missing: [names in only one result], definition: str}`` (definitions in the module docstring).
    Benchmarks present in only one of the two results are left out (and listed in ``missing``); a benchmark whose
    metric or dimension differs between the two raises ``ValueError``. ``total`` averages the dimensions that have
    a finite retention; fewer than four is logged as a warning.
    """
    pb, db = pruned.get("benchmarks"), dense.get("benchmarks")
    if not isinstance(pb, Mapping) or not isinstance(db, Mapping):
        raise ValueError("retention() takes two results of calibprune.evaluate (dicts with a 'benchmarks' key)")
    missing = sorted(set(pb) ^ set(db))
    if missing:
        log.warning("retention: benchmarks in only one of the results are left out: %s", ", ".join(missing))
    per_bench: dict[str, dict[str, Any]] = {}
    for name in [n for n in db if n in pb]:
        p, d = pb[name], db[name]
        for key in ("metric", "dimension", "higher_is_better"):
            if p[key] != d[key]:
                raise ValueError(f"retention: benchmark {name!r} has {key}={p[key]!r} (pruned) but {d[key]!r} (dense)")
        r = _benchmark_retention(d["metric"], bool(d["higher_is_better"]), float(d["value"]), float(p["value"]))
        if not math.isfinite(r):
            log.warning("retention of %r is undefined (dense %s, pruned %s); left out of the means",
                        name, d["value"], p["value"])
        per_bench[name] = {"dimension": d["dimension"], "metric": d["metric"], "dense": d["value"],
                           "pruned": p["value"], "retention": r}
    dims: dict[str, float] = {}
    for dim in DIMENSIONS:
        values = [b["retention"] for b in per_bench.values() if b["dimension"] == dim]
        if values:
            dims[dim] = _mean(values)
    finite = {k: v for k, v in dims.items() if math.isfinite(v)}
    if len(finite) < len(DIMENSIONS):
        log.warning("total retention averages %d of the %d dimensions (%s)", len(finite), len(DIMENSIONS),
                    ", ".join(finite) or "none")
    return {
        "benchmarks": per_bench,
        "dimensions": dims,
        "total": _mean(finite.values()),
        "missing": missing,
        "definition": "benchmark: pruned/dense (scores), dense_ppl/pruned_ppl (perplexity, exp(NLL) proxies); "
                      "dimension: mean of its benchmarks; total: mean of the dimensions",
    }


# ---------------------------------------------------------------------------------------------------------------
# Planning: validate everything before any evaluation starts
# ---------------------------------------------------------------------------------------------------------------


def _unknown(kind: str, name: str, known: Iterable[str]) -> ValueError:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")


def _allowed_options(bench: Benchmark) -> set[str]:
    allowed = ({"limit"} if bench.kind != "perplexity" else set()) | set(bench.options)
    if bench.kind == "proxy":
        allowed |= set(_PROXY_DEFAULTS)
    return allowed


def resolve_plan(suite: str = "lite", *, limit: int | None = None, benchmarks: Iterable[str] | None = None,
                 dimensions: Iterable[str] | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 data_dir: str | os.PathLike[str] | None = None, offline: bool = True,
                 allow_code_execution: bool = False) -> dict[str, Any]:
    """Validate the request and load every benchmark's documents; no model is touched.

    Returns ``{"options": {name: resolved options}, "docs": {name: list of docs (limited)}, "data_dir": Path}``.
    ``docs`` holds the converted documents of offline lm-eval tasks and proxies (``None`` for the hub / WikiText).
    Raises ``ValueError`` (unknown suite / benchmark / dimension / option, bad limit, empty task, code execution
    not allowed), ``FileNotFoundError`` (missing offline file, named) or ``ImportError`` (lm-eval missing).
    """
    if suite not in SUITES:
        raise _unknown("suite", suite, SUITES)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    names = list(SUITES[suite])
    if benchmarks is not None:
        benchmarks = [benchmarks] if isinstance(benchmarks, str) else list(benchmarks)
        for name in benchmarks:
            if name not in BENCHMARKS:
                raise _unknown("benchmark", name, BENCHMARKS)
        names = benchmarks
    if dimensions is not None:
        dimensions = [dimensions] if isinstance(dimensions, str) else list(dimensions)
        for dim in dimensions:
            if dim not in DIMENSIONS:
                raise _unknown("dimension", dim, DIMENSIONS)
        names = [n for n in names if BENCHMARKS[n].dimension in dimensions]
    if not names:
        raise ValueError(f"no benchmark selected (suite={suite!r}, benchmarks={benchmarks}, dimensions={dimensions})")
    overrides = dict(overrides or {})
    for name, opts in overrides.items():
        if name not in BENCHMARKS:
            raise _unknown("benchmark in overrides", name, BENCHMARKS)
        if name not in names:
            raise ValueError(f"overrides for {name!r}, which is not among the selected benchmarks {names}")
        bad = set(opts) - _allowed_options(BENCHMARKS[name])
        if bad:
            raise ValueError(f"unknown option(s) {sorted(bad)} for benchmark {name!r}; allowed: "
                             f"{sorted(_allowed_options(BENCHMARKS[name]))}")

    options: dict[str, dict[str, Any]] = {}
    for name in names:
        bench = BENCHMARKS[name]
        opts: dict[str, Any] = {"limit": None, **bench.options}
        if bench.kind == "proxy":
            opts |= _PROXY_DEFAULTS
        opts |= SUITES[suite].get(name, {})
        if limit is not None and bench.kind != "perplexity":
            opts["limit"] = limit
        opts |= dict(overrides.get(name, {}))
        lim = opts.get("limit")
        if lim is not None and (not isinstance(lim, int) or isinstance(lim, bool) or lim < 1):
            raise ValueError(f"{name}: limit must be a positive integer or None, got {lim!r}")
        if bench.executes_code and not allow_code_execution:
            raise ValueError(f"benchmark {name!r} executes model-generated code; pass allow_code_execution=True "
                             "(ideally in a sandbox) or leave it out with benchmarks=[...]")
        options[name] = opts

    uses_lm_eval = any(BENCHMARKS[n].kind == "lm_eval" for n in names)
    if uses_lm_eval:
        try:
            import lm_eval  # noqa: F401
        except ImportError as exc:
            raise ImportError("these benchmarks need lm-evaluation-harness: pip install 'calibprune[eval]' "
                              "(or pip install lm-eval)") from exc

    needs_files = [n for n in names if offline or BENCHMARKS[n].kind == "proxy"]
    resolved = resolve_data_dir(data_dir)
    if needs_files and resolved is None:
        raise FileNotFoundError(f"no offline data directory found for {needs_files}: set {DATA_DIR_ENV} or pass "
                                "data_dir= (the folder with mmlu/, hellaswag/, gsm8k/, ...)")
    for name in needs_files:
        for rel in BENCHMARKS[name].files:
            path = resolved / rel
            if not path.exists():
                raise FileNotFoundError(f"benchmark {name!r}: offline file not found: {path} (data dir {resolved}; "
                                        f"set {DATA_DIR_ENV} or data_dir=)")

    docs: dict[str, list[dict[str, Any]] | None] = {}
    for name in names:
        bench = BENCHMARKS[name]
        if bench.kind == "perplexity" or (bench.kind == "lm_eval" and not offline):
            docs[name] = None
            continue
        all_docs = load_docs(name, resolved, options[name])
        lim = options[name]["limit"]
        docs[name] = all_docs[:lim] if lim is not None else all_docs
        if not docs[name]:
            raise ValueError(f"benchmark {name!r} has 0 documents after filtering (files: "
                             f"{', '.join(str(resolved / f) for f in bench.files)})")
    return {"options": options, "docs": docs, "data_dir": resolved}


# ---------------------------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------------------------


def _lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001 - not installed or no metadata
        return None


def _cache_path(cache_dir: str | os.PathLike[str], cache_key: str, config: Mapping[str, Any]) -> Path:
    blob = json.dumps({"key": cache_key, "config": config, "format": _CACHE_FORMAT}, sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cache_key)[:80]
    return Path(cache_dir) / f"{slug}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"


# ---------------------------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------------------------


def _result_value(task_result: Mapping[str, Any], metric: str) -> float:
    if metric in task_result:
        return float(task_result[metric])
    key = next((k for k in task_result if k.split(",")[0] == metric.split(",")[0] and not k.endswith("_stderr")
                and "_stderr," not in k), None)
    if key is None:
        raise KeyError(f"metric {metric!r} not in lm-eval results {sorted(task_result)}")
    return float(task_result[key])


def _run_lm_eval(model: nn.Module, tokenizer, names: list[str], plan: Mapping[str, Any], *, offline: bool,
                 batch_size: int | str, max_length: int | None, device: str, allow_code_execution: bool
                 ) -> dict[str, tuple[float, int | None, float]]:
    """``{name: (value, n, seconds)}`` for the lm-eval benchmarks ``names``.

    Offline, one ``simple_evaluate`` per benchmark (documents already limited; the time is per benchmark); with
    the hub, one per distinct limit (the time is that call's).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    out: dict[str, tuple[float, int | None, float]] = {}
    prev_env = os.environ.get("CALIBPRUNE_ALLOW_CODE_EXECUTION")
    if allow_code_execution:
        os.environ["CALIBPRUNE_ALLOW_CODE_EXECUTION"] = "1"
    try:
        with tempfile.TemporaryDirectory(prefix="calibprune-tasks-") as tmp:
            # (limit, num_fewshot) -> benchmarks evaluated in one simple_evaluate call
            groups: list[tuple[tuple[int | None, int | None], list[str]]] = []
            if offline:
                for name in names:
                    render_lm_eval_task(name, plan["docs"][name], tmp, data_dir=plan["data_dir"],
                                        options=plan["options"][name])
                    groups.append(((None, None), [name]))  # documents limited and shots set in the config
                manager = TaskManager(include_path=tmp, include_defaults=False)
            else:
                manager = TaskManager()
                by_key: dict[tuple[int | None, int | None], list[str]] = {}
                for name in names:
                    opts = plan["options"][name]
                    by_key.setdefault((opts["limit"], opts.get("num_fewshot")), []).append(name)
                groups = list(by_key.items())
            for (lim, shots), group in groups:
                tasks = [BENCHMARKS[n].task_name if offline else BENCHMARKS[n].hub_task for n in group]
                log.info("lm-eval: %s (limit %s, shots %s)", ", ".join(tasks), lim, shots)
                t0 = time.perf_counter()
                res = lm_eval.simple_evaluate(
                    model=lm, tasks=tasks, task_manager=manager, limit=lim, num_fewshot=shots,
                    log_samples=False, bootstrap_iters=0, confirm_run_unsafe_code=allow_code_execution)
                for name, task in zip(group, tasks):
                    bench = BENCHMARKS[name]
                    metric = bench.metric if offline else (bench.hub_metric or bench.metric)
                    n_samples = res.get("n-samples", {}).get(task, {})
                    n = n_samples.get("effective") if isinstance(n_samples, Mapping) else None
                    out[name] = (_result_value(res["results"][task], metric), n, time.perf_counter() - t0)
    finally:
        if allow_code_execution:
            if prev_env is None:
                os.environ.pop("CALIBPRUNE_ALLOW_CODE_EXECUTION", None)
            else:
                os.environ["CALIBPRUNE_ALLOW_CODE_EXECUTION"] = prev_env
    return out


def _evaluate_study(model: nn.Module, tokenizer, *, benchmarks, dimensions, overrides, data_dir, cache_dir
                    ) -> dict[str, Any]:
    """``suite="study"``: the study suite's TEST items (:mod:`.study_suite`), summarised in :func:`evaluate`'s
    format (``value`` = the primary score; every score, chance and the item count beside it)."""
    from ..provenance import provenance
    from .study_suite import STUDY_SUITE, evaluate_items

    names = list(STUDY_SUITE) if benchmarks is None else ([benchmarks] if isinstance(benchmarks, str)
                                                           else list(benchmarks))
    if dimensions is not None:
        dims = [dimensions] if isinstance(dimensions, str) else list(dimensions)
        for dim in dims:
            if dim not in DIMENSIONS:
                raise _unknown("dimension", dim, DIMENSIONS)
        names = [n for n in names if n in STUDY_SUITE and STUDY_SUITE[n].dimension in dims]
    t0 = time.perf_counter()
    res = evaluate_items(model, tokenizer, benchmarks=names, overrides=overrides, data_dir=data_dir,
                         cache_dir=cache_dir)
    out = {name: {"dimension": r["dimension"], "metric": r["primary"], "value": r["scores"][r["primary"]],
                  "higher_is_better": r["primary"] != "nll", "n": r["n"], "scores": r["scores"],
                  "time_s": r["seconds"]} for name, r in res["benchmarks"].items()}
    prov = provenance()
    prov["wall_s"] = time.perf_counter() - t0
    return {"benchmarks": out, "dimensions": {d: {"benchmarks": [n for n in out if out[n]["dimension"] == d]}
                                              for d in DIMENSIONS if any(b["dimension"] == d for b in out.values())},
            "suite": "study", "config": {"suite": "study", "benchmarks": names, "overrides": overrides},
            "provenance": prov}


def evaluate(model: nn.Module, tokenizer, suite: str = "lite", *, limit: int | None = None,
             benchmarks: Iterable[str] | None = None, dimensions: Iterable[str] | None = None,
             overrides: Mapping[str, Mapping[str, Any]] | None = None,
             data_dir: str | os.PathLike[str] | None = None, offline: bool = True,
             cache_dir: str | os.PathLike[str] | None = None, cache_key: str | None = None,
             batch_size: int | str = 8, max_length: int | None = None, allow_code_execution: bool = False
             ) -> dict[str, Any]:
    """Evaluate ``model`` on a capability suite; see the module docstring for suites and benchmarks.

    Args:
        model, tokenizer: an already-loaded causal LM (any device/dtype) and its HF tokenizer.
        suite: ``"lite"``, ``"paper"`` or ``"study"`` (per-item scoring on the study suite's TEST items, see
            :mod:`calibprune.evaluation.study_suite`; ``limit`` does not apply, ``overrides`` set its fields).
        limit: items per benchmark for every benchmark except WikiText-2 (whose knob is ``max_windows``).
        benchmarks, dimensions: evaluate only these (any registered benchmark may be named).
        overrides: per-benchmark options, e.g. ``{"mmlu": {"limit": 200, "num_fewshot": 5},
            "wikitext2": {"max_windows": 32}, "gsm8k_nll": {"max_length": 512}}``.
        data_dir: offline data folder (default: ``CALIBPRUNE_DATA_DIR`` / ``shared/data``).
        offline: ``False`` uses the standard lm-eval hub tasks for the lm-eval benchmarks.
        cache_dir, cache_key: when ``cache_dir`` is set, the result is stored as JSON under a name derived from
            ``cache_key`` (default: the model's name + :func:`model_fingerprint`) and the resolved config + data
            revision, and returned from there on the next call (the dense model is evaluated once per study).
        batch_size: lm-eval / proxy / perplexity batch size. max_length: lm-eval context length (default: model's).
        allow_code_execution: needed for generative HumanEval / MBPP (runs generated code in subprocesses).

    Returns:
        ``{"benchmarks": {name: {dimension, metric, value, higher_is_better, n, ...}}, "dimensions": {dim:
        {"benchmarks": [names]}}, "suite", "config", "provenance"}``.
    """
    if suite == "study":
        return _evaluate_study(model, tokenizer, benchmarks=benchmarks, dimensions=dimensions, overrides=overrides,
                               data_dir=data_dir, cache_dir=cache_dir)
    plan = resolve_plan(suite, limit=limit, benchmarks=benchmarks, dimensions=dimensions, overrides=overrides,
                        data_dir=data_dir, offline=offline, allow_code_execution=allow_code_execution)
    names = list(plan["options"])
    config = {
        "suite": suite, "offline": offline, "limit": limit, "max_length": max_length,
        "benchmarks": plan["options"],
        "data_dir": str(plan["data_dir"]) if plan["data_dir"] is not None else None,
        "data_revision": data_revision(names, plan["data_dir"]),
    }
    cache_path = None
    if cache_dir is not None:
        if cache_key is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
            cache_key = f"{Path(str(name)).name}-{model_fingerprint(model)}"
        key_config = {k: v for k, v in config.items() if k != "data_dir"}
        key_config["lm_eval"] = _lm_eval_version()
        cache_path = _cache_path(cache_dir, cache_key, key_config)
        if cache_path.is_file():
            log.info("evaluation cache hit: %s", cache_path)
            cached = json.loads(cache_path.read_text(encoding="utf-8"))
            cached["provenance"]["cache"] = {"hit": True, "path": str(cache_path), "key": cache_key}
            return cached

    from ..provenance import provenance

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            bench, opts = BENCHMARKS[name], plan["options"][name]
            if bench.kind == "perplexity":
                t0 = time.perf_counter()
                text = load_wikitext2_test(data_dir=plan["data_dir"], source="offline" if offline else "auto")
                ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
                n_windows = ids.numel() // opts["seqlen"]
                if opts["max_windows"] is not None:
                    n_windows = min(n_windows, opts["max_windows"])
                value = perplexity(model, ids, seqlen=opts["seqlen"], max_windows=opts["max_windows"],
                                   batch_size=int(batch_size) if isinstance(batch_size, int) else 4)
                results[name] = {"value": value, "n": n_windows, "tokens": n_windows * opts["seqlen"],
                                 "time_s": time.perf_counter() - t0}
                log.info("%s: perplexity %.3f (%d windows of %d)", name, value, n_windows, opts["seqlen"])
            elif bench.kind == "proxy":
                t0 = time.perf_counter()
                pairs = [(d["prompt"], d["solution"]) for d in plan["docs"][name]]
                r = solution_nll(model, tokenizer, pairs, max_length=int(opts["max_length"]),
                                 batch_size=int(batch_size) if isinstance(batch_size, int) else 4, device=device)
                results[name] = {"value": r.mean_nll, "n": r.n_items, "tokens": r.n_tokens,
                                 "ppl": math.exp(r.mean_nll), "time_s": time.perf_counter() - t0}
                log.info("%s: NLL/token %.4f (ppl %.3f) over %d items, %d tokens", name, r.mean_nll,
                         math.exp(r.mean_nll), r.n_items, r.n_tokens)
        lm_names = [n for n in names if BENCHMARKS[n].kind == "lm_eval"]
        if lm_names:
            lm_results = _run_lm_eval(model, tokenizer, lm_names, plan, offline=offline, batch_size=batch_size,
                                      max_length=max_length, device=str(device),
                                      allow_code_execution=allow_code_execution)
            for name, (value, n, seconds) in lm_results.items():
                results[name] = {"value": value, "n": n, "time_s": seconds}
                log.info("%s: %s %.4f (n=%s)", name, BENCHMARKS[name].metric, value, n)
    finally:
        model.train(was_training)

    benchmarks_out = {
        name: {"dimension": BENCHMARKS[name].dimension, "metric": BENCHMARKS[name].metric,
               "higher_is_better": BENCHMARKS[name].higher_is_better, **results[name]}
        for name in names
    }
    dims_out = {dim: {"benchmarks": [n for n in names if BENCHMARKS[n].dimension == dim]}
                for dim in DIMENSIONS if any(BENCHMARKS[n].dimension == dim for n in names)}
    prov = provenance()
    prov["versions"]["lm_eval"] = _lm_eval_version()
    prov["model"] = getattr(getattr(model, "config", None), "_name_or_path", None)
    prov["wall_s"] = time.perf_counter() - t_start
    prov["cache"] = {"hit": False, "path": str(cache_path) if cache_path else None, "key": cache_key}
    out = {"benchmarks": benchmarks_out, "dimensions": dims_out, "suite": suite, "config": config,
           "provenance": prov}
    if cache_path is not None:
        atomic_write_text(cache_path, json.dumps(out, indent=1, default=str))
        log.info("evaluation cached at %s", cache_path)
    return copy.deepcopy(out)
