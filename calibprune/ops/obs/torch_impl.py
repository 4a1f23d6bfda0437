"""Fused torch backend for ``obs_prune``: the reference algorithm with a lean in-block column loop.

Differences from :mod:`.naive` are in bookkeeping only (same masks, bitwise the same weights on CPU and GPU):
the block is updated in place instead of through Q1/Losses1 copies, the error of column i is (w·m)/U[i,i]
(equal to (w − q)/U[i,i] since q = w·(1 − m)), the rank-1 update skips column i itself, the block threshold is a
k-th value instead of a full sort (the same value), and losses are summed once per block from the errors.

Every update is a rounded product followed by a rounded subtraction, as the reference's ``matmul`` then ``-=``.
``addr_`` is not that: on CPU its vectorised loop fuses into an FMA for some layouts and widths (measured: widths
>= 16 on this AVX-512 machine), and on CUDA nvcc may contract it, so the outer product is formed first, into a
reused scratch buffer. The trailing GEMM uses U in the layout the factorisation returned it (column-major from
LAPACK/cuSOLVER), as the reference does: the GEMM's rounding depends on the operand layout. ``numerics="fast"``
lets the trailing update fuse into one ``addmm_``.
"""
from __future__ import annotations

import torch

from .factor import InverseFactor

__all__ = ["prune_block", "obs_prune_torch", "block_threshold", "trailing_update"]


def block_threshold(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``sorted(score.flatten())[int(numel·sparsity)]`` (the reference's block threshold) as a 0-dim tensor.

    A k-th value is exact, so it is the same value the reference's full sort picks, in a fraction of the time.
    """
    flat = score.flatten()
    return torch.kthvalue(flat, int(flat.numel() * sparsity) + 1).values


def _rank1_sub(W1: torch.Tensor, err: torch.Tensor, u: torch.Tensor, scratch: torch.Tensor) -> None:
    """W1 -= err ⊗ u with one rounding for the product and one for the subtraction (the reference's numerics).

    ``scratch``: ``[rows, >= W1.shape[1]]``, overwritten.
    """
    prod = scratch[:, : W1.shape[1]]
    torch.mul(err.unsqueeze(1), u.unsqueeze(0), out=prod)
    W1.sub_(prod)


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
        mask1 = score <= block_threshold(score, sparsity)
    else:
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        d1_sq = d1.square()
    maskf = mask1.to(W1.dtype)
    scratch = torch.empty((W1.shape[0], max(count - 1, 0)), dtype=W1.dtype, device=W1.device)
    for i in range(count):
        if prune_n != 0 and i % prune_m == 0:
            j = min(i + prune_m, count)
            score = W1[:, i:j].square().div_(d1_sq[i:j])
            # torch.topk on W's device: the reference's own tie rule (see calibprune.ops.obs docs).
            mask1[:, i:j].scatter_(1, torch.topk(score, min(prune_n, j - i), dim=1, largest=False)[1], True)
            maskf[:, i:j] = mask1[:, i:j]
        err = Err1[:, i]
        torch.mul(W1[:, i], maskf[:, i], out=err)
        err.div_(d1[i])
        if i + 1 < count:
            _rank1_sub(W1[:, i + 1 :], err, U1[i, i + 1 :], scratch)
    W1.masked_fill_(mask1, 0)
    return mask1


def obs_prune_torch(
    W: torch.Tensor,
    factor: InverseFactor,
    sparsity: float,
    *,
    prune_n: int,
    prune_m: int,
    blocksize: int,
    fused_trailing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT OBS prune of ``W: [rows, cols]`` in place given the inverse factor of its Hessian.

    Args:
        W: ``[rows, cols]`` fp32 (or fp64), overwritten with the pruned, updated weights.
        factor: :func:`calibprune.ops.obs.inverse_factor` of the Hessian (``U [cols, cols]``, ``dead [cols]``).
        fused_trailing: one ``addmm_`` for the trailing update (one rounding; ``numerics="fast"``) instead of the
            reference's product then subtraction.

    Returns:
        ``(mask [rows, cols] bool, losses [rows])``.
    """
    rows, cols = W.shape
    U, dead = factor.U, factor.dead
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
            trailing_update(W[:, i2:], Err1, U[i1:i2, i2:], fused=fused_trailing)
    return mask, losses


def trailing_update(W2: torch.Tensor, Err1: torch.Tensor, U12: torch.Tensor, *, fused: bool) -> None:
    """W2 -= Err1 @ U12: the reference's product then subtraction, or one fused ``addmm_`` when ``fused``.

    Product then subtraction as the reference does: ``addmm_`` rounds once where the reference rounds twice (and
    for a single-column block it would be an FMA).
    """
    if fused:
        W2.addmm_(Err1, U12, alpha=-1)
    else:
        W2 -= Err1 @ U12
