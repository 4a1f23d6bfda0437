"""Backend selection for op tests: run every backend this machine has, skip the others with a reason.

Triton on CPU needs its interpreter. Triton's own language functions are fixed when ``triton`` is first imported,
which is why ``tests/conftest.py`` turns ``TRITON_INTERPRET`` on for the whole session on a machine without a GPU;
our kernels are fixed when their module is imported, so the fixture also sets the variable and drops the kernel
modules from ``sys.modules`` before and after each Triton test.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

from calibprune.ops._backend import native_extension, triton_importable

KERNEL_MODULES = ("calibprune.kernels.hessian", "calibprune.kernels.obs")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _drop_kernel_modules() -> None:
    for name in KERNEL_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def backend_env(request, monkeypatch) -> Iterator[tuple[str, torch.device, bool]]:
    """``(backend, device, interpreted)`` for the test's ``backend`` parameter, or a skip saying why not."""
    backend = request.param
    device = default_device()
    interpreted = False
    if backend == "cuda":
        if device.type != "cuda":
            pytest.skip("cuda backend needs a GPU")
        if native_extension("_cuda") is None:
            pytest.skip("calibprune._cuda is not built")
    elif backend == "cpp":
        device = torch.device("cpu")
        if native_extension("_cpp") is None:
            pytest.skip("calibprune._cpp is not built")
    elif backend == "triton":
        if not triton_importable():
            pytest.skip("triton is not installed")
        if device.type == "cpu":
            interpreted = True
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            _drop_kernel_modules()
    yield backend, device, interpreted
    if interpreted:
        _drop_kernel_modules()
