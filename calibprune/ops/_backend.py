"""Backend discovery and selection for ``calibprune.ops``.

Backends: ``"torch"`` (plain PyTorch, always there), ``"triton"`` (kernels in ``calibprune.kernels``; on CPU only
under ``TRITON_INTERPRET=1``), ``"cuda"`` (``calibprune._cuda``, built from ``csrc/cuda``) and ``"cpp"``
(``calibprune._cpp``, C++/OpenMP, built from ``csrc/cpu``). Native extensions are optional: a missing one logs a
single warning and never breaks ``import calibprune``. Nothing here initialises CUDA at import time.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

log = logging.getLogger(__name__)

BACKENDS = ("torch", "triton", "cuda", "cpp")


@functools.cache
def native_extension(name: str) -> ModuleType | None:
    """Import ``calibprune.<name>`` (``_cpp`` or ``_cuda``) once; ``None`` with one warning when absent."""
    try:
        return importlib.import_module(f"calibprune.{name}")
    except ImportError as exc:
        log.warning("calibprune.%s is not available (%s); using the torch/Triton backends instead", name, exc)
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


def resolve_backend(backend: str, device: torch.device | str, supported: tuple[str, ...], *, op: str,
                    auto_order: tuple[str, ...] | None = None) -> str:
    """Turn ``backend`` (one of ``BACKENDS`` or ``"auto"``) into a concrete backend for ``op`` on ``device``.

    ``auto`` takes the first of ``auto_order`` (default: cuda, triton on GPU; cpp, torch on CPU) that is available
    and that ``op`` supports. Triton is never chosen automatically on CPU: the interpreter is for tests only.
    An explicit backend that cannot run raises a ``RuntimeError`` that says why.
    """
    device = torch.device(device)
    if backend == "auto":
        order = auto_order or (("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch"))
        avail = available_backends(device)
        for cand in order:
            if cand in supported and cand in avail:
                return cand
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if backend not in supported:
        raise ValueError(f"{op} has no {backend!r} backend; it supports {supported}")
    if backend not in available_backends(device):
        why = {
            "cuda": "calibprune._cuda is not built or the tensor is not on a CUDA device",
            "cpp": "calibprune._cpp is not built (needs a C++ compiler at install time) or the tensor is on a GPU",
            "triton": "triton is not installed, or the tensor is on CPU without TRITON_INTERPRET=1",
        }.get(backend, "")
        raise RuntimeError(f"backend {backend!r} is not available for {op} on {device}: {why}")
    return backend
