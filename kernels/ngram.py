"""Triton kernel for n-gram keys (definition in ``calibprune/ops/ngram/naive.py``); counting stays in torch.

On CPU it runs only under ``TRITON_INTERPRET=1``, which Triton reads when ``@triton.jit`` decorates the kernel,
i.e. when this module is first imported: set it before that import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch_guard, same_device

__all__ = ["ngram_hashes_triton"]

_BLOCK = 1024


@triton.jit
def _ngram_hash_kernel(ids_ptr, mask_ptr, hash_ptr, valid_ptr, windows, m, t,
                       N: tl.constexpr, WIDTH: tl.constexpr, EXACT: tl.constexpr, HAS_MASK: tl.constexpr,
                       BLOCK: tl.constexpr):
    # One lane per window q of the flattened [b, m] output; window q reads ids[row, j : j + N].
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = q < windows
    row = q // m
    base = row * t + (q - row * m)
    ok = inb
    h = tl.zeros([BLOCK], dtype=tl.uint64)
    for k in tl.static_range(N):
        x = tl.load(ids_ptr + base + k, mask=inb, other=0).to(tl.uint64, bitcast=True)
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + base + k, mask=inb, other=0) != 0)
        if EXACT:
            if k == 0:
                h = x
            else:
                h = (h << WIDTH) | x
        else:
            # splitmix64 finaliser of (h XOR x); uint64 products wrap mod 2^64 and >> is logical.
            if k == 0:
                z = x ^ 0x9E3779B97F4A7C15
            else:
                z = h ^ x
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            h = z ^ (z >> 31)
    h = tl.where(ok, h, 0)
    tl.store(hash_ptr + q, h.to(tl.int64, bitcast=True), mask=inb)
    tl.store(valid_ptr + q, ok.to(tl.uint8), mask=inb)


def ngram_hashes_triton(ids: torch.Tensor, token_mask: torch.Tensor | None, n: int,
                        exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of every window of ``ids: [b, t] int64`` contiguous; ``token_mask: [b, t] bool`` or None.

    Returns:
        hashes: ``[b, m] int64`` with m = max(t−n+1, 0), 0 where invalid; valid: ``[b, m] bool``.
    """
    b, t = ids.shape
    m = max(t - n + 1, 0)
    hashes = torch.empty(b, m, dtype=torch.int64, device=ids.device)
    valid = torch.empty(b, m, dtype=torch.uint8, device=ids.device)
    windows = b * m
    if windows:
        mask = ids if token_mask is None else token_mask.contiguous().view(torch.uint8)
        grid = (triton.cdiv(windows, _BLOCK),)
        with launch_guard(same_device(ids, mask)):
            _ngram_hash_kernel[grid](ids, mask, hashes, valid, windows, m, t, N=n, WIDTH=64 // n, EXACT=exact,
                                     HAS_MASK=token_mask is not None, BLOCK=_BLOCK)
    return hashes, valid.view(torch.bool)
