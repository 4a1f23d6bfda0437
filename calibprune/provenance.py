"""Provenance of artefacts: versions, git revision, device, time."""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path

import torch

from ._version import __version__

__all__ = ["provenance"]


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, stderr=subprocess.DEVNULL, text=True)
        dirty = subprocess.call(["git", "diff", "--quiet"], cwd=root, stderr=subprocess.DEVNULL) != 0
        return rev.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance() -> dict:
    """Versions of calibprune and its main dependencies, git revision, host and time."""
    versions = {"calibprune": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "triton", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"versions": versions, "git_revision": _git_revision(), "device": device,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
