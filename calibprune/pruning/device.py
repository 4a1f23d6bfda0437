"""Where and in what precision the layer loop computes: the checked compute device, the fp32 regime of the
reference numerics, and the reduced precision of ``numerics="fast"`` forwards.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .config import PruneConfig

__all__ = ["check_device", "resolve_device", "fast_forwards", "exact_fp32"]


def check_device(name: str | None) -> torch.device:
    """The compute device named ``name`` (``None``: cuda when torch sees a GPU, else cpu), checked: asking for
    CUDA on a machine without it is an error, not a late crash."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for but torch sees no CUDA device "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise RuntimeError(f"unsupported compute device {device}")
    return device


def resolve_device(config: PruneConfig) -> torch.device:
    """The config's compute device, checked (:func:`check_device`)."""
    return check_device(config.device)


def fast_forwards(config: PruneConfig, device: torch.device) -> torch.dtype | None:
    """The reduced precision for calibration forwards in ``numerics="fast"``, or None (run in the model dtype).

    bf16 where the device computes it natively: CUDA with bf16 support, or a CPU with AVX512-BF16 / AMX.
    """
    if config.numerics != "fast":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native or amx else None
    return None


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """SparseGPT's reference numerics: fp32 matmuls without TF32."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev[:2]
        torch.set_float32_matmul_precision(prev[2])
