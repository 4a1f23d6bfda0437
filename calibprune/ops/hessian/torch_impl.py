"""Torch backend for ``hessian_update``.

``numerics="reference"``: the reference's own numerics, for identical SparseGPT masks. The masks SparseGPT picks
depend on H through ties that float rounding can break, so this keeps the reference's exact sequence (scale X by √α,
scale H by β, add the product) and is bitwise equal to :func:`hessian_update_reference`. A single
``addmm_(beta, alpha)`` or upper-triangle tiling differs by ~1e-7 relative, enough to flip a handful of the 100M
mask entries of SmolLM2-135M at 60%.

``numerics="fast"``: a SYRK-style update of the upper triangle only, H[i-block, i:] ← β·H + α·X[:, i-block]ᵀ X[:, i:]
with one ``addmm_`` per row block (about half the flops of the full product, no scaled copy of X). The lower
triangle is left stale; :func:`symmetrize_upper_` mirrors it once, when H is used. On a GPU the products run with
TF32 inputs (bf16 X is upcast exactly: bf16 values are exact in TF32) and fp32 accumulation. Which CPU variant is
faster was measured (``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import contextlib
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


def hessian_update_torch_fast(H: torch.Tensor, X2d: torch.Tensor, beta: float, alpha: float, *,
                              block: int = UPPER_BLOCK) -> None:
    """Upper triangle of H ← β·H + α·XᵀX, one ``addmm_`` per block of ``block`` rows; the lower triangle is stale.

    Args:
        H: ``[d, d]`` fp32; only ``triu(H)`` is read and written.
        X2d: ``[tokens, d]`` any float dtype (16-bit inputs are upcast exactly to fp32).
    """
    X = X2d if X2d.dtype == H.dtype else X2d.to(H.dtype)
    d = H.shape[0]
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
