"""Mask rules shared by the score-based methods (Wanda, magnitude) and the DSnoT refiner.

Each follows the authors' own arithmetic and tie rules (locuslab/wanda ``prune_wanda`` / ``prune_magnitude``).
"""
from __future__ import annotations

import torch

__all__ = ["nm_mask", "row_mask", "matrix_mask"]


def nm_mask(score: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """In every row, prune the ``prune_n`` lowest scores of each group of ``prune_m`` consecutive columns.

    ``score: [rows, cols]`` with ``cols % prune_m == 0``; returns a bool mask of the same shape, True = pruned.
    Ties go as ``torch.topk(largest=False)`` breaks them on each ``[rows, prune_m]`` slice, which is how the
    authors select (one slice per group, in column order).
    """
    rows, cols = score.shape
    mask = torch.zeros((rows, cols), dtype=torch.bool, device=score.device)
    for start in range(0, cols, prune_m):
        group = score[:, start : start + prune_m].float()
        mask.scatter_(1, start + torch.topk(group, prune_n, dim=1, largest=False)[1], True)
    return mask


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(cols·sparsity)`` lowest scores of every row (stable sort: ties keep the lower index).

    ``score: [rows, cols]``; returns a bool mask, True = pruned.
    """
    k = int(score.shape[1] * sparsity)
    idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold for the whole matrix: prune every score ``<=`` ``sorted(score)[int(numel·sparsity)]``."""
    flat = score.flatten()
    thresh = torch.kthvalue(flat.float().cpu(), int(flat.numel() * sparsity) + 1).values.to(score.device)
    return score <= thresh
