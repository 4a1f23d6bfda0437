"""The one registry of pruning methods, sparsity profiles and mask refiners.

Adding one is a file in :mod:`calibprune.pruning.methods` that defines it, plus one line here. The CLI, recipes, the
study and :func:`~calibprune.pruning.make_config` all read these tables; :func:`resolve_options` turns a config's
profile and refiner names into their typed options.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .config import PruneConfig, option_fields
from .method import MaskRefiner, PruningMethod, SparsityProfile
from .methods.alps import ALPSMethod
from .methods.dsnot import DSnoT
from .methods.magnitude import MagnitudeMethod
from .methods.owl import OWL
from .methods.ria import RIAMethod
from .methods.sparsegpt import SparseGPTMethod, SparseGPTReferenceMethod
from .methods.wanda import WandaMethod

__all__ = ["METHODS", "PROFILES", "REFINERS", "CONFIGS", "resolve_options", "check_options"]


#: method name -> the class that implements it (its ``config_class`` is the method's typed config)
METHODS: dict[str, type[PruningMethod]] = {
    "sparsegpt": SparseGPTMethod,
    "sparsegpt-reference": SparseGPTReferenceMethod,
    "wanda": WandaMethod,
    "magnitude": MagnitudeMethod,
    "ria": RIAMethod,
    "alps": ALPSMethod,
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


def check_options(method: str, options: Mapping[str, Any]) -> type[PruneConfig]:
    """The config class of ``method``, after checking that it takes every one of ``options``.

    An unknown method, or an option the method does not take, is a ``ValueError`` that names it and lists what the
    method takes.
    """
    if method not in CONFIGS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(CONFIGS)}")
    cls = CONFIGS[method]
    known = {f.name for f in option_fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method {method!r} takes no option(s) {unknown}; it takes: {', '.join(sorted(known))}")
    return cls


def _typed_options(kind: str, name: str, table: Mapping[str, Any], options: Any) -> Any:
    """``options`` (None, a dict or the typed dataclass) as ``table[name]``'s typed options."""
    if name not in table:
        choices = ["uniform", *sorted(table)] if kind == "profile" else sorted(table)
        what = "sparsity_profile" if kind == "profile" else "refine"
        raise ValueError(f"unknown {what} {name!r}; choose one of {choices}")
    options_cls = table[name].options_class
    if options is None:
        return options_cls()
    if isinstance(options, options_cls):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"{kind}_options for {name!r} must be a dict or {options_cls.__name__}, "
                        f"got {type(options).__name__}")
    known = {f.name for f in dataclasses.fields(options_cls) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {kind} {name!r}; known: {sorted(known)}")
    return options_cls(**options)


def resolve_options(config: PruneConfig) -> PruneConfig:
    """Check ``config``'s method, profile and refiner names against the registry and turn their options into the
    typed dataclasses (in place); returns ``config``. ``ValueError`` / ``TypeError`` name what is wrong."""
    if config.method not in METHODS:
        raise TypeError(f"config must be a registered method's config ({', '.join(METHODS)}), got "
                        f"{type(config).__name__}")
    if config.sparsity_profile != "uniform":
        config.profile_options = _typed_options("profile", config.sparsity_profile, PROFILES, config.profile_options)
    if config.refine is not None:
        config.refine_options = _typed_options("refine", config.refine, REFINERS, config.refine_options)
    return config
