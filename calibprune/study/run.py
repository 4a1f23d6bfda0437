"""Running the study: one run at a time, each finished run written as a small committable JSON, resumable anywhere.

Layout of ``<out_dir>``:

- ``plan.json``: the resolved spec; ``runs/dense.json``: the dense model's per-item scores (and the item lists);
  ``runs/<run id>.json``: one per finished run (calibration summary, OIT metrics, per-item scores, timings,
  provenance), a few tens of kB; ``runs/dtype_check.json``: fp32 vs ``eval_dtype`` scores of the dense model and
  the first pruned run. These are meant to be committed: a study copied to another machine resumes from them.
- ``cache/`` (not committed): calibration sets, generated pools, OIT metrics and evaluation caches.
- ``study.json`` and ``report.md``: rebuilt from ``runs/`` after every run (:mod:`.aggregate`, :mod:`.report`).

A run is skipped when ``runs/<id>.json`` exists and its ``key`` (a hash of everything that determines it: model
fingerprint, calibration definition, seed, pruner settings, suite items and dtype) matches; a run whose settings
changed is redone. Every write is atomic, so a study killed at any point loses at most the run in progress.
"""
from __future__ import annotations

import copy
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._progress import progress_bar
from ..calibration import CalibrationSet, build_calibration
from ..evaluation.study_suite import evaluate_items, resolve_suite
from ..fingerprint import model_fingerprint
from ..metrics import information_metrics
from ..provenance import provenance
from .plan import (
    FORMAT,
    GENERATORS,
    RunSpec,
    StudySpec,
    calibration_options,
    device_key,
    entry_kind,
    plan_runs,
    plan_study,
    pruner_settings,
    stable_hash,
    unresolved_runs,
)
from .records import compact_record, dense_record, load_runs, read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["run_study", "summarise_study"]

# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------


def _prune(model: torch.nn.Module, calib: CalibrationSet, pruner: str, sparsity: float,
           spec: Mapping[str, Any]) -> Any:
    """The study's one call into the pruning registry (``calibprune.prune`` with the method's typed config)."""
    from ..pruning import make_config, prune

    options = {"sparsity": sparsity, "device": spec["device"]} | pruner_settings(spec, pruner)
    return prune(model, calib, make_config(pruner, **options))


def _pruner_settings(spec: Mapping[str, Any], pruner: str) -> dict[str, Any]:
    return {"pruner": pruner} | pruner_settings(spec, pruner)


def _calib_key(spec: Mapping[str, Any], entry: str, seed: int, model_fp: str) -> str:
    generator, options = calibration_options(spec, entry)
    parts: dict[str, Any] = {"model": model_fp, "entry": entry, "n": spec["n"], "seqlen": spec["seqlen"],
                             "seed": seed, "data_source": spec["data_source"]}
    if entry == "mix":
        parts["sources"] = spec["sources"]
    if generator is not None:
        parts |= {"generator": generator, "options": options, "batch_size": spec["gen_batch_size"]}
    return stable_hash(parts)


def _build(spec: Mapping[str, Any], entry: str, seed: int, model, tokenizer, cache: Path) -> CalibrationSet:
    pools = Path(spec["pool_dir"]) if spec.get("pool_dir") else cache / "pools"
    generator, options = calibration_options(spec, entry)
    n, seqlen = spec["n"], spec["seqlen"]
    if generator is not None:
        opts = {"batch_size": spec["gen_batch_size"], **options}
        if generator == "sgs":
            opts.setdefault("data_dir", spec["data_dir"])
            opts.setdefault("data_source", spec["data_source"])
        return GENERATORS[generator](model, tokenizer, n=n, seqlen=seqlen, seed=seed, cache_dir=pools, **opts)
    sources = spec["sources"] if entry == "mix" else entry
    return build_calibration(tokenizer, sources, n=n, seqlen=seqlen, seed=seed, data_dir=spec["data_dir"],
                             data_source=spec["data_source"])


def _save_calibration(calib: CalibrationSet, path: Path) -> None:
    """Write ``<path>.pt`` + ``<path>.json`` so that a ``.pt`` on disk always has its provenance beside it.

    ``CalibrationSet.save`` writes each file atomically, the ``.json`` first, so two runs of the same study that
    build the same set at once both succeed (a fixed temporary name here used to make them collide).
    """
    calib.save(path)


def _metrics(calib: CalibrationSet, model) -> dict[str, Any]:
    """Set-level OIT metrics plus the mean of the per-sample values; the dense forward runs once."""
    per = information_metrics(calib, model=model, per_sample=True)
    out: dict[str, Any] = information_metrics(calib, vocab_size=model.config.vocab_size)
    # rows have equal length, so the set perplexity (exp of the mean NLL over all tokens) is the geometric mean
    out["perplexity"] = float(torch.exp(torch.log(per["perplexity"]).mean()))
    out["per_sample_mean"] = {k: float(v.mean()) for k, v in per.items() if isinstance(v, torch.Tensor)}
    return out


