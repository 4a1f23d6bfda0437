"""Plain-PyTorch reference for the SparseGPT OBS prune (IST-DASLab ``SparseGPT.fasterprune``), numerics kept exactly.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023), Alg. 1.
Everything runs in fp32; the caller is expected to have TF32 off (``calibprune.pruning`` does).
"""
from __future__ import annotations

import torch


def inverse_factor_reference(H: torch.Tensor, W: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Dead columns, relative damping and the upper Cholesky factor U of H⁻¹ (so that UᵀU = H⁻¹).

    Args:
        H: ``[cols, cols]`` fp32 Hessian; modified in place (dead diagonal set to 1, damping added).
        W: ``[rows, cols]`` fp32 weights; dead columns (zero Hessian diagonal) are zeroed in place.
        percdamp: damping as a fraction of mean(diag H).

    Returns:
        U: ``[cols, cols]`` fp32 upper-triangular, computed as chol → cholesky_inverse → chol(upper).
    """
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def obs_prune_reference(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    *,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` in place with SparseGPT's OBS updates; the reference ``fasterprune`` line for line.

    Unstructured: the mask of each column block is chosen once, from W²/diag(U)² on the block's weights as they
    stand when the block starts, pruning every score ``<=`` the ``int(numel·sparsity)``-th smallest.
    N:M (``prune_n > 0``): every ``prune_m`` columns (counted from the block start) the ``prune_n`` smallest
    scores of each row are pruned, on the already-updated weights. Per column the error (w − q)/U[i,i] is
    propagated to the rest of the block; the trailing columns get one lazy GEMM per block.

    Args:
        W: ``[rows, cols]`` fp32, overwritten with the pruned and updated weights.
        H: ``[cols, cols]`` fp32 Hessian (consumed: modified in place).

    Returns:
        mask: ``[rows, cols]`` bool, True where a weight was pruned;
        losses: ``[rows]`` fp32, the OBS loss Σ (w − q)²/U[i,i]² / 2 per row.
    """
    rows, columns = W.shape
    Hinv = inverse_factor_reference(H, W, percdamp)
    Losses = torch.zeros(rows, device=W.device)
    full_mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i : (i + prune_m)] ** 2 / (torch.diag(Hinv1)[i : (i + prune_m)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return full_mask, Losses
