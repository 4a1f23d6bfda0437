"""OIT information metrics of a calibration set: how predictable, repetitive and varied its text is.

Every function takes a ``CalibrationSet`` (anything with an ``.ids`` attribute) or a plain ``LongTensor [n, seqlen]``
of token ids (a single ``[seqlen]`` row is read as one sample). N-grams are taken within rows, never across them.

* calibration perplexity = exp(mean token NLL) under the dense model (every next-token prediction of every row);
* n-gram aggregation = 1 − distinct/total n-grams over the whole set (n = 4), with the share of the top-k n-grams;
* n-gram diversity = mean over n = 1…max_n of distinct/total;
* token entropy = Shannon entropy (bits) of the unigram distribution;
* vocabulary coverage = distinct tokens / vocabulary size;
* Zipf slope = least-squares slope of ln(frequency) against ln(rank).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from calibprune.models import model_device
from calibprune.ops import ngram_stats

__all__ = ["as_ids", "calibration_perplexity", "ngram_aggregation", "ngram_diversity", "token_entropy",
           "vocab_coverage", "zipf_slope", "information_metrics"]

log = logging.getLogger(__name__)


def as_ids(calib: Any) -> torch.Tensor:
    """The ``[n, seqlen] int64`` ids of a ``CalibrationSet`` (its ``.ids``) or of a plain tensor."""
    ids = getattr(calib, "ids", calib)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"expected a CalibrationSet or a LongTensor [n, seqlen], got {type(calib).__name__}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"ids must be [n, seqlen], got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must be integer token ids, got {ids.dtype}")
    return ids.long()


@torch.no_grad()
def calibration_perplexity(model: torch.nn.Module, calib: Any, *, batch_size: int = 8,
                           per_sample: bool = False) -> float | torch.Tensor:
    """Perplexity of the calibration text under ``model``: exp of the mean next-token NLL.

    Each row ``x`` of ``ids: [n, seqlen]`` contributes the NLLs −log p(x_{j+1} | x_{≤j}) for j = 0…seqlen−2,
    computed from fp32 logits. The set value averages all n·(seqlen−1) NLLs before the exp; ``per_sample``
    gives exp(mean NLL of each row) instead. The model runs in eval mode (restored afterwards), without
    gradients, on its own device, ``batch_size`` rows at a time (this bounds peak memory: logits are
    ``[batch_size, seqlen, vocab]`` in the model dtype, and fp32 one row at a time).

    Returns:
        A float, or with ``per_sample`` a ``[n] fp64`` CPU tensor.
    """
    ids = as_ids(calib)
    if ids.shape[1] < 2:
        raise ValueError("perplexity needs rows of at least 2 tokens")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll_sums = torch.empty(ids.shape[0], dtype=torch.float64)
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)
            logits = model(input_ids=batch).logits
            for r in range(batch.shape[0]):
                nll = F.cross_entropy(logits[r, :-1].float(), batch[r, 1:], reduction="sum")
                nll_sums[start + r] = nll.double().item()
            log.debug("perplexity: %d/%d rows", min(start + batch_size, ids.shape[0]), ids.shape[0])
    finally:
        model.train(was_training)
    tokens = ids.shape[1] - 1
    if per_sample:
        return torch.exp(nll_sums / tokens)
    return math.exp(nll_sums.sum().item() / (tokens * ids.shape[0]))


def ngram_aggregation(ids: Any, n: int = 4, *, top_k: Sequence[int] = (10, 100)) -> dict:
    """Repetition of the set's n-grams: ``aggregation`` = 1 − distinct/total over all rows, and ``top_k_mass``.

    Returns:
        ``{"aggregation": float, "top_k_mass": {k: share of all n-gram occurrences taken by the k most frequent},
        "total": int, "distinct": int, "exact": bool}`` (``exact`` False when n-grams were compared by 64-bit
        hash; see :func:`calibprune.ops.ngram_stats`).
    """
    s = ngram_stats(as_ids(ids), n, top_k=top_k)
    return {key: s[key] for key in ("aggregation", "top_k_mass", "total", "distinct", "exact")}


def ngram_diversity(ids: Any, max_n: int = 4) -> float:
    """Mean over n = 1…max_n of distinct/total n-grams of the set (1 = nothing repeats; 0 when there are none)."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    ids = as_ids(ids)
    ratios = []
    for n in range(1, max_n + 1):
        s = ngram_stats(ids, n, top_k=())
        ratios.append(s["distinct"] / s["total"] if s["total"] else 0.0)
    return sum(ratios) / max_n


