"""Evaluation: WikiText-2 perplexity now; capability suites and retention come with the calibration-science work."""
from __future__ import annotations

from .perplexity import load_wikitext2_test, perplexity, wikitext2_perplexity

__all__ = ["perplexity", "wikitext2_perplexity", "load_wikitext2_test"]
