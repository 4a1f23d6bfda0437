"""Torch backend for ``hessian_update``.

``numerics="reference"``: the reference's own numerics, for identical SparseGPT masks. The masks SparseGPT picks
depend on H through ties that float rounding can break, so this keeps the reference's exact sequence (scale X by √α,
scale H by β, add the product) and is bitwise equal to :func:`hessian_update_reference`. A single
``addmm_(beta, alpha)`` or upper-triangle tiling differs by ~1e-7 relative, enough to flip a handful of the 100M
mask entries of SmolLM2-135M at 60%.

``numerics="fast"``: a SYRK-style update of the upper triangle only, H[i-block, i:] ← β·H + α·X[:, i-block]ᵀ X[:, i:]
with one ``addmm_`` per row block (about half the flops of the full product, no scaled copy of X). The lower
triangle is left stale; :func:`symmetrize_upper_` mirrors it once, when H is used. On a GPU, fp32 X runs with TF32
inputs and 16-bit X goes to the tensor cores as it is (``torch.mm(..., out_dtype=torch.float32)``, or an exact
upcast where that overload is missing), always with fp32 accumulation. Which CPU variant is faster was measured
(``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

__all__ = ["hessian_update_torch", "hessian_update_torch_fast", "symmetrize_upper_", "UPPER_BLOCK"]

# Row-block height of the upper-triangle update (measured on CPU: see benchmarks/RESULTS.md).
UPPER_BLOCK = 256


def hessian_update_torch(H: torch.Tensor, X2d: torch.Tensor, beta: float, alpha: float) -> None:
    """H ← β·H + (√α·X)ᵀ(√α·X) for ``X2d: [tokens, d]`` (upcast to fp32), bitwise as the reference computes it."""
    Xs = math.sqrt(alpha) * X2d.float()
    H *= beta
    H += Xs.t() @ Xs


@contextlib.contextmanager
def _tf32(enabled: bool):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@functools.cache
def _mm_out_fp32(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` takes ``dtype`` inputs on this device type."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def hessian_update_torch_fast(H: torch.Tensor, X2d: torch.Tensor, beta: float, alpha: float, *,
                              block: int = UPPER_BLOCK) -> None:
    """Upper triangle of H ← β·H + α·XᵀX, one product per block of ``block`` rows; the lower triangle is stale.

    Args:
        H: ``[d, d]`` fp32; only ``triu(H)`` is read and written.
        X2d: ``[tokens, d]`` any float dtype; fp32 accumulation.
    """
    d = H.shape[0]
    if X2d.is_cuda and X2d.dtype in (torch.bfloat16, torch.float16) and _mm_out_fp32("cuda", X2d.dtype):
        for i in range(0, d, block):
            j = min(i + block, d)
            prod = torch.mm(X2d[:, i:j].t(), X2d[:, i:], out_dtype=torch.float32)
            H[i:j, i:].mul_(beta).add_(prod, alpha=alpha)
        return
    X = X2d if X2d.dtype == H.dtype else X2d.to(H.dtype)  # 16-bit values are exact in fp32 (and TF32)
    with _tf32(True) if X.is_cuda else contextlib.nullcontext():
        for i in range(0, d, block):
            j = min(i + block, d)
            H[i:j, i:].addmm_(X[:, i:j].t(), X[:, i:], beta=beta, alpha=alpha)


def symmetrize_upper_(H: torch.Tensor) -> torch.Tensor:
    """Mirror the upper triangle of ``H: [d, d]`` onto the lower one, in place and exactly; returns H."""
    lower = H.triu(1).t()
    H.triu_()
    H.add_(lower)  # x + 0 is exact
    return H
