"""Study specification: validate a request before any work, and lay out the runs it implies.

A *run* is one (entry, calibration seed, pruner, sparsity): build the entry's calibration set with that seed, prune
a fresh copy of the dense model, score it on the study suite. Runs come in four stages, each after the previous:

1. every entry except the variants (single sources, then the constructed sets) with the first seed and the first
   pruner;
2. the remaining seeds for the *seeded* entries (``seeded``: entry names, or ``"best:K"`` = the K single sources
   with the highest stage-1 total retention, known once stage 1 is done);
3. the other pruners for ``pruner_entries`` (``"sources"`` = every single source), with the first seed;
4. the variants (e.g. IGSP ablations), first seed, first pruner.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..calibration import GENERATORS
from ..calibration.sources import check_available, list_sources, resolve_data_dir
from ..evaluation.benchmarks import DIMENSIONS
from ..evaluation.study_suite import SPLITS, resolve_suite

__all__ = ["CONSTRUCTED", "GENERATORS", "PAPER", "RunSpec", "StudySpec", "plan_runs", "plan_study", "run_id"]

#: constructed calibration sets, in the order they run (after the single sources)
CONSTRUCTED: tuple[str, ...] = ("mix", "self-cal", "sgs", "igsp")
EVAL_DTYPES: tuple[str, ...] = ("bfloat16", "float32")
TARGETS: tuple[str, ...] = (*DIMENSIONS, "total")
FORMAT = 2

#: what arXiv 2606.03328 reports for LLaMA-3.1-8B, SparseGPT 60 % unstructured, 15 sources
PAPER: dict[str, Any] = {
    "model": "LLaMA-3.1-8B", "sparsity": 0.6, "n_sources": 15,
    "spearman_perplexity": {"general": 0.71, "math": -0.53, "code": -0.59},
    "total_retention_pct": {"mix": 58.8, "best single (MetaMathQA)": 50.0, "c4": 40.0},
    "igsp_minus": {"self-cal": 2.4, "sgs": 4.8},
}


class StudySpec(dict):
    """The resolved, validated study settings (a plain dict, so it serialises as is)."""


@dataclass(frozen=True)
class RunSpec:
    """One run: ``entry`` built with calibration ``seed``, pruned by ``pruner`` to ``sparsity``."""

    entry: str
    seed: int
    pruner: str
    sparsity: float

    @property
    def id(self) -> str:
        return run_id(self.entry, self.seed, self.pruner, self.sparsity)


def run_id(entry: str, seed: int, pruner: str, sparsity: float) -> str:
    """``<entry>__<pruner>__s<sparsity>__seed<seed>``: the run's file name in ``runs/`` (without ``.json``)."""
    return f"{entry}__{pruner}__s{sparsity:g}__seed{seed}"


def parse_list(value: str | Iterable[Any] | None) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _check_generator_options(name: str, opts: Mapping[str, Any]) -> None:
    allowed = {p for p in inspect.signature(GENERATORS[name]).parameters
               if p not in ("model", "tokenizer", "n", "seqlen", "seed", "progress", "cache", "cache_dir")}
    bad = set(opts) - allowed
    if bad:
        raise ValueError(f"unknown option(s) {sorted(bad)} for {name}; allowed: {sorted(allowed)}")


