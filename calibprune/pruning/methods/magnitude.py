"""Magnitude pruning: one |W| threshold per matrix (or N:M per row), the authors' baseline (locuslab/wanda)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import PruneConfig
from ..masks import matrix_mask, nm_mask
from ..method import ModuleResult, PruningMethod

__all__ = ["MagnitudeConfig", "MagnitudeMethod", "magnitude_mask"]


@dataclass(kw_only=True)
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning; calibration data, when given, only feeds the report's reconstruction errors."""

    method = "magnitude"


def magnitude_mask(W: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """``W: [rows, cols]`` → bool mask (True = pruned): ``|W| <= sorted(|W|)[int(numel·s)]``, or N:M per row."""
    score = W.abs()
    return nm_mask(score, prune_n, prune_m) if prune_n else matrix_mask(score, sparsity)


class MagnitudeMethod(PruningMethod):
    """Magnitude masks; with calibration data the base class accumulates the report's Hessian."""

    solves_concurrently = True
    config_class = MagnitudeConfig
    needs_calibration = False

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        W = module.weight.data
        W[magnitude_mask(W, sparsity, self.config.prune_n, self.config.prune_m)] = 0
        return ModuleResult()
