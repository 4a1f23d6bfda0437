"""Triton kernel for ``hessian_update``: H ← β·H + α·XᵀX as a symmetric rank-k update (SYRK).

Only the upper-triangle tiles of XᵀX are computed (about half the flops of a GEMM); each program writes its tile and
(``numerics="reference"``) the tile's mirror below the diagonal, so the whole update is one launch; with
``numerics="fast"`` the mirror is skipped (``calibprune.ops.hessian_finalize`` mirrors once at the end) and fp32
inputs may use TF32. Accumulation is always fp32 (``tl.dot``): bf16 and fp16 inputs run on tensor cores, fp32 inputs
use IEEE fp32 dot products in reference mode. Offsets are 64-bit: X reaches 2³¹ elements at 128×2048 tokens of a
14336-wide layer. On CPU this runs only under ``TRITON_INTERPRET=1`` (tests, tiny shapes).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import launch_guard, same_device

__all__ = ["hessian_update_triton"]

_INTERPRETED = bool(triton.knobs.runtime.interpret)
# The interpreter's tl.dot misreads 16-bit float operands; there we upcast first (bf16·bf16 products are exact in
# fp32 either way, so the numerics are the GPU's).

# A small explicit list for GPUs (square tiles: a tile and its mirror have the same shape).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_D": 64, "BLOCK_T": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_D": 64, "BLOCK_T": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 128, "BLOCK_T": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_D": 128, "BLOCK_T": 64}, num_warps=8, num_stages=3),
]
# CALIBPRUNE_TRITON_AUTOTUNE=0: the last config only, no tuning runs (test suites that compile many shapes).
if os.environ.get("CALIBPRUNE_TRITON_AUTOTUNE", "1") == "0":
    _GPU_CONFIGS = _GPU_CONFIGS[-1:]
# The interpreter is for correctness only: one config, small tiles so that ragged edges are exercised.
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_D": 16, "BLOCK_T": 16}, num_warps=1)]


@triton.autotune(configs=_INTERPRETER_CONFIGS if _INTERPRETED else _GPU_CONFIGS,
                 key=["d", "IN_DTYPE", "PRECISION", "UPPER_ONLY"], restore_value=["H_ptr"])
@triton.jit
def _hessian_syrk_kernel(
    H_ptr, X_ptr, tokens, d, stride_h, stride_x, beta, alpha,
    IN_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, UPPER_ONLY: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One [BLOCK_D, BLOCK_D] tile (ti, tj), ti <= tj, of H: [d, d] fp32 from X: [tokens, d]."""
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if ti > tj:
        return
    # 64-bit indices: token·stride and row·stride overflow int32 for inputs of >= 2^31 elements.
    rm = ti.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tj.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_T).to(tl.int64)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, tokens, BLOCK_T):
        kk = k0 + rk
        kin = kk[:, None] < tokens
        a = tl.load(X_ptr + kk[:, None] * stride_x + rm[None, :], mask=kin & (rm[None, :] < d), other=0.0)
        b = tl.load(X_ptr + kk[:, None] * stride_x + rn[None, :], mask=kin & (rn[None, :] < d), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    inb = (rm[:, None] < d) & (rn[None, :] < d)
    h = tl.load(H_ptr + rm[:, None] * stride_h + rn[None, :], mask=inb, other=0.0)
    out = beta * h + alpha * acc
    # Upper part of the tile in place; its transpose goes below the diagonal (a diagonal tile keeps one copy
    # of each pair, so H stays exactly symmetric).
    tl.store(H_ptr + rm[:, None] * stride_h + rn[None, :], out, mask=inb & (rm[:, None] <= rn[None, :]))
    if not UPPER_ONLY:
        inb_t = (rn[:, None] < d) & (rm[None, :] < d)
        tl.store(H_ptr + rn[:, None] * stride_h + rm[None, :], tl.trans(out),
                 mask=inb_t & (rm[None, :] < rn[:, None]))


def hessian_update_triton(H: torch.Tensor, X2d: torch.Tensor, beta: float, alpha: float, *,
                          upper_only: bool = False, allow_tf32: bool = False) -> None:
    """H ← β·H + α·XᵀX in one launch.

    Args:
        H: ``[d, d]`` fp32, symmetric, updated in place (only its upper triangle is read).
        X2d: ``[tokens, d]`` fp32 / bf16 / fp16 (made row-contiguous); products accumulate in fp32.
        beta, alpha: the running-average factors n/(n+b) and 2/(n+b).
        upper_only: write the upper triangle only (``numerics="fast"``; mirror later).
        allow_tf32: fp32 X through TF32 tensor cores (``numerics="fast"``); IEEE fp32 otherwise.
    """
    if H.dtype != torch.float32 or H.dim() != 2 or H.shape[0] != H.shape[1] or H.stride(1) != 1:
        raise ValueError(f"H must be a square fp32 matrix with unit column stride, got {tuple(H.shape)} {H.dtype}")
    if X2d.dim() != 2 or X2d.shape[1] != H.shape[0]:
        raise ValueError(f"X2d must be [tokens, {H.shape[0]}], got {tuple(X2d.shape)}")
    if X2d.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"X2d must be fp32, bf16 or fp16, got {X2d.dtype}")
    device = same_device(H, X2d)
    X2d = X2d.contiguous()
    tokens, d = X2d.shape
    if d == 0:
        return  # a zero-size grid is not a valid launch
    if tokens == 0:
        H.mul_(beta)
        return
    # IEEE fp32 products unless TF32 is allowed; for 16-bit inputs the value is ignored (they are exact in fp32).
    precision = "ieee" if X2d.dtype == torch.float32 and not allow_tf32 else "tf32"

    def grid(meta):
        t = triton.cdiv(d, meta["BLOCK_D"])
        return (t, t)

    with launch_guard(device):
        _hessian_syrk_kernel[grid](H, X2d, tokens, d, H.stride(0), X2d.stride(0), float(beta), float(alpha),
                                   IN_DTYPE=str(X2d.dtype), PRECISION=precision, UPCAST=_INTERPRETED,
                                   UPPER_ONLY=upper_only)
