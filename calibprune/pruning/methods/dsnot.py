"""DSnoT: training-free mask refinement (Zhang et al., "Dynamic Sparse No Training", ICLR 2024; zyxxmu/DSnoT).

After a method has pruned a matrix, DSnoT swaps pruned and kept weights, one pair per row per cycle, to drive each
row's *expected* reconstruction error e = Σ_j (W_j − Ŵ_j)·μ_j toward zero (W dense, Ŵ pruned; μ_j the running mean
over sequences of input feature j's per-sequence sum, so e and ``update_threshold`` scale with seqlen, as in the
authors' ``WrappedGPT.sum_metric_row``). Each cycle, in every row still being refined:

* regrow a pruned weight from one end of the pruned weights sorted by W_j·μ_j / var_j^p: the largest when e > 0, the
  smallest when e ≤ 0, restoring its dense value;
* prune a kept weight that pushes e back: for unstructured masks one end of the kept weights ordered by sign of
  Ŵ_k·μ_k and Wanda score |Ŵ_k|·‖X_k‖ (negative ones from the lowest score when e > 0, positive ones from the
  lowest score when e < 0); for N:M the lowest-scored kept weight of the regrown weight's own group of M;
* a row stops once |e| ≤ ``update_threshold`` (and, with the same-sign rule, when a swap would flip e's sign); at
  most ``max_cycles`` cycles.

Two orders:

* the authors' loop (default), bitwise ``prune_DSnoT``: both candidate lists are walked by pointers that are never
  checked, so a row that has used up the candidates of one sign walks on into the other end of its list (for
  unstructured pruning, kept weights of the wrong sign; for the regrow list, weights that are kept); the pointers
  of a row that stopped keep moving, and the authors' writes for it are kept too. The same-sign rule is the
  authors': off for unstructured (their ``--without_same_sign`` default), always on for N:M (their N:M branch).
  Unstructured, their loop needs every row to prune the same count (Wanda's per-row masks; any N:M); after a
  method whose rows differ (magnitude's one threshold per matrix, SparseGPT) the stopping order below runs, and the
  report says so.
* ``stop_when_exhausted`` (calibprune's own): a row stops when its candidates of the needed sign run out, so it
  never prunes a weight that makes its error worse; each row keeps exactly its number of pruned weights.

With Wanda the kept weights are the dense ones, which is the authors' algorithm; after SparseGPT, whose kept weights
were updated, e starts from the updated weights and a pruned kept weight removes its *updated* value (our
adaptation: the authors' ``--initial_method sparsegpt`` never accumulates H, so it is not a SparseGPT mask). Modules
matching ``skip`` keep the method's mask; the authors' default run skips the MLP matrices.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..method import MaskRefiner
from ..statistics import ColumnNormStatistic, InputMeanStatistic, TokenVarianceStatistic

log = logging.getLogger(__name__)

__all__ = ["DSnoTOptions", "DSnoT", "dsnot_refine", "dsnot_refine_faithful"]


@dataclass
class DSnoTOptions:
    """DSnoT's knobs (the authors' command-line defaults).

    Attributes:
        max_cycles: most swap cycles per matrix.
        update_threshold: a row stops once its |expected error| is at or below this, in the authors' units (the
            error sums per-sequence input sums, so it grows with seqlen: 0.1 is their setting at seqlen 2048).
        var_power: regrowing divides W_j·μ_j by var_j to this power (0: no variance term).
        same_sign: also stop a row when a swap would flip the sign of its error; None: the authors' rule (off for
            unstructured masks, on for N:M).
        stop_when_exhausted: calibprune's stopping order instead of the authors' loop (see the module docstring).
        skip: fnmatch patterns (layer-relative names) of modules left as the method pruned them.
    """

    max_cycles: int = 50
    update_threshold: float = 0.1
    var_power: float = 1.0
    same_sign: bool | None = None
    stop_when_exhausted: bool = False
    skip: tuple[str, ...] = field(default_factory=lambda: ("mlp.*",))

    def __post_init__(self) -> None:
        if isinstance(self.max_cycles, bool) or not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise ValueError(f"DSnoT max_cycles must be an integer >= 0, got {self.max_cycles!r}")
        if not self.update_threshold >= 0:
            raise ValueError(f"DSnoT update_threshold must be >= 0, got {self.update_threshold}")
        if not self.var_power >= 0:
            raise ValueError(f"DSnoT var_power must be >= 0, got {self.var_power}")
        if self.same_sign is not None and not isinstance(self.same_sign, bool):
            raise ValueError(f"DSnoT same_sign must be True, False or None (the authors' rule), got {self.same_sign!r}")
        self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)

    def same_sign_for(self, prune_n: int) -> bool:
        """The same-sign rule in force: the explicit setting, else the authors' (on for N:M only)."""
        return bool(prune_n) if self.same_sign is None else self.same_sign


