"""``ngram_hashes`` / ``ngram_stats``: token n-gram keys and repetition statistics of id rows, with a backend switch.

N-grams are taken within each row and never across padding. Keys are exact (packed ids) when the vocabulary fits
in 64 bits for this n, otherwise a 64-bit splitmix64 hash; the definition and the collision bound are in
``naive.py``. Backends: ``"torch"`` (vectorised keys, sort-unique counting), ``"cpp"`` (C++/OpenMP keys and
partitioned hash-table counting), ``"triton"`` and ``"cuda"`` (GPU keys; counting by torch sort-unique).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

from .._backend import native_extension, resolve_backend
from .naive import fits_exact, ngram_counter_reference, ngram_hashes_reference, ngram_stats_reference
from .torch_impl import count_keys_torch, ngram_hashes_torch

__all__ = ["NgramHashes", "ngram_hashes", "ngram_stats", "ngram_counter_reference", "ngram_hashes_reference",
           "ngram_stats_reference"]

log = logging.getLogger(__name__)

SUPPORTED = ("torch", "triton", "cuda", "cpp")
MODES = ("auto", "exact", "hash")


class NgramHashes(tuple):
    """``(hashes, valid)`` — unpacks as a pair — plus the key ``mode`` (``"exact"`` or ``"hash"``) and ``n``.

    hashes: ``[b, max(t−n+1, 0)] int64`` (0 where invalid); valid: same shape, bool.
    """

    def __new__(cls, hashes: torch.Tensor, valid: torch.Tensor, mode: str, n: int) -> NgramHashes:
        obj = super().__new__(cls, (hashes, valid))
        obj.mode, obj.n = mode, n
        return obj

    @property
    def hashes(self) -> torch.Tensor:
        return self[0]

    @property
    def valid(self) -> torch.Tensor:
        return self[1]

    @property
    def exact(self) -> bool:
        return self.mode == "exact"


def _token_mask(ids: torch.Tensor, lengths: torch.Tensor | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[b, t] bool`` of real tokens, or None when every token is real."""
    b, t = ids.shape
    if lengths is not None and attention_mask is not None:
        raise ValueError("give lengths or attention_mask, not both")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be [b, t] = {(b, t)}, got {tuple(attention_mask.shape)}")
        return attention_mask.to(device=ids.device, dtype=torch.bool).contiguous()
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=ids.device)
        if tuple(lengths.shape) != (b,):
            raise ValueError(f"lengths must be [b] = [{b}], got {tuple(lengths.shape)}")
        if lengths.is_floating_point() or bool((lengths < 0).any()) or bool((lengths > t).any()):
            raise ValueError(f"lengths must be integers in [0, {t}]")
        return torch.arange(t, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
    return None


def _prepare(ids: torch.Tensor, n: int, lengths: torch.Tensor | None, attention_mask: torch.Tensor | None,
             mode: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Validated ``ids [b, t] int64`` (contiguous), the token mask and whether keys are exact."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        if lengths is not None:
            lengths = torch.as_tensor(lengths).reshape(1)
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(1, -1)
    if ids.dim() != 2:
        raise ValueError(f"ids must be [b, t] (or [t]), got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    ids = ids.to(torch.int64).contiguous()
    token_mask = _token_mask(ids, lengths, attention_mask)
    max_id = 0
    if ids.numel():
        real = ids if token_mask is None else ids.masked_fill(~token_mask, 0)
        lo, hi = torch.aminmax(real)
        if int(lo) < 0:
            raise ValueError(f"token ids must be >= 0, found {int(lo)}")
        max_id = int(hi)
    fits = fits_exact(max_id, n)
    if mode == "exact" and not fits:
        raise ValueError(f"ids up to {max_id} do not pack into 64 bits for n = {n}; use mode='hash' or 'auto'")
    exact = fits if mode == "auto" else mode == "exact"
    return ids, token_mask, exact


@functools.cache
def _native_op(namespace: str, name: str) -> object | None:
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def _resolve(backend: str, device: torch.device, op: str) -> str:
    chosen = resolve_backend(backend, device, SUPPORTED, op=op)
    if chosen in ("cpp", "cuda"):
        # The extension may predate these ops (a stale build): fall back in auto mode, fail loudly otherwise.
        native_extension(f"_{chosen}")
        if _native_op(f"calibprune_{chosen}", "ngram_hashes") is None:
            if backend != "auto":
                raise RuntimeError(f"calibprune._{chosen} has no ngram ops; rebuild it "
                                   "(pip install --no-build-isolation -e .)")
            log.warning("calibprune._%s has no ngram ops (stale build?); %s uses another backend", chosen, op)
            return "triton" if chosen == "cuda" else "torch"
    return chosen


def _hashes(ids: torch.Tensor, token_mask: torch.Tensor | None, n: int, exact: bool,
            chosen: str) -> tuple[torch.Tensor, torch.Tensor]:
    if chosen == "torch":
        return ngram_hashes_torch(ids, token_mask, n, exact)
    if chosen == "triton":
        from calibprune.kernels.ngram import ngram_hashes_triton

        return ngram_hashes_triton(ids, token_mask, n, exact)
    mask = None if token_mask is None else token_mask.view(torch.uint8)
    ns = torch.ops.calibprune_cpp if chosen == "cpp" else torch.ops.calibprune_cuda
    return ns.ngram_hashes(ids, mask, n, exact)


def ngram_hashes(ids: torch.Tensor, n: int = 4, *, lengths: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, mode: str = "auto",
                 backend: str = "auto") -> NgramHashes:
    """A 64-bit key for every length-``n`` window of each row of ``ids``.

    Keys are **exact** (the ids packed big-endian, ⌊64/n⌋ bits each) when every real id < 2^⌊64/n⌋ — i.e.
    n·⌈log₂(max_id+1)⌉ ≤ 64, e.g. ids ≤ 65535 for n = 4 — and otherwise a **hash**: a splitmix64 chain over the
    ids. Two distinct n-grams then share a key with probability ≈ 2⁻⁶⁴, so among k distinct n-grams any collision
    has probability ≤ k²/2⁶⁵ (birthday bound; ≈ 2·10⁻⁹ for 262 144 distinct 4-grams). ``result.mode`` says which.

    Args:
        ids: ``[b, t]`` (or ``[t]``) integer token ids ≥ 0, any device.
        n: n-gram order (≥ 1).
        lengths: ``[b]`` real tokens per row (right padding after them), or
        attention_mask: ``[b, t]`` nonzero at real tokens (any padding pattern). A window is valid only if all its
            n tokens are real; windows never cross rows.
        mode: ``"auto"`` (exact when it fits), ``"exact"`` (error when it does not fit) or ``"hash"``.
        backend: ``"auto" | "torch" | "triton" | "cuda" | "cpp"``; every backend returns identical keys.

    Returns:
        :class:`NgramHashes` ``(hashes [b, max(t−n+1, 0)] int64, valid [b, max(t−n+1, 0)] bool)``, hashes 0 where
        invalid, with ``.mode``.
    """
    ids, token_mask, exact = _prepare(ids, n, lengths, attention_mask, mode)
    chosen = _resolve(backend, ids.device, "ngram_hashes")
    hashes, valid = _hashes(ids, token_mask, n, exact, chosen)
    return NgramHashes(hashes, valid, "exact" if exact else "hash", n)


def ngram_stats(ids: torch.Tensor, n: int = 4, *, lengths: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, top_k: Sequence[int] = (10, 100), mode: str = "auto",
                backend: str = "auto") -> dict:
    """Repetition statistics of the n-grams of ``ids`` (within rows, never across padding), counted over all rows.

    Args:
        ids, n, lengths, attention_mask, mode, backend: as in :func:`ngram_hashes`.
        top_k: the k values for ``top_k_mass``.

    Returns:
        ``{"n", "total", "distinct", "aggregation", "top_k_mass", "exact", "mode", "backend"}`` where total is the
        number of n-gram occurrences, distinct the number of different n-grams, aggregation = 1 − distinct/total,
        ``top_k_mass[k]`` = share of all occurrences taken by the k most frequent n-grams, and ``exact`` is True
        when keys are packed ids (counts are exact) and False when they are 64-bit hashes (distinct may undercount
        by a collision, probability ≤ distinct²/2⁶⁵). With no n-gram, aggregation and masses are 0.
    """
    top_k = tuple(int(k) for k in top_k)
    if any(k < 1 for k in top_k):
        raise ValueError(f"top_k values must be >= 1, got {top_k}")
    ids, token_mask, exact = _prepare(ids, n, lengths, attention_mask, mode)
    chosen = _resolve(backend, ids.device, "ngram_stats")
    max_k = max(top_k, default=0)
    if chosen == "cpp":
        mask = None if token_mask is None else token_mask.view(torch.uint8)
        total, distinct, top = torch.ops.calibprune_cpp.ngram_stats(ids, mask, n, exact, max_k)
    else:
        hashes, valid = _hashes(ids, token_mask, n, exact, chosen)
        keys = hashes.reshape(-1) if token_mask is None else hashes[valid]
        total, distinct, top = count_keys_torch(keys, max_k)
    cum = torch.cumsum(top, 0).tolist()
    mass = {k: (cum[min(k, len(cum)) - 1] / total if total and cum else 0.0) for k in top_k}
    return {
        "n": n,
        "total": int(total),
        "distinct": int(distinct),
        "aggregation": 1.0 - distinct / total if total else 0.0,
        "top_k_mass": mass,
        "exact": exact,
        "mode": "exact" if exact else "hash",
        "backend": chosen,
    }
