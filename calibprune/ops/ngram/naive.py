"""Plain-Python reference for n-gram hashing and counting; the definition every backend must match.

The n-gram key of ``(x_0, …, x_{n-1})`` (token ids, all ≥ 0) is a 64-bit pattern stored in an int64:

* **exact** (when every id < 2^w with w = ⌊64/n⌋, i.e. n·⌈log₂(max_id+1)⌉ ≤ 64): the ids packed big-endian,
  ``key = Σ_k x_k · 2^{w·(n−1−k)}`` (mod 2^64). Distinct n-grams have distinct keys.
* **hash** (otherwise): a sequential splitmix64 chain, ``h ← SEED; h ← fmix(h XOR x_k)`` for k = 0…n−1, where
  ``fmix`` is the splitmix64 finaliser (Stafford's "Mix13"), a bijection on 64-bit words. Two distinct n-grams
  collide with probability ≈ 2⁻⁶⁴, so among k distinct n-grams the chance of any collision is ≤ k²/2⁶⁵
  (birthday bound; ≈ 2·10⁻⁹ for k = 262 144 = 128×2048 n-grams).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

__all__ = ["SEED", "MIX1", "MIX2", "MASK64", "exact_width", "fits_exact", "ngram_key_reference",
           "ngram_counter_reference", "ngram_hashes_reference", "ngram_stats_reference"]

MASK64 = (1 << 64) - 1
SEED = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def exact_width(n: int) -> int:
    """Bits per id in exact packing: ⌊64/n⌋."""
    return 64 // n


def fits_exact(max_id: int, n: int) -> bool:
    """True when n ids ≤ ``max_id`` pack losslessly into 64 bits (n·⌈log₂(max_id+1)⌉ ≤ 64)."""
    return n <= 64 and max_id < (1 << exact_width(n))


def _fmix(z: int) -> int:
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def ngram_key_reference(gram: Sequence[int], exact: bool) -> int:
    """The signed int64 key of one n-gram (see the module docstring for the definition)."""
    if exact:
        w = exact_width(len(gram))
        key = 0
        for x in gram:
            key = ((key << w) | x) & MASK64
    else:
        key = SEED
        for x in gram:
            key = _fmix(key ^ (x & MASK64))
    return key - (1 << 64) if key >= 1 << 63 else key


def _valid_runs(row: list[int], keep: list[bool]) -> list[list[int]]:
    """Maximal runs of kept tokens: n-grams never cross padding."""
    runs, cur = [], []
    for x, k in zip(row, keep):
        if k:
            cur.append(x)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _token_mask(ids: torch.Tensor, lengths: torch.Tensor | None,
                attention_mask: torch.Tensor | None) -> list[list[bool]]:
    b, t = ids.shape
    if attention_mask is not None:
        return (attention_mask.cpu() != 0).tolist()
    if lengths is not None:
        return [[j < int(length) for j in range(t)] for length in lengths.cpu().tolist()]
    return [[True] * t for _ in range(b)]


def ngram_counter_reference(ids: torch.Tensor, n: int = 4, *, lengths: torch.Tensor | None = None,
                            attention_mask: torch.Tensor | None = None) -> Counter:
    """``Counter`` of n-gram tuples over ``ids: [b, t]``, within rows and within runs of unpadded tokens."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    counter: Counter = Counter()
    rows = ids.cpu().tolist()
    if lengths is None and attention_mask is None:
        for row in rows:
            counter.update(zip(*(row[k:] for k in range(n))))
        return counter
    for row, keep in zip(rows, _token_mask(ids, lengths, attention_mask)):
        for run in _valid_runs(row, keep):
            counter.update(zip(*(run[k:] for k in range(n))))
    return counter


def ngram_hashes_reference(ids: torch.Tensor, n: int = 4, *, exact: bool, lengths: torch.Tensor | None = None,
                           attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and validity per window, one Python loop iteration per window (slow; for tests).

    Returns:
        hashes: ``[b, max(t−n+1, 0)]`` int64 (0 where invalid); valid: same shape, bool.
    """
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    b, t = ids.shape
    m = max(t - n + 1, 0)
    hashes, valid = torch.zeros(b, m, dtype=torch.int64), torch.zeros(b, m, dtype=torch.bool)
    for i, (row, keep) in enumerate(zip(ids.cpu().tolist(), _token_mask(ids, lengths, attention_mask))):
        for j in range(m):
            if all(keep[j:j + n]):
                hashes[i, j] = ngram_key_reference(row[j:j + n], exact)
                valid[i, j] = True
    return hashes, valid


def ngram_stats_reference(ids: torch.Tensor, n: int = 4, *, lengths: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None,
                          top_k: Sequence[int] = (10, 100)) -> dict:
    """``total``, ``distinct``, ``aggregation`` = 1 − distinct/total and ``top_k_mass`` from a ``Counter``.

    Counts the tuples themselves, so it is exact whatever the vocabulary (``exact`` is always True).
    With no n-gram at all, aggregation and every top-k mass are 0.
    """
    counter = ngram_counter_reference(ids, n, lengths=lengths, attention_mask=attention_mask)
    total, distinct = sum(counter.values()), len(counter)
    ordered = sorted(counter.values(), reverse=True)
    return {
        "n": n,
        "total": total,
        "distinct": distinct,
        "aggregation": 1.0 - distinct / total if total else 0.0,
        "top_k_mass": {int(k): (sum(ordered[:k]) / total if total else 0.0) for k in top_k},
        "exact": True,
    }
