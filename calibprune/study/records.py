"""The study's records on disk: atomic JSON writes, tolerant reads, and the compact per-item form of ``runs/``.

What :mod:`.run` writes and :mod:`.aggregate` reads; neither imports the other for it.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from .plan import stable_hash

log = logging.getLogger(__name__)

__all__ = ["write_json", "read_json", "compact_record", "expand_record", "dense_record", "load_runs"]

_STATIC = ("items", "k", "ntok")  # per-item fields that depend on the items only, kept once in dense.json


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default, allow_nan=True) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def read_json(path: Path, key: str | None = None) -> dict[str, Any] | None:
    """A JSON result, or ``None`` when absent, unreadable or (with ``key``) made for other settings."""
    if not path.is_file():
        return None
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable file %s (%s)", path, exc)
        return None
    if key is not None and blob.get("key") != key:
        return None
    return blob


def compact_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A benchmark record for ``runs/``: 0/1 arrays as strings, floats to 4 decimals, item lists as a hash."""
    out: dict[str, Any] = {"items_hash": stable_hash(list(record["items"])), "n": record["n"],
                           "scores": record["scores"], "seconds": round(float(record["seconds"]), 2)}
    if "correct" in record:
        out["correct"] = "".join(str(int(c)) for c in record["correct"])
    for key in ("margin", "nll"):
        if key in record:
            out[key] = [round(float(v), 4) for v in record[key]]
    return out


def expand_record(compact: Mapping[str, Any], dense: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`compact_record`, taking the item lists and static fields from the dense record."""
    if compact["items_hash"] != stable_hash(list(dense["items"])):
        raise ValueError("a run was scored on other items than the dense model (items_hash differs)")
    out = {k: dense[k] for k in _STATIC if k in dense}
    out.update({k: v for k, v in compact.items() if k not in ("items_hash", "correct")})
    if "correct" in compact:
        out["correct"] = [int(c) for c in compact["correct"]]
    return out


def dense_record(record: Mapping[str, Any]) -> dict[str, Any]:
    keep = {k: record[k] for k in ("dimension", "kind", "primary", "items", "n", "tokens", "seconds", "scores")}
    keep.update({k: record[k] for k in _STATIC if k in record})
    keep.update({k: v for k, v in compact_record(record).items() if k in ("correct", "margin", "nll")})
    return keep


def load_runs(out_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """``(dense, {run id: run})`` read from ``<out_dir>/runs`` (what :mod:`.aggregate` builds the study from)."""
    runs_dir = Path(out_dir) / "runs"
    dense = read_json(runs_dir / "dense.json")
    runs = {}
    for path in sorted(runs_dir.glob("*__*.json")):
        blob = read_json(path)
        if blob is not None:
            runs[blob["id"]] = blob
    return dense, runs
