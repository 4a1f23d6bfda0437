"""What every Triton launcher in ``calibprune.kernels`` does around a launch.

Triton launches on the *current* CUDA device, not on the device of the tensors it is given, so a tensor on
``cuda:1`` while the current device is ``cuda:0`` is an illegal memory access (which also poisons the CUDA context
for everything after it). Every launch therefore runs under :func:`launch_guard`, which makes the tensors' device
current for the duration of the launch.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["launch_guard", "same_device"]


def same_device(*tensors: torch.Tensor) -> torch.device:
    """The one device that all ``tensors`` live on; ``ValueError`` if they disagree."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors of one launch must be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def launch_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (its index made current), a no-op otherwise.

    Constructing the guard does not initialise CUDA; entering it does, only for a CUDA device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
