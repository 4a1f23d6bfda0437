"""RIA: relative importance and activations (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method
for Large Language Models", ICLR 2024; biomedical-cybernetics/Relative-importance-and-activation-pruning).

Score ``(|W_ij| / Σ_i |W_ij| + |W_ij| / Σ_j |W_ij|) · (‖X_j‖₂)^a``: each weight's share of its input channel's and of
its output row's total magnitude, times the activation norm to the power ``a`` (the authors' ``--a``, 0.5). The
activation norms are Wanda's running means (:class:`~calibprune.pruning.statistics.ColumnNormStatistic`), as in the
authors' ``WrappedGPT``. Unstructured: one threshold per matrix (``per_output`` compares within each row instead, the
authors' ``--per_outneuron``). N:M: the lowest N of every M consecutive columns, or, with ``reallocation``, of every M
columns after the authors' heuristic channel reallocation (columns ranked by ``importance_score`` and dealt
round-robin into the groups), optionally refined by a linear sum assignment per group position (``lsa``; needs
scipy). With reallocation the mask is N:M in the permuted channel order, as the authors keep it: the permutation of
the input channels that makes it hardware N:M is the inference engine's to apply.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...ops import BACKENDS
from ..config import PruneConfig
from ..masks import matrix_mask, nm_mask, row_mask
from ..method import ModuleResult, PruningMethod
from ..statistics import ColumnNormStatistic

__all__ = ["RIAConfig", "RIAMethod", "ria_score", "ria_mask", "channel_reallocation"]

IMPORTANCE_SCORES = ("sum", "retained_degree_unstructured", "retained_degree_per_outneuron")


@dataclass(kw_only=True)
class RIAConfig(PruneConfig):
    """RIA (the authors' defaults).

    Attributes:
        alpha: the exponent of the activation norm (the authors' ``--a``).
        per_output: compare scores within each output row (Wanda's grouping) instead of the whole matrix.
        reallocation: for N:M, the heuristic channel reallocation before choosing each group's N.
        importance_score: how reallocation ranks the input channels: "sum" of scores, or
            "retained_degree_unstructured" / "retained_degree_per_outneuron" (kept weights under an unstructured
            mask, then their score).
        lsa: refine the reallocation by a linear sum assignment for each position within the groups (scipy).
        backend: backend of the Hessian accumulated only for the report's reconstruction errors.
    """

    method = "ria"

    alpha: float = 0.5
    per_output: bool = False
    reallocation: bool = False
    importance_score: str = "sum"
    lsa: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.importance_score not in IMPORTANCE_SCORES:
            raise ValueError(f"importance_score must be one of {IMPORTANCE_SCORES}, got {self.importance_score!r}")
        if (self.reallocation or self.lsa) and not self.prune_n:
            raise ValueError("reallocation and lsa reorder channels for an N:M pattern; give pattern='N:M'")
        if self.lsa and not self.reallocation:
            raise ValueError("lsa refines the channel reallocation; set reallocation=True too")
        if self.lsa:
            try:
                import scipy.optimize  # noqa: F401
            except ImportError:
                raise ValueError("lsa=True needs scipy (pip install scipy)") from None
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose auto or one of {BACKENDS}")


def ria_score(W: torch.Tensor, scaler: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W: [rows, cols]``, ``scaler: [cols]`` fp32 (running mean of ‖X_j‖²) -> the RIA score ``[rows, cols]``, in
    the authors' expression and order of operations."""
    A = torch.abs(W)
    return (A / torch.sum(A, dim=0) + A / torch.sum(A, dim=1).reshape(-1, 1)) * (
        torch.sqrt(scaler.reshape((1, -1)))) ** alpha


def _lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Indices sorting by the last key, ties by the ones before (stable argsorts, numpy's lexsort order)."""
    idx = keys[0].argsort(dim=-1, stable=True)
    for k in keys[1:]:
        idx = idx.gather(-1, k.gather(-1, idx).argsort(dim=-1, stable=True))
    return idx


def _channel_ranking(score: torch.Tensor, importance: str, sparsity: float) -> torch.Tensor:
    if importance == "sum":
        return torch.sort(torch.sum(score, dim=0))[1]
    mask = matrix_mask(score, sparsity) if importance == "retained_degree_unstructured" else row_mask(score, sparsity)
    return _lexsort([torch.sum(mask, dim=0), torch.sum((mask == 0) * score, dim=0)])


def _deal_round_robin(ranked: torch.Tensor, m: int) -> torch.Tensor:
    """Column order that deals the ranked columns into the groups: slice k of the ranking fills position k of every
    group, reversed for every second slice (the authors' zig-zag)."""
    cols = ranked.numel()
    index = torch.zeros_like(ranked)
    for k in range(1, m + 1):
        part = ranked[int(cols * (k - 1) / m): int(cols * k / m)]
        index[k - 1:: m] = part if k % 2 == 1 else part.flip(0)
    return index


def _lsa_position(score: torch.Tensor, position: int, n: int, m: int) -> torch.Tensor:
    """One linear-sum-assignment round: which group each column at ``position`` should move to, so that the sum of
    the kept scores over all groups is largest; returns the new column order of ``score: [rows, cols]``."""
    from scipy.optimize import linear_sum_assignment

    groups = score.shape[1] // m
    device = score.device
    starts = torch.arange(groups, device=device) * m
    others = torch.arange(m, device=device)
    others = others[others != position]
    gain = torch.zeros(groups, groups, device=device)
    for g in range(groups):
        # candidate group g's other columns, with each group's column at `position` swapped in
        strip = torch.zeros(1, groups, m, dtype=torch.long, device=device)
        strip[:, :, 0] = starts.reshape(1, -1) + position
        strip[:, :, 1:] = others.reshape(1, 1, -1) + torch.arange(g, g + 1, device=device).reshape(-1, 1, 1) * m
        cand = score[:, strip].transpose(1, 0).transpose(2, 1)
        pruned = torch.zeros_like(cand)
        pruned.scatter_(dim=-1, index=torch.sort(cand, dim=-1)[1][:, :, :, :n], value=1)
        gain[:, g:g + 1] = torch.sum(torch.sum(cand * (pruned == 0), dim=-1), dim=-1).transpose(1, 0)
    cols = linear_sum_assignment(gain.transpose(1, 0).cpu(), maximize=True)[1]
    order = torch.arange(score.shape[1], device=device)
    order[starts + position] = torch.as_tensor(cols, dtype=torch.long, device=device) * m + position
    return order


def channel_reallocation(score: torch.Tensor, n: int, m: int, importance: str = "sum", sparsity: float = 0.5,
                         lsa: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' N:M with channel reallocation: ``(mask, order)``, ``mask: [rows, cols]`` bool (True = pruned)
    whose columns ``order`` are N:M, ``order: [cols]`` the permutation of the input channels."""
    order = _deal_round_robin(_channel_ranking(score, importance, sparsity), m)
    if lsa:
        for position in range(m):
            order = order[_lsa_position(score[:, order], position, n, m)]
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask[:, order] = nm_mask(score[:, order], n, m)
    return mask, order


def ria_mask(W: torch.Tensor, scaler: torch.Tensor, config: RIAConfig, sparsity: float) -> torch.Tensor:
    """RIA's mask of ``W: [rows, cols]`` (bool, True = pruned) under ``config``'s pattern and options."""
    score = ria_score(W, scaler, config.alpha)
    if config.prune_n:
        if config.reallocation:
            return channel_reallocation(score, config.prune_n, config.prune_m, config.importance_score, sparsity,
                                        config.lsa)[0]
        return nm_mask(score, config.prune_n, config.prune_m)
    return row_mask(score, sparsity) if config.per_output else matrix_mask(score, sparsity)


class RIAMethod(PruningMethod):
    """Per input group: Wanda's running column norms; the mask from the RIA score."""

    solves_concurrently = True
    config_class = RIAConfig

    def __init__(self, config: RIAConfig):
        super().__init__(config)
        self.norms = ColumnNormStatistic()
        self.statistics = (self.norms,)

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        W = module.weight.data
        W[ria_mask(W, self.norms[group], self.config, sparsity)] = 0
        return ModuleResult()
