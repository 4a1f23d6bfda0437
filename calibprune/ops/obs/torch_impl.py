"""Fused torch backend for ``obs_prune``: the reference algorithm with a lean in-block column loop.

Differences from :mod:`.naive` are in bookkeeping only (same masks, weights equal up to float rounding):
the block is updated in place instead of through Q1/Losses1 copies, the error of column i is (w·m)/U[i,i]
(equal to (w − q)/U[i,i] since q = w·(1 − m)), the rank-1 update skips column i itself, the block threshold is a
k-th value instead of a full sort, and losses are summed once per block from the errors.
"""
from __future__ import annotations

import torch


def inverse_factor(H: torch.Tensor, percdamp: float, *,
                   method: str = "chol_inverse") -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of the damped H⁻¹ (UᵀU = H⁻¹), after the reference's dead-column fix.

    ``method="chol_inverse"`` is the reference's chol → cholesky_inverse → chol(upper) (three O(d³) steps).
    ``method="reversed"`` uses one Cholesky of the index-reversed matrix and one triangular inverse: with
    J the reversal permutation and JHJ = LLᵀ, H⁻¹ = (J L⁻¹ J)ᵀ(J L⁻¹ J) and J L⁻¹ J is upper-triangular with
    a positive diagonal, so by uniqueness of the Cholesky factor it *is* U.

    Args:
        H: ``[d, d]`` fp32, modified in place (dead diagonal set to 1, damping added).

    Returns:
        ``(U [d, d] fp32 upper-triangular, dead [d] bool)``; the caller zeroes ``W[:, dead]``.
    """
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    if method == "chol_inverse":
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead
    if method != "reversed":
        raise ValueError(f"unknown inverse_factor method {method!r}")
    L = torch.linalg.cholesky(H.flip(0, 1))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    return Linv.flip(0, 1), dead


def prune_block(
    W1: torch.Tensor,
    U1: torch.Tensor,
    sparsity: float,
    prune_n: int,
    prune_m: int,
    Err1: torch.Tensor,
) -> torch.Tensor:
    """The sequential in-block OBS loop over one column block, in place.

    Args:
        W1: ``[rows, count]`` fp32 view of the block; on return holds the pruned, updated weights.
        U1: ``[count, count]`` fp32, the block's diagonal tile of U.
        Err1: ``[rows, count]`` fp32 output, the scaled errors (w − q)/U[i,i] used by the trailing update.

    Returns:
        mask1: ``[rows, count]`` bool, True where pruned.
    """
    count = W1.shape[1]
    d1 = torch.diagonal(U1)
    if prune_n == 0:
        score = W1.square().div_(d1.square())
        flat = score.flatten()
        # sorted(flat)[k] is the (k+1)-th smallest value.
        thresh = torch.kthvalue(flat, int(flat.numel() * sparsity) + 1).values
        mask1 = score <= thresh
    else:
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        d1_sq = d1.square()
    maskf = mask1.to(W1.dtype)
    for i in range(count):
        if prune_n != 0 and i % prune_m == 0:
            j = min(i + prune_m, count)
            score = W1[:, i:j].square().div_(d1_sq[i:j])
            mask1[:, i:j].scatter_(1, torch.topk(score, prune_n, dim=1, largest=False)[1], True)
            maskf[:, i:j] = mask1[:, i:j]
        err = Err1[:, i]
        torch.mul(W1[:, i], maskf[:, i], out=err)
        err.div_(d1[i])
        if i + 1 < count:
            W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1)
    W1.masked_fill_(mask1, 0)
    return mask1


def obs_prune_torch(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    *,
    prune_n: int,
    prune_m: int,
    blocksize: int,
    percdamp: float,
    inverse_method: str = "chol_inverse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT OBS prune of ``W: [rows, cols] fp32`` in place; returns ``(mask [rows, cols] bool, losses [rows])``."""
    rows, cols = W.shape
    U, dead = inverse_factor(H, percdamp, method=inverse_method)
    W[:, dead] = 0
    mask = torch.empty_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=W.dtype, device=W.device)
    Err = torch.empty((rows, min(blocksize, cols)), dtype=W.dtype, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        Err1 = Err[:, : i2 - i1]
        mask[:, i1:i2] = prune_block(W[:, i1:i2], U[i1:i2, i1:i2], sparsity, prune_n, prune_m, Err1)
        losses += Err1.square().sum(1) / 2
        if i2 < cols:
            # Product, then subtraction, as the reference does: addmm_ would fuse them into one rounding when
            # the block is a single column.
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return mask, losses
