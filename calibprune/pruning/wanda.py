"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024).

Score |W_ij|·‖X_j‖₂ per output row, with ‖X_j‖² kept as the authors keep it (locuslab/wanda ``WrappedGPT``): per
batch, ``scaler *= n/(n+b); n += b; scaler += norm(Xᵀ, p=2, dim=1)**2 / n``. With one sequence per batch (the
default, their order) the weights are bitwise theirs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import CalibrationSet
from ..ops import hessian_update
from ..ops._backend import BACKENDS, resolve_backend
from ..ops.hessian import SUPPORTED as HESSIAN_BACKENDS
from .config import PruneConfig
from .masks import nm_mask, row_mask
from .method import ModuleResult, PruningMethod
from .report import PruneReport

__all__ = ["WandaConfig", "WandaMethod", "prune_wanda", "wanda_scaler_update", "wanda_mask"]


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


def wanda_scaler_update(scaler: torch.Tensor, x: torch.Tensor, nsamples: int) -> int:
    """Fold the batch ``x: [b, t, d]`` (or ``[t, d]``, one sequence) into Wanda's running mean of ‖X_j‖².

    ``scaler: [d]`` fp32, updated in place with the authors' expression. Returns ``nsamples + b``.
    """
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    batch = x3.shape[0]
    inp = x3.reshape(-1, x3.shape[-1]).t().type(torch.float32)
    scaler *= nsamples / (nsamples + batch)
    nsamples += batch
    scaler += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
    return nsamples


def wanda_mask(W: torch.Tensor, scaler: torch.Tensor, sparsity: float, prune_n: int = 0,
               prune_m: int = 0) -> torch.Tensor:
    """Wanda's mask: score |W|·sqrt(scaler), lowest ``int(cols·sparsity)`` per output row, or N:M per row.

    ``W: [rows, cols]``, ``scaler: [cols]`` fp32 (:func:`wanda_scaler_update`); returns bool, True = pruned.
    """
    score = torch.abs(W) * torch.sqrt(scaler.reshape((1, -1)))
    return nm_mask(score, prune_n, prune_m) if prune_n else row_mask(score, sparsity)


class WandaMethod(PruningMethod):
    """Per input group: Wanda's running column norms, plus (for the report) the Hessian."""

    config_class = WandaConfig

    def resolve(self, device: torch.device) -> None:
        if self.config.report_errors:
            backend = self.config.backend
            self.resolved_backends = {"hessian_update": "torch" if backend not in ("auto", *HESSIAN_BACKENDS)
                                      else resolve_backend(backend, device, HESSIAN_BACKENDS, op="hessian_update")}

    def start_layer(self, index: int, modules: dict[str, nn.Linear], device: torch.device) -> None:
        self.scaler: dict[str, torch.Tensor] = {}
        self.nsamples: dict[str, int] = {}
        self.H: dict[str, torch.Tensor] = {}

    def add_batch(self, group: str, x: torch.Tensor) -> None:
        d = x.shape[-1]
        if group not in self.scaler:
            self.scaler[group] = torch.zeros(d, dtype=torch.float32, device=x.device)
            self.nsamples[group] = 0
            if self.config.report_errors:
                self.H[group] = torch.zeros((d, d), dtype=torch.float32, device=x.device)
        n = self.nsamples[group]
        reducer, batch = self.reducer, 1 if x.dim() == 2 else x.shape[0]
        with self.timed("scaler"):
            if reducer is None:
                self.nsamples[group] = wanda_scaler_update(self.scaler[group], x, n)
            else:  # in a process group (calibprune.pruning.distributed)
                self.nsamples[group] = reducer.fold("scaler", group, self.scaler[group], n, batch,
                                                    lambda s, m: wanda_scaler_update(s, x, m))
        if self.config.report_errors:
            backend = self.resolved_backends["hessian_update"]
            with self.timed("hessian"):
                if reducer is None:
                    hessian_update(self.H[group], x, n, backend=backend)
                else:
                    reducer.fold("H", group, self.H[group], n, batch,
                                 lambda H, m: hessian_update(H, x, m, backend=backend), split=backend == "torch")

    def finalize_statistics(self, index: int) -> None:
        # In a process group: the scaler and the report's Hessian (running means over sequences), combined on the
        # rank that prunes the group (see StatisticsReducer).
        if self.reducer is not None:
            counts = dict(self.nsamples)
            self.scaler, self.nsamples = self.reducer.running_means("scaler", self.scaler, counts)
            if self.H:
                self.H, _ = self.reducer.running_means("H", self.H, counts)

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        W = module.weight.data
        mask = wanda_mask(W, self.scaler[group], sparsity, self.config.prune_n, self.config.prune_m)
        W[mask] = 0
        return ModuleResult(hessian=self.H.get(group))

    def end_layer(self, index: int) -> None:
        self.scaler, self.nsamples, self.H = {}, {}, {}


def prune_wanda(model: nn.Module, calib: CalibrationSet | torch.Tensor, *,
                sparsity: float | Sequence[float] | None = None, pattern: str = "unstructured",
                backend: str = "auto", **options) -> PruneReport:
    """Prune ``model`` in place with Wanda (|W|·‖X‖ per output row; N:M per row); options as :class:`WandaConfig`."""
    from .pipeline import prune

    return prune(model, calib, WandaConfig(sparsity=sparsity, pattern=pattern, backend=backend, **options))