def _reorder_by_sign(metric: torch.Tensor) -> torch.Tensor:
    """Per row, the positions of ``metric``'s negative entries in order, then those of its positive entries in
    reverse order (a zero entry leaves a 0 in the middle): the authors' ``return_reorder_indice``."""
    positions = torch.arange(metric.shape[1], device=metric.device).to(torch.float64).repeat(metric.shape[0], 1)
    positive, negative = positions.clone(), positions.clone()
    positive[~(metric > 0)] = float("inf")
    negative[~(metric < 0)] = float("inf")
    positive = torch.flip(torch.sort(positive, dim=1)[0], dims=[1])
    negative = torch.sort(negative, dim=1)[0]
    negative[negative == float("inf")] = 0
    positive[positive == float("inf")] = 0
    return (positive + negative).to(torch.int64)


def _pointers(rows: int, last: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pointers [rows, 2], steps [rows, 2])``: a low pointer from 0 going up and a high one from ``last`` down."""
    ptr = torch.zeros((rows, 2), dtype=torch.long, device=device)
    ptr[:, 1] = last
    step = torch.ones((rows, 2), dtype=torch.long, device=device)
    step[:, 1] = -1
    return ptr, step


def _take(order: torch.Tensor, ptr: torch.Tensor, step: torch.Tensor, side: torch.Tensor,
          advance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The entry of ``order`` under each row's pointer on ``side`` ([rows, 1], 0 low / 1 high), clamped to the list
    (where the authors' index would run out and raise), and the pointer position used."""
    at = torch.gather(ptr, 1, side)
    entry = torch.gather(order, 1, at.clamp(0, order.shape[1] - 1))
    if advance:
        ptr.scatter_(1, side, at + step.gather(1, side))
    return entry, at


