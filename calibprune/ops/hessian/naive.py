"""Plain-PyTorch reference for the running-average Hessian of SparseGPT (IST-DASLab ``SparseGPT.add_batch``)."""
from __future__ import annotations

import math

import torch


def hessian_update_reference(H: torch.Tensor, X: torch.Tensor, nsamples: int) -> int:
    """Fold a batch into the running-average Hessian, exactly as the reference implementation does.

    H ← H·n/(n+b);  n ← n+b;  H += (√(2/n)·X)ᵀ(√(2/n)·X)   (b = sequences in the batch, X rows = tokens)

    Args:
        H: ``[d, d]`` fp32, updated in place.
        X: ``[b, t, d]`` or ``[t, d]`` (counted as one sequence), any float dtype; upcast to fp32.
        nsamples: sequences folded in so far.

    Returns:
        The new sequence count ``n + b``.
    """
    if X.dim() == 2:
        X = X.unsqueeze(0)
    batch = X.shape[0]
    X = X.reshape(-1, X.shape[-1]).t()
    H *= nsamples / (nsamples + batch)
    nsamples += batch
    X = math.sqrt(2 / nsamples) * X.float()
    H += X.matmul(X.t())
    return nsamples