def _calib_summary(calib: CalibrationSet) -> dict[str, Any]:
    """Row counts per source and the provenance with long lists shortened (the full one is in the cache)."""
    def trim(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: trim(v) for k, v in obj.items() if k != "environment"}
        if isinstance(obj, list) and len(obj) > 32:
            return f"<{len(obj)} values>"
        return obj

    counts: dict[str, int] = {}
    for s in calib.row_sources:
        counts[s] = counts.get(s, 0) + 1
    return {"n": calib.n, "seqlen": calib.seqlen, "row_sources": counts, "provenance": trim(copy.deepcopy(
        calib.provenance))}


class _Study:
    """Holds the dense model and runs the steps; the model is restored to the dense fp32 weights before each."""

    def __init__(self, spec: StudySpec, progress: bool) -> None:
        from ..models import load_model

        self.spec, self.progress = spec, progress
        self.out = Path(spec["out_dir"])
        self.runs_dir, self.cache = self.out / "runs", self.out / "cache"
        self.model, self.tokenizer = load_model(spec["model"], dtype=torch.float32, device=spec["device"])
        self.model.eval()
        self.model_fp = model_fingerprint(self.model)
        self.dense_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.suite = resolve_suite(spec["benchmarks"], spec["eval_overrides"])
        self.suite_key = stable_hash({k: vars(v) for k, v in self.suite.items()})

    def restore(self) -> None:
        self.model.to(torch.float32)
        self.model.load_state_dict(self.dense_state)

    def evaluate(self, dtype: str) -> tuple[dict[str, Any], float]:
        """Per-item records of the current weights scored in ``dtype``; afterwards the model holds exactly the
        fp32 weights it had before (a cast to bf16 and back would round them)."""
        t0 = time.perf_counter()
        saved = None
        if dtype != "float32":
            saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.to(getattr(torch, dtype))
        try:
            res = evaluate_items(self.model, self.tokenizer, split=self.spec["split"], benchmarks=list(self.suite),
                                 overrides=self.spec["eval_overrides"] or None, data_dir=self.spec["data_dir"],
                                 cache_dir=self.cache / "eval", progress=self.progress)
        finally:
            if saved is not None:
                self.model.to(torch.float32)
                self.model.load_state_dict(saved)
        return res["benchmarks"], time.perf_counter() - t0

    def dense(self) -> dict[str, Any]:
        key = stable_hash({"format": FORMAT, "model": self.model_fp, "suite": self.suite_key,
                           "split": self.spec["split"], "dtype": self.spec["eval_dtype"], **device_key(self.spec)})
        path = self.runs_dir / "dense.json"
        blob = read_json(path, key)
        if blob is None:
            self.restore()
            records, seconds = self.evaluate(self.spec["eval_dtype"])
            blob = {"key": key, "model": self.spec["model"], "model_fingerprint": self.model_fp,
                    "split": self.spec["split"], "dtype": self.spec["eval_dtype"], "device": self.spec["device"],
                    "seconds": seconds,
                    "benchmarks": {k: dense_record(v) for k, v in records.items()}, "provenance": provenance()}
            write_json(path, blob)
            log.info("dense model scored in %s in %.0f s", self.spec["eval_dtype"], seconds)
        return blob

    def run_key(self, run: RunSpec) -> str:
        return stable_hash({"format": FORMAT, "calib": _calib_key(self.spec, run.entry, run.seed, self.model_fp),
                            "sparsity": run.sparsity, "pruner": _pruner_settings(self.spec, run.pruner),
                            "suite": self.suite_key, "split": self.spec["split"], "dtype": self.spec["eval_dtype"],
                            **device_key(self.spec)})

    def calibration(self, entry: str, seed: int) -> tuple[CalibrationSet, dict[str, Any]]:
        """The calibration set (cached) and its OIT metrics record (cached), built with the dense fp32 model."""
        ckey = _calib_key(self.spec, entry, seed, self.model_fp)
        path = self.cache / "calib" / f"{entry}-seed{seed}-{ckey}.pt"
        timings: dict[str, float] = {}
        if path.is_file() and path.with_suffix(".json").is_file():
            calib = CalibrationSet.load(path)
        else:
            self.restore()
            t = time.perf_counter()
            calib = _build(self.spec, entry, seed, self.model, self.tokenizer, self.cache)
            timings["build_s"] = time.perf_counter() - t
            _save_calibration(calib, path)
            log.info("%s (seed %d): built %d x %d in %.0f s", entry, seed, calib.n, calib.seqlen, timings["build_s"])
        if tuple(calib.ids.shape) != (self.spec["n"], self.spec["seqlen"]):
            raise RuntimeError(f"{entry}: calibration set has shape {tuple(calib.ids.shape)}, expected "
                               f"({self.spec['n']}, {self.spec['seqlen']})")
        mpath = self.cache / "metrics" / f"{entry}-seed{seed}-{ckey}.json"
        rec = read_json(mpath, ckey)
        if rec is None:
            self.restore()
            t = time.perf_counter()
            metrics = _metrics(calib, self.model)
            timings["metrics_s"] = time.perf_counter() - t
            rec = {"key": ckey, "metrics": metrics, "timings": timings, "calibration": _calib_summary(calib)}
            write_json(mpath, rec)
        return calib, rec

    def execute(self, run: RunSpec, key: str) -> dict[str, Any]:
        t_start = time.perf_counter()
        calib, crec = self.calibration(run.entry, run.seed)
        self.restore()
        t = time.perf_counter()
        report = _prune(self.model, calib, run.pruner, run.sparsity, self.spec)
        prune_s = time.perf_counter() - t
        records, eval_s = self.evaluate(self.spec["eval_dtype"])
        blob = {"format": FORMAT, "key": key, "id": run.id, "entry": run.entry,
                "kind": entry_kind(self.spec, run.entry), "seed": run.seed, "pruner": run.pruner,
                "sparsity": run.sparsity, "device": self.spec["device"],
                "achieved_sparsity": float(report.sparsity), "calibration": crec["calibration"],
                "metrics": crec["metrics"], "benchmarks": {k: compact_record(v) for k, v in records.items()},
                "timings": {**crec["timings"], "prune_s": prune_s, "eval_s": eval_s,
                            "total_s": time.perf_counter() - t_start},
                "provenance": provenance()}
        if self.spec["dtype_check"] and self.spec["eval_dtype"] != "float32" and \
                read_json(self.runs_dir / "dtype_check.json") is None:
            self.dtype_check(run, records)
        return blob

    def dtype_check(self, run: RunSpec, records: Mapping[str, Any]) -> None:
        """Score the current (pruned) weights and the dense model in fp32 too; write ``runs/dtype_check.json``."""
        pruned32, _ = self.evaluate("float32")
        pruned_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.restore()
        dense32, _ = self.evaluate("float32")
        dense_low = read_json(self.runs_dir / "dense.json")["benchmarks"]
        write_json(self.runs_dir / "dtype_check.json", {
            "run": run.id, "dtype": self.spec["eval_dtype"],
            "dense": {"float32": {k: dense_record(v) for k, v in dense32.items()}, "low": dense_low},
            "pruned": {"float32": {k: compact_record(v) for k, v in pruned32.items()},
                       "low": {k: compact_record(v) for k, v in records.items()}},
            "provenance": provenance()})
        self.model.load_state_dict(pruned_state)


