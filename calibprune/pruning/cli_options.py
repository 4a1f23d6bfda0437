"""``calibprune prune`` options generated from the config dataclasses and the registry, so CLI and API cannot drift.

Every field of :class:`PruneConfig` becomes a flag (``batch_size`` → ``--batch-size``), every method-only field too
(``--blocksize``: sparsegpt, sparsegpt-reference), and every option of a registered profile or refiner gets the
registry name as prefix (OWL's ``m`` → ``--owl-m``, DSnoT's ``max_cycles`` → ``--dsnot-max-cycles``). A flag the
chosen method does not take is an error that names it, never silently dropped.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from ..ops._backend import BACKENDS
from .api import make_config
from .config import NUMERICS, PruneConfig, option_fields
from .recipe import load_recipe
from .registry import CONFIGS, PROFILES, REFINERS

__all__ = ["add_prune_options", "config_from_args"]

# Fields a recipe cannot express; with --recipe they may still be given on the command line.
_RUNTIME = {"numerics", "batch_size", "device", "workers", "offload_activations", "activations", "report_errors",
            "backend", "refine", "resume"}
# Prefixes of the argparse destinations, so that the three kinds of option never collide.
_CFG, _PROFILE, _REFINE = "cfg__", "profile__", "refine__"


def _doc_attributes(cls: type) -> dict[str, str]:
    """``name: text`` lines under ``Attributes:`` of a dataclass docstring, as help strings."""
    helps: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").split("Attributes:", 1)[-1].splitlines():
        m = re.match(r"\s{8}(\w+): (.*)", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2).strip().replace("``", "")
        elif current and line.strip():
            helps[current] += " " + line.strip().replace("``", "")
    return helps


def _sparsity(text: str) -> float | tuple[float, ...]:
    """``"0.6"`` → 0.6; ``"0.5,0.6,0.7"`` → one sparsity per decoder layer."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number or a comma list of numbers, got {text!r}") \
            from None
    if not values:
        raise argparse.ArgumentTypeError("sparsity is empty")
    return values[0] if len(values) == 1 and "," not in text else values


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _argument(parser: argparse._ActionsContainer, flag: str, dest: str, f: dataclasses.Field, help_text: str,
              choices: tuple | None = None) -> None:
    default = _default(f)
    shown = "0.6 (N/M for N:M)" if f.name == "sparsity" else default
    help_text = f"{help_text} (default: {shown})".replace("%", "%%")  # argparse formats help with %
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text,
                          "metavar": f.name.upper()}
    if f.name == "sparsity":
        kw.update(type=_sparsity, metavar="S[,S...]")
    elif isinstance(default, bool) or (default is None and str(f.type).replace(" ", "") == "bool|None"):
        kw.pop("metavar")
        kw["action"] = argparse.BooleanOptionalAction
    elif isinstance(default, tuple):
        kw.update(nargs="*", type=str)
    elif choices is not None:
        kw.pop("metavar")
        kw["choices"] = choices
    elif isinstance(default, (int, float)):
        kw["type"] = type(default)
    elif default is None and str(f.type).replace(" ", "") in ("int|None", "float|None"):
        kw["type"] = int if str(f.type).startswith("int") else float
    else:
        kw["type"] = str
    parser.add_argument(flag, **kw)


def add_prune_options(parser: argparse.ArgumentParser) -> None:
    """Add the method, recipe, common, method-only, profile and refiner options to ``parser``."""
    g = parser.add_argument_group("method")
    g.add_argument("--method", choices=tuple(CONFIGS), default=None,
                   help="pruning method (default: sparsegpt, or the recipe's)")
    g.add_argument("--recipe", default=None, metavar="RECIPE.yaml",
                   help="llm-compressor recipe with a SparseGPTModifier or WandaPruningModifier (sets the method and "
                        "its fields; runtime options such as --batch-size or --numerics may be added)")
    choices = {"sparsity_profile": ("uniform", *PROFILES), "refine": tuple(REFINERS), "numerics": NUMERICS,
               "backend": ("auto", *BACKENDS)}
    common = parser.add_argument_group("options of every method")
    helps = _doc_attributes(PruneConfig)
    common_names = {f.name for f in option_fields(PruneConfig)}
    for f in option_fields(PruneConfig):
        if f.name in ("profile_options", "refine_options"):
            continue
        _argument(common, "--" + f.name.replace("_", "-"), _CFG + f.name, f, helps.get(f.name, ""),
                  choices.get(f.name))
    own: dict[str, tuple[dataclasses.Field, list[str], str]] = {}
    for method, cls in CONFIGS.items():
        cls_help = _doc_attributes(cls)
        for f in option_fields(cls):
            if f.name not in common_names:
                entry = own.setdefault(f.name, (f, [], cls_help.get(f.name, "")))
                entry[1].append(method)
    specific = parser.add_argument_group("method-specific options")
    for name, (f, methods, text) in own.items():
        _argument(specific, "--" + name.replace("_", "-"), _CFG + name, f, f"[{', '.join(methods)}] {text}",
                  choices.get(name))
    for kind, table, dest in (("sparsity_profile", PROFILES, _PROFILE), ("refine", REFINERS, _REFINE)):
        for reg_name, cls in table.items():
            group = parser.add_argument_group(f"{reg_name} options (with --{kind.replace('_', '-')} {reg_name})")
            opt_help = _doc_attributes(cls.options_class)
            for f in option_fields(cls.options_class):
                _argument(group, f"--{reg_name}-{f.name.replace('_', '-')}", f"{dest}{reg_name}__{f.name}", f,
                          opt_help.get(f.name, ""))


def _flag(dest: str) -> str:
    return "--" + dest.split("__")[-1].replace("_", "-") if dest.startswith(_CFG) else \
        "--" + "-".join(dest.split("__")[1:]).replace("_", "-")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The typed config the parsed ``prune`` options describe; a flag the method cannot take is a ``ValueError``."""
    given = {k[len(_CFG):]: v for k, v in vars(args).items() if k.startswith(_CFG)}
    for kind, prefix, option_key, chosen_key in (("sparsity_profile", _PROFILE, "profile_options",
                                                  "sparsity_profile"), ("refine", _REFINE, "refine_options",
                                                                        "refine")):
        extra = {k: v for k, v in vars(args).items() if k.startswith(prefix)}
        for dest, value in extra.items():
            name, field_name = dest[len(prefix):].split("__", 1)
            if given.get(chosen_key) != name:
                raise ValueError(f"{_flag(dest)} needs --{kind.replace('_', '-')} {name}")
            given.setdefault(option_key, {})[field_name] = value
    if args.recipe:
        recipe_only = sorted(set(given) - _RUNTIME - {"refine_options"})
        if recipe_only:
            flags = ", ".join("--" + k.replace("_", "-") for k in recipe_only)
            raise ValueError(f"--recipe sets {flags}; give them in the recipe or drop --recipe")
        config = load_recipe(args.recipe, **given)
        if args.method is not None and args.method != config.method:
            raise ValueError(f"--method {args.method} contradicts the recipe's {config.method}")
        return config
    method = args.method or "sparsegpt"
    known = {f.name for f in option_fields(CONFIGS[method])}
    foreign = sorted(set(given) - known)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise ValueError(f"{flags} {'is not an option' if len(foreign) == 1 else 'are not options'} of method "
                         f"{method}")
    return make_config(method, **given)