def plan_study(model: str, *, sources: str | Sequence[str] = "all", constructed: str | Sequence[str] = CONSTRUCTED,
               variants: Mapping[str, Mapping[str, Any]] | None = None,
               sparsities: float | Sequence[float] = (0.6,), n: int = 64, seqlen: int = 512,
               seeds: int | str | Sequence[int] = (0, 1, 2),
               seeded: str | Sequence[str] = ("c4", "best:2", "mix", "self-cal", "sgs", "igsp"),
               pruners: str | Sequence[str] = ("sparsegpt", "wanda"),
               pruner_entries: str | Sequence[str] = ("sources", "mix"), split: str = "test",
               benchmarks: Sequence[str] | None = None,
               eval_overrides: Mapping[str, Mapping[str, Any]] | None = None, eval_dtype: str = "bfloat16",
               dtype_check: bool = True, blocksize: int = 128, percdamp: float = 0.01,
               pruner_options: Mapping[str, Mapping[str, Any]] | None = None,
               data_dir: str | os.PathLike | None = None, data_source: str = "offline", gen_batch_size: int = 16,
               generator_options: Mapping[str, Mapping[str, Any]] | None = None, n_boot: int = 2000,
               pool_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
               device: str | None = None) -> StudySpec:
    """Validate a study request and resolve it; reads no model and no calibration data.

    Args:
        sources: ``"all"`` (every registered source loadable with ``data_source``), a comma string or a list.
        constructed: any of :data:`CONSTRUCTED` (``"none"`` / ``[]`` for none).
        variants: extra generated entries, ``{name: {"generator": "igsp", "options": {...}}}`` (e.g. IGSP
            ablations); options are checked against the generator's signature.
        seeds: calibration seeds (an int ``k`` means ``0..k-1``); the first one runs for every entry.
        seeded: entries that run every seed (names, or ``"best:K"``); pruners: the pruner axis (any method of
            the registry, :data:`calibprune.pruning.METHODS`), the first is the main one; pruner_entries: entries
            the other pruners run (``"sources"`` = all single sources).
        blocksize, percdamp: SparseGPT's settings (the study's historical spelling of its pruner options).
        pruner_options: further options of each pruner by name, e.g. ``{"wanda": {"pattern": "2:4"}}``, checked
            against the method's config (``sparsity`` and ``device`` are the study's own).
        split: ``"test"`` (what the study reports) or ``"dev"`` (design choices).
        benchmarks, eval_overrides: restrict / resize the study suite (:func:`calibprune.evaluation.study_suite.
            resolve_suite`).
        eval_dtype: dtype the pruned and dense models are scored in (pruning always runs in fp32).
        dtype_check: also score the dense model and the first pruned run in fp32 and record the agreement.
        generator_options: keyword arguments for ``self_cal`` / ``sgs`` / ``igsp`` by entry name.
        n_boot: bootstrap replicates of the statistics.
        pool_dir: where generated pools are cached (default ``<out_dir>/cache/pools``); two studies of the same
            model can share one.
        device: where the model generates, prunes and is scored (default: ``"cuda"`` when torch sees a GPU, else
            ``"cpu"``). Runs on another device type round differently, so a study's runs all come from one type.

    Raises ``ValueError`` (unknown name / option, bad numbers, fewer than 3 entries) or ``FileNotFoundError``.
    """
    if data_source not in ("auto", "offline", "hub"):
        raise ValueError(f"data_source must be 'auto', 'offline' or 'hub', got {data_source!r}")
    resolved_dir = resolve_data_dir(data_dir)
    if sources in ("none", "", None) or sources == []:
        names: list[str] = []
    elif sources == "all" or sources == ["all"]:
        names = list_sources(offline_only=data_source == "offline", data_dir=resolved_dir)
        if not names:
            raise FileNotFoundError(f"sources='all' found no source with offline files (data dir: {resolved_dir}); "
                                    "set CALIBPRUNE_DATA_DIR or pass data_dir=")
    else:
        names = parse_list(sources) or []
    if len(set(names)) != len(names):
        raise ValueError(f"sources repeat a name: {names}")
    modes = {name: check_available(name, data_dir=resolved_dir, source=data_source) for name in names}

    built = [] if constructed in ("none", None) else (parse_list(constructed) or [])
    for name in built:
        if name not in CONSTRUCTED:
            raise ValueError(f"unknown constructed set {name!r}; known: {', '.join(CONSTRUCTED)}")
    if "mix" in built and len(names) < 2:
        raise ValueError("the uniform mix needs at least 2 sources")
    gen_opts = {k: dict(v) for k, v in (generator_options or {}).items()}
    for name, opts in gen_opts.items():
        if name not in GENERATORS:
            raise ValueError(f"generator_options for {name!r}; generators are {', '.join(GENERATORS)}")
        _check_generator_options(name, opts)
    var = {}
    for name, v in (variants or {}).items():
        if name in names or name in CONSTRUCTED:
            raise ValueError(f"variant name {name!r} clashes with a source or constructed set")
        if set(v) - {"generator", "options"} or v.get("generator") not in GENERATORS:
            raise ValueError(f"variant {name!r} must be {{'generator': one of {list(GENERATORS)}, 'options': {{...}}}}")
        opts = {**gen_opts.get(v["generator"], {}), **dict(v.get("options", {}))}
        _check_generator_options(v["generator"], opts)
        var[name] = {"generator": v["generator"], "options": opts}

    if isinstance(sparsities, (int, float)):
        sparsities = [sparsities]
    sparsities = [float(s) for s in (parse_list(sparsities) or [])]
    if not sparsities:
        raise ValueError("no sparsity given")
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {s}")
    if len(set(sparsities)) != len(sparsities):
        raise ValueError(f"sparsities repeat a value: {sparsities}")
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    seeds = [int(s) for s in (parse_list(seeds) or [])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {seeds}")
    for label, value, low in (("n", n, 1), ("seqlen", seqlen, 8), ("blocksize", blocksize, 1),
                              ("gen_batch_size", gen_batch_size, 1), ("n_boot", n_boot, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    if "mix" in built and n < len(names):
        raise ValueError(f"n={n} is smaller than the {len(names)} sources of the uniform mix")
    entries = names + built + list(var)
    if len(entries) < 3:
        raise ValueError(f"a Spearman study needs at least 3 entries, got {entries}")

    pruners = parse_list(pruners) or []
    if not pruners or len(set(pruners)) != len(pruners):
        raise ValueError(f"pruners must be distinct names, got {pruners}")
    p_opts = check_pruner_options(pruners, pruner_options)
    seeded_list = parse_list(seeded) or []
    for e in seeded_list:
        if not (e in entries or re.fullmatch(r"best:\d+", e)):
            raise ValueError(f"seeded entry {e!r} is neither an entry ({', '.join(entries)}) nor 'best:K'")
    p_entries = parse_list(pruner_entries) or []
    for e in p_entries:
        if e != "sources" and e not in entries:
            raise ValueError(f"pruner entry {e!r} is neither 'sources' nor an entry")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if eval_dtype not in EVAL_DTYPES:
        raise ValueError(f"eval_dtype must be one of {EVAL_DTYPES}, got {eval_dtype!r}")
    suite = resolve_suite(parse_list(benchmarks), eval_overrides)
    device = resolve_study_device(device)
    return StudySpec(
        format=FORMAT, model=str(model), sources=names, source_modes=modes, constructed=built, variants=var,
        entries=entries, sparsities=sparsities, n=n, seqlen=seqlen, seeds=seeds, seeded=seeded_list,
        pruners=pruners, pruner_entries=p_entries, split=split, benchmarks=list(suite),
        eval_overrides={k: dict(v) for k, v in (eval_overrides or {}).items()}, eval_dtype=eval_dtype,
        dtype_check=bool(dtype_check), blocksize=blocksize, percdamp=percdamp, pruner_options=p_opts,
        data_dir=str(resolved_dir) if resolved_dir else None, data_source=data_source,
        gen_batch_size=gen_batch_size, generator_options=gen_opts, n_boot=n_boot,
        pool_dir=str(pool_dir) if pool_dir is not None else None, device=device,
        out_dir=str(out_dir if out_dir is not None else Path("results") / slug(Path(str(model)).name)))


def check_pruner_options(pruners: Sequence[str],
                         options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Each pruner checked against the method registry, and its options against the method's config."""
    from ..pruning.registry import METHODS, check_options

    for p in pruners:
        if p not in METHODS:
            raise ValueError(f"unknown pruner {p!r}; the study runs any registered method: {', '.join(METHODS)}")
    out: dict[str, dict[str, Any]] = {}
    for p, opts in (options or {}).items():
        if p not in pruners:
            raise ValueError(f"pruner options for {p!r}, which is not on the pruner axis {list(pruners)}")
        own = sorted(set(opts) & {"sparsity", "device", "blocksize", "percdamp"})
        if own:
            raise ValueError(f"pruner options of {p!r} set {own}: the study sets sparsity and device, and SparseGPT's "
                             "blocksize and percdamp have their own study settings")
        check_options(p, opts)
        if opts:
            out[p] = dict(opts)
    return out


def pruner_settings(spec: Mapping[str, Any], pruner: str) -> dict[str, Any]:
    """Everything a study run passes to ``make_config(pruner, ...)`` besides sparsity and device (and its run key:
    ``{"pruner": name, ...}`` minus the name)."""
    out: dict[str, Any] = {}
    if pruner in ("sparsegpt", "sparsegpt-reference"):
        out |= {"blocksize": spec["blocksize"], "percdamp": spec["percdamp"]}
    return out | dict(spec.get("pruner_options", {}).get(pruner, {}))


def resolve_study_device(device: str | None) -> str:
    """``device`` checked before any work (a CUDA device torch cannot see is a ``ValueError``), or the default:
    ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    from ..pruning.device import check_device

    try:
        return str(check_device(device))
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


def device_key(spec: Mapping[str, Any]) -> dict[str, str]:
    """The device's part of a result key: nothing on CPU (so CPU keys are what they were before the study had a
    device), the device type otherwise (``cuda:0`` and ``cuda:1`` compute the same)."""
    kind = torch.device(spec.get("device", "cpu")).type
    return {} if kind == "cpu" else {"device": kind}


def entry_kind(spec: Mapping[str, Any], entry: str) -> str:
    """``"source"``, a constructed set's name, or ``"variant:<generator>"``."""
    if entry in spec["sources"]:
        return "source"
    if entry in spec["variants"]:
        return f"variant:{spec['variants'][entry]['generator']}"
    return entry


def resolve_seeded(spec: Mapping[str, Any], stage1_totals: Mapping[str, float]) -> tuple[list[str], int]:
    """``(seeded entries, unresolved)``: ``best:K`` replaced by the K best single sources by stage-1 total retention
    (ties by name); while some single source has no stage-1 result, ``best:K`` stays unresolved and its K entries
    are counted in ``unresolved`` instead."""
    out: list[str] = []
    unresolved = 0
    ready = all(s in stage1_totals for s in spec["sources"])
    for e in spec["seeded"]:
        m = re.fullmatch(r"best:(\d+)", e)
        if m is None:
            out.append(e)
        elif ready:
            out += sorted(spec["sources"], key=lambda s: (-stage1_totals[s], s))[:int(m.group(1))]
        else:
            unresolved += int(m.group(1))
    return list(dict.fromkeys(out)), unresolved


def plan_runs(spec: Mapping[str, Any], stage1_totals: Mapping[str, float] | None = None) -> list[RunSpec]:
    """Every run of the study in execution order; ``best:K`` runs appear once stage 1 is done."""
    first_seed, main = spec["seeds"][0], spec["pruners"][0]
    variants = [e for e in spec["entries"] if e in spec["variants"]]
    runs = [RunSpec(e, first_seed, main, s) for e in spec["entries"] if e not in variants for s in spec["sparsities"]]
    seeded, _ = resolve_seeded(spec, stage1_totals or {})
    runs += [RunSpec(e, seed, main, s) for e in seeded for seed in spec["seeds"][1:] for s in spec["sparsities"]]
    others = [e for e in spec["entries"] if e in spec["pruner_entries"]
              or (e in spec["sources"] and "sources" in spec["pruner_entries"])]
    runs += [RunSpec(e, first_seed, p, s) for p in spec["pruners"][1:] for e in others for s in spec["sparsities"]]
    runs += [RunSpec(e, first_seed, main, s) for e in variants for s in spec["sparsities"]]
    return list(dict.fromkeys(runs))


def unresolved_runs(spec: Mapping[str, Any], stage1_totals: Mapping[str, float] | None = None) -> int:
    """How many stage-2 runs are not in :func:`plan_runs` yet (their ``best:K`` entries are unknown)."""
    _, unresolved = resolve_seeded(spec, stage1_totals or {})
    return unresolved * (len(spec["seeds"]) - 1) * len(spec["sparsities"])


def calibration_options(spec: Mapping[str, Any], entry: str) -> tuple[str | None, dict[str, Any]]:
    """``(generator or None, its options)`` for an entry."""
    if entry in spec["variants"]:
        v = spec["variants"][entry]
        return v["generator"], dict(v["options"])
    if entry in GENERATORS:
        return entry, dict(spec["generator_options"].get(entry, {}))
    return None, {}