def _stage1_totals(spec: Mapping[str, Any], dense: Mapping[str, Any], runs: Mapping[str, Any]) -> dict[str, float]:
    """Total retention of each single source's stage-1 run (first seed, main pruner, first sparsity)."""
    from .aggregate import run_retentions

    first = [r for r in runs.values() if r["seed"] == spec["seeds"][0] and r["pruner"] == spec["pruners"][0]
             and r["sparsity"] == spec["sparsities"][0] and r["entry"] in spec["sources"]]
    if not first:
        return {}
    rep = run_retentions(spec, dense, {r["id"]: r for r in first}, n_boot=0)
    return {r["entry"]: rep.point[r["id"]]["total"] for r in first}


def _run_class(spec: Mapping[str, Any], entry: str, pruner: str) -> str:
    """The run's class for the time estimate: its pruner, plus ``"+generated"`` when it generates its calibration
    set (generation only runs with the main pruner; the other pruners reuse the set)."""
    generates = calibration_options(spec, entry)[0] is not None and pruner == spec["pruners"][0]
    return f"{pruner}+generated" if generates else pruner


def _eta(done_times: Mapping[str, list[float]], remaining: list[RunSpec], spec: Mapping[str, Any]) -> float | None:
    """Expected seconds for ``remaining``: per run, the median time of finished runs of its class (all finished
    runs when its class has none yet). The median, not the mean, so that a run slowed by a busy machine does not
    inflate the whole estimate."""
    every = [t for ts in done_times.values() for t in ts]
    if not every:
        return None
    fallback = statistics.median(every)
    return sum(statistics.median(done_times[c]) if done_times.get(c) else fallback
               for c in (_run_class(spec, r.entry, r.pruner) for r in remaining))


