"""Fast ops behind calibprune, each with ``backend="auto" | "torch" | "triton" | "cuda" | "cpp"``.

``hessian_update`` and ``obs_prune`` also take ``numerics="reference" | "fast"``; the contract that judges the
fused kernels and the fast numerics is in :mod:`calibprune.ops.contract`.
"""
from __future__ import annotations

import logging

import torch

from . import hessian, obs
from ._backend import BACKENDS, NUMERICS, available_backends, resolve_backend
from .contract import check_contract, mask_agreement, reconstruction_error
from .hessian import hessian_finalize, hessian_update, hessian_update_reference
from .ngram import ngram_hashes, ngram_stats
from .obs import InverseFactor, inverse_factor, obs_prune, obs_prune_reference

__all__ = ["BACKENDS", "NUMERICS", "OP_BACKENDS", "InverseFactor", "available_backends", "check_contract",
           "hessian_finalize", "hessian_update", "hessian_update_reference", "inverse_factor", "mask_agreement",
           "ngram_hashes", "ngram_stats", "obs_prune", "obs_prune_reference", "reconstruction_error",
           "resolve_op_backend"]

log = logging.getLogger(__name__)

#: op -> the backends it implements
OP_BACKENDS: dict[str, tuple[str, ...]] = {"hessian_update": hessian.SUPPORTED, "obs_prune": obs.SUPPORTED}


def resolve_op_backend(op: str, backend: str, device: torch.device | str, *, numerics: str = "reference") -> str:
    """The backend ``op`` will run on ``device`` when a prune asks for ``backend`` (``"auto"`` or one of BACKENDS).

    ``auto`` takes the fastest available for ``numerics``; an explicit backend that ``op`` does not implement (the
    Hessian has no C++ kernel) falls back to torch for that op, with a log line; an explicit backend that is not
    available here (``cuda`` on a CPU machine) is an error.
    """
    supported = OP_BACKENDS[op]
    if backend not in ("auto", "torch") and backend not in supported:
        log.info("%s has no %r backend; it runs on torch", op, backend)
        return "torch"
    return resolve_backend(backend, device, supported, op=op, numerics=numerics)
