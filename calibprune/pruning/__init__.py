"""Layer-wise pruning: SparseGPT (reference and fused), Wanda and magnitude, one pipeline and one report."""
from __future__ import annotations

from .baselines import prune_magnitude, prune_wanda
from .config import METHODS, PruneConfig, parse_pattern
from .pipeline import capture_layer_inputs, find_decoder_layers, prune_layerwise, select_targets
from .report import ModuleRecord, PruneReport
from .sparsegpt import prune_sparsegpt_fused, prune_sparsegpt_reference

__all__ = ["prune_sparsegpt_fused", "prune_sparsegpt_reference", "prune_wanda", "prune_magnitude", "PruneConfig",
           "PruneReport", "ModuleRecord", "METHODS", "parse_pattern", "find_decoder_layers", "select_targets",
           "capture_layer_inputs", "prune_layerwise"]

