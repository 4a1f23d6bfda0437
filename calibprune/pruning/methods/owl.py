"""OWL: outlier-weighed layer-wise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity", ICML 2024).

A dense pass measures, per decoder layer, the share of its Wanda scores |W_ij|·‖X_j‖ that exceed ``m`` times the
layer's mean score (the outlier ratio, over all the layer's target matrices together). Layers with more outliers
are pruned less: the ratios are min-max scaled to [0, 2·lmbda] and subtracted from the target around their mean,
so every layer's sparsity lies within target ± lmbda. The mean is the authors' plain mean over layers
(luuyin/OWL ``prune_wanda_outlier``, in their arithmetic), so the mean layer sparsity is the target;
``layer_mean="parameters"`` weights each layer by its number of target parameters instead, so that the model's
overall sparsity is the target when the layers differ in size (the same for equal-sized layers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..anatomy import find_decoder_layers
from ..config import PruneConfig
from ..loop import prune_layerwise
from ..method import ModuleResult, PruningMethod, SparsityProfile
from ..report import PruneReport
from ..statistics import ColumnNormStatistic

__all__ = ["OWLOptions", "OWL", "owl_layer_sparsities"]


@dataclass
class OWLOptions:
    """OWL's knobs (llm-compressor calls them ``owl_m`` and ``owl_lmbda``).

    Attributes:
        m: a score is an outlier when it exceeds m × its layer's mean score.
        lmbda: the spread: layer sparsities lie within target ± lmbda.
        layer_mean: "plain" (the authors': the mean layer sparsity is the target) or "parameters" (weighted by each
            layer's target parameters: the model's overall sparsity is the target).
    """

    m: float = 5.0
    lmbda: float = 0.08
    layer_mean: str = "plain"

    def __post_init__(self) -> None:
        if not self.m > 0:
            raise ValueError(f"OWL m must be > 0, got {self.m}")
        if not 0 <= self.lmbda < 0.5:
            raise ValueError(f"OWL lmbda must be in [0, 0.5), got {self.lmbda}")
        if self.layer_mean not in ("plain", "parameters"):
            raise ValueError(f"OWL layer_mean must be 'plain' or 'parameters', got {self.layer_mean!r}")


def owl_layer_sparsities(outlier_ratios: list[float], weights: list[float], target: float, lmbda: float,
                         layer_mean: str = "plain") -> list[float]:
    """Per-layer sparsities from outlier ratios (percent) around ``target``, within ± ``lmbda``.

    ``layer_mean="plain"``: the authors' arithmetic (NumPy float64, their order of operations), mean sparsity =
    ``target``. ``"parameters"``: ``Σ w_l·s_l / Σ w_l = target`` with ``weights`` each layer's number of target
    parameters. Equal ratios give the target everywhere.
    """
    if max(outlier_ratios) == min(outlier_ratios):
        return [float(target)] * len(outlier_ratios)
    if layer_mean == "plain":
        r = np.array(outlier_ratios)
        r = (r - r.min()) * (1 / (r.max() - r.min()) * lmbda * 2)
        out = (1 - (r - np.mean(r) + (1 - target))).tolist()
    else:
        r = torch.tensor(outlier_ratios, dtype=torch.float64)
        w = torch.tensor(weights, dtype=torch.float64)
        scaled = (r - r.min()) / (r.max() - r.min()) * (2 * lmbda)
        mean = (scaled * w).sum() / w.sum()
        out = (target - (scaled - mean)).tolist()
    if any(not 0.0 < s < 1.0 for s in out):
        raise ValueError(f"OWL with lmbda={lmbda} around sparsity {target} gives layer sparsities outside (0, 1): "
                         f"{[round(s, 3) for s in out]}; lower lmbda")
    return out


class _OutlierRatios(PruningMethod):
    """A measuring pass: Wanda statistics per group, then each layer's outlier ratio; weights stay dense."""

    config_class = PruneConfig
    # Every rank measures every module (the weights stay dense), so every rank derives the same sparsities.
    distribute_modules = False
    needs_report_hessian = False

    def __init__(self, config: PruneConfig, m: float):
        super().__init__(config)
        self.m = m
        self.norms = ColumnNormStatistic(everywhere=True)  # combined on every rank
        self.statistics = (self.norms,)
        self.ratios: dict[int, float] = {}
        self.params: dict[int, int] = {}

    def start_layer(self, index: int, modules: dict[str, nn.Linear], device: torch.device) -> None:
        super().start_layer(index, modules, device)
        self.seen: list[tuple[nn.Linear, str]] = []
        self.total, self.count = 0.0, 0

    def _score(self, module: nn.Linear, group: str) -> torch.Tensor:
        return torch.abs(module.weight.data.float()) * torch.sqrt(self.norms[group].reshape(1, -1))

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        # First sweep: the layer's mean score. The outliers are counted in end_layer, one matrix at a time, so
        # the layer's scores are never all held at once.
        score = self._score(module, group)
        self.total += float(score.sum(dtype=torch.float64))
        self.count += score.numel()
        self.seen.append((module, group))
        return ModuleResult()

    def end_layer(self, index: int) -> None:
        if self.count:
            threshold = self.total / self.count * self.m
            outliers = sum(int((self._score(mod, group) > threshold).sum()) for mod, group in self.seen)
            self.ratios[index] = 100.0 * outliers / self.count
            self.params[index] = self.count
        self.seen = []
        super().end_layer(index)


class OWL(SparsityProfile):
    """``sparsity_profile="owl"``: per-layer sparsities from a dense measuring pass over the calibration data."""

    options_class = OWLOptions

    def layer_sparsities(self, model: nn.Module, ids: torch.Tensor, config: PruneConfig, *,
                         progress: bool = True) -> tuple[list[float], dict]:
        _, layers = find_decoder_layers(model)
        measure = _OutlierRatios(config, self.options.m)
        prune_layerwise(model, ids, config, measure, PruneReport("owl (measure)", {}), progress=progress)
        measured = sorted(measure.ratios)
        sparsities = owl_layer_sparsities([measure.ratios[i] for i in measured],
                                          [measure.params[i] for i in measured], float(config.sparsity),
                                          self.options.lmbda, self.options.layer_mean)
        by_layer = dict(zip(measured, sparsities))
        out = [by_layer.get(i, float(config.sparsity)) for i in range(len(layers))]
        return out, {"m": self.options.m, "lmbda": self.options.lmbda, "layer_mean": self.options.layer_mean,
                     "outlier_ratio_pct": [measure.ratios.get(i) for i in range(len(layers))]}
