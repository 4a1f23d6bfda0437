"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024).

Score |W_ij|·‖X_j‖₂ per output row, with ‖X_j‖² kept as the authors keep it (locuslab/wanda ``WrappedGPT``): per
batch, ``scaler *= n/(n+b); n += b; scaler += norm(Xᵀ, p=2, dim=1)**2 / n``. With one sequence per batch (the
default, their order) the weights are bitwise theirs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...ops import BACKENDS
from ..config import PruneConfig
from ..masks import nm_mask, row_mask
from ..method import ModuleResult, PruningMethod
from ..statistics import ColumnNormStatistic

__all__ = ["WandaConfig", "WandaMethod", "wanda_mask"]


@dataclass(kw_only=True)
class WandaConfig(PruneConfig):
    """Wanda.

    Attributes:
        backend: backend of the Hessian accumulated only for the report's reconstruction errors
            ("auto" or one of torch, triton, cuda; report_errors=False skips it).
    """

    method = "wanda"

    backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose auto or one of {BACKENDS}")


def wanda_mask(W: torch.Tensor, scaler: torch.Tensor, sparsity: float, prune_n: int = 0,
               prune_m: int = 0) -> torch.Tensor:
    """Wanda's mask: score |W|·sqrt(scaler), lowest ``int(cols·sparsity)`` per output row, or N:M per row.

    ``W: [rows, cols]``, ``scaler: [cols]`` fp32 (:func:`~calibprune.pruning.statistics.wanda_scaler_update`);
    returns bool, True = pruned.
    """
    score = torch.abs(W) * torch.sqrt(scaler.reshape((1, -1)))
    return nm_mask(score, prune_n, prune_m) if prune_n else row_mask(score, sparsity)


class WandaMethod(PruningMethod):
    """Per input group: Wanda's running column norms; the mask from |W|·‖X‖ per output row."""

    solves_concurrently = True
    config_class = WandaConfig

    def __init__(self, config: WandaConfig):
        super().__init__(config)
        self.norms = ColumnNormStatistic()
        self.statistics = (self.norms,)

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        W = module.weight.data
        W[wanda_mask(W, self.norms[group], sparsity, self.config.prune_n, self.config.prune_m)] = 0
        return ModuleResult()
