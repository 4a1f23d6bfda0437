"""SparseGPT, twice: the faithful reference and the fused path (same masks, same weights under the same batches).

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023).

Reference (IST-DASLab/sparsegpt ``llama_sequential``): one Hessian per Linear fed by its own hook, the full layer
forward, and ``fasterprune`` line for line. Fused: one Hessian per group of modules reading the same input
(q/k/v, gate/up), the statistics forward stopped once the last target has its input, the lean OBS loop of
:func:`calibprune.ops.obs_prune` with a backend switch, and no recompute after the last layer.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import CalibrationSet
from ..ops import hessian_update, hessian_update_reference, obs_prune, obs_prune_reference
from ..ops._backend import BACKENDS, resolve_backend
from ..ops.hessian import SUPPORTED as HESSIAN_BACKENDS
from ..ops.hessian import hessian_finalize
from ..ops.obs import SUPPORTED as OBS_BACKENDS
from ..ops.obs import InverseFactor, inverse_factor, inverse_factor_reference
from .config import PruneConfig
from .method import ModuleResult, PruningMethod
from .report import PruneReport

log = logging.getLogger(__name__)

__all__ = ["SparseGPTConfig", "SparseGPTReferenceConfig", "SparseGPTMethod", "prune_sparsegpt_fused",
           "prune_sparsegpt_reference", "resolve_op_backends",
           "SparseGPTReferenceMethod"]


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


def resolve_op_backends(backend: str, device: torch.device) -> dict[str, str]:
    """The backend each SparseGPT op will run for ``backend`` on ``device``.

    An explicit backend that an op does not implement (the Hessian has no C++ kernel) falls back to torch for
    that op, with a log line; one that is not available here (``cuda`` on a CPU machine) is an error.
    """
    out = {}
    for op, supported in (("hessian_update", HESSIAN_BACKENDS), ("obs_prune", OBS_BACKENDS)):
        if backend not in ("auto", "torch") and backend not in supported:
            log.info("%s has no %r backend; it runs on torch", op, backend)
            out[op] = "torch"
        else:
            out[op] = resolve_backend(backend, device, supported, op=op)
    return out


class SparseGPTMethod(PruningMethod):
    """Hessian statistics and OBS pruning; with a :class:`SparseGPTReferenceConfig` it keeps every reference habit
    (a Hessian per module, the full layer forward, ``fasterprune`` line for line).

    The inverse factor U of a Hessian is computed once per group and shared by the group's modules (q/k/v,
    gate/up): it is a function of H alone, so sharing changes no bit. A Hessian that is not positive definite gets
    its damping escalated (logged); the damping used is recorded per module in the report.
    """

    config_class = SparseGPTConfig

    def __init__(self, config: SparseGPTConfig):
        super().__init__(config)
        self.reference = isinstance(config, SparseGPTReferenceConfig)
        self.share_inputs = self.stop_early = not self.reference
        self.H: dict[str, torch.Tensor] = {}
        self.nsamples: dict[str, int] = {}
        self.factors: dict[str, InverseFactor] = {}

    def resolve(self, device: torch.device) -> None:
        if not self.reference:
            self.resolved_backends = resolve_op_backends(self.config.backend, device)

    def start_layer(self, index: int, modules: dict[str, nn.Linear], device: torch.device) -> None:
        self.H, self.nsamples, self.factors = {}, {}, {}

    def add_batch(self, group: str, x: torch.Tensor) -> None:
        if group not in self.H:
            d = x.shape[-1]
            self.H[group] = torch.zeros((d, d), dtype=torch.float32, device=x.device)
            self.nsamples[group] = 0
        with self.timed("hessian"):
            if self.reducer is None:
                self.nsamples[group] = self._update(self.H[group], x, self.nsamples[group])
            else:  # in a process group (calibprune.pruning.distributed): exactly one process's fold, or partial sums
                torch_backend = self.reference or self.resolved_backends["hessian_update"] == "torch"
                self.nsamples[group] = self.reducer.fold(
                    "H", group, self.H[group], self.nsamples[group], 1 if x.dim() == 2 else x.shape[0],
                    lambda H, n: self._update(H, x, n), split=torch_backend)

    def _update(self, H: torch.Tensor, x: torch.Tensor, nsamples: int) -> int:
        if self.reference:
            return hessian_update_reference(H, x, nsamples)
        return hessian_update(H, x, nsamples, backend=self.resolved_backends["hessian_update"],
                              numerics=self.config.numerics)

    def finalize_statistics(self, index: int) -> None:
        # In a process group: H on the rank that prunes the group, either the one-process fold replayed in sample
        # order (reference numerics) or Σ_r (n_r/N)·H_r (fast: upper triangles summed, then mirrored once).
        if self.reducer is not None:
            self.H, self.nsamples = self.reducer.running_means("H", self.H, self.nsamples)
        if not self.reference:
            for H in self.H.values():
                hessian_finalize(H, numerics=self.config.numerics)

    def _factor(self, index: int, group: str) -> InverseFactor:
        if group not in self.factors:
            config = self.config
            what = f"the Hessian of layer {index} {group}"
            with self.timed("inverse factor"):
                if self.reference:
                    self.factors[group] = inverse_factor_reference(self.H[group].clone(), config.percdamp, what=what)
                else:
                    method = "reversed" if config.numerics == "fast" else "chol_inverse"
                    self.factors[group] = inverse_factor(self.H[group].clone(), config.percdamp, method=method,
                                                         what=what)
        return self.factors[group]

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        config = self.config
        factor = self._factor(index, group)
        W = module.weight.data.float().clone()
        kwargs = dict(prune_n=config.prune_n, prune_m=config.prune_m, blocksize=config.blocksize,
                      percdamp=config.percdamp, factor=factor)
        with self.timed("obs"):
            if self.reference:
                _, losses = obs_prune_reference(W, None, sparsity, **kwargs)
            else:
                _, losses = obs_prune(W, None, sparsity, backend=self.resolved_backends["obs_prune"],
                                      return_losses=True, numerics=config.numerics, **kwargs)
        module.weight.data.copy_(W.to(module.weight.dtype))
        damping = {"percdamp": factor.damp, "escalations": factor.escalations} if factor.escalations else None
        return ModuleResult(hessian=self.H[group], obs_loss=float(losses.sum()), damping=damping)

    def end_layer(self, index: int) -> None:
        self.H, self.nsamples, self.factors = {}, {}, {}


def prune_sparsegpt_fused(model: nn.Module, calib: CalibrationSet | torch.Tensor, *,
                          sparsity: float | Sequence[float] | None = None, pattern: str = "unstructured",
                          blocksize: int = 128, percdamp: float = 0.01, backend: str = "auto",
                          **options) -> PruneReport:
    """Prune ``model`` in place with SparseGPT, fast: bitwise the reference under the same batch order.

    Args:
        calib: a ``CalibrationSet`` or token ids ``[n, seqlen]`` int64.
        sparsity: fraction pruned per matrix (default 0.6), or one value per decoder layer; implied by N:M.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        backend: ops backend, ``"auto"`` picks the fastest available.
        options: any other :class:`SparseGPTConfig` field (``numerics``, ``sparsity_profile``, ``refine``,
            ``batch_size``, ``device``, ``targets``, ``ignore``…).
    """
    from .pipeline import prune

    config = SparseGPTConfig(sparsity=sparsity, pattern=pattern, blocksize=blocksize, percdamp=percdamp,
                             backend=backend, **options)
    return prune(model, calib, config)


class SparseGPTReferenceMethod(SparseGPTMethod):
    """The faithful reference: a Hessian per Linear, the full layer forward, ``fasterprune`` line for line."""

    config_class = SparseGPTReferenceConfig


def prune_sparsegpt_reference(model: nn.Module, calib: CalibrationSet | torch.Tensor, *,
                              sparsity: float | Sequence[float] | None = None, pattern: str = "unstructured",
                              blocksize: int = 128, percdamp: float = 0.01, backend: str = "torch",
                              **options) -> PruneReport:
    """Prune ``model`` in place with the faithful, slow SparseGPT reference (IST-DASLab numerics and order).

    Same signature as :func:`prune_sparsegpt_fused`; ``backend`` must be ``"torch"`` (or ``"auto"``).
    """
    from .pipeline import prune

    config = SparseGPTReferenceConfig(sparsity=sparsity, pattern=pattern, blocksize=blocksize, percdamp=percdamp,
                                      backend=backend, **options)
    return prune(model, calib, config)
