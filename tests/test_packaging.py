"""The checkout never shadows an installed distribution, and the installed package is whole.

transformers 5.25 began importing Hugging Face's ``kernels`` distribution; the repository's top-level ``kernels/``
folder, then a regular package, shadowed it whenever the repository root was on ``sys.path`` (``python -m
pytest``, ``python -m calibprune``, ``python -c`` from the root), and README's test command went red overnight.
These tests fail on the next such collision, whichever distribution brings it.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "calibprune"
# Every folder the project itself puts first on sys.path: the root (``python -c`` / ``-m`` run from it, and pytest's
# rootdir insertion through tests/__init__.py), tests/ (conftest.py) and benchmarks/ (each benchmark script).
SEARCH_FOLDERS = (ROOT, ROOT / "tests", ROOT / "benchmarks")
MODULE_SUFFIXES = tuple(importlib.machinery.all_suffixes())


def _top_level_names(folder: Path) -> dict[str, str]:
    """``{name: kind}`` of what ``import name`` could find in ``folder``: a module file, a regular package (a folder
    with ``__init__.py``) or a namespace portion (any other folder whose name is an identifier)."""
    names: dict[str, str] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_file():
            suffix = next((s for s in MODULE_SUFFIXES if entry.name.endswith(s)), None)
            stem = entry.name[: -len(suffix)] if suffix else ""
            if stem.isidentifier():
                names.setdefault(stem, "module")
        elif entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = "package" if (entry / "__init__.py").is_file() else "namespace folder"
    return names


def _installed_top_levels() -> dict[str, list[str]]:
    """Top-level module name -> the installed distributions (other than calibprune itself) that provide it."""
    provided = importlib.metadata.packages_distributions()
    return {name: others for name, dists in provided.items()
            if (others := sorted({d for d in dists if d.lower() != OWN_DISTRIBUTION}))}


def _run_python(code: str, *, cwd: Path, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)] if code else [sys.executable, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_no_module_or_package_in_the_checkout_shares_a_name_with_an_installed_distribution():
    installed = _installed_top_levels()
    clashes = [f"{(folder / name).relative_to(ROOT)} ({kind}) shadows the top-level module {name!r} of "
               f"{', '.join(installed[name])}"
               for folder in SEARCH_FOLDERS for name, kind in _top_level_names(folder).items()
               if kind != "namespace folder" and name in installed]
    assert not clashes, ("a name that Python finds first whenever this folder is on sys.path:\n  "
                         + "\n  ".join(clashes) + "\nrename it, or make the folder a namespace folder (no __init__.py)")


def test_a_namespace_folder_in_the_checkout_never_takes_over_an_installed_distribution():
    """A folder without ``__init__.py`` loses to a regular package anywhere on sys.path; check it in a fresh
    interpreter whose first path entry is the folder, and that it does not merge into an installed namespace."""
    installed = _installed_top_levels()
    probes = [(folder, name) for folder in SEARCH_FOLDERS for name, kind in _top_level_names(folder).items()
              if kind == "namespace folder" and name in installed]
    if not probes:
        pytest.skip("no folder of the checkout shares its name with an installed distribution's module")
    for folder, name in probes:
        done = _run_python(f"""
            import importlib.util, sys
            sys.path.insert(0, {str(folder)!r})
            spec = importlib.util.find_spec({name!r})
            print(spec.origin)
            print(*(spec.submodule_search_locations or ()), sep="\\n")
        """, cwd=folder)
        assert done.returncode == 0, done.stderr
        inside = [line for line in done.stdout.splitlines() if line.startswith(str(folder / name))]
        assert not inside, (f"`import {name}` with {folder} first on sys.path resolves into the checkout "
                            f"({inside}) instead of {', '.join(installed[name])}")


def test_the_triton_kernels_folder_is_never_a_top_level_package():
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/ must stay a plain folder: with an __init__.py it shadows Hugging Face's `kernels` distribution")
    link = ROOT / "calibprune" / "kernels"
    if link.exists():  # a checkout (the installed wheel holds real files there)
        assert link.resolve() == (ROOT / "kernels").resolve(), (
            f"calibprune/kernels must be the symbolic link ../kernels; found {link} -> {link.resolve()} "
            "(a checkout with core.symlinks=false? clone with symlinks enabled)")


def test_transformers_hub_kernels_imports_with_the_repository_root_first_on_sys_path():
    if importlib.util.find_spec("transformers.integrations.hub_kernels") is None:
        pytest.skip("this transformers has no integrations.hub_kernels")
    done = _run_python(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import transformers.integrations.hub_kernels
        import calibprune, calibprune.ops
        print("ok")
    """, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_python_c_and_python_m_work_from_the_repository_root():
    """README-style use from the root: ``python -c`` building a model (which imports transformers' modeling code)
    and pruning it, and ``python -m calibprune``."""
    done = _run_python("""
        import calibprune, torch, transformers
        from transformers import AutoModelForCausalLM, LlamaConfig
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        model = AutoModelForCausalLM.from_config(config)
        report = calibprune.prune_magnitude(model, sparsity=0.5)
        print(round(report.sparsity, 3))
    """, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert abs(float(done.stdout.strip().splitlines()[-1]) - 0.5) < 0.01, done.stdout
    done = _run_python("", cwd=ROOT, args=("-m", "calibprune", "--help"))
    assert done.returncode == 0 and "prune" in done.stdout, done.stderr[-3000:]


def _elf_section_names(path: Path) -> list[str]:
    """Section names of a 64-bit little-endian ELF file (enough to tell whether it carries debug information)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        pytest.skip(f"{path.name} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_offset = headers[shstrndx][4]
    return [data[strtab_offset + h[0]: data.index(b"\0", strtab_offset + h[0])].decode() for h in headers]


INSTALLED_CHECK = os.environ.get("CALIBPRUNE_TEST_INSTALLED_OUTSIDE")


@pytest.mark.skipif(not INSTALLED_CHECK, reason="set CALIBPRUNE_TEST_INSTALLED_OUTSIDE=<checkout> (.ci/run's wheel "
                                                "step does) to check an installed wheel")
def test_the_installed_wheel_is_whole_and_not_the_checkout():
    import calibprune
    import calibprune.ops as ops

    package = Path(calibprune.__file__).resolve().parent
    checkout = Path(INSTALLED_CHECK).resolve()
    assert checkout not in package.parents, f"calibprune was imported from the checkout ({package}), not the wheel"
    kernels = package / "kernels"
    assert kernels.is_dir() and not kernels.is_symlink(), f"the wheel has no calibprune/kernels folder ({kernels})"
    assert sorted(p.name for p in kernels.glob("*.py")) == sorted(p.name for p in (checkout / "kernels").glob("*.py"))
    import calibprune._cpp  # noqa: F401 - the C++ extension loads

    import calibprune.kernels.hessian  # noqa: F401 - the Triton kernels import
    import calibprune.kernels.ngram  # noqa: F401
    import calibprune.kernels.obs  # noqa: F401
    assert {"cpp", "triton"} <= set(ops.available_backends("cpu")), ops.available_backends("cpu")
    shared = next(package.glob("_cpp*.so"))
    debug = [name for name in _elf_section_names(shared) if name.startswith(".debug")]
    assert not debug, (f"{shared.name} ({shared.stat().st_size / 1e6:.1f} MB) carries debug sections {debug}; "
                       "the wheel is built without them unless CALIBPRUNE_DEBUG_SYMBOLS=1")
