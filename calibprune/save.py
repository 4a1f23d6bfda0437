"""Saving a pruned model: a plain dense safetensors checkpoint plus a ``calibprune.json`` sidecar.

Safety rules (issue 13), all checked by :func:`check_output_dir` before any work:

- the output is never the current directory, a parent of it, the home directory or ``/``;
- ``overwrite`` replaces only a folder that holds a previous calibprune output (its ``calibprune.json``);
- the output's parent must accept files (a real probe, not ``os.access``), and ``/proc``, ``/sys``, ``/dev`` and
  paths under a file are refused.

The save itself writes into a staging folder *beside* the target (``.calibprune-staging-<name>-<pid>-<tag>``),
then swaps it in: the old output is renamed aside, the new one renamed in, and only then the old one deleted; an
interruption in between restores the old one. Staging folders of dead processes (or older than a day) are
cleaned by the next save into the same parent folder; an old output set aside by a killed save is put back when
its target is missing.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ._io import normal_dir_mode, pid_alive, probe_writable
from .models import source_fingerprint
from .provenance import provenance
from .pruning.report import PruneReport

log = logging.getLogger(__name__)

__all__ = ["save_pruned", "check_output_dir", "check_finite", "NonFiniteWeightsError", "SIDECAR", "STAGING_PREFIX",
           "save_staged", "sidecar_for", "write_sidecar"]

SIDECAR = "calibprune.json"
STAGING_PREFIX = ".calibprune-staging-"
_ASIDE_SUFFIX = ".previous"
_STALE_SECONDS = 24 * 3600


class NonFiniteWeightsError(ValueError):
    """A tensor of the model holds NaN or Inf, so the checkpoint would be useless."""


def _protected(path: Path) -> str | None:
    """Why ``path`` (absolute, symlinks resolved) must never be an output folder, or None."""
    cwd = Path.cwd().resolve()
    home = Path(os.path.expanduser("~")).resolve()
    if path == Path(path.anchor):
        return "the filesystem root"
    if path == cwd:
        return "the current directory"
    if path in cwd.parents:
        return "a parent of the current directory"
    if path == home:
        return "the home directory"
    return None


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail before any work if ``out`` cannot or must not receive a pruned model; returns ``out`` as a Path.

    Raises ``ValueError`` for a protected folder (cwd, its parents, home, root), ``FileExistsError`` for an
    existing file, a symbolic link, a non-empty folder without ``overwrite`` or, with ``overwrite``, a non-empty
    folder that is not a previous calibprune output; ``NotADirectoryError`` / ``PermissionError`` when the
    folder cannot be created or written (probed by creating a file in the nearest existing ancestor).
    """
    out = Path(out).expanduser()
    absolute = Path(os.path.abspath(out))
    reason = _protected(absolute.resolve())
    if reason:
        raise ValueError(f"refusing to write the output to {absolute} ({reason}); give a new sub-folder, "
                         "e.g. --out ./pruned")
    if absolute.is_symlink():
        raise FileExistsError(f"output path {out} is a symbolic link; give the real folder")
    if absolute.exists() and not absolute.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if absolute.is_dir() and any(absolute.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; choose another or pass --overwrite")
        if not (absolute / SIDECAR).is_file():
            raise FileExistsError(f"--overwrite replaces only a previous calibprune output (a folder holding "
                                  f"{SIDECAR}); {out} has none, so it is left alone: choose another folder")
    probe_writable(absolute.parent, f"the output directory {out}")
    return out


def check_finite(model: nn.Module) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first parameters/buffers that hold NaN or Inf."""
    bad = []
    for name, tensor in model.state_dict().items():
        if not torch.is_floating_point(tensor) or tensor.is_meta:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            count = int(finite.numel() - finite.sum())
            bad.append(f"{name} ({count} of {tensor.numel()} values)")
    if bad:
        module = bad[0].rsplit(".", 1)[0]
        raise NonFiniteWeightsError(
            f"refusing to save: NaN/Inf in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; module "
            f"{module} diverged (try a larger --percdamp, fp32, or more calibration samples)")


def _staging_parts(name: str) -> tuple[str, int, bool] | None:
    """``(target name, pid, is_aside)`` of a staging folder name, or None if it is not one of ours."""
    if not name.startswith(STAGING_PREFIX):
        return None
    rest = name[len(STAGING_PREFIX):]
    aside = rest.endswith(_ASIDE_SUFFIX)
    rest = rest.removesuffix(_ASIDE_SUFFIX)
    parts = rest.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), aside


def clean_stale_staging(parent: Path) -> None:
    """Remove staging folders in ``parent`` left by dead processes or older than a day; an old output that a
    killed save had set aside goes back to its name when nothing took its place."""
    if not parent.is_dir():
        return
    now = time.time()
    for entry in parent.iterdir():
        parts = _staging_parts(entry.name)
        if parts is None or not entry.is_dir() or entry.is_symlink():
            continue
        target, pid, aside = parts
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if pid_alive(pid) and age < _STALE_SECONDS:
            continue
        if aside and not os.path.lexists(parent / target):
            log.warning("restoring %s, set aside by an interrupted save", parent / target)
            os.replace(entry, parent / target)
            continue
        log.info("removing stale staging folder %s", entry)
        shutil.rmtree(entry, ignore_errors=True)


def _swap_in(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is renamed aside first and deleted only once ``new`` is
    in place, or renamed back if that fails."""
    if not os.path.lexists(out):
        os.replace(new, out)
        return
    aside = new.with_name(new.name + _ASIDE_SUFFIX)
    os.replace(out, aside)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_pruned(model: nn.Module, tokenizer, out: str | os.PathLike, report: PruneReport, *,
                extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the pruned model (dense weights with zeros, safetensors) and the sidecar, atomically.

    Everything is written into a staging folder beside ``out`` that replaces ``out`` only when complete (see
    the module docstring), so an interrupted save leaves the previous output, never a half-written one. Refuses
    a model holding NaN/Inf (:class:`NonFiniteWeightsError`, naming the tensors) before writing anything. The
    sidecar records the report, provenance, the command line and, for a model from :func:`load_model`, what it
    was loaded from with the sha256 of its files. The checkpoint reloads with
    ``AutoModelForCausalLM``. Dense rather than 2:4-compressed storage: vLLM no longer loads sparse 2:4 checkpoints.
    """
    out = check_output_dir(out, overwrite=overwrite)
    check_finite(model)

    def fill(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_sidecar(folder, sidecar_for(model, report, extra))

    out = save_staged(out, fill, overwrite=overwrite)
    log.info("saved pruned model to %s", out)
    return out


def sidecar_for(model: nn.Module, report: PruneReport, extra: dict | None = None) -> dict:
    """The ``calibprune.json`` content :func:`save_pruned` writes: report, provenance, command line, the source
    model's fingerprint (when :func:`load_model` loaded it) and ``extra``."""
    sidecar = {"report": report.to_dict(), "provenance": provenance(), "command": list(sys.argv)}
    source = source_fingerprint(model)
    if source is not None:
        sidecar["source_model"] = source
    return sidecar | (extra or {})


def write_sidecar(folder: str | os.PathLike, sidecar: dict) -> None:
    """Write ``calibprune.json`` into ``folder`` (a staging folder: atomicity comes from the swap)."""
    (Path(folder) / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str))


def save_staged(out: str | os.PathLike, fill, *, overwrite: bool = False) -> Path:
    """Publish an output folder with :func:`save_pruned`'s safety rules: ``check_output_dir``, a staging folder
    beside ``out`` that ``fill(staging: Path)`` writes, then the swap (the old output is removed only once the new
    one is in place). Used by the layer-by-layer save of :func:`calibprune.pruning.prune_and_save`."""
    out = check_output_dir(out, overwrite=overwrite)
    parent = Path(os.path.abspath(out)).parent
    clean_stale_staging(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out.name}-{os.getpid()}-", dir=parent))
    try:
        os.chmod(tmp, normal_dir_mode())
        fill(tmp)
        _swap_in(tmp, parent / out.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
