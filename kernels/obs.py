"""Triton kernel for ``obs_prune``: SparseGPT's sequential in-block OBS loop, one launch per column block.

Frantar & Alistarh (2023), Alg. 1. Inside a block the rows are independent, so each program owns ``BLOCK_R`` rows and
keeps their ``[BLOCK_R, count]`` slice of W in registers while it walks the block's columns in order: choose the
mask (unstructured: a block threshold computed beforehand; N:M: the ``n`` smallest scores of each group of ``m``
columns on the already-updated weights), err = (w·mask)/U[i,i], W[:, i+1:] -= err ⊗ U[i, i+1:]. The trailing
columns get one fp32 GEMM per block in torch, exactly as in the torch path. On CPU this runs only under
``TRITON_INTERPRET=1`` (tests, tiny shapes).

Numerics are the reference's, so that on a GPU the masks agree with the torch backend on the same GPU:

* every division is IEEE round-to-nearest (``tl.div_rn``): a plain fp32 ``/`` compiles to ``div.full.f32``, up to
  2 ulp off, which moves elements across the block threshold;
* no fused multiply-add: the launch passes ``enable_fp_fusion=False`` (:data:`LAUNCH_OPTIONS`), so the rank-1 update
  is a rounded product then a rounded subtraction (``mul.rn.f32``, ``sub.rn.f32``), as the reference's k=1 matmul
  followed by ``-=``;
* N:M ties are ranked lowest column first, which is CUDA ``torch.topk``'s rule (see ``calibprune.ops.obs``).

``tests/ops/test_ptx.py`` compiles this kernel for sm_90 without a GPU and checks the PTX for all three.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from calibprune.ops.obs.factor import InverseFactor
from calibprune.ops.obs.torch_impl import block_threshold, trailing_update

from ._launch import launch_guard, same_device

__all__ = ["obs_prune_triton", "LAUNCH_OPTIONS", "launch_config"]

_INTERPRETED = bool(triton.knobs.runtime.interpret)
# Launch options of record (tests compile the kernel with exactly these).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _obs_block_kernel(
    W_ptr, U_ptr, Err_ptr, Mask_ptr, Thresh_ptr, rows, count, stride_w, stride_u, stride_e, stride_m,
    PRUNE_N: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rows [pid·BLOCK_R, +BLOCK_R) of one block. W: [rows, count] fp32 (in place), U: [count, count] fp32 tile,
    Err: [rows, count] fp32 out, Mask: [rows, count] uint8 out, Thresh: [1] fp32 (unstructured only)."""
    pid = tl.program_id(0)
    # int64 rows: rows·stride overflows int32 for matrices with >= 2^31 elements.
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rin = r < rows
    cin = c < count
    tile = rin[:, None] & cin[None, :]
    W = tl.load(W_ptr + r[:, None] * stride_w + c[None, :], mask=tile, other=0.0)
    dg = tl.load(U_ptr + c.to(tl.int64) * stride_u + c, mask=cin, other=1.0)
    dsq = dg * dg
    if PRUNE_N == 0:
        thresh = tl.load(Thresh_ptr)
        prune = (tl.div_rn(W * W, dsq[None, :]) <= thresh) & tile
    else:
        prune = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int1)
    E = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    # GROUP = m for N:M, 1 for unstructured. A group is cut short at the block's end (never read past it).
    for g in range(0, count, GROUP):
        if PRUNE_N != 0:
            # Rank each score of the group among the group's in-block columns (ties: lower column first, as CUDA
            # topk); prune rank < n.
            grp = (c >= g) & (c < g + GROUP) & cin
            score = tl.div_rn(W * W, dsq[None, :])
            rank = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
            for k in tl.static_range(GROUP):
                col_k = (c[None, :] == g + k) & cin[None, :]  # empty when g + k is past the block
                s_k = tl.sum(tl.where(col_k, score, 0.0), axis=1)[:, None]
                k_in = tl.sum(tl.where(col_k, 1, 0), axis=1)[:, None] > 0
                smaller = k_in & ((s_k < score) | ((s_k == score) & (g + k < c[None, :])))
                rank += tl.where(smaller, 1, 0)
            prune = prune | (grp[None, :] & (rank < PRUNE_N) & tile)
        for k in tl.static_range(GROUP):
            i = g + k
            sel = c[None, :] == i
            w_i = tl.sum(tl.where(sel, W, 0.0), axis=1)
            # p_i is False for a column past the block (prune is confined to the tile), so err is 0 there.
            p_i = tl.sum(tl.where(sel & prune, 1, 0), axis=1) > 0
            i_safe = tl.minimum(i, count - 1).to(tl.int64)  # never read U past the block
            d_i = tl.load(U_ptr + i_safe * stride_u + i_safe)
            err = tl.where(p_i, tl.div_rn(w_i, d_i), 0.0)
            u_row = tl.load(U_ptr + i_safe * stride_u + c, mask=(c > i) & cin, other=0.0)
            # Product, then subtraction: two roundings, never an FMA (LAUNCH_OPTIONS disables fusion).
            W = W - err[:, None] * u_row[None, :]
            E = tl.where(sel, err[:, None], E)
    W = tl.where(prune, 0.0, W)
    tl.store(W_ptr + r[:, None] * stride_w + c[None, :], W, mask=tile)
    tl.store(Err_ptr + r[:, None] * stride_e + c[None, :], E, mask=tile)
    tl.store(Mask_ptr + r[:, None] * stride_m + c[None, :], prune.to(tl.uint8), mask=tile)


