"""Layer-wise pruning: one pipeline, one registry of methods, profiles and refiners, one report.

``prune(model, calib, config)`` is the generic entry; ``config`` is a method's typed config from the registry
(``SparseGPTConfig``, ``WandaConfig``, ``MagnitudeConfig``…, or ``make_config(name, ...)``). The
``prune_sparsegpt_fused`` / ``prune_sparsegpt_reference`` / ``prune_wanda`` / ``prune_magnitude`` functions are thin
wrappers that build the config and call it.
"""
from __future__ import annotations

from .config import PruneConfig, parse_pattern
from .dsnot import DSnoTOptions
from .magnitude import MagnitudeConfig, prune_magnitude
from .method import MaskRefiner, ModuleResult, PruningMethod, SparsityProfile
from .owl import OWLOptions
from .pipeline import capture_layer_inputs, check_request, find_decoder_layers, prune, prune_layerwise, select_targets
from .recipe import load_recipe
from .registry import CONFIGS, METHODS, PROFILES, REFINERS, make_config
from .report import ModuleRecord, PruneReport
from .sparsegpt import SparseGPTConfig, SparseGPTReferenceConfig, prune_sparsegpt_fused, prune_sparsegpt_reference
from .streaming import load_streamed, prune_and_save
from .wanda import WandaConfig, prune_wanda

__all__ = [
    "prune", "check_request", "make_config", "load_recipe", "PruneConfig", "SparseGPTConfig",
    "SparseGPTReferenceConfig", "WandaConfig", "MagnitudeConfig", "OWLOptions", "DSnoTOptions", "METHODS",
    "PROFILES", "REFINERS", "CONFIGS", "PruningMethod", "MaskRefiner", "SparsityProfile", "ModuleResult",
    "PruneReport", "ModuleRecord", "prune_sparsegpt_fused", "prune_sparsegpt_reference", "prune_wanda",
    "prune_magnitude", "parse_pattern", "find_decoder_layers", "select_targets", "capture_layer_inputs",
    "prune_layerwise", "prune_and_save", "load_streamed",
]
