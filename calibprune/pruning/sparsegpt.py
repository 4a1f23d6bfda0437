"""SparseGPT, twice: the faithful reference pipeline and the fused one (same masks, weights up to rounding).

Reference (IST-DASLab/sparsegpt): one Hessian per Linear fed by its own hook, the full layer forward, and
``fasterprune`` line for line. Fused: one Hessian per group of modules reading the same input (q/k/v, gate/up),
one scaled accumulate per batch, the statistics forward stopped once the last target has its input, the lean
OBS loop of :func:`calibprune.ops.obs_prune` with a backend switch, and no recompute after the last layer.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..calibration import CalibrationSet, as_token_ids
from ..ops import hessian_update, hessian_update_reference, obs_prune, obs_prune_reference
from ..ops._backend import resolve_backend
from ..ops.hessian import SUPPORTED as HESSIAN_BACKENDS
from ..ops.obs import SUPPORTED as OBS_BACKENDS
from .config import PruneConfig
from .pipeline import LayerMethod, hessian_errors, prune_layerwise
from .report import PruneReport

log = logging.getLogger(__name__)

__all__ = ["prune_sparsegpt_fused", "prune_sparsegpt_reference", "SparseGPTMethod"]


class SparseGPTMethod(LayerMethod):
    """Hessian statistics and OBS pruning; ``reference=True`` keeps every reference habit."""

    def __init__(self, reference: bool, backend: str = "auto"):
        self.reference = reference
        self.backend = backend
        self.share_inputs = not reference
        self.stop_early = not reference
        self.H: dict[str, torch.Tensor] = {}
        self.nsamples: dict[str, int] = {}
        self.seqlen = 0
        self.phase_seconds = {"hessian": 0.0}

    def start_layer(self, modules: dict[str, nn.Linear], device: torch.device) -> None:
        self.device = device
        self.H, self.nsamples = {}, {}
        if not self.reference:  # which backends "auto" (or the explicit choice) really runs, for the report
            self.resolved_backends = {
                "hessian_update": resolve_backend(self.backend, device, HESSIAN_BACKENDS, op="hessian_update"),
                "obs_prune": resolve_backend(self.backend, device, OBS_BACKENDS, op="obs_prune"),
            }

    def add_batch(self, leader: str, x: torch.Tensor) -> None:
        if leader not in self.H:
            d = x.shape[-1]
            self.H[leader] = torch.zeros((d, d), dtype=torch.float32, device=x.device)
            self.nsamples[leader] = 0
        self.seqlen = x.shape[-2] if x.dim() == 3 else x.shape[0]
        t0 = time.perf_counter()
        if self.reference:
            self.nsamples[leader] = hessian_update_reference(self.H[leader], x, self.nsamples[leader])
        else:
            self.nsamples[leader] = hessian_update(self.H[leader], x, self.nsamples[leader], backend=self.backend)
        self.phase_seconds["hessian"] += time.perf_counter() - t0

    def prune_module(self, name: str, module: nn.Linear, leader: str, config: PruneConfig) -> dict:
        H = self.H[leader]
        W_old = module.weight.data.float().clone()
        W = W_old.clone()
        kwargs = dict(prune_n=config.prune_n, prune_m=config.prune_m, blocksize=config.blocksize,
                      percdamp=config.percdamp)
        t0 = time.perf_counter()
        if self.reference:
            _, losses = obs_prune_reference(W, H.clone(), config.sparsity, **kwargs)
        else:
            _, losses = obs_prune(W, H.clone(), config.sparsity, backend=self.backend, return_losses=True, **kwargs)
        self.phase_seconds["obs"] = self.phase_seconds.get("obs", 0.0) + time.perf_counter() - t0
        module.weight.data.copy_(W.to(module.weight.dtype))
        return hessian_errors(W_old, W, H, self.seqlen) | {"obs_loss": float(losses.sum())}

    def end_layer(self) -> None:
        self.H, self.nsamples = {}, {}


def _validate_nm(model: nn.Module, config: PruneConfig) -> None:
    """N:M needs M to divide every target's input width; say which module breaks it before any work."""
    if not config.prune_m:
        return
    from .pipeline import find_decoder_layers, select_targets

    _, layers = find_decoder_layers(model)
    for name, mod in select_targets(layers[0], config.targets, config.ignore).items():
        if mod.in_features % config.prune_m:
            raise ValueError(f"N:M pattern {config.pattern} needs M to divide the input width of every target, "
                             f"but {name} has in_features = {mod.in_features}")


def run_method(model: nn.Module, calib: CalibrationSet | torch.Tensor | None, config: PruneConfig,
               method: LayerMethod) -> PruneReport:
    """Validate, then run ``method`` through the layer-wise pipeline and return its report."""
    ids = as_token_ids(calib)
    _validate_nm(model, config)
    provenance = calib.provenance if isinstance(calib, CalibrationSet) else {"kind": "tensor"}
    report = PruneReport(method=config.method, config=config.to_dict(),
                         calibration=provenance | {"n": ids.shape[0], "seqlen": ids.shape[1]})
    return prune_layerwise(model, ids, config, method, report)


def prune_sparsegpt_fused(model: nn.Module, calib: CalibrationSet | torch.Tensor, *, sparsity: float = 0.6,
                          pattern: str = "unstructured", blocksize: int = 128, percdamp: float = 0.01,
                          backend: str = "auto", **options) -> PruneReport:
    """Prune ``model`` in place with SparseGPT, fast: same masks as the reference, weights up to float rounding.

    Args:
        calib: a ``CalibrationSet`` or token ids ``[n, seqlen]`` int64.
        sparsity: fraction pruned per matrix (unstructured); implied by ``pattern`` for N:M.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        backend: ops backend, ``"auto"`` picks the fastest available.
        options: any other :class:`PruneConfig` field (``batch_size``, ``device``, ``targets``, ``ignore``…).
    """
    config = PruneConfig(method="sparsegpt", sparsity=sparsity, pattern=pattern, blocksize=blocksize,
                         percdamp=percdamp, backend=backend, **options)
    return run_method(model, calib, config, SparseGPTMethod(reference=False, backend=backend))


def prune_sparsegpt_reference(model: nn.Module, calib: CalibrationSet | torch.Tensor, *, sparsity: float = 0.6,
                              pattern: str = "unstructured", blocksize: int = 128, percdamp: float = 0.01,
                              backend: str = "torch", **options) -> PruneReport:
    """Prune ``model`` in place with the faithful, slow SparseGPT reference (IST-DASLab numerics).

    Same signature as :func:`prune_sparsegpt_fused`; ``backend`` is accepted and ignored (always plain torch).
    """
    config = PruneConfig(method="sparsegpt-reference", sparsity=sparsity, pattern=pattern, blocksize=blocksize,
                         percdamp=percdamp, backend="torch", **options)
    return run_method(model, calib, config, SparseGPTMethod(reference=True))
