"""Saving a pruned model: a plain dense safetensors checkpoint plus a ``calibprune.json`` sidecar."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from .provenance import provenance
from .pruning.report import PruneReport

log = logging.getLogger(__name__)

__all__ = ["save_pruned", "check_output_dir", "SIDECAR"]

SIDECAR = "calibprune.json"


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail before any work if ``out`` exists and is not empty (unless ``overwrite``) or cannot be created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; choose another or pass --overwrite")
    parent = out.resolve().parent
    if not os.access(parent if parent.exists() else parent.parent, os.W_OK):
        raise PermissionError(f"cannot write the output directory {out}")
    return out


def save_pruned(model: nn.Module, tokenizer, out: str | os.PathLike, report: PruneReport, *,
                extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the pruned model (dense weights with zeros, safetensors) and the sidecar, atomically.

    Everything is written into a temporary sibling directory that replaces ``out`` only when complete, so an
    interrupted save leaves no half-written output. The checkpoint reloads with ``AutoModelForCausalLM``.
    Dense rather than 2:4-compressed storage: vLLM no longer loads sparse 2:4 checkpoints.
    """
    out = check_output_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        sidecar = {"report": report.to_dict(), "provenance": provenance()} | (extra or {})
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved pruned model to %s", out)
    return out