def summarise_study(spec: StudySpec, dense: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]], *,
                    run_key: Callable[[RunSpec], str] | None = None,
                    done_times: Mapping[str, list[float]] | None = None, finished: bool = True) -> dict[str, Any]:
    """The ``study.json`` content of the planned runs among ``runs``, with ``complete`` and ``progress``.

    ``run_key`` (needs the model) also counts a run whose settings changed as remaining; without it (a report
    rebuilt from ``runs/`` alone) a planned run counts as done when its file exists. ``done_times`` (seconds per
    finished run, by class) gives the time estimate ``eta_s``; ``finished`` False marks the study as still running.
    """
    from .aggregate import build_study

    totals = _stage1_totals(spec, dense, runs)
    planned = plan_runs(spec, totals)
    remaining = [r for r in planned
                 if r.id not in runs or (run_key is not None and runs[r.id].get("key") != run_key(r))]
    pending = unresolved_runs(spec, totals)
    eta = None if done_times is None else _eta(done_times, remaining, spec)
    if eta is not None and pending:
        eta += pending * eta / max(len(remaining), 1)
    planned_ids = {r.id for r in planned}
    study = build_study(spec, dense, {k: v for k, v in runs.items() if k in planned_ids}, out_dir=spec["out_dir"])
    study["complete"] = finished and not remaining and not pending
    study["progress"] = {"planned": len(planned) + pending, "done": len(planned) - len(remaining),
                         "remaining": [r.id for r in remaining], "not_yet_planned": pending, "eta_s": eta}
    return study


def _check_device(spec: Mapping[str, Any], out: Path) -> None:
    """Refuse, before any work, to continue a study on another device type: the run keys differ (rounding
    differs), so every committed run would be redone and overwritten."""
    dense = read_json(out / "runs" / "dense.json")
    if dense is None:
        return
    ran = torch.device(dense.get("device", "cpu")).type  # dense.json from before the study had a device: CPU
    if ran != torch.device(spec["device"]).type:
        raise ValueError(f"{out} holds a study scored on {ran}; on {spec['device']} it would redo and overwrite "
                         f"its runs: pass --device {ran} to continue it, or --out a new folder")


def run_study(model: str, *, out_dir: str | os.PathLike | None = None, report: bool = True, plots: bool = True,
              progress: bool = True, max_runs: int | None = None, **settings: Any) -> dict[str, Any]:
    """Run (or resume) the study and return the ``study.json`` content; see the module docstring.

    ``model``: anything :func:`calibprune.load_model` takes; ``settings``: the keywords of
    :func:`~calibprune.study.plan.plan_study`. ``max_runs`` stops after that many new runs (the study stays
    resumable; ``study.json`` says ``"complete": false``).
    """
    from .report import require_matplotlib, write_report

    spec = plan_study(model, out_dir=out_dir, **settings)
    if report and plots:
        require_matplotlib()
    out = Path(spec["out_dir"])
    _check_device(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", {"format": FORMAT, "spec": dict(spec)})
    study_runner = _Study(spec, progress)
    dense = study_runner.dense()
    _, runs = load_runs(out)
    done_times: dict[str, list[float]] = {}  # seconds per finished run, by class (for the time estimate)
    for r in runs.values():
        done_times.setdefault(_run_class(spec, r["entry"], r["pruner"]), []).append(r["timings"]["total_s"])
    new = 0
    bar = progress_bar(desc="study", unit="run", show=progress)

    def summary(finished: bool) -> dict[str, Any]:
        study = summarise_study(spec, dense, runs, run_key=study_runner.run_key, done_times=done_times,
                                finished=finished)
        write_json(out / "study.json", study)
        return study

    try:
        while True:
            planned = plan_runs(spec, _stage1_totals(spec, dense, runs))
            todo = [r for r in planned if r.id not in runs or runs[r.id].get("key") != study_runner.run_key(r)]
            bar.total = len(planned)
            bar.n = len(planned) - len(todo)
            bar.refresh()
            if not todo or (max_runs is not None and new >= max_runs):
                break
            run = todo[0]
            key = study_runner.run_key(run)
            if run.id in runs:
                log.warning("%s: settings changed since it ran; running it again", run.id)
            bar.set_postfix_str(run.id)
            blob = study_runner.execute(run, key)
            write_json(study_runner.runs_dir / f"{run.id}.json", blob)
            runs[run.id] = blob
            new += 1
            done_times.setdefault(_run_class(spec, run.entry, run.pruner), []).append(blob["timings"]["total_s"])
            progress = summary(False)["progress"]
            eta = progress["eta_s"]
            log.info("%s done in %.0f s (prune %.0f s, eval %.0f s); %d of %d runs done%s", run.id,
                     blob["timings"]["total_s"], blob["timings"]["prune_s"], blob["timings"]["eval_s"],
                     progress["done"], progress["planned"], "" if eta is None else
                     f", about {eta / 3600:.1f} h left at this pace")
    finally:
        bar.close()
        study_runner.restore()
    study = summary(True)
    if report:
        write_report(study, out, plots=plots)
    return study