def dsnot_refine_faithful(W_dense: torch.Tensor, W_pruned: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                          scaler: torch.Tensor, options: DSnoTOptions, prune_n: int = 0,
                          prune_m: int = 0) -> tuple[torch.Tensor, dict]:
    """The authors' DSnoT loop on the mask of ``W_pruned`` (zeros = pruned), both ``[rows, cols]``; statistics as
    :func:`dsnot_refine`. Unstructured needs every row to prune the same count. Returns the new weights and
    ``{"swaps", "cycles", "order"}`` (swaps: the pairs a row accepted, summed over rows and cycles)."""
    pruned0 = W_pruned == 0
    rows, cols = W_pruned.shape
    kept_weights = torch.where(pruned0, W_dense, W_pruned)  # Ŵ on the kept, W on the pruned
    metric = kept_weights * mean.reshape((1, -1))              # the authors' DSnoT_metric
    mask = pruned0.clone()
    regrow = metric.clone()
    regrow[~pruned0] = 0
    error = torch.sum(regrow, dim=1, keepdim=True)
    sign0 = torch.sign(error)
    if options.var_power:
        regrow /= torch.pow(var.reshape((1, -1)), options.var_power)
    regrow_order = torch.sort(regrow, dim=1, stable=True)[1]
    regrow_ptr, step = _pointers(rows, cols - 1, W_pruned.device)
    score = torch.abs(kept_weights) * torch.sqrt(scaler.reshape((1, -1)))
    update = torch.ones_like(error, dtype=torch.bool)
    same_sign = options.same_sign_for(prune_n)
    cycles = swaps = 0
    if prune_n:
        score[pruned0] = float("inf")
        top = torch.max(score, dim=1, keepdim=True)[0] + 1
        while not (torch.all(update == False) or cycles >= options.max_cycles):  # noqa: E712 - the authors' test
            cycles += 1
            grow_side = (error > 0).int().to(torch.int64)
            j, at = _take(regrow_order, regrow_ptr, step, grow_side, advance=False)
            grown = metric.gather(1, j)
            start = j - j % prune_m
            block = torch.arange(0, prune_m, device=start.device).repeat(start.shape[1], 1) + start
            _, k = torch.topk(torch.gather(score, 1, block), 1, dim=1, largest=False)
            k += start
            cut = metric.gather(1, k)
            after = error + cut - grown
            update = update & (abs(error) > options.update_threshold)
            if same_sign:
                update = update & (sign0 == torch.sign(after))
            score.scatter_(1, k, top)
            mask.scatter_(1, k, update)
            mask.scatter_(1, j, ~update)
            error += torch.where(update, cut, torch.zeros_like(cut))
            error -= torch.where(update, grown, torch.zeros_like(grown))
            regrow_ptr.scatter_(1, grow_side, at + step.gather(1, grow_side))
            swaps += int(update.sum())
    else:
        kept = cols - int(pruned0[0].sum())
        score[pruned0] = float("inf")
        kept_order = torch.sort(score, dim=1, stable=True)[1][:, :kept]
        prune_order = torch.gather(kept_order, 1, _reorder_by_sign(torch.gather(metric, 1, kept_order)))
        prune_ptr, _ = _pointers(rows, kept - 1, W_pruned.device)
        while not (torch.all(update == False) or cycles >= options.max_cycles):  # noqa: E712 - the authors' test
            cycles += 1
            j, _ = _take(regrow_order, regrow_ptr, step, (error > 0).int().to(torch.int64))
            grown = metric.gather(1, j)
            k, _ = _take(prune_order, prune_ptr, step, (error < 0).int().to(torch.int64))
            cut = metric.gather(1, k)
            after = error + cut - grown
            update = update & (abs(error) > options.update_threshold)
            if same_sign:
                update = update & (sign0 == torch.sign(after))
            mask.scatter_(1, k, update)
            mask.scatter_(1, j, ~update)
            error += torch.where(update, cut, torch.zeros_like(cut))
            error -= torch.where(update, grown, torch.zeros_like(grown))
            swaps += int(update.sum())
    W_new = torch.where(mask, torch.zeros_like(kept_weights), kept_weights)
    return W_new, {"swaps": swaps, "cycles": cycles, "order": "faithful"}


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

    solves_concurrently = True
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
        options, (n, m) = self.options, (self.config.prune_n, self.config.prune_m)
        W_pruned = module.weight.data.float()
        stats = (self.mean[group], self.variance[group], self.norms[group])
        faithful = not options.stop_when_exhausted
        if faithful and not n:
            counts = (W_pruned == 0).sum(1)
            if bool((counts != counts[0]).any()):
                log.info("layer %d %s: its rows prune different counts, which the authors' DSnoT loop cannot take; "
                         "refining it with stop_when_exhausted", index, name)
                faithful = False
        with self.timed("dsnot"):
            if faithful:
                W_new, info = dsnot_refine_faithful(W_dense, W_pruned, *stats, options, n, m)
            else:
                resolved = dataclasses.replace(options, same_sign=options.same_sign_for(n))
                W_new, info = dsnot_refine(W_dense, W_pruned, *stats, resolved, n, m)
                info["order"] = "stop_when_exhausted"
            module.weight.data.copy_(W_new.to(module.weight.dtype))
        return {"dsnot": info}
