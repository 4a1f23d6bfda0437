"""``hessian_update``: the running-average SparseGPT Hessian, H ← β·H + α·XᵀX with β = n/(n+b), α = 2/(n+b).

Two numerics:

* ``"reference"`` (default): the full symmetric H after every update. The torch backend is bitwise the reference
  (``SparseGPT.add_batch``) on any device; the Triton/CUDA SYRK kernels compute the same function in fp32 with a
  different summation order and keep H exactly symmetric.
* ``"fast"``: only the upper triangle of H is accumulated (half the flops); on a GPU fp32 inputs may be rounded to
  TF32 and 16-bit inputs go straight to the tensor cores, always with fp32 accumulation. The lower triangle is stale
  until :func:`hessian_finalize` mirrors it, once, before H is used. Judged by the pruning quality contract
  (:mod:`calibprune.ops.contract`), not by bits.

Always call ``hessian_finalize(H, numerics=...)`` after the last update (a no-op for ``"reference"``).
"""
from __future__ import annotations

import torch

from .._backend import check_numerics, native_extension, resolve_backend
from .naive import hessian_update_reference
from .torch_impl import hessian_update_torch, hessian_update_torch_fast, symmetrize_upper_

__all__ = ["hessian_update", "hessian_update_reference", "hessian_finalize", "symmetrize_upper_"]

SUPPORTED = ("torch", "triton", "cuda")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(H: torch.Tensor, X: torch.Tensor, nsamples: int) -> None:
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"H must be a square fp32 (or fp64) matrix, got {tuple(H.shape)} {H.dtype}")
    if X.dim() not in (2, 3) or X.shape[-1] != H.shape[0]:
        raise ValueError(f"X must be [b, t, d] or [t, d] with d = {H.shape[0]}, got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"X must be floating point, got {X.dtype}")
    if X.device != H.device:
        raise ValueError(f"H is on {H.device} but X is on {X.device}")
    if nsamples < 0:
        raise ValueError(f"nsamples must be >= 0, got {nsamples}")


def _cannot_take(H: torch.Tensor, X: torch.Tensor):
    def reason(backend: str) -> str | None:
        if backend == "torch":
            return None
        if H.dtype != torch.float32:
            return f"H is {H.dtype}; the {backend} kernel accumulates into fp32 only"
        if X.dtype not in _KERNEL_DTYPES:
            return f"X is {X.dtype}; the {backend} kernel takes fp32, bf16 or fp16"
        if backend == "cuda" and X.dtype != torch.float32 and X.is_cuda and torch.cuda.get_device_capability(
                X.device)[0] < 8:
            return "16-bit X needs sm_80 or newer in the cuda kernel"
        return None

    return reason


def hessian_update(H: torch.Tensor, X: torch.Tensor, nsamples: int, *, backend: str = "auto",
                   numerics: str = "reference") -> int:
    """Fold the batch ``X`` into the running-average Hessian ``H``.

    Same function as :func:`hessian_update_reference` (H ← H·n/(n+b) + (2/(n+b))·XᵀX).

    Args:
        H: ``[d, d]`` fp32 (fp64 on the torch backend only), updated in place. With ``numerics="fast"`` only its upper
            triangle is maintained: call :func:`hessian_finalize` before using H.
        X: ``[b, t, d]`` or ``[t, d]`` (one sequence) in fp32 / bf16 / fp16 (any float on the torch backend);
            accumulation is fp32.
        nsamples: sequences folded in so far (``n``).
        backend: ``"auto" | "torch" | "triton" | "cuda"``; ``auto`` takes the torch backend for inputs the kernels
            do not take (fp64) instead of raising.
        numerics: ``"reference"`` | ``"fast"`` (see the module docstring).

    Returns:
        ``n + b``.
    """
    check_numerics(numerics)
    _check(H, X, nsamples)
    batch = 1 if X.dim() == 2 else X.shape[0]
    total = nsamples + batch
    beta, alpha = nsamples / total, 2.0 / total
    X2d = X.flatten(0, -2) if X.dim() == 3 else X  # flatten, unlike reshape(-1, d), also takes d == 0
    chosen = resolve_backend(backend, H.device, SUPPORTED, op="hessian_update", cannot_take=_cannot_take(H, X2d),
                             numerics=numerics)
    fast = numerics == "fast"
    if H.shape[0] == 0:
        return total
    if chosen == "torch":
        if fast:
            hessian_update_torch_fast(H, X2d, beta, alpha)
        else:
            hessian_update_torch(H, X2d, beta, alpha)
    elif chosen == "triton":
        from calibprune.kernels.hessian import hessian_update_triton

        hessian_update_triton(H, X2d, beta, alpha, upper_only=fast, allow_tf32=fast)
    else:  # cuda: importing calibprune._cuda registers torch.ops.calibprune_cuda
        native_extension("_cuda")
        torch.ops.calibprune_cuda.hessian_update(H, X2d.contiguous(), beta, alpha, fast)
    return total


def hessian_finalize(H: torch.Tensor, *, numerics: str = "reference") -> torch.Tensor:
    """Make ``H`` ready for use after the last :func:`hessian_update`; returns H.

    ``"reference"``: nothing to do (H is already the full matrix; it is left bitwise as accumulated).
    ``"fast"``: mirror the upper triangle onto the stale lower one (:func:`symmetrize_upper_`), exactly.
    """
    if check_numerics(numerics) == "fast":
        symmetrize_upper_(H)
    return H
