"""Typed, validated configuration: one common config every method shares, one subclass per method.

Each method's config (``SparseGPTConfig``, ``WandaConfig``, ``MagnitudeConfig``, …) adds its own knobs to
:class:`PruneConfig` and is validated for that method only, in ``__post_init__``: an N:M pattern only constrains
SparseGPT's ``blocksize``, because only SparseGPT has blocks. A config validates its own fields only: the names of a
sparsity profile (OWL) or a mask refiner (DSnoT) and their typed options are resolved by the registry
(:func:`calibprune.pruning.registry.resolve_options`, which :func:`~calibprune.pruning.make_config` and
:func:`~calibprune.pruning.prune` call before any weight changes).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["PruneConfig", "parse_pattern", "NUMERICS", "option_fields"]

#: ``"reference"``: bitwise the authors' numerics; ``"fast"``: may round differently, judged by quality.
NUMERICS = ("reference", "fast")
#: Where layer inputs wait between decoder layers (:mod:`calibprune.pruning.activations`).
ACTIVATION_STORES = ("auto", "device", "cpu", "disk")
DEFAULT_SPARSITY = 0.6


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"unstructured"`` → ``(0, 0)``; ``"2:4"`` → ``(2, 4)``; anything else is a ``ValueError``.

    llm-compressor's spelling of unstructured, ``"0:0"``, is accepted too.
    """
    if pattern in ("unstructured", "0:0"):
        return 0, 0
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except (ValueError, AttributeError):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The init fields of a config dataclass, in declaration order (what the CLI and recipes may set)."""
    return [f for f in dataclasses.fields(cls) if f.init]


@dataclass(kw_only=True)
class PruneConfig:
    """What every method shares: how much to prune, where, and how the layer-wise pipeline runs.

    Use a method's subclass (``SparseGPTConfig``, ``WandaConfig``, ``MagnitudeConfig``…) or
    :func:`calibprune.pruning.make_config`; the base class names no method.

    Attributes:
        sparsity: fraction pruned per target matrix, in (0, 1), or one value per decoder layer; default 0.6.
            For N:M it is implied (N/M): leave it out, or give exactly N/M.
        pattern: "unstructured" or "N:M" (e.g. "2:4"; N:M needs M to divide every target's input width).
        sparsity_profile: "uniform" (the same sparsity in every layer) or a registered profile such as "owl"
            (per-layer sparsities from the calibration data, parameter-weighted mean = sparsity).
        profile_options: the profile's options (a dict or its typed dataclass, e.g. OWL's m and lmbda; turned into
            the typed dataclass by the registry).
        refine: None, or a registered mask refiner such as "dsnot" applied to every pruned matrix.
        refine_options: the refiner's options (a dict or its typed dataclass).
        numerics: "reference" (bitwise the authors' arithmetic) or "fast" (bf16 calibration forwards where the
            device supports them, cheaper Hessian and OBS arithmetic; judged by quality, not bit equality).
        targets: patterns of Linear modules to prune: fnmatch on names relative to a decoder layer
            ("self_attn.*") or on full names, "re:<regex>" matched on full names or their prefixes, or a class name
            ("Linear"); empty means every Linear inside the decoder layers. lm_head is never pruned.
        ignore: patterns (same forms) of modules to leave dense.
        batch_size: calibration sequences per layer forward and per statistics update. 1 is the authors' order
            (bitwise their weights); larger is faster and rounds the statistics differently.
        device: compute device for one decoder layer at a time (default: cuda if available, else cpu).
        workers: sample-parallel workers on a CPU, each computing with one thread (default: torch's thread count,
            i.e. the cores or OMP_NUM_THREADS). Any count gives bitwise the weights of one thread
            (:mod:`calibprune.pruning.workers`); a GPU runs one.
        offload_activations: keep layer inputs on CPU between layers (big models on GPU).
        activations: where layer inputs wait between layers: "auto" (the compute device, or CPU with
            offload_activations), "device", "cpu", or "disk" (one file per batch; calibration larger than RAM).
        report_errors: compute each matrix's reconstruction error from the Hessian for the report (on a GPU its
            GEMM runs in bf16 with fp32 accumulation: a diagnostic, within about 1% of fp32).
        resume: continue a killed prune after its last finished layer, from the work folder beside the output
            (calibprune prune --out, prune_and_save); refused when the model, calibration or settings differ.
    """

    method: ClassVar[str] = ""

    sparsity: float | tuple[float, ...] | None = None
    pattern: str = "unstructured"
    sparsity_profile: str = "uniform"
    profile_options: Any = None
    refine: str | None = None
    refine_options: Any = None
    numerics: str = "reference"
    targets: tuple[str, ...] = field(default_factory=tuple)
    ignore: tuple[str, ...] = field(default_factory=tuple)
    batch_size: int = 1
    device: str | None = None
    workers: int | None = None
    offload_activations: bool = False
    activations: str = "auto"
    report_errors: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        if type(self) is PruneConfig:
            raise TypeError("PruneConfig is the common base; use a method's config (SparseGPTConfig, WandaConfig, "
                            "MagnitudeConfig) or make_config(method, ...)")
        self.prune_n, self.prune_m = parse_pattern(self.pattern)
        given = self.sparsity is not None
        if not given:
            self.sparsity = self.prune_n / self.prune_m if self.prune_n else DEFAULT_SPARSITY
        if isinstance(self.sparsity, Sequence) and not isinstance(self.sparsity, str):
            self.sparsity = tuple(float(s) for s in self.sparsity)
            if not self.sparsity:
                raise ValueError("a per-layer sparsity list must not be empty")
            values = self.sparsity
        elif isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool):
            self.sparsity = float(self.sparsity)
            values = (self.sparsity,)
        else:
            raise TypeError(f"sparsity must be a number or a list of numbers, got {self.sparsity!r}")
        if self.prune_n:
            implied = self.prune_n / self.prune_m
            if given and any(not math.isclose(v, implied) for v in values):
                raise ValueError(f"pattern {self.pattern} prunes exactly {implied:g} of each group; sparsity "
                                 f"{self.sparsity} contradicts it (leave sparsity out for N:M)")
            self.sparsity = implied
        elif any(not 0.0 < v < 1.0 for v in values):
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if not isinstance(self.sparsity_profile, str) or not self.sparsity_profile:
            raise ValueError(f"sparsity_profile must be 'uniform' or a profile's name, got {self.sparsity_profile!r}")
        if self.sparsity_profile != "uniform":
            if self.prune_n:
                raise ValueError(f"sparsity_profile={self.sparsity_profile!r} sets per-layer sparsities; an N:M "
                                 f"pattern ({self.pattern}) fixes every layer's sparsity")
            if isinstance(self.sparsity, tuple):
                raise ValueError("give either per-layer sparsities or a sparsity_profile, not both")
        if self.sparsity_profile == "uniform" and self.profile_options:
            raise ValueError("profile_options given without a profile")
        if self.refine is None and self.refine_options:
            raise ValueError("refine_options given without a refine")
        if self.refine is not None and (not isinstance(self.refine, str) or not self.refine):
            raise ValueError(f"refine must be None or a refiner's name, got {self.refine!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.activations not in ACTIVATION_STORES:
            raise ValueError(f"activations must be one of {ACTIVATION_STORES}, got {self.activations!r}")
        if self.offload_activations and self.activations == "device":
            raise ValueError("offload_activations keeps layer inputs on CPU; it contradicts activations='device'")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f"workers must be an integer >= 1 (or None: the cores), got {self.workers!r}")
        self.targets, self.ignore = _patterns(self.targets, "targets"), _patterns(self.ignore, "ignore")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"device {self.device!r} is not a torch device ({exc})") from None

    def layer_sparsity(self, index: int) -> float:
        """The uniform or listed sparsity of decoder layer ``index`` (profiles are resolved by the pipeline)."""
        return self.sparsity[index] if isinstance(self.sparsity, tuple) else self.sparsity

    def to_dict(self) -> dict:
        """Every setting, JSON-ready, with the method name and the parsed pattern."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out | {"prune_n": self.prune_n, "prune_m": self.prune_m}


def _patterns(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    for p in value:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{name} must be non-empty strings, got {p!r}")
        if p.startswith("re:"):
            import re

            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ValueError(f"{name} pattern {p!r} is not a valid regular expression: {exc}") from None
    return value
