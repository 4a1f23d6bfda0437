"""Evaluation: WikiText-2 perplexity, per-capability suites (``evaluate``) and retention vs the dense model."""
from __future__ import annotations

from .benchmarks import BENCHMARKS, DIMENSIONS
from .capabilities import SUITES, evaluate, retention
from .perplexity import load_wikitext2_test, perplexity, wikitext2_perplexity
from .proxies import solution_nll
from .study_suite import STUDY_SUITE, evaluate_items

__all__ = [
    "perplexity",
    "wikitext2_perplexity",
    "load_wikitext2_test",
    "evaluate",
    "retention",
    "solution_nll",
    "SUITES",
    "BENCHMARKS",
    "DIMENSIONS",
    "STUDY_SUITE",
    "evaluate_items",
]
