"""SparseGPT, twice: the faithful reference and the fused path (same masks, same weights under the same batches).

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023).

Reference (IST-DASLab/sparsegpt ``llama_sequential``): one Hessian per Linear fed by its own hook, the full layer
forward, and ``fasterprune`` line for line. Fused: one Hessian per group of modules reading the same input
(q/k/v, gate/up), the statistics forward stopped once the last target has its input, the lean OBS loop of
:func:`calibprune.ops.obs_prune` with a backend switch, and no recompute after the last layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...ops import (
    BACKENDS,
    InverseFactor,
    inverse_factor,
    obs_prune,
    obs_prune_reference,
    resolve_op_backend,
)
from ...ops.obs import inverse_factor_reference
from ..config import PruneConfig
from ..method import ModuleResult, PruningMethod
from ..statistics import HessianStatistic

__all__ = ["SparseGPTConfig", "SparseGPTReferenceConfig", "SparseGPTMethod", "SparseGPTReferenceMethod",
           "resolve_op_backends"]


@dataclass(kw_only=True)
class SparseGPTConfig(PruneConfig):
    """SparseGPT through the fused path.

    Attributes:
        blocksize: lazy-update block width of the OBS solve (a multiple of M for N:M).
        percdamp: damping added to diag(H), as a fraction of its mean.
        backend: op backend, "auto" or one of torch, triton, cuda, cpp; an op that lacks the chosen backend runs
            on torch (logged, and recorded in the report's resolved_backends).
    """

    method = "sparsegpt"

    blocksize: int = 128
    percdamp: float = 0.01
    backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be an integer >= 1, got {self.blocksize!r}")
        if self.prune_m and self.blocksize % self.prune_m:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M = {self.prune_m} for "
                             f"pattern {self.pattern}")
        if not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp}")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose auto or one of {BACKENDS}")


@dataclass(kw_only=True)
class SparseGPTReferenceConfig(SparseGPTConfig):
    """The faithful, slow reference: plain torch, reference numerics, one Hessian per Linear."""

    method = "sparsegpt-reference"

    backend: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in ("torch", "auto"):
            raise ValueError(f"sparsegpt-reference always runs plain torch; backend {self.backend!r} is for "
                             "method sparsegpt")
        if self.numerics != "reference":
            raise ValueError("sparsegpt-reference runs reference numerics only; numerics='fast' is for sparsegpt")
        self.backend = "torch"


def resolve_op_backends(backend: str, device: torch.device, numerics: str = "reference") -> dict[str, str]:
    """The backend each SparseGPT op will run for ``backend`` on ``device`` with ``numerics``
    (:func:`calibprune.ops.resolve_op_backend`)."""
    return {op: resolve_op_backend(op, backend, device, numerics=numerics) for op in ("hessian_update", "obs_prune")}


class _SparseGPT(PruningMethod):
    """What both SparseGPT paths share: a Hessian per input group, one inverse factor per Hessian (a function of H
    alone, so a group's modules share it without changing a bit), and an OBS solve per module. A Hessian that is
    not positive definite gets its damping escalated (logged); the damping used is recorded per module."""

    solves_concurrently = True
    config_class = SparseGPTConfig
    needs_report_hessian = False  # its own Hessian is the report's

    def __init__(self, config: SparseGPTConfig, hessian: HessianStatistic):
        super().__init__(config)
        self.hessian = hessian
        self.statistics = (hessian,)
        self.factors: dict[str, InverseFactor] = {}

    def _new_factor(self, H: torch.Tensor, what: str) -> InverseFactor:
        raise NotImplementedError

    def _solve(self, W: torch.Tensor, sparsity: float, factor: InverseFactor) -> torch.Tensor:
        """Prune ``W: [rows, cols] fp32`` in place; returns the per-row OBS losses."""
        raise NotImplementedError

    def _factor(self, index: int, group: str) -> InverseFactor:
        if group not in self.factors:
            with self.timed("inverse factor"):
                self.factors[group] = self._new_factor(self.hessian[group].clone(),
                                                       f"the Hessian of layer {index} {group}")
        return self.factors[group]

    def _obs_options(self, factor: InverseFactor) -> dict:
        config = self.config
        return dict(prune_n=config.prune_n, prune_m=config.prune_m, blocksize=config.blocksize,
                    percdamp=config.percdamp, factor=factor)

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        factor = self._factor(index, group)
        W = module.weight.data.float().clone()
        with self.timed("obs"):
            losses = self._solve(W, sparsity, factor)
        module.weight.data.copy_(W.to(module.weight.dtype))
        damping = {"percdamp": factor.damp, "escalations": factor.escalations} if factor.escalations else None
        return ModuleResult(hessian=self.hessian[group], obs_loss=float(losses.sum()), damping=damping)

    def start_layer(self, index: int, modules: dict[str, nn.Linear], device: torch.device) -> None:
        super().start_layer(index, modules, device)
        self.factors = {}

    def end_layer(self, index: int) -> None:
        super().end_layer(index)
        self.factors = {}


class SparseGPTMethod(_SparseGPT):
    """The fused path: shared Hessians per input group on the chosen backend, the lean OBS loop
    (:func:`calibprune.ops.obs_prune`); with ``numerics="fast"`` the half-flop Hessian and the reversed factor."""

    def __init__(self, config: SparseGPTConfig):
        super().__init__(config, HessianStatistic(numerics=config.numerics))

    def resolve(self, device: torch.device) -> None:
        self.resolved_backends = resolve_op_backends(self.config.backend, device, self.config.numerics)
        self.hessian.backend = self.resolved_backends["hessian_update"]

    def _new_factor(self, H: torch.Tensor, what: str) -> InverseFactor:
        method = "reversed" if self.config.numerics == "fast" else "chol_inverse"
        return inverse_factor(H, self.config.percdamp, method=method, what=what)

    def _solve(self, W: torch.Tensor, sparsity: float, factor: InverseFactor) -> torch.Tensor:
        _, losses = obs_prune(W, None, sparsity, backend=self.resolved_backends["obs_prune"], return_losses=True,
                              numerics=self.config.numerics, **self._obs_options(factor))
        return losses


class SparseGPTReferenceMethod(_SparseGPT):
    """The faithful reference: a Hessian per Linear, the full layer forward, ``fasterprune`` line for line."""

    config_class = SparseGPTReferenceConfig
    share_inputs = False
    stop_early = False

    def __init__(self, config: SparseGPTReferenceConfig):
        super().__init__(config, HessianStatistic(reference=True))

    def _new_factor(self, H: torch.Tensor, what: str) -> InverseFactor:
        return inverse_factor_reference(H, self.config.percdamp, what=what)

    def _solve(self, W: torch.Tensor, sparsity: float, factor: InverseFactor) -> torch.Tensor:
        _, losses = obs_prune_reference(W, None, sparsity, **self._obs_options(factor))
        return losses