def launch_config(count: int, *, interpreted: bool = _INTERPRETED) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` for a block of ``count`` columns."""
    block_c = triton.next_power_of_2(max(count, 1))
    # Registers hold three [BLOCK_R, BLOCK_C] tiles; keep about 4K elements per tile on GPU.
    block_r = 16 if interpreted else max(1, min(64, 4096 // block_c))
    num_warps = 1 if interpreted else (4 if block_r * block_c <= 2048 else 8)
    return block_r, block_c, num_warps


def obs_prune_triton(
    W: torch.Tensor,
    factor: InverseFactor,
    sparsity: float,
    *,
    prune_n: int,
    prune_m: int,
    blocksize: int,
    fused_trailing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT OBS prune of ``W: [rows, cols] fp32`` in place with one Triton launch per column block.

    Args:
        W: ``[rows, cols]`` fp32 (unit column stride), overwritten with the pruned, updated weights.
        factor: :func:`calibprune.ops.obs.inverse_factor` of the Hessian (``U [cols, cols]`` fp32, ``dead [cols]``).
        fused_trailing: one ``addmm_`` per trailing update (``numerics="fast"``) instead of product, then subtract.

    Returns:
        ``(mask [rows, cols] bool, losses [rows] fp32)``.
    """
    if W.dtype != torch.float32 or W.dim() != 2 or W.stride(1) != 1:
        raise ValueError(f"W must be a 2-D fp32 matrix with unit column stride, got {tuple(W.shape)} {W.dtype}")
    rows, cols = W.shape
    # The kernel reads rows of U (a row-major copy); the trailing GEMM uses the factor's own U, whose layout
    # (column-major from LAPACK/cuSOLVER) the reference's GEMM sees: the GEMM's rounding depends on it.
    U = factor.U
    U_rows = U.contiguous()
    device = same_device(W, U)
    if U.dtype != torch.float32 or U.shape != (cols, cols):
        raise ValueError(f"factor.U must be [{cols}, {cols}] fp32, got {tuple(U.shape)} {U.dtype}")
    W[:, factor.dead] = 0
    mask = torch.zeros((rows, cols), dtype=torch.bool, device=device)
    losses = torch.zeros(rows, dtype=torch.float32, device=device)
    if rows == 0 or cols == 0:
        return mask, losses
    mask_u8 = mask.view(torch.uint8)
    # The same Err layout as the torch path, so the trailing GEMM sees the same operands.
    Err = torch.empty((rows, min(blocksize, cols)), dtype=torch.float32, device=device)
    thresh = torch.zeros(1, dtype=torch.float32, device=device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1, U1 = W[:, i1:i2], U_rows[i1:i2, i1:i2]
        Err1 = Err[:, :count]
        if prune_n == 0:
            # Same score and k-th value as the torch path: sorted(W1²/diag(U1)²)[int(numel·s)].
            thresh.copy_(block_threshold(W1.square().div_(torch.diagonal(U1).square()), sparsity).reshape(1))
        block_r, block_c, num_warps = launch_config(count)
        grid = (triton.cdiv(rows, block_r),)
        with launch_guard(device):
            _obs_block_kernel[grid](
                W1, U1, Err1, mask_u8[:, i1:i2], thresh, rows, count, W.stride(0), U_rows.stride(0), Err1.stride(0),
                mask_u8.stride(0),
                PRUNE_N=prune_n, GROUP=prune_m if prune_n else 1, BLOCK_R=block_r, BLOCK_C=block_c,
                num_warps=num_warps, **LAUNCH_OPTIONS)
        losses += Err1.square().sum(1) / 2
        if i2 < cols:
            trailing_update(W[:, i2:], Err1, U[i1:i2, i2:], fused=fused_trailing)
    return mask, losses
