"""The reference OBS prune against an independent float64 implementation written from the math.

The independent version never uses lazy blocking: after each column it updates *all* later columns of W,
and it derives U from an explicit float64 inverse. Lazy batching is a pure reordering, so both must agree.
"""
from __future__ import annotations

import pytest
import torch
from _compare import assert_close, assert_masks_equal

from calibprune.ops import hessian_update_reference
from calibprune.ops.obs import obs_prune_reference


def obs_float64(W: torch.Tensor, H: torch.Tensor, sparsity: float, prune_n: int, prune_m: int, blocksize: int,
                percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(cols, dtype=H.dtype) * percdamp * H.diagonal().mean()
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # upper factor: Uᵀ U = H⁻¹
    d = U.diagonal()
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(cols):
        b0 = (i // blocksize) * blocksize
        if prune_n == 0 and i == b0:
            b1 = min(b0 + blocksize, cols)
            score = (W[:, b0:b1] / d[b0:b1]) ** 2
            k = int(score.numel() * sparsity)
            mask[:, b0:b1] = score <= score.flatten().sort().values[k]
        if prune_n and (i - b0) % prune_m == 0:
            score = (W[:, i : i + prune_m] / d[i : i + prune_m]) ** 2
            idx = score.argsort(dim=1)[:, :prune_n]
            mask[:, i : i + prune_m].scatter_(1, idx, True)
        err = torch.where(mask[:, i], W[:, i], torch.zeros_like(W[:, i])) / d[i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[mask[:, i], i] = 0
    return W, mask


def _hessian(cols: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(4, tokens // 4, cols, generator=g) @ mix
    H = torch.zeros(cols, cols)
    n = 0
    for batch in X.split(2):
        n = hessian_update_reference(H, batch, n)
    return H


CASES = [
    # rows, cols, blocksize, pattern
    (45, 99, 32, "unstructured"),
    (64, 33, 32, "unstructured"),   # one-column tail block
    (17, 128, 128, "unstructured"),
    (30, 96, 32, "2:4"),
    (23, 64, 16, "4:8"),
]


@pytest.mark.parametrize("rows,cols,blocksize,pattern", CASES,
                         ids=[f"R{r}-C{c}-B{b}-{p}" for r, c, b, p in CASES])
def test_reference_matches_float64(rows, cols, blocksize, pattern):
    prune_n, prune_m = (0, 0) if pattern == "unstructured" else map(int, pattern.split(":"))
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    W = torch.randn(rows, cols, generator=g)
    H = _hessian(cols, tokens=8 * cols, seed=cols)
    W64, mask64 = obs_float64(W, H, 0.6, prune_n, prune_m, blocksize, 0.01)
    W32 = W.clone()
    mask32, losses = obs_prune_reference(W32, H.clone(), 0.6, prune_n=prune_n, prune_m=prune_m,
                                         blocksize=blocksize, percdamp=0.01)
    assert_masks_equal(mask32, mask64)
    assert_close(W32, W64.float(), rtol=1e-4, name="pruned W")
    assert torch.all(W32[mask32] == 0)
    assert torch.all(losses >= 0)
    if prune_n:
        per_group = mask32.reshape(rows, cols // prune_m, prune_m).sum(-1)
        assert torch.all(per_group == prune_n)
    else:
        for b0 in range(0, cols, blocksize):
            block = mask32[:, b0 : b0 + blocksize]
            assert block.sum() == int(block.numel() * 0.6) + 1  # '<=' the k-th smallest prunes k+1 (no ties)


def test_dead_columns_are_zeroed_and_pruned():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(12, 40, generator=g)
    H = _hessian(40, 320, seed=3)
    H[5, :] = 0
    H[:, 5] = 0
    mask, _ = obs_prune_reference(W, H, 0.5, blocksize=16)
    assert torch.all(W[:, 5] == 0) and torch.all(mask[:, 5])