def _unigram_counts(ids: torch.Tensor) -> torch.Tensor:
    return torch.unique(ids.reshape(-1), return_counts=True)[1]


def token_entropy(ids: Any) -> float:
    """Shannon entropy H = −Σ p·log₂ p (bits) of the set's unigram (token) distribution."""
    counts = _unigram_counts(as_ids(ids)).double()
    if counts.numel() == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def vocab_coverage(ids: Any, vocab_size: int) -> float:
    """Distinct tokens in the set / ``vocab_size``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return _unigram_counts(as_ids(ids)).numel() / vocab_size


def zipf_slope(ids: Any) -> float:
    """Least-squares slope of ln(frequency) against ln(rank) of the set's tokens (about −1 for natural text).

    Fitting choice: every distinct token is one point (rank r = 1, 2, … by decreasing count, ties in arbitrary
    order, so tied tokens get consecutive ranks), unweighted ordinary least squares over all of them, the
    singleton tail included. Natural logs on both axes (the slope does not depend on the base). NaN when the
    set has fewer than two distinct tokens (no slope is defined).
    """
    counts = torch.sort(_unigram_counts(as_ids(ids)), descending=True).values.double()
    if counts.numel() < 2:
        return float("nan")
    x = torch.log(torch.arange(1, counts.numel() + 1, dtype=torch.float64))
    y = torch.log(counts)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _set_metrics(ids: torch.Tensor, vocab_size: int | None) -> dict[str, float]:
    agg = ngram_aggregation(ids, 4, top_k=(10, 100))
    out = {
        "ngram_aggregation": agg["aggregation"],
        "top10_mass": agg["top_k_mass"][10],
        "top100_mass": agg["top_k_mass"][100],
        "ngram_diversity": ngram_diversity(ids, 4),
        "token_entropy": token_entropy(ids),
        "zipf_slope": zipf_slope(ids),
    }
    if vocab_size is not None:
        out["vocab_coverage"] = vocab_coverage(ids, vocab_size)
    return out


def information_metrics(calib: Any, *, model: torch.nn.Module | None = None, vocab_size: int | None = None,
                        per_sample: bool = False, batch_size: int = 8) -> dict[str, Any]:
    """All OIT metrics of a calibration set.

    Keys: ``perplexity`` (only with ``model``), ``ngram_aggregation`` (4-grams), ``top10_mass``, ``top100_mass``,
    ``ngram_diversity`` (n = 1…4), ``token_entropy`` (bits), ``vocab_coverage`` (when ``vocab_size`` is given,
    or taken from ``model.config.vocab_size``), ``zipf_slope``, plus ``n_samples`` and ``seqlen``.

    With ``per_sample`` every metric is computed on each row alone and returned as a ``[n] fp64`` tensor.
    """
    ids = as_ids(calib)
    if vocab_size is None and model is not None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    out: dict[str, Any] = {"n_samples": ids.shape[0], "seqlen": ids.shape[1]}
    if model is not None:
        out["perplexity"] = calibration_perplexity(model, ids, batch_size=batch_size, per_sample=per_sample)
    if not per_sample:
        out.update(_set_metrics(ids, vocab_size))
        return out
    rows = [_set_metrics(ids[i:i + 1], vocab_size) for i in range(ids.shape[0])]
    for key in rows[0] if rows else ():
        out[key] = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    return out
