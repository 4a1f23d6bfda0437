"""calibprune: calibration-aware, high-sparsity pruning of LLMs.

Faithful SparseGPT (reference and fused), Wanda and magnitude through one layer-wise pipeline and one method
registry (OWL layer sparsities, DSnoT mask refinement, llm-compressor recipes);
calibration sets built from named sources and mixes; fast ops with torch / Triton / C++ / CUDA backends.
Importing calibprune does not initialise CUDA and never fails for lack of a native extension.
"""
from __future__ import annotations

from . import ops
from ._version import __version__
from .calibration import CalibrationSet, build_calibration, igsp, list_sources, load_texts, self_cal, sgs
from .evaluation import evaluate, perplexity, retention, wikitext2_perplexity
from .models import load_model, load_tokenizer
from .pruning import (
    MagnitudeConfig,
    PruneConfig,
    PruneReport,
    SparseGPTConfig,
    WandaConfig,
    load_recipe,
    make_config,
    prune,
    prune_magnitude,
    prune_sparsegpt_fused,
    prune_sparsegpt_reference,
    prune_wanda,
)
from .save import save_pruned

__all__ = [
    "__version__",
    "ops",
    "load_model",
    "load_tokenizer",
    "CalibrationSet",
    "build_calibration",
    "list_sources",
    "load_texts",
    "self_cal",
    "sgs",
    "igsp",
    "prune",
    "make_config",
    "load_recipe",
    "PruneConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "MagnitudeConfig",
    "PruneReport",
    "prune_sparsegpt_fused",
    "prune_sparsegpt_reference",
    "prune_wanda",
    "prune_magnitude",
    "perplexity",
    "wikitext2_perplexity",
    "evaluate",
    "retention",
    "save_pruned",
]
