"""Fast ops behind calibprune, each with ``backend="auto" | "torch" | "triton" | "cuda" | "cpp"``.

``hessian_update`` and ``obs_prune`` also take ``numerics="reference" | "fast"``; the contract that judges the
fused kernels and the fast numerics is in :mod:`calibprune.ops.contract`.
"""
from __future__ import annotations

from ._backend import BACKENDS, NUMERICS, available_backends
from .contract import check_contract, mask_agreement, reconstruction_error
from .hessian import hessian_finalize, hessian_update, hessian_update_reference
from .ngram import ngram_hashes, ngram_stats
from .obs import InverseFactor, inverse_factor, obs_prune, obs_prune_reference

__all__ = ["BACKENDS", "NUMERICS", "InverseFactor", "available_backends", "check_contract", "hessian_finalize",
           "hessian_update", "hessian_update_reference", "inverse_factor", "mask_agreement", "ngram_hashes",
           "ngram_stats", "obs_prune", "obs_prune_reference", "reconstruction_error"]
