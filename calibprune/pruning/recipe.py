"""llm-compressor recipes: run a ``SparseGPTModifier`` / ``WandaPruningModifier`` recipe with calibprune.

A recipe is YAML or JSON in llm-compressor's layout::

    sparsity_stage:
      run_type: oneshot
      sparsity_modifiers:
        SparseGPTModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]

Its fields map onto calibprune's config (``block_size`` → ``blocksize``, ``dampening_frac`` → ``percdamp``,
``mask_structure`` → ``pattern``, ``owl_m`` / ``owl_lmbda`` → OWL's options). Anything calibprune cannot honour —
an unknown modifier or field, a second pruning modifier, ``preserve_sparsity_mask: true`` — is an error that names
it; nothing is silently ignored.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .api import make_config
from .config import PruneConfig

log = logging.getLogger(__name__)

__all__ = ["load_recipe", "recipe_config", "MODIFIERS"]

#: llm-compressor modifier -> calibprune method
MODIFIERS = {"SparseGPTModifier": "sparsegpt", "WandaPruningModifier": "wanda"}

# Fields both modifiers share (llm-compressor's SparsityModifierBase), then each modifier's own.
_COMMON = {"sparsity", "sparsity_profile", "mask_structure", "owl_m", "owl_lmbda", "targets", "ignore",
           "sequential_update", "sequential_targets"}
_FIELDS = {"SparseGPTModifier": _COMMON | {"block_size", "dampening_frac", "preserve_sparsity_mask",
                                           "offload_hessians"},
           "WandaPruningModifier": set(_COMMON)}
# Target spellings that mean "every prunable Linear".
_ALL = {"Linear", "__ALL__", "__ALL_PRUNABLE__"}


def _parse_text(text: str, origin: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {origin} is neither valid YAML nor JSON: {exc}") from None


def _modifiers(recipe: Mapping[str, Any], origin: str) -> list[tuple[str, str, dict]]:
    """``(where, modifier name, fields)`` for every modifier of every stage, in order."""
    found: list[tuple[str, str, dict]] = []

    def group(where: str, mods: Any) -> None:
        if not isinstance(mods, Mapping):
            raise ValueError(f"recipe {origin}: {where} must map modifier names to their fields")
        for name, fields in mods.items():
            if fields is None:
                fields = {}
            if not isinstance(fields, Mapping):
                raise ValueError(f"recipe {origin}: {where}.{name} must be a mapping of fields")
            found.append((f"{where}.{name}", str(name), dict(fields)))

    for key, value in recipe.items():
        if key.endswith("_stage"):
            if not isinstance(value, Mapping):
                raise ValueError(f"recipe {origin}: stage {key} must be a mapping")
            for sub, mods in value.items():
                if sub.endswith("_modifiers"):
                    group(f"{key}.{sub}", mods)
                elif sub == "run_type":
                    if mods != "oneshot":
                        raise ValueError(f"recipe {origin}: {key}.run_type {mods!r}: calibprune runs oneshot only")
                else:
                    raise ValueError(f"recipe {origin}: unknown key {key}.{sub} (a stage holds run_type and "
                                     "*_modifiers groups)")
        elif key.endswith("_modifiers"):
            group(key, value)
        else:
            raise ValueError(f"recipe {origin}: unknown top-level key {key!r} (expected *_stage or *_modifiers)")
    return found


def recipe_config(recipe: Mapping[str, Any], *, origin: str = "<recipe>", **overrides: Any) -> PruneConfig:
    """The calibprune config of a parsed recipe; ``overrides`` are calibprune options the recipe cannot express
    (``batch_size``, ``device``, ``numerics``, ``backend``…)."""
    if not isinstance(recipe, Mapping):
        raise ValueError(f"recipe {origin} must be a mapping of stages, got {type(recipe).__name__}")
    mods = _modifiers(recipe, origin)
    if not mods:
        raise ValueError(f"recipe {origin} holds no modifier")
    unknown = [where for where, name, _ in mods if name not in MODIFIERS]
    if unknown:
        raise ValueError(f"recipe {origin}: calibprune runs {' and '.join(MODIFIERS)} only; it cannot run "
                         f"{', '.join(unknown)}")
    if len(mods) > 1:
        raise ValueError(f"recipe {origin} has {len(mods)} pruning modifiers ({', '.join(w for w, _, _ in mods)}); "
                         "calibprune runs one per prune")
    where, name, fields = mods[0]
    bad = sorted(set(fields) - _FIELDS[name])
    if bad:
        raise ValueError(f"recipe {origin}: {where} has unknown field(s) {bad}; {name} takes "
                         f"{', '.join(sorted(_FIELDS[name]))}")
    options: dict[str, Any] = {}
    if "sparsity" in fields:
        sparsity = fields["sparsity"]
        if isinstance(sparsity, Mapping):
            raise ValueError(f"recipe {origin}: {where}.sparsity as a mapping is not supported; give a number or "
                             "one number per decoder layer")
        options["sparsity"] = tuple(sparsity) if isinstance(sparsity, list) else sparsity
    if fields.get("mask_structure") is not None:
        options["pattern"] = str(fields["mask_structure"])
    profile = fields.get("sparsity_profile")
    if profile is not None:
        options["sparsity_profile"] = str(profile).lower()
    owl = {k: fields[f] for k, f in (("m", "owl_m"), ("lmbda", "owl_lmbda")) if fields.get(f) is not None}
    if owl:
        if options.get("sparsity_profile") != "owl":
            raise ValueError(f"recipe {origin}: {where} sets owl_m / owl_lmbda without sparsity_profile: owl")
        options["profile_options"] = owl
    for key in ("targets", "ignore"):
        value = fields.get(key)
        if value is None:
            continue
        patterns = [value] if isinstance(value, str) else list(value)
        if key == "targets" and any(p in _ALL for p in patterns):
            patterns = []
        options[key] = tuple(patterns)
    if fields.get("sequential_targets") not in (None, [], ""):
        raise ValueError(f"recipe {origin}: {where}.sequential_targets is not supported: calibprune always prunes "
                         "decoder layer by decoder layer")
    if "sequential_update" in fields and not fields["sequential_update"]:
        log.warning("recipe %s: sequential_update=false is deprecated in llm-compressor too; pruning runs "
                    "sequentially, layer by layer", origin)
    if name == "SparseGPTModifier":
        if fields.get("block_size") is not None:
            options["blocksize"] = fields["block_size"]
        if fields.get("dampening_frac") is not None:
            options["percdamp"] = fields["dampening_frac"]
        if fields.get("preserve_sparsity_mask"):
            raise ValueError(f"recipe {origin}: {where}.preserve_sparsity_mask: true is not supported")
        if fields.get("offload_hessians"):
            raise ValueError(f"recipe {origin}: {where}.offload_hessians: true is not supported (calibprune holds "
                             "one decoder layer's Hessians at a time; use offload_activations for memory)")
    clash = sorted(set(options) & set(overrides))
    if clash:
        raise ValueError(f"{', '.join(clash)} given both in recipe {origin} and as options; set it in one place")
    return make_config(MODIFIERS[name], **options, **overrides)


def load_recipe(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> PruneConfig:
    """A config from a recipe file (``.yaml``, ``.yml``, ``.json``), a YAML/JSON string or a parsed mapping."""
    if isinstance(source, Mapping):
        return recipe_config(source, **overrides)
    path = Path(source)
    text = str(source)
    if "\n" not in text and path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} not found")
        return recipe_config(_parse_text(path.read_text(), str(path)), origin=str(path), **overrides)
    return recipe_config(_parse_text(text, "<string>"), **overrides)
