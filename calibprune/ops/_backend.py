"""Backend discovery and selection for ``calibprune.ops``.

Backends: ``"torch"`` (plain PyTorch, always there), ``"triton"`` (kernels in ``calibprune.kernels``; on CPU only
under ``TRITON_INTERPRET=1``), ``"cuda"`` (``calibprune._cuda``, built from ``csrc/cuda``) and ``"cpp"``
(``calibprune._cpp``, C++/OpenMP, built from ``csrc/cpu``). Native extensions are optional: a missing one logs a
single warning that names it and says why it is missing (the build's own record, ``calibprune/_build_status.json``,
written by ``setup.py``) and never breaks ``import calibprune``. Nothing here initialises CUDA at import time.

``auto`` skips a backend that cannot take the inputs (e.g. fp64, which only the torch backend computes) instead of
raising; an explicit backend that cannot run raises one clear error.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

BACKENDS = ("torch", "triton", "cuda", "cpp")
NUMERICS = ("reference", "fast")
BUILD_STATUS_FILE = Path(__file__).resolve().parent.parent / "_build_status.json"

_FIX = {
    "_cpp": "rebuild with CALIBPRUNE_BUILD_CPP=1 pip install --no-build-isolation -e . (needs a C++ compiler)",
    "_cuda": "rebuild with CALIBPRUNE_BUILD_CUDA=1 pip install --no-build-isolation -e . (needs nvcc and a CUDA "
             "build of torch)",
}


def build_status() -> dict:
    """What ``setup.py`` recorded about the native extensions (``{}`` when nothing was recorded)."""
    try:
        return json.loads(BUILD_STATUS_FILE.read_text())
    except (OSError, ValueError):
        return {}


def missing_reason(name: str, exc: BaseException | None = None) -> str:
    """One line: why ``calibprune.<name>`` is not importable, and how to get it."""
    record = build_status().get(f"calibprune.{name}")
    if record and record.get("status") == "failed":
        why = f"its build failed at install time ({record.get('error', 'no detail recorded')})"
    elif record and record.get("status") == "skipped":
        why = f"it was not built ({record.get('reason', 'skipped')})"
    elif exc is not None and not isinstance(exc, ModuleNotFoundError):
        why = f"it is built but does not load ({exc})"
    else:
        why = "it is not built"
    return f"calibprune.{name} is not available: {why}; {_FIX.get(name, '')}".rstrip("; ")


@functools.cache
def native_extension(name: str) -> ModuleType | None:
    """Import ``calibprune.<name>`` (``_cpp`` or ``_cuda``) once; ``None`` with one warning when absent."""
    try:
        return importlib.import_module(f"calibprune.{name}")
    except ImportError as exc:
        log.warning("%s; using the torch/Triton backends instead", missing_reason(name, exc))
        return None


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` on this machine, fastest first."""
    device = torch.device(device)
    found: list[str] = []
    if device.type == "cuda":
        if native_extension("_cuda") is not None:
            found.append("cuda")
        if triton_importable():
            found.append("triton")
    else:
        if native_extension("_cpp") is not None:
            found.append("cpp")
        if triton_importable() and triton_interpreted():
            found.append("triton")
    found.append("torch")
    return found


# The order `auto` tries backends in, per (op, device type, numerics). CPU rows are measured (benchmarks/RESULTS.md:
# the cpp OBS kernel beats the torch loop at every SmolLM2 shape; the Hessian has only the torch backend on CPU).
# GPU rows are priors, not measurements (no GPU was lent when they were set): the fused OBS loop on chip before the
# per-column torch loop; the half-flop SYRK kernels for reference-numerics Hessians; cuBLAS (torch, TF32/bf16 tensor
# cores) first for fast Hessians, as the review expected. benchmarks/gpu_check.sh measures every provider: update
# these rows from its SUMMARY.
AUTO_ORDER: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("obs_prune", "cpu", "reference"): ("cpp", "torch"),
    ("obs_prune", "cpu", "fast"): ("cpp", "torch"),
    ("hessian_update", "cpu", "reference"): ("torch",),
    ("hessian_update", "cpu", "fast"): ("torch",),
    ("obs_prune", "cuda", "reference"): ("cuda", "triton", "torch"),
    ("obs_prune", "cuda", "fast"): ("cuda", "triton", "torch"),
    ("hessian_update", "cuda", "reference"): ("cuda", "triton", "torch"),
    ("hessian_update", "cuda", "fast"): ("torch", "triton", "cuda"),
}


def auto_order(op: str, device: torch.device | str, numerics: str = "reference") -> tuple[str, ...] | None:
    """The backend order ``auto`` tries for ``op`` on ``device`` (None: the generic default)."""
    return AUTO_ORDER.get((op, torch.device(device).type, numerics))


def check_numerics(numerics: str) -> str:
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    return numerics


def resolve_backend(backend: str, device: torch.device | str, supported: tuple[str, ...], *, op: str,
                    auto_order: tuple[str, ...] | None = None,
                    cannot_take: Callable[[str], str | None] | None = None, numerics: str = "reference") -> str:
    """Turn ``backend`` (one of ``BACKENDS`` or ``"auto"``) into a concrete backend for ``op`` on ``device``.

    ``auto`` takes the first of ``auto_order`` (default: :data:`AUTO_ORDER` for ``(op, device type, numerics)``,
    else cuda, triton, torch on GPU and cpp, torch on CPU) that is available, that ``op`` supports and that can take
    the inputs (``cannot_take(backend)`` returns None, else the reason).
    Triton is never chosen automatically on CPU: the interpreter is for tests only. An explicit backend that
    cannot run raises a ``RuntimeError`` (not available here) or ``ValueError`` (cannot take these inputs).
    """
    device = torch.device(device)
    if backend == "auto":
        order = (auto_order or AUTO_ORDER.get((op, device.type, numerics))
                 or (("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")))
        avail = available_backends(device)
        for cand in order:
            if cand in supported and cand in avail and (cannot_take is None or cannot_take(cand) is None):
                return cand
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if backend not in supported:
        raise ValueError(f"{op} has no {backend!r} backend; it supports {supported}")
    if backend not in available_backends(device):
        why = {
            "cuda": (missing_reason("_cuda") if native_extension("_cuda") is None
                     else "the tensors are not on a CUDA device"),
            "cpp": (missing_reason("_cpp") if native_extension("_cpp") is None
                    else "the tensors are on a GPU; the cpp backend is CPU-only"),
            "triton": "triton is not installed, or the tensors are on CPU without TRITON_INTERPRET=1",
        }.get(backend, "")
        raise RuntimeError(f"backend {backend!r} is not available for {op} on {device}: {why}")
    reason = cannot_take(backend) if cannot_take is not None else None
    if reason is not None:
        raise ValueError(f"backend {backend!r} of {op} cannot take these inputs: {reason}; use backend='torch' "
                         "or 'auto'")
    return backend
