"""Triton kernel for ``obs_prune``: SparseGPT's sequential in-block OBS loop, one launch per column block.

Frantar & Alistarh (2023), Alg. 1. Inside a block the rows are independent, so each program owns ``BLOCK_R`` rows and
keeps their ``[BLOCK_R, count]`` slice of W in registers while it walks the block's columns in order: choose the
mask (unstructured: a block threshold computed beforehand; N:M: the ``n`` smallest scores of each group of ``m``
columns on the already-updated weights), err = (w·mask)/U[i,i], W[:, i+1:] -= err ⊗ U[i, i+1:]. The trailing
columns get one fp32 GEMM per block in torch, as in the torch path. On CPU this runs only under
``TRITON_INTERPRET=1`` (tests, tiny shapes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from calibprune.ops.obs.torch_impl import inverse_factor

__all__ = ["obs_prune_triton"]

_INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _obs_block_kernel(
    W_ptr, U_ptr, Err_ptr, Mask_ptr, Loss_ptr, Thresh_ptr, rows, count, stride_w, stride_u, stride_e, stride_m,
    PRUNE_N: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rows [pid·BLOCK_R, +BLOCK_R) of one block. W: [rows, count] fp32 (in place), U: [count, count] fp32 tile,
    Err: [rows, count] fp32 out, Mask: [rows, count] uint8 out, Loss: [rows] fp32 (accumulated), Thresh: [1]."""
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rin = r < rows
    cin = c < count
    tile = rin[:, None] & cin[None, :]
    W = tl.load(W_ptr + r[:, None] * stride_w + c[None, :], mask=tile, other=0.0)
    dg = tl.load(U_ptr + c * stride_u + c, mask=cin, other=1.0)
    dsq = dg * dg
    if PRUNE_N == 0:
        thresh = tl.load(Thresh_ptr)
        prune = (W * W / dsq[None, :] <= thresh) & tile
    else:
        prune = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int1)
    E = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    # GROUP = m for N:M (count is a multiple of m), 1 for unstructured.
    for g in range(0, count, GROUP):
        if PRUNE_N != 0:
            # Rank each score of the group among the group (ties: lower column first); prune rank < n.
            grp = (c >= g) & (c < g + GROUP)
            score = W * W / dsq[None, :]
            rank = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
            for k in tl.static_range(GROUP):
                s_k = tl.sum(tl.where(c[None, :] == g + k, score, 0.0), axis=1)[:, None]
                smaller = (s_k < score) | ((s_k == score) & (g + k < c[None, :]))
                rank += tl.where(smaller, 1, 0)
            prune = prune | (grp[None, :] & (rank < PRUNE_N) & tile)
        for k in tl.static_range(GROUP):
            i = g + k
            sel = c[None, :] == i
            w_i = tl.sum(tl.where(sel, W, 0.0), axis=1)
            p_i = tl.sum(tl.where(sel & prune, 1, 0), axis=1) > 0
            d_i = tl.load(U_ptr + i * stride_u + i)
            err = tl.where(p_i, w_i / d_i, 0.0)
            u_row = tl.load(U_ptr + i * stride_u + c, mask=(c > i) & cin, other=0.0)
            W = W - err[:, None] * u_row[None, :]
            E = tl.where(sel, err[:, None], E)
    W = tl.where(prune, 0.0, W)
    tl.store(W_ptr + r[:, None] * stride_w + c[None, :], W, mask=tile)
    tl.store(Err_ptr + r[:, None] * stride_e + c[None, :], E, mask=tile)
    tl.store(Mask_ptr + r[:, None] * stride_m + c[None, :], prune.to(tl.uint8), mask=tile)
    loss = tl.load(Loss_ptr + r, mask=rin, other=0.0)
    tl.store(Loss_ptr + r, loss + tl.sum(E * E, axis=1) / 2, mask=rin)


def obs_prune_triton(
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
    """SparseGPT OBS prune of ``W: [rows, cols] fp32`` in place with one Triton launch per column block.

    Args:
        W: ``[rows, cols]`` fp32 (unit column stride), overwritten with the pruned, updated weights.
        H: ``[cols, cols]`` fp32 Hessian; consumed (damped in place by :func:`inverse_factor`).

    Returns:
        ``(mask [rows, cols] bool, losses [rows] fp32)``; masks equal the reference's, weights up to rounding.
    """
    if W.dtype != torch.float32 or W.dim() != 2 or W.stride(1) != 1:
        raise ValueError(f"W must be a 2-D fp32 matrix with unit column stride, got {tuple(W.shape)} {W.dtype}")
    rows, cols = W.shape
    U, dead = inverse_factor(H, percdamp, method=inverse_method)
    W[:, dead] = 0
    U = U.contiguous()
    mask = torch.empty((rows, cols), dtype=torch.bool, device=W.device)
    mask_u8 = mask.view(torch.uint8)
    losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    Err = torch.empty(rows * min(blocksize, cols), dtype=torch.float32, device=W.device)
    thresh = torch.zeros(1, dtype=torch.float32, device=W.device)
    block_c = triton.next_power_of_2(min(blocksize, cols))
    # Registers hold three [BLOCK_R, BLOCK_C] tiles; keep about 4K elements per tile on GPU.
    block_r = 16 if _INTERPRETED else max(1, min(64, 4096 // block_c))
    num_warps = 1 if _INTERPRETED else (4 if block_r * block_c <= 2048 else 8)
    grid = (triton.cdiv(rows, block_r),)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        Err1 = Err[: rows * count].view(rows, count)
        if prune_n == 0:
            # Same score and k-th value as the torch path: sorted(W1²/diag(U1)²)[int(numel·s)].
            score = W1.square().div_(torch.diagonal(U1).square())
            flat = score.flatten()
            thresh.copy_(torch.kthvalue(flat, int(flat.numel() * sparsity) + 1).values.reshape(1))
        _obs_block_kernel[grid](
            W1, U1, Err1, mask_u8[:, i1:i2], losses, thresh, rows, count, W.stride(0), U.stride(0),
            Err1.stride(0), mask_u8.stride(0),
            PRUNE_N=prune_n, GROUP=prune_m if prune_n else 1, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=num_warps)
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return mask, losses
