"""DSnoT: training-free mask refinement (Zhang et al., "Dynamic Sparse No Training", ICLR 2024).

After a method has pruned a matrix, DSnoT swaps pruned and kept weights, one pair per row per cycle, to drive each
row's *expected* reconstruction error e = Σ_j (W_j − Ŵ_j)·μ_j toward zero (μ_j: mean of input feature j; W dense,
Ŵ pruned). Each cycle, in every row still being refined:

* regrow the pruned weight whose W_j·μ_j / var_j^p is largest (e > 0) or smallest (e ≤ 0), restoring its dense value;
* prune the kept weight with the lowest Wanda score |Ŵ_k|·‖X_k‖ among those whose Ŵ_k·μ_k has the sign that
  reduces e (negative when e > 0, positive when e < 0), or, for N:M, the lowest-scored kept weight of the
  regrown weight's own group of M (so every group keeps exactly N pruned);
* a row stops once |e| ≤ ``update_threshold`` (and, with ``same_sign``, when a swap would flip e's sign), or its
  candidates run out; at most ``max_cycles`` cycles.

Statistics follow the authors' ``WrappedGPT`` (locuslab/wanda style running means over sequences). With Wanda the
kept weights are the dense ones, which is the authors' algorithm; after SparseGPT, whose kept weights were
updated, e starts from the updated weights and a pruned kept weight removes its *updated* value. Modules matching
``skip`` keep the method's mask; the authors' default run skips the MLP matrices.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ..method import MaskRefiner
from ..statistics import ColumnNormStatistic, InputMeanStatistic, TokenVarianceStatistic

__all__ = ["DSnoTOptions", "DSnoT", "dsnot_refine"]


@dataclass
class DSnoTOptions:
    """DSnoT's knobs (the authors' command-line defaults).

    Attributes:
        max_cycles: most swap cycles per matrix.
        update_threshold: a row stops once its |expected error| is at or below this.
        var_power: regrowing divides W_j·μ_j by var_j to this power (0: no variance term).
        same_sign: also stop a row when a swap would flip the sign of its error (off in the authors' default run).
        skip: fnmatch patterns (layer-relative names) of modules left as the method pruned them.
    """

    max_cycles: int = 50
    update_threshold: float = 0.1
    var_power: float = 1.0
    same_sign: bool = False
    skip: tuple[str, ...] = field(default_factory=lambda: ("mlp.*",))

    def __post_init__(self) -> None:
        if isinstance(self.max_cycles, bool) or not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise ValueError(f"DSnoT max_cycles must be an integer >= 0, got {self.max_cycles!r}")
        if not self.update_threshold >= 0:
            raise ValueError(f"DSnoT update_threshold must be >= 0, got {self.update_threshold}")
        if not self.var_power >= 0:
            raise ValueError(f"DSnoT var_power must be >= 0, got {self.var_power}")
        self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)


def _pointer_take(order: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    return order.gather(1, ptr.clamp(0, order.shape[1] - 1).unsqueeze(1)).squeeze(1)


def dsnot_refine(W_dense: torch.Tensor, W_pruned: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 scaler: torch.Tensor, options: DSnoTOptions, prune_n: int = 0,
                 prune_m: int = 0) -> tuple[torch.Tensor, dict]:
    """Refine the mask of ``W_pruned`` (zeros = pruned) against ``W_dense``; both ``[rows, cols]`` fp32.

    ``mean, var, scaler: [cols]`` fp32 input statistics (μ_j, var_j, running mean of ‖X_j‖²). Returns the new
    weights (each row keeps its number of pruned weights; N:M keeps N per group) and ``{"swaps", "cycles"}``.
    """
    W_new = W_pruned.clone()
    pruned = W_pruned == 0
    rows, cols = W_pruned.shape
    ar = torch.arange(rows, device=W_pruned.device)
    regrow_metric = W_dense * mean.reshape(1, -1)            # e change when j is regrown: −W_j·μ_j
    prune_metric = W_pruned * mean.reshape(1, -1)             # e change when k is pruned: +Ŵ_k·μ_k
    error = ((W_dense - W_pruned) * mean.reshape(1, -1)).sum(1)
    sign0 = torch.sign(error)
    wanda = torch.abs(W_pruned) * torch.sqrt(scaler.reshape(1, -1))
    inf = torch.tensor(float("inf"), device=W_pruned.device)

    # Regrow candidates: pruned weights by W_j·μ_j / var_j^p, ascending; kept ones sorted past the end.
    key = regrow_metric / var.clamp_min(1e-12).pow(options.var_power).reshape(1, -1) if options.var_power else \
        regrow_metric.clone()
    regrow_order = torch.sort(torch.where(pruned, key, inf), dim=1, stable=True)[1]
    n_pruned = pruned.sum(1)
    lo, hi = torch.zeros_like(n_pruned), n_pruned - 1
    if not prune_n:
        # Prune candidates: kept weights with Ŵ·μ < 0 by Wanda score ascending (used when e > 0), and kept
        # weights with Ŵ·μ > 0 likewise (used when e < 0).
        neg_order = torch.sort(torch.where(~pruned & (prune_metric < 0), wanda, inf), dim=1, stable=True)[1]
        pos_order = torch.sort(torch.where(~pruned & (prune_metric > 0), wanda, inf), dim=1, stable=True)[1]
        n_neg, n_pos = (~pruned & (prune_metric < 0)).sum(1), (~pruned & (prune_metric > 0)).sum(1)
        p_neg, p_pos = torch.zeros_like(n_neg), torch.zeros_like(n_pos)
    else:
        group_score = torch.where(pruned, inf, wanda)
    active = error.abs() > options.update_threshold
    swaps, cycles = 0, 0
    while cycles < options.max_cycles and bool(active.any()):
        cycles += 1
        grow_high = error > 0
        ptr = torch.where(grow_high, hi, lo)
        active &= lo <= hi
        j = _pointer_take(regrow_order, ptr)
        hi = torch.where(active & grow_high, hi - 1, hi)
        lo = torch.where(active & ~grow_high, lo + 1, lo)
        if not prune_n:
            take_neg = error > 0
            have = torch.where(take_neg, p_neg < n_neg, p_pos < n_pos)
            k = torch.where(take_neg, _pointer_take(neg_order, p_neg), _pointer_take(pos_order, p_pos))
            active &= have
            p_neg = torch.where(active & take_neg, p_neg + 1, p_neg)
            p_pos = torch.where(active & ~take_neg, p_pos + 1, p_pos)
        else:
            start = j - j % prune_m
            cand = start.unsqueeze(1) + torch.arange(prune_m, device=j.device).unsqueeze(0)
            scores = group_score.gather(1, cand)
            best, pos = scores.min(1)
            k = start + pos
            active &= torch.isfinite(best)
        after = error + prune_metric[ar, k] - regrow_metric[ar, j]
        if options.same_sign:
            active &= torch.sign(after) == sign0
        if not bool(active.any()):
            break
        rs = ar[active]
        jj, kk = j[active], k[active]
        W_new[rs, jj] = W_dense[rs, jj]
        W_new[rs, kk] = 0
        pruned[rs, jj], pruned[rs, kk] = False, True
        if prune_n:
            group_score[rs, kk] = inf  # newly pruned: never pruned again; the regrown j was inf already
        error = torch.where(active, after, error)
        swaps += int(active.sum())
        active &= error.abs() > options.update_threshold
    return W_new, {"swaps": swaps, "cycles": cycles}


class DSnoT(MaskRefiner):
    """``refine="dsnot"``: DSnoT after any method (see the module docstring)."""

    options_class = DSnoTOptions

    def __init__(self, options: DSnoTOptions, config):
        super().__init__(options, config)
        # The authors' WrappedGPT statistics: ‖X_j‖² and μ_j averaged over sequences, the variance over tokens.
        timing = "dsnot statistics"
        self.variance = TokenVarianceStatistic(timing=timing)
        self.mean = InputMeanStatistic(timing=timing)
        self.norms = ColumnNormStatistic(timing=timing)
        self.statistics = (self.variance, self.mean, self.norms)

    def refine(self, index: int, name: str, module: nn.Linear, group: str, W_dense: torch.Tensor,
               sparsity: float) -> dict:
        if any(fnmatch.fnmatchcase(name, p) for p in self.options.skip):
            return {"dsnot": "skipped"}
        with self.timed("dsnot"):
            W_new, info = dsnot_refine(W_dense, module.weight.data.float(), self.mean[group], self.variance[group],
                                       self.norms[group], self.options, self.config.prune_n, self.config.prune_m)
            module.weight.data.copy_(W_new.to(module.weight.dtype))
        return {"dsnot": info}
