"""The one registry of pruning methods, sparsity profiles and mask refiners.

Adding one is a file that defines it plus one line here. The CLI, recipes, the study and :func:`make_config`
all read these tables.
"""
from __future__ import annotations

from typing import Any

from .config import PruneConfig
from .dsnot import DSnoT
from .magnitude import MagnitudeMethod
from .method import MaskRefiner, PruningMethod, SparsityProfile
from .owl import OWL
from .sparsegpt import SparseGPTMethod, SparseGPTReferenceMethod
from .wanda import WandaMethod

__all__ = ["METHODS", "PROFILES", "REFINERS", "CONFIGS", "make_config"]


#: method name -> the class that implements it (its ``config_class`` is the method's typed config)
METHODS: dict[str, type[PruningMethod]] = {
    "sparsegpt": SparseGPTMethod,
    "sparsegpt-reference": SparseGPTReferenceMethod,
    "wanda": WandaMethod,
    "magnitude": MagnitudeMethod,
}

#: sparsity profile name -> class (``"uniform"`` is built in)
PROFILES: dict[str, type[SparsityProfile]] = {
    "owl": OWL,
}

#: mask refiner name -> class
REFINERS: dict[str, type[MaskRefiner]] = {
    "dsnot": DSnoT,
}

#: method name -> its typed config class
CONFIGS: dict[str, type[PruneConfig]] = {name: cls.config_class for name, cls in METHODS.items()}


def make_config(method: str, **options: Any) -> PruneConfig:
    """The typed config of ``method`` built from keyword options, e.g. ``make_config("wanda", sparsity=0.5)``.

    An option the method does not take is a ``ValueError`` that names it and lists what the method takes.
    """
    if method not in CONFIGS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(CONFIGS)}")
    import dataclasses

    cls = CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method {method!r} takes no option(s) {unknown}; it takes: {', '.join(sorted(known))}")
    return cls(**options)
