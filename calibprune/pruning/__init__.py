"""Layer-wise pruning: one layer loop, one registry of methods, profiles and refiners, one report.

``prune(model, calib, config)`` is the generic entry; ``config`` is a method's typed config from the registry
(``SparseGPTConfig``, ``WandaConfig``, ``MagnitudeConfig``…, or ``make_config(name, ...)``). The
``prune_sparsegpt_fused`` / ``prune_sparsegpt_reference`` / ``prune_wanda`` / ``prune_magnitude`` functions are thin
wrappers that build the config and call it.

Floors, from the ground up: ``config``, ``report``, ``masks``, ``anatomy`` (where the layers and targets are),
``device``, ``distributed``, ``statistics`` (the running statistics and their lifecycle), ``method`` (the protocol),
``activations``, ``checkpoint``, ``loop`` (the layer loop), ``methods/`` (one file per method, profile and
refiner), ``registry``, ``api`` (the door: ``prune``, ``check_request``, ``make_config``, the wrappers), then
``streaming``, ``recipe`` and ``cli_options``.
"""
from __future__ import annotations

from .anatomy import find_decoder_layers, select_targets
from .api import (
    check_request,
    make_config,
    prune,
    prune_magnitude,
    prune_sparsegpt_fused,
    prune_sparsegpt_reference,
    prune_wanda,
)
from .config import PruneConfig, parse_pattern
from .loop import capture_layer_inputs, prune_layerwise
from .method import MaskRefiner, ModuleResult, PruningMethod, SparsityProfile
from .methods.alps import ALPSConfig
from .methods.dsnot import DSnoTOptions
from .methods.magnitude import MagnitudeConfig
from .methods.owl import OWLOptions
from .methods.ria import RIAConfig
from .methods.sparsegpt import SparseGPTConfig, SparseGPTReferenceConfig
from .methods.wanda import WandaConfig
from .recipe import load_recipe
from .registry import CONFIGS, METHODS, PROFILES, REFINERS
from .report import ModuleRecord, PruneReport
from .streaming import load_streamed, prune_and_save

__all__ = [
    "prune", "check_request", "make_config", "load_recipe", "PruneConfig", "SparseGPTConfig",
    "SparseGPTReferenceConfig", "WandaConfig", "MagnitudeConfig", "RIAConfig", "ALPSConfig", "OWLOptions",
    "DSnoTOptions", "METHODS",
    "PROFILES", "REFINERS", "CONFIGS", "PruningMethod", "MaskRefiner", "SparsityProfile", "ModuleResult",
    "PruneReport", "ModuleRecord", "prune_sparsegpt_fused", "prune_sparsegpt_reference", "prune_wanda",
    "prune_magnitude", "parse_pattern", "find_decoder_layers", "select_targets", "capture_layer_inputs",
    "prune_layerwise", "prune_and_save", "load_streamed",
]
