"""The interface a pruning method implements; :func:`calibprune.pruning.loop.prune_layerwise` drives it.

Per decoder layer the layer loop calls, in order::

    start_layer(index, modules, device)
    add_batch(group, x)            for every calibration batch and every input group of the layer
    finalize_statistics(index)     once, after the last batch (the seam where a distributed all-reduce goes)
    prune_module(index, name, module, group, sparsity)   for every target module
    end_layer(index)

A *group* is the modules that read the very same input tensor (q/k/v, gate/up); it is named after its first
module and, when ``share_inputs`` is set, shares one statistic. A method declares its running statistics
(:mod:`calibprune.pruning.statistics`) in ``statistics``, and the first four calls are implemented here, once, over
them: a method adds only its math (``prune_module``). A method reports sub-phase timings in ``timings`` and the op
backends it really ran in ``resolved_backends``; the loop copies both into the report.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .config import PruneConfig
from .statistics import HessianStatistic, RunningStatistic

_TIMINGS_LOCK = threading.Lock()

__all__ = ["LayerStatistics", "PruningMethod", "MaskRefiner", "SparsityProfile", "ModuleResult"]


@dataclass
class ModuleResult:
    """What pruning one matrix produced, besides its new weights (all optional).

    ``hessian``: the ``[cols, cols]`` fp32 running-average Hessian of the module's input, when the method has it
    (the pipeline uses it for the reconstruction error after any refinement); ``obs_loss``: SparseGPT's own loss;
    ``damping``: the damping actually applied, when it was escalated; ``extra``: anything else for the report.
    """

    hessian: torch.Tensor | None = None
    obs_loss: float | None = None
    damping: dict | None = None
    extra: dict = field(default_factory=dict)


class LayerStatistics:
    """Per-layer calibration statistics: what a pruning method and a mask refiner both collect.

    ``statistics``: the running statistics this collects (set in ``__init__``); the lifecycle below folds every
    batch into each of them in order, combines them across ranks and resets them. ``timings`` (sub-phase seconds)
    and ``resolved_backends`` (op → backend really run) are copied into the report by the loop. ``reducer``: in a
    process group, the :class:`~calibprune.pruning.distributed.StatisticsReducer` that ``finalize_statistics``
    combines the ranks' statistics with (set by the loop for each layer; None in one process).
    """

    #: the per-matrix work (``prune_module``, ``refine``) of different input groups may run at once on
    #: sample-parallel workers: it reads the layer's statistics and writes only its own module
    solves_concurrently: ClassVar[bool] = False

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.resolved_backends: dict[str, str] = {}
        self.reducer: Any = None
        self.statistics: Sequence[RunningStatistic] = ()

    @property
    def combines_statistics(self) -> bool:
        """Whether a process group may run this: every batch goes into declared statistics (which the base class
        combines), or the class combines what it collects in its own ``finalize_statistics``."""
        cls = type(self)
        return (cls.add_batch is LayerStatistics.add_batch
                or cls.finalize_statistics is not LayerStatistics.finalize_statistics)

    def resolve(self, device: torch.device) -> None:
        """Check, before any work, that this can run on ``device``; fill ``resolved_backends``."""

    def collected(self) -> tuple[RunningStatistic, ...]:
        """Every running statistic the lifecycle below runs, in order."""
        return tuple(self.statistics)

    def start_layer(self, index: int, modules: dict[str, nn.Linear], device: torch.device) -> None:
        """Reset per-layer state before the statistics forwards of decoder layer ``index``."""
        for statistic in self.collected():
            statistic.reset()

    def add_batch(self, group: str, x: torch.Tensor) -> None:
        """Fold the input ``x: [b, t, in]`` of the modules of ``group`` into each statistic, in order."""
        for statistic in self.collected():
            with self.timed(statistic.timing):
                statistic.add(group, x, self.reducer)

    def add_batch_later(self, group: str, x: torch.Tensor, sequences_before: int) -> list[Callable[[], None]]:
        """:meth:`add_batch` in two halves, for a sample-parallel worker: the terms of every statistic computed
        now (``sequences_before`` local sequences precede this batch), the folds returned, to be called in batch
        order. A class that collects in its own ``add_batch`` gets that ``add_batch`` as its fold."""
        if type(self).add_batch is not LayerStatistics.add_batch:
            return [lambda: self.add_batch(group, x)]
        commits = []
        for statistic in self.collected():
            with self.timed(statistic.timing):
                commits.append(statistic.add_later(group, x, sequences_before, self.reducer))
        return commits

    def finalize_statistics(self, index: int) -> None:
        """After the layer's last batch and before any pruning (a distributed run combines the ranks here)."""
        for statistic in self.collected():
            statistic.finalize(self.reducer)

    def end_layer(self, index: int) -> None:
        """Free the layer's statistics."""
        for statistic in self.collected():
            statistic.reset()

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``timings[phase]`` (summed over the workers that ran it)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            with _TIMINGS_LOCK:
                self.timings[phase] = self.timings.get(phase, 0.0) + seconds


