"""The calibration study: which calibration data keeps which capability after pruning, with seeds and intervals.

For every entry (each single source, the uniform mix of those sources, Self-Cal, SGS, IGSP and IGSP variants),
calibration seed, pruner and sparsity: build the calibration set → its OIT metrics under the dense model → prune a
fresh copy of the dense model → score it on the study suite's TEST items → retention against the dense model.
Then seed means, paired-bootstrap intervals, Spearman ρ with intervals, and a verdict on each claim of the paper.

Modules: :mod:`.plan` (validation, the run list), :mod:`.run` (execution, resumable ``runs/`` JSONs),
:mod:`.statistics` (bootstrap, intervals, Spearman, verdicts), :mod:`.aggregate` (``study.json``),
:mod:`.report` (``report.md`` and plots).

Usage::

    from calibprune.study import run_study
    study = run_study("smollm2-135m", out_dir="results/smollm2-135m-v2")
    study["verdicts"]["mix > best single"]  # {"verdict": "confirmed" | ..., "estimate": ..., "lo": ..., "hi": ...}
"""
from __future__ import annotations

from .aggregate import METRICS, build_study
from .plan import CONSTRUCTED, PAPER, TARGETS, StudySpec, plan_runs, plan_study
from .records import load_runs
from .report import write_report
from .run import run_study
from .statistics import spearman_table

__all__ = ["CONSTRUCTED", "METRICS", "PAPER", "TARGETS", "StudySpec", "build_study", "load_runs", "plan_runs",
           "plan_study", "run_study", "spearman_table", "write_report"]
