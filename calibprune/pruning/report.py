"""``PruneReport``: what a pruning run did, per module and per layer, serialisable to JSON."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["ModuleRecord", "PruneReport"]


@dataclass
class ModuleRecord:
    """One pruned matrix.

    ``recon_error`` is the mean over calibration tokens of ‖(W − Ŵ)x‖² (summed over output rows), computed
    exactly from the Hessian as tr(ΔW·H·ΔWᵀ)/(2·seqlen); ``rel_error`` divides it by the same quantity for W.
    ``obs_loss`` is SparseGPT's own Σ(w − q)²/U[i,i]²/2 (None for other methods).
    """

    layer: int
    name: str
    shape: tuple[int, int]
    sparsity: float
    recon_error: float | None
    rel_error: float | None
    seconds: float
    obs_loss: float | None = None


@dataclass
class PruneReport:
    method: str
    config: dict
    modules: list[ModuleRecord] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)
    # Wall time per pipeline phase: capture (up to layer 0), statistics (hooked forwards, incl. Hessians),
    # prune (the per-module method), propagate (forwards through the pruned layer).
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all pruned matrices (zeros / weights)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.modules)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.modules) / max(total, 1)

    def per_layer_sparsity(self) -> list[float]:
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
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path
