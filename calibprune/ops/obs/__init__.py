"""``obs_prune``: SparseGPT's OBS prune of one weight matrix given its Hessian, with a backend switch.

Contract between the backends (checked by ``tests/ops`` and, on a GPU, by ``tests/test_gpu_ops.py``):

* ``backend="torch"`` with ``numerics="reference"`` is bitwise :func:`obs_prune_reference` on any device (CPU or
  GPU): same masks, same weights.
* The fused kernels (``cpp``, ``triton``, ``cuda``) use the reference's in-block arithmetic (IEEE division, a
  separately rounded product and subtraction, the same threshold and the same N:M tie rule); they are judged against
  the torch backend *on the same device* by :mod:`calibprune.ops.contract`: mask agreement >= 99.9% and a
  reconstruction error tr(ΔW H ΔWᵀ) within 0.5% of the reference's. (On CPU the cpp backend is in fact bitwise.)
* ``numerics="fast"`` (one-Cholesky ``"reversed"`` factor, fused trailing ``addmm_``) is judged by the same contract.

N:M tie rule. On an exact tie of scores inside a group of m, the reference's ``torch.topk(largest=False)`` decides,
and it decides differently per device: on CPU it is libstdc++'s ``std::nth_element`` (``std::partial_sort`` when
m >= 64·n) over (score, index) pairs compared by score alone, which keeps no fixed index order (in
W = [1, 2, 0.1, 1, 3, 0.2, 1.5, 2.5], H = I, 2:4 it prunes column 3, not 0); on CUDA it takes the tied scores in
index order (lowest index pruned first). Each backend follows the rule of the device it runs on: the cpp kernel
calls the same ``std::nth_element``/``std::partial_sort`` with the same comparator, and the CUDA and Triton kernels
(GPU-only in production) rank ties lowest index first. Under the Triton CPU interpreter the Triton kernel keeps the
GPU rule, so its tie tests compare with the reference run with CUDA's tie rule.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .._backend import check_numerics, native_extension, resolve_backend
from .factor import METHODS, InverseFactor, damping_schedule, inverse_factor
from .naive import inverse_factor_reference, obs_prune_reference
from .torch_impl import obs_prune_torch, prune_block

__all__ = ["obs_prune", "obs_prune_reference", "inverse_factor", "inverse_factor_reference", "InverseFactor",
           "damping_schedule", "prune_block", "check_obs_args"]

SUPPORTED = ("torch", "triton", "cuda", "cpp")


def check_obs_args(shape: tuple[int, int], sparsity: float, prune_n: int, prune_m: int, blocksize: int,
                   percdamp: float) -> None:
    """Validate pruning arguments for a ``[rows, cols]`` weight; one clear ``ValueError`` per problem."""
    rows, cols = shape
    if prune_n == 0 and prune_m == 0:
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    else:
        if not (0 < prune_n < prune_m):
            raise ValueError(f"N:M pattern needs 0 < n < m, got {prune_n}:{prune_m}")
        if cols % prune_m:
            raise ValueError(f"N:M pattern {prune_n}:{prune_m} needs m to divide the input width {cols}")
        if blocksize % prune_m:
            raise ValueError(f"blocksize {blocksize} must be a multiple of m = {prune_m} for N:M pruning")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")


def _cannot_take(W: torch.Tensor, blocksize: int, prune_m: int) -> Callable[[str], str | None]:
    def reason(backend: str) -> str | None:
        if backend == "torch":
            return None
        if W.dtype != torch.float32:
            return f"W is {W.dtype}; the {backend} kernel computes in fp32 only"
        if backend == "cuda" and blocksize > 256:
            return f"blocksize {blocksize} > 256"
        return None

    return reason


def obs_prune(
    W: torch.Tensor,
    H: torch.Tensor | None,
    sparsity: float = 0.5,
    *,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    backend: str = "auto",
    return_losses: bool = False,
    numerics: str = "reference",
    inverse_method: str | None = None,
    factor: InverseFactor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` in place as SparseGPT's ``fasterprune`` does and return the pruned-weight mask.

    Args:
        W: ``[rows, cols]`` fp32 (fp64 on the torch backend only; ``auto`` picks it), updated in place (pruned
            entries become 0, the rest absorb the OBS updates).
        H: ``[cols, cols]`` Hessian (W's dtype) from :func:`calibprune.ops.hessian_update`; consumed (damped in
            place). Ignored, and may be None, when ``factor`` is given.
        sparsity: fraction pruned per block (unstructured); ignored for N:M.
        prune_n, prune_m: N:M pattern (``0, 0`` = unstructured).
        blocksize: lazy-update block width (a multiple of ``prune_m`` for N:M).
        percdamp: damping as a fraction of mean(diag H); escalated (logged) if H is not positive definite.
        backend: ``"auto" | "torch" | "triton" | "cuda" | "cpp"``.
        return_losses: also return the per-row OBS loss ``[rows]``.
        numerics: ``"reference"`` (default: the reference's arithmetic; bitwise on the torch backend) or ``"fast"``
            (the one-Cholesky ``"reversed"`` factor and one fused ``addmm_`` per trailing update; judged by the
            quality contract of :mod:`calibprune.ops.contract`, not by bits).
        inverse_method: override the factor method (``"chol_inverse"`` | ``"reversed"``); default from ``numerics``.
        factor: a precomputed :func:`inverse_factor` of H, to share one factor between modules that read the same
            inputs (q/k/v, gate/up): ``f = inverse_factor(H, percdamp)``, then ``obs_prune(W, None, ...,
            factor=f)`` for each; the result is bitwise the same as factoring H in each call. ``f.damp`` and
            ``f.escalations`` say whether the damping had to be raised.

    Returns:
        mask ``[rows, cols]`` bool (True = pruned), or ``(mask, losses)``.
    """
    check_numerics(numerics)
    if W.dim() != 2 or W.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"W must be a 2-D fp32 (or fp64) matrix, got {tuple(W.shape)} {W.dtype}")
    cols = W.shape[1]
    if factor is None:
        if H is None:
            raise ValueError("give H (the Hessian) or factor (its precomputed inverse_factor)")
        if H.shape != (cols, cols) or H.dtype != W.dtype:
            raise ValueError(f"H must be [cols, cols] = {(cols, cols)} {W.dtype}, got {tuple(H.shape)} {H.dtype}")
        if H.device != W.device:
            raise ValueError(f"W is on {W.device} but H is on {H.device}")
    elif (factor.U.shape != (cols, cols) or factor.U.dtype != W.dtype or factor.U.device != W.device
          or factor.dead.shape != (cols,)):
        raise ValueError(f"factor.U must be [cols, cols] = {(cols, cols)} {W.dtype} on {W.device}, got "
                         f"{tuple(factor.U.shape)} {factor.U.dtype} on {factor.U.device}")
    check_obs_args(tuple(W.shape), sparsity, prune_n, prune_m, blocksize, percdamp)
    method = inverse_method or ("reversed" if numerics == "fast" else "chol_inverse")
    if method not in METHODS:
        raise ValueError(f"inverse_method must be one of {METHODS}, got {inverse_method!r}")
    chosen = resolve_backend(backend, W.device, SUPPORTED, op="obs_prune",
                             cannot_take=_cannot_take(W, blocksize, prune_m),
                             numerics=numerics)
    rows = W.shape[0]
    if rows == 0 or cols == 0:
        mask = torch.zeros_like(W, dtype=torch.bool)
        losses = torch.zeros(rows, dtype=W.dtype, device=W.device)
        return (mask, losses) if return_losses else mask
    if factor is None:
        factor = inverse_factor(H, percdamp, method=method)
    fused = numerics == "fast"
    kwargs = dict(prune_n=prune_n, prune_m=prune_m, blocksize=blocksize)
    if chosen == "torch":
        mask, losses = obs_prune_torch(W, factor, sparsity, fused_trailing=fused, **kwargs)
    elif chosen == "triton":
        from calibprune.kernels.obs import obs_prune_triton

        mask, losses = obs_prune_triton(W, factor, sparsity, fused_trailing=fused, **kwargs)
    else:
        # Importing the extension registers torch.ops.calibprune_cpp / torch.ops.calibprune_cuda.
        native_extension("_cuda" if chosen == "cuda" else "_cpp")
        W[:, factor.dead] = 0
        op = torch.ops.calibprune_cuda.obs_prune if chosen == "cuda" else torch.ops.calibprune_cpp.obs_prune
        mask, losses = op(W, factor.U, float(sparsity), prune_n, prune_m, blocksize, fused)
    return (mask, losses) if return_losses else mask
