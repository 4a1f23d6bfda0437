"""Baselines: Wanda (Sun et al., 2024) and magnitude pruning, through the same pipeline and report."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..calibration import CalibrationSet
from ..ops import hessian_update
from .config import PruneConfig
from .pipeline import LayerMethod, find_decoder_layers, hessian_errors, select_targets
from .report import ModuleRecord, PruneReport
from .sparsegpt import run_method

__all__ = ["prune_wanda", "prune_magnitude", "wanda_mask", "magnitude_mask", "nm_mask"]


def nm_mask(score: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """In every row, prune the ``prune_n`` lowest scores of each group of ``prune_m`` columns.

    ``score: [rows, cols]``; returns a bool mask of the same shape.
    """
    rows, cols = score.shape
    groups = score.reshape(rows, cols // prune_m, prune_m)
    idx = torch.topk(groups, prune_n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def wanda_mask(W: torch.Tensor, scaler_row: torch.Tensor, sparsity: float, prune_n: int = 0,
               prune_m: int = 0) -> torch.Tensor:
    """Wanda's mask: score |W|·‖X_j‖₂, lowest ``int(cols·sparsity)`` per output row (or N:M per row).

    ``W: [rows, cols]``, ``scaler_row: [cols]`` = running mean of ‖X_j‖² per sequence, as Wanda keeps it.
    """
    score = W.abs() * torch.sqrt(scaler_row.reshape(1, -1))
    if prune_n:
        return nm_mask(score, prune_n, prune_m)
    k = int(W.shape[1] * sparsity)
    idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
    return torch.zeros_like(W, dtype=torch.bool).scatter_(1, idx, True)


def magnitude_mask(W: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """Magnitude mask: one threshold per matrix (``sorted(|W|)[int(numel·s)]``, ``<=``) or N:M per row."""
    score = W.abs()
    if prune_n:
        return nm_mask(score, prune_n, prune_m)
    flat = score.flatten()
    thresh = torch.kthvalue(flat.float().cpu(), int(flat.numel() * sparsity) + 1).values.to(score.device)
    return score <= thresh


class WandaMethod(LayerMethod):
    """Per input group: Wanda's running column norms, plus the Hessian for the reconstruction error."""

    def __init__(self, backend: str = "auto", with_error: bool = True):
        self.backend, self.with_error = backend, with_error

    def start_layer(self, modules: dict[str, nn.Linear], device: torch.device) -> None:
        self.scaler: dict[str, torch.Tensor] = {}
        self.nsamples: dict[str, int] = {}
        self.H: dict[str, torch.Tensor] = {}

    def add_batch(self, leader: str, x: torch.Tensor) -> None:
        x3 = x if x.dim() == 3 else x.unsqueeze(0)
        batch, d = x3.shape[0], x3.shape[-1]
        self.seqlen = x3.shape[1]
        if leader not in self.scaler:
            self.scaler[leader] = torch.zeros(d, dtype=torch.float32, device=x.device)
            self.nsamples[leader] = 0
            if self.with_error:
                self.H[leader] = torch.zeros((d, d), dtype=torch.float32, device=x.device)
        n = self.nsamples[leader]
        flat = x3.reshape(-1, d).float()
        self.scaler[leader] *= n / (n + batch)
        self.scaler[leader] += flat.square().sum(0) / (n + batch)
        if self.with_error:
            hessian_update(self.H[leader], x3, n, backend=self.backend)
        self.nsamples[leader] = n + batch

    def prune_module(self, name: str, module: nn.Linear, leader: str, config: PruneConfig) -> dict:
        W_old = module.weight.data.float().clone()
        mask = wanda_mask(W_old, self.scaler[leader], config.sparsity, config.prune_n, config.prune_m)
        W = W_old.masked_fill(mask, 0)
        module.weight.data.copy_(W.to(module.weight.dtype))
        return hessian_errors(W_old, W, self.H[leader], self.seqlen) if self.with_error else {}


def prune_wanda(model: nn.Module, calib: CalibrationSet | torch.Tensor, *, sparsity: float = 0.6,
                pattern: str = "unstructured", backend: str = "auto", **options) -> PruneReport:
    """Prune ``model`` in place with Wanda (|W|·‖X‖ per output row; N:M per row)."""
    config = PruneConfig(method="wanda", sparsity=sparsity, pattern=pattern, backend=backend, **options)
    return run_method(model, calib, config, WandaMethod(backend=backend))


class MagnitudeMethod(WandaMethod):
    """Magnitude masks; calibration is used only to report the reconstruction error."""

    def prune_module(self, name: str, module: nn.Linear, leader: str, config: PruneConfig) -> dict:
        W_old = module.weight.data.float().clone()
        W = W_old.masked_fill(magnitude_mask(W_old, config.sparsity, config.prune_n, config.prune_m), 0)
        module.weight.data.copy_(W.to(module.weight.dtype))
        return hessian_errors(W_old, W, self.H[leader], self.seqlen)


@torch.no_grad()
def prune_magnitude(model: nn.Module, calib: CalibrationSet | torch.Tensor | None = None, *, sparsity: float = 0.6,
                    pattern: str = "unstructured", backend: str = "auto", **options) -> PruneReport:
    """Prune ``model`` in place by weight magnitude. With ``calib`` the report also holds reconstruction errors."""
    config = PruneConfig(method="magnitude", sparsity=sparsity, pattern=pattern, backend=backend, **options)
    if calib is not None:
        return run_method(model, calib, config, MagnitudeMethod(backend=backend))
    from .sparsegpt import _validate_nm

    _validate_nm(model, config)
    report = PruneReport(method="magnitude", config=config.to_dict(), calibration={"kind": "none"})
    t_start = time.perf_counter()
    _, layers = find_decoder_layers(model)
    for index, layer in enumerate(layers):
        t_layer = time.perf_counter()
        for name, module in select_targets(layer, config.targets, config.ignore).items():
            t_mod = time.perf_counter()
            W = module.weight.data
            W.masked_fill_(magnitude_mask(W.float(), config.sparsity, config.prune_n, config.prune_m), 0)
            report.modules.append(ModuleRecord(layer=index, name=name, shape=(W.shape[0], W.shape[1]),
                                               sparsity=float((W == 0).float().mean()), recon_error=None,
                                               rel_error=None, seconds=time.perf_counter() - t_mod))
        report.layer_seconds.append(time.perf_counter() - t_layer)
    report.seconds = time.perf_counter() - t_start
    return report
