"""Magnitude pruning: one |W| threshold per matrix (or N:M per row), the authors' baseline (locuslab/wanda)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import CalibrationSet
from ..ops import hessian_update
from ..ops._backend import resolve_backend
from ..ops.hessian import SUPPORTED as HESSIAN_BACKENDS
from .config import PruneConfig
from .masks import matrix_mask, nm_mask
from .method import ModuleResult, PruningMethod
from .report import PruneReport

__all__ = ["MagnitudeConfig", "MagnitudeMethod", "prune_magnitude", "magnitude_mask"]


@dataclass(kw_only=True)
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning; calibration data, when given, only feeds the report's reconstruction errors."""

    method = "magnitude"


def magnitude_mask(W: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """``W: [rows, cols]`` → bool mask (True = pruned): ``|W| <= sorted(|W|)[int(numel·s)]``, or N:M per row."""
    score = W.abs()
    return nm_mask(score, prune_n, prune_m) if prune_n else matrix_mask(score, sparsity)


class MagnitudeMethod(PruningMethod):
    """Magnitude masks; with calibration data the Hessian is accumulated for the report only."""

    config_class = MagnitudeConfig
    needs_calibration = False

    def resolve(self, device: torch.device) -> None:
        self.resolved_backends = {"hessian_update": resolve_backend("auto", device, HESSIAN_BACKENDS,
                                                                    op="hessian_update")}

    def start_layer(self, index: int, modules: dict[str, nn.Linear], device: torch.device) -> None:
        self.H: dict[str, torch.Tensor] = {}
        self.nsamples: dict[str, int] = {}

    def add_batch(self, group: str, x: torch.Tensor) -> None:
        if group not in self.H:
            self.H[group] = torch.zeros((x.shape[-1],) * 2, dtype=torch.float32, device=x.device)
            self.nsamples[group] = 0
        backend = self.resolved_backends["hessian_update"]
        with self.timed("hessian"):
            if self.reducer is None:
                self.nsamples[group] = hessian_update(self.H[group], x, self.nsamples[group], backend=backend)
            else:  # in a process group (calibprune.pruning.distributed)
                self.nsamples[group] = self.reducer.fold(
                    "H", group, self.H[group], self.nsamples[group], 1 if x.dim() == 2 else x.shape[0],
                    lambda H, n: hessian_update(H, x, n, backend=backend), split=backend == "torch")

    def finalize_statistics(self, index: int) -> None:
        # In a process group: the report's Hessian, combined on the rank that prunes the group.
        if self.reducer is not None:
            self.H, self.nsamples = self.reducer.running_means("H", self.H, self.nsamples)

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        W = module.weight.data
        W[magnitude_mask(W, sparsity, self.config.prune_n, self.config.prune_m)] = 0
        return ModuleResult(hessian=self.H.get(group))

    def end_layer(self, index: int) -> None:
        self.H, self.nsamples = {}, {}


def prune_magnitude(model: nn.Module, calib: CalibrationSet | torch.Tensor | None = None, *,
                    sparsity: float | Sequence[float] | None = None, pattern: str = "unstructured",
                    **options) -> PruneReport:
    """Prune ``model`` in place by weight magnitude. With ``calib`` the report also holds reconstruction errors."""
    from .pipeline import prune

    return prune(model, calib, MagnitudeConfig(sparsity=sparsity, pattern=pattern, **options))
