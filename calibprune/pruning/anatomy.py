"""Model anatomy: where a decoder's layers are, which of their Linear modules a request targets, and how layers kept
elsewhere are loaded.

The bottom of :mod:`calibprune.pruning`: it knows models, not methods.
"""
from __future__ import annotations

import fnmatch
import re

from torch import nn

__all__ = ["find_decoder_layers", "select_targets", "LAYER_LOADER"]

#: Attribute of a model whose decoder layers live elsewhere (on disk) and are loaded one at a time: an object with
#: ``load(index, layer, device)`` and ``release(index, layer)`` (see :mod:`calibprune.pruning.streaming`).
LAYER_LOADER = "calibprune_layer_loader"


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ``nn.ModuleList`` of identical blocks holding the most parameters.

    Returns ``(dotted name, ModuleList)``; raises ``ValueError`` when the model has none.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(block) for block in mod}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers: no nn.ModuleList of blocks containing "
                         "nn.Linear modules was found")
    return best[1], best[2]


def _prefixes(name: str) -> list[str]:
    """``a.b.c`` → ``["a.b.c", "a.b", "a"]``: the module and every module it lives under."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def _matches(pattern: str, rel_name: str, full_name: str, module: nn.Module) -> bool:
    """One target/ignore pattern, matched as llm-compressor matches: against the module's name or the name of any
    module it lives under (a plain ``model.layers.0`` or ``mlp`` takes that whole subtree). The pattern is
    ``re:<regex>`` (``re.match`` on the full name or a dotted prefix of it), a class name (``Linear``), or an
    fnmatch pattern on the layer-relative or full name (or a dotted prefix of either)."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.match(name) for name in _prefixes(full_name))
    if pattern in {cls.__name__ for cls in type(module).__mro__}:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for name in _prefixes(rel_name) + _prefixes(full_name))


def select_targets(layer: nn.Module, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = (),
                   prefix: str = "") -> dict[str, nn.Linear]:
    """Linear modules of one decoder layer to prune, by name relative to the layer (see ``PruneConfig.targets``).

    ``prefix`` is the layer's full dotted name (``model.layers.3``), for patterns written on full names.
    """
    found = {}
    for name, mod in layer.named_modules():
        if not isinstance(mod, nn.Linear) or "lm_head" in name:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if targets and not any(_matches(p, name, full, mod) for p in targets):
            continue
        if any(_matches(p, name, full, mod) for p in ignore):
            continue
        found[name] = mod
    return found
