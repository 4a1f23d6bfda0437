"""Fused torch backend for ``hessian_update``: one scaled accumulate per batch, upper-triangle tiles only."""
from __future__ import annotations

import torch

# Below this width a single GEMM is cheaper than tiling (launch and Python overhead dominate).
_SYRK_MIN_DIM = 1024
_SYRK_TILE = 512


def hessian_update_torch(H: torch.Tensor, X2d: torch.Tensor, beta: float, alpha: float) -> None:
    """H ← β·H + α·XᵀX for ``X2d: [tokens, d]`` fp32, computing only the upper-triangle tiles and mirroring.

    A symmetric rank-k update (SYRK) needs about half the flops of a full GEMM; torch has no SYRK, so wide
    Hessians are split into tiles and the strictly-lower tiles are copied from their transposes.
    """
    d = H.shape[0]
    if d < _SYRK_MIN_DIM:
        H.addmm_(X2d.t(), X2d, beta=beta, alpha=alpha)
        return
    Xt = X2d.t()
    starts = list(range(0, d, _SYRK_TILE))
    for i in starts:
        i2 = min(i + _SYRK_TILE, d)
        # One GEMM per tile row covers the diagonal tile and everything right of it.
        H[i:i2, i:].addmm_(Xt[i:i2], X2d[:, i:], beta=beta, alpha=alpha)
    for i in starts:
        i2 = min(i + _SYRK_TILE, d)
        H[i2:, i:i2] = H[i:i2, i2:].t()
