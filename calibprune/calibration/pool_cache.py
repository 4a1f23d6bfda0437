"""On-disk cache of generated calibration pools, keyed by model identity, generator settings and seed.

The identity is :func:`calibprune.fingerprint.model_identity`.

A pool is what a generator drew from the model before any filtering or selection (token ids plus per-sample
labels and perplexities), so a second ``self_cal`` / ``sgs`` / ``igsp`` call with the same model, settings and seed
loads it instead of generating again. Files are written atomically (temporary file in the same folder, fsync, then
``os.replace``), so an interrupted write never leaves a truncated pool behind, and two processes writing the same
pool at once both succeed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write

__all__ = ["default_pool_dir", "pool_key", "pool_path", "load_pool", "save_pool"]

log = logging.getLogger(__name__)

def default_pool_dir() -> Path:
    """``$CALIBPRUNE_CACHE/pools`` (``~/.cache/calibprune/pools`` when the variable is unset)."""
    from calibprune.models import cache_root

    return cache_root() / "pools"


def pool_key(identity: dict[str, Any], settings: dict[str, Any]) -> str:
    """Hex key (24 chars) of a model identity plus generator settings (any JSON-serialisable dict, seed included)."""
    blob = json.dumps({"model": identity, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def pool_path(cache_dir: str | os.PathLike | None, kind: str, key: str) -> Path:
    """``<cache_dir or default_pool_dir()>/<kind>-<key>.pt``."""
    root = Path(cache_dir) if cache_dir is not None else default_pool_dir()
    return root / f"{kind}-{key}.pt"


def load_pool(path: Path) -> dict[str, Any] | None:
    """The cached pool at ``path``, or None when absent or unreadable (a corrupt file is logged and ignored)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # a damaged cache entry must not stop generation
        log.warning("ignoring unreadable pool cache %s (%s); generating again", path, exc)
        return None


def save_pool(path: Path, pool: dict[str, Any]) -> Path:
    """Write ``pool`` (tensors, lists, dicts of plain values) to ``path`` atomically; returns ``path``.

    Two processes that generated the same pool (same key: same model, settings and seed) may both save it: each
    write is complete before it replaces the file, so both succeed and the file always holds one whole pool.
    """
    atomic_write(path, lambda fh: torch.save(pool, fh))
    log.info("saved generated pool to %s", path)
    return path
