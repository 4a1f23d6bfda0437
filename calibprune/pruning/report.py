"""``PruneReport``: what a pruning run did, per module and per layer, serialisable to JSON."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._io import atomic_write_text

__all__ = ["ModuleRecord", "PruneReport"]


@dataclass
class ModuleRecord:
    """One pruned matrix.

    ``recon_error`` is the mean over calibration tokens of ‖(W − Ŵ)x‖² (summed over output rows), computed
    exactly from the Hessian as tr(ΔW·H·ΔWᵀ)/(2·seqlen); ``rel_error`` divides it by the same quantity for W.
    ``obs_loss`` is SparseGPT's own Σ(w − q)²/U[i,i]²/2 (None for other methods). ``damping`` records an escalated
    Hessian damping (None when the configured one sufficed); ``extra`` holds method- or refiner-specific fields.
    """

    layer: int
    name: str
    shape: tuple[int, int]
    sparsity: float
    recon_error: float | None
    rel_error: float | None
    seconds: float
    target_sparsity: float | None = None
    obs_loss: float | None = None
    damping: dict | None = None
    extra: dict | None = None


@dataclass
class PruneReport:
    """The run's config, calibration provenance, per-module records and timings.

    ``phase_seconds``: wall time per pipeline phase — capture (up to layer 0), statistics (hooked forwards),
    prune (the method, refiner and error diagnostics), propagate (forwards through the pruned layer).
    ``timings``: sub-phases the method and refiner time themselves (e.g. ``hessian`` inside statistics, ``obs``
    and ``errors`` inside prune; summed over the workers that ran them). ``resolved_backends``: the op backends
    that really ran. ``workers``: the sample-parallel workers the pass ran with (:mod:`calibprune.pruning.workers`).
    ``layer_targets``: each decoder layer's target sparsity; ``profile``: details of a non-uniform sparsity profile
    (e.g. OWL's outlier ratios). ``distributed``: for a run in a process group, its world size, backend, and per
    rank the phase seconds and the time and volume of each kind of collective.
    """

    method: str
    config: dict
    modules: list[ModuleRecord] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    resolved_backends: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    layer_targets: list[float] = field(default_factory=list)
    profile: dict | None = None
    distributed: dict | None = None

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all pruned matrices (zeros / weights)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.modules)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.modules) / max(total, 1)

    def per_layer_sparsity(self) -> list[float]:
        """Achieved sparsity of each decoder layer that had pruned matrices, in layer order."""
        by_layer: dict[int, list[ModuleRecord]] = {}
        for r in self.modules:
            by_layer.setdefault(r.layer, []).append(r)
        out = []
        for layer in sorted(by_layer):
            recs = by_layer[layer]
            total = sum(r.shape[0] * r.shape[1] for r in recs)
            out.append(sum(r.sparsity * r.shape[0] * r.shape[1] for r in recs) / total)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["achieved_sparsity"] = self.sparsity
        d["per_layer_sparsity"] = self.per_layer_sparsity()
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str))
