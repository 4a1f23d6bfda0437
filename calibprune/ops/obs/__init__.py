"""``obs_prune``: SparseGPT's OBS prune of one weight matrix given its Hessian, with a backend switch."""
from __future__ import annotations

import torch

from .._backend import native_extension, resolve_backend
from .naive import inverse_factor_reference, obs_prune_reference
from .torch_impl import inverse_factor, obs_prune_torch, prune_block

__all__ = ["obs_prune", "obs_prune_reference", "inverse_factor", "inverse_factor_reference", "prune_block",
           "check_obs_args"]

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


def obs_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    *,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    backend: str = "auto",
    return_losses: bool = False,
    inverse_method: str = "chol_inverse",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` in place exactly as SparseGPT's ``fasterprune`` does and return the pruned-weight mask.

    Args:
        W: ``[rows, cols]`` fp32, updated in place (pruned entries become 0, the rest absorb the OBS updates).
        H: ``[cols, cols]`` fp32 Hessian from :func:`calibprune.ops.hessian_update`; consumed (modified).
        sparsity: fraction pruned per block (unstructured); ignored for N:M.
        prune_n, prune_m: N:M pattern (``0, 0`` = unstructured).
        blocksize: lazy-update block width (a multiple of ``prune_m`` for N:M).
        percdamp: damping as a fraction of mean(diag H).
        backend: ``"auto" | "torch" | "triton" | "cuda" | "cpp"``.
        return_losses: also return the per-row OBS loss ``[rows]``.
        inverse_method: how U is factored (see :func:`inverse_factor`): ``"chol_inverse"`` (default) is the
            reference's sequence and keeps masks bitwise equal to it; ``"reversed"`` needs about 40% less time
            (one Cholesky + one triangular inverse) and gives the same U up to float rounding, which can flip
            near-tied mask entries.

    Returns:
        mask ``[rows, cols]`` bool (True = pruned), or ``(mask, losses)``.
    """
    if W.dim() != 2 or W.dtype != torch.float32:
        raise ValueError(f"W must be a 2-D fp32 matrix, got {tuple(W.shape)} {W.dtype}")
    if H.shape != (W.shape[1], W.shape[1]) or H.dtype != torch.float32:
        raise ValueError(f"H must be [cols, cols] = {(W.shape[1], W.shape[1])} fp32, got {tuple(H.shape)} {H.dtype}")
    check_obs_args(tuple(W.shape), sparsity, prune_n, prune_m, blocksize, percdamp)
    if inverse_method not in ("chol_inverse", "reversed"):
        raise ValueError(f"inverse_method must be 'chol_inverse' or 'reversed', got {inverse_method!r}")
    chosen = resolve_backend(backend, W.device, SUPPORTED, op="obs_prune")
    kwargs = dict(prune_n=prune_n, prune_m=prune_m, blocksize=blocksize, percdamp=percdamp)
    if chosen == "torch":
        mask, losses = obs_prune_torch(W, H, sparsity, inverse_method=inverse_method, **kwargs)
    elif chosen == "triton":
        from calibprune.kernels.obs import obs_prune_triton

        mask, losses = obs_prune_triton(W, H, sparsity, inverse_method=inverse_method, **kwargs)
    else:
        # Importing the extension registers torch.ops.calibprune_cpp / torch.ops.calibprune_cuda.
        native_extension("_cuda" if chosen == "cuda" else "_cpp")
        U, dead = inverse_factor(H, percdamp, method=inverse_method)
        W[:, dead] = 0
        op = torch.ops.calibprune_cuda.obs_prune if chosen == "cuda" else torch.ops.calibprune_cpp.obs_prune
        mask, losses = op(W, U, float(sparsity), prune_n, prune_m, blocksize)
    return (mask, losses) if return_losses else mask