class PruningMethod(LayerStatistics):
    """Base class of every pruning method; see the module docstring for the call order.

    Class attributes:
        config_class: the method's typed config (a :class:`PruneConfig` subclass).
        share_inputs: modules reading the very same input tensor share one statistic.
        stop_early: end each statistics forward once every target module has seen its input.
        needs_calibration: False for data-free methods (magnitude), which may run without calibration data.
        needs_report_hessian: with ``report_errors``, the base class accumulates a Hessian for the report's
            reconstruction errors only (``report_hessian``, on the config's ``backend`` when it has one). False for a
            method whose own statistics hold it (SparseGPT returns it in ``ModuleResult.hessian``) or that reports
            no errors (OWL's measuring pass).
    """

    config_class: ClassVar[type[PruneConfig]]
    share_inputs: ClassVar[bool] = True
    stop_early: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    needs_report_hessian: ClassVar[bool] = True

    def __init__(self, config: PruneConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.report_hessian = HessianStatistic() if config.report_errors and self.needs_report_hessian else None

    def collected(self) -> tuple[RunningStatistic, ...]:
        return tuple(self.statistics) + ((self.report_hessian,) if self.report_hessian is not None else ())

    def resolve(self, device: torch.device) -> None:
        if self.report_hessian is not None:
            backend = getattr(self.config, "backend", "auto")
            self.resolved_backends["hessian_update"] = self.report_hessian.resolve(backend, device)

    def hessian_for_report(self, group: str, result: ModuleResult) -> torch.Tensor | None:
        """The Hessian the report's reconstruction error of ``group`` uses: the method's own, else the base's."""
        if result.hessian is not None:
            return result.hessian
        return self.report_hessian.get(group) if self.report_hessian is not None else None

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        """Prune ``module`` of decoder layer ``index`` in place to ``sparsity`` (ignored for N:M)."""
        raise NotImplementedError


class MaskRefiner(LayerStatistics):
    """Changes which weights a method pruned (e.g. DSnoT), keeping each row's (or group's) count.

    ``options_class``: the refiner's typed options dataclass (``PruneConfig.refine_options``).
    """

    options_class: ClassVar[type]

    def __init__(self, options: Any, config: PruneConfig):
        super().__init__()
        self.options, self.config = options, config

    def refine(self, index: int, name: str, module: nn.Linear, group: str, W_dense: torch.Tensor,
               sparsity: float) -> dict:
        """Refine ``module.weight`` in place, given its dense weights ``W_dense: [rows, cols] fp32``; return
        report fields."""
        raise NotImplementedError


class SparsityProfile:
    """Chooses each decoder layer's sparsity (e.g. OWL). ``options_class``: its typed options dataclass."""

    options_class: ClassVar[type]

    def __init__(self, options: Any):
        self.options = options

    def layer_sparsities(self, model: nn.Module, ids: torch.Tensor, config: PruneConfig, *,
                         progress: bool = True) -> tuple[list[float], dict]:
        """One sparsity per decoder layer (parameter-weighted mean = ``config.sparsity``) and report details."""
        raise NotImplementedError
