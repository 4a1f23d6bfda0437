"""Plain-PyTorch reference for the SparseGPT OBS prune (IST-DASLab ``SparseGPT.fasterprune``), numerics kept exactly.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023), Alg. 1.
Everything runs in fp32; the caller is expected to have TF32 off (``calibprune.pruning`` does).
"""
from __future__ import annotations

import torch

from .factor import InverseFactor, factor_with_escalation


def inverse_factor_reference(H: torch.Tensor, percdamp: float, *, what: str = "H") -> InverseFactor:
    """Dead columns, relative damping and the upper Cholesky factor U of H⁻¹ (so that UᵀU = H⁻¹).

    The reference's lines: dead = diag(H) == 0 → H[dead, dead] = 1 → H += percdamp·mean(diag H)·I → chol →
    cholesky_inverse → chol(upper). Where the reference would stop with a Cholesky error (H not positive definite
    after damping), the damping is escalated instead (:mod:`.factor`); when the first attempt succeeds the result is
    bitwise the reference's.

    Args:
        H: ``[cols, cols]`` fp32 Hessian; modified in place (dead diagonal set to 1, damping added).
        percdamp: damping as a fraction of mean(diag H).

    Returns:
        :class:`InverseFactor` ``(U [cols, cols] upper, dead [cols] bool, damp, escalations)``.
    """
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    mean_diag = torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0], device=H.device)

    def attempt(Hd: torch.Tensor, rel: float) -> torch.Tensor:
        damp = rel * mean_diag
        Hd[diag, diag] += damp
        L = torch.linalg.cholesky(Hd)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True)

    U, damp, escalations = factor_with_escalation(H, percdamp, attempt, what=what)
    return InverseFactor(U, dead, damp, escalations)


def obs_prune_reference(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    *,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    factor: InverseFactor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` in place with SparseGPT's OBS updates; the reference ``fasterprune`` line for line.

    Unstructured: the mask of each column block is chosen once, from W²/diag(U)² on the block's weights as they
    stand when the block starts, pruning every score ``<=`` the ``int(numel·sparsity)``-th smallest.
    N:M (``prune_n > 0``): every ``prune_m`` columns (counted from the block start) the ``prune_n`` smallest
    scores of each row are pruned, on the already-updated weights. Per column the error (w − q)/U[i,i] is
    propagated to the rest of the block; the trailing columns get one lazy GEMM per block.

    Args:
        W: ``[rows, cols]`` fp32, overwritten with the pruned and updated weights.
        H: ``[cols, cols]`` fp32 Hessian (consumed: modified in place); may be None when ``factor`` is given.
        factor: a precomputed :func:`inverse_factor_reference` of the same H (shared by modules that read the
            same inputs); bitwise the same as computing it here.

    Returns:
        mask: ``[rows, cols]`` bool, True where a weight was pruned;
        losses: ``[rows]`` fp32, the OBS loss Σ (w − q)²/U[i,i]² / 2 per row.
    """
    rows, columns = W.shape
    if factor is None:
        factor = inverse_factor_reference(H, percdamp)
    Hinv = factor.U
    W[:, factor.dead] = 0
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
