"""Fast ops behind calibprune, each with ``backend="auto" | "torch" | "triton" | "cuda" | "cpp"``."""
from __future__ import annotations

from ._backend import BACKENDS, available_backends
from .hessian import hessian_update, hessian_update_reference
from .ngram import ngram_hashes, ngram_stats
from .obs import obs_prune, obs_prune_reference

__all__ = ["BACKENDS", "available_backends", "hessian_update", "hessian_update_reference", "ngram_hashes",
           "ngram_stats", "obs_prune", "obs_prune_reference"]
