"""calibprune: calibration-aware, high-sparsity pruning of LLMs."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: E402

__all__ = ["__version__", "ops"]
