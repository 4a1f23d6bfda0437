"""Torch backend for n-gram keys (vectorised over windows) and counting (sort-unique)."""
from __future__ import annotations

import torch

from .naive import MIX1, MIX2, SEED, exact_width

__all__ = ["ngram_hashes_torch", "window_valid", "count_keys_torch", "signed64"]


def signed64(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return v - (1 << 64) if v >= 1 << 63 else v


_SEED, _MIX1, _MIX2 = signed64(SEED), signed64(MIX1), signed64(MIX2)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _fmix_(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps mod 2^64, so the bits equal the unsigned splitmix64 product.
    z.bitwise_xor_(_shr(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_shr(z, 27)).mul_(_MIX2)
    return z.bitwise_xor_(_shr(z, 31))


def window_valid(token_mask: torch.Tensor | None, n: int, m: int, shape: tuple[int, int],
                 device: torch.device) -> torch.Tensor:
    """``valid[i, j]`` = all of ``token_mask[i, j:j+n]``; ``token_mask: [b, t] bool`` or None (all valid)."""
    if token_mask is None:
        return torch.ones(shape[0], m, dtype=torch.bool, device=device)
    valid = token_mask[:, 0:m].clone()
    for k in range(1, n):
        valid &= token_mask[:, k:k + m]
    return valid


def ngram_hashes_torch(ids: torch.Tensor, token_mask: torch.Tensor | None, n: int,
                       exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of every window of ``ids: [b, t] int64`` (definition in ``naive.py``).

    Returns:
        hashes: ``[b, m] int64`` with m = max(t−n+1, 0), 0 where invalid; valid: ``[b, m] bool``.
    """
    b, t = ids.shape
    m = max(t - n + 1, 0)
    valid = window_valid(token_mask, n, m, (b, t), ids.device)
    if m == 0:
        return torch.zeros(b, 0, dtype=torch.int64, device=ids.device), valid
    if exact:
        w = exact_width(n)
        h = ids[:, 0:m].clone()
        for k in range(1, n):
            h.bitwise_left_shift_(w).bitwise_or_(ids[:, k:k + m])
    else:
        h = torch.full((b, m), _SEED, dtype=torch.int64, device=ids.device)
        for k in range(n):
            _fmix_(h.bitwise_xor_(ids[:, k:k + m]))
    if token_mask is not None:
        h.masked_fill_(~valid, 0)
    return h, valid


def count_keys_torch(keys: torch.Tensor, max_k: int) -> tuple[int, int, torch.Tensor]:
    """``(total, distinct, top)`` for 1-D int64 ``keys``; ``top`` holds the ``max_k`` largest counts, descending."""
    total = keys.numel()
    if total == 0:
        return 0, 0, torch.zeros(0, dtype=torch.int64)
    s, _ = torch.sort(keys)
    # Positions where a new key starts; counts are the gaps between them.
    starts = torch.ones(total, dtype=torch.bool, device=keys.device)
    starts[1:] = s[1:] != s[:-1]
    idx = torch.nonzero(starts).flatten()
    counts = torch.diff(idx, append=torch.tensor([total], device=keys.device))
    top = torch.topk(counts, min(max_k, counts.numel())).values if max_k > 0 else counts[:0]
    return total, int(counts.numel()), top.cpu()
