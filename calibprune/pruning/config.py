"""Typed, validated configuration shared by every pruning method and the CLI."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..ops._backend import BACKENDS

__all__ = ["PruneConfig", "parse_pattern", "METHODS"]

METHODS = ("sparsegpt", "sparsegpt-reference", "wanda", "magnitude")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"unstructured"`` → ``(0, 0)``; ``"2:4"`` → ``(2, 4)``; anything else is a ``ValueError``."""
    if pattern == "unstructured":
        return 0, 0
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


@dataclass
class PruneConfig:
    """What to prune and how.

    Attributes:
        method: one of ``METHODS``.
        sparsity: fraction of weights pruned per target matrix, in (0, 1). For N:M it is implied (N/M).
        pattern: ``"unstructured"`` or ``"N:M"``.
        blocksize: SparseGPT lazy-update block width (a multiple of M for N:M).
        percdamp: SparseGPT damping as a fraction of mean(diag H).
        backend: op backend for the fused path (``"auto"`` or one of ``calibprune.ops.BACKENDS``).
        batch_size: sequences per batched layer forward.
        device: compute device for one layer at a time (default: cuda if available, else cpu).
        offload_activations: keep layer inputs on CPU between layers (for big models on GPU).
        targets: fnmatch patterns of module names (relative to a decoder layer, e.g. ``"self_attn.*"``);
            empty means every ``nn.Linear`` inside the decoder layers. ``lm_head`` is never pruned.
        ignore: fnmatch patterns to leave dense.
    """

    method: str = "sparsegpt"
    sparsity: float = 0.6
    pattern: str = "unstructured"
    blocksize: int = 128
    percdamp: float = 0.01
    backend: str = "auto"
    batch_size: int = 8
    device: str | None = None
    offload_activations: bool = False
    targets: tuple[str, ...] = field(default_factory=tuple)
    ignore: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        self.prune_n, self.prune_m = parse_pattern(self.pattern)
        if self.prune_n == 0 and not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.prune_n:
            self.sparsity = self.prune_n / self.prune_m
            if self.blocksize % self.prune_m:
                raise ValueError(f"blocksize {self.blocksize} must be a multiple of M = {self.prune_m}")
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp}")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose auto or one of {BACKENDS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.targets, self.ignore = tuple(self.targets), tuple(self.ignore)

    def to_dict(self) -> dict:
        return asdict(self) | {"prune_n": self.prune_n, "prune_m": self.prune_m}
