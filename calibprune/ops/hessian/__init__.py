"""``hessian_update``: the running-average SparseGPT Hessian, H ← β·H + α·XᵀX with β = n/(n+b), α = 2/(n+b)."""
from __future__ import annotations

import torch

from .._backend import native_extension, resolve_backend
from .naive import hessian_update_reference
from .torch_impl import hessian_update_torch

__all__ = ["hessian_update", "hessian_update_reference"]

SUPPORTED = ("torch", "triton", "cuda")


def _check(H: torch.Tensor, X: torch.Tensor, nsamples: int) -> None:
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.dtype != torch.float32:
        raise ValueError(f"H must be a square fp32 matrix, got {tuple(H.shape)} {H.dtype}")
    if X.dim() not in (2, 3) or X.shape[-1] != H.shape[0]:
        raise ValueError(f"X must be [b, t, d] or [t, d] with d = {H.shape[0]}, got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"X must be floating point, got {X.dtype}")
    if X.device != H.device:
        raise ValueError(f"H is on {H.device} but X is on {X.device}")
    if nsamples < 0:
        raise ValueError(f"nsamples must be >= 0, got {nsamples}")


def hessian_update(H: torch.Tensor, X: torch.Tensor, nsamples: int, *, backend: str = "auto") -> int:
    """Fold the batch ``X`` into the running-average Hessian ``H``.

    Same function as :func:`hessian_update_reference` (H ← H·n/(n+b) + (2/(n+b))·XᵀX): bitwise equal on the torch
    backend (the reference's own op sequence), up to float rounding on the one-launch SYRK kernels (triton, cuda).

    Args:
        H: ``[d, d]`` fp32, updated in place.
        X: ``[b, t, d]`` or ``[t, d]`` (one sequence) in fp32 / bf16 / fp16; accumulation is fp32.
        nsamples: sequences folded in so far (``n``).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Returns:
        ``n + b``.
    """
    _check(H, X, nsamples)
    batch = 1 if X.dim() == 2 else X.shape[0]
    total = nsamples + batch
    beta, alpha = nsamples / total, 2.0 / total
    X2d = X.reshape(-1, X.shape[-1])
    chosen = resolve_backend(backend, H.device, SUPPORTED, op="hessian_update")
    if chosen == "torch":
        hessian_update_torch(H, X2d, beta, alpha)
    elif chosen == "triton":
        from calibprune.kernels.hessian import hessian_update_triton

        hessian_update_triton(H, X2d, beta, alpha)
    else:  # cuda: importing calibprune._cuda registers torch.ops.calibprune_cuda
        native_extension("_cuda")
        torch.ops.calibprune_cuda.hessian_update(H, X2d.contiguous(), beta, alpha)
    return total
