"""Build script for calibprune.

The Python package always installs. Native extensions are optional and built only when their toolchain is there:

* ``calibprune._cpp``  — C++/OpenMP CPU kernels from ``csrc/cpu/*.cpp`` (needs a C++ compiler and torch).
* ``calibprune._cuda`` — CUDA kernels from ``csrc/cuda/*.{cu,cpp}`` (needs nvcc and a CUDA-enabled torch).

Environment switches (``auto`` unless set):

* ``CALIBPRUNE_BUILD_CPP=0|1``   skip / force the C++ CPU extension (force fails the install if it cannot build).
* ``CALIBPRUNE_BUILD_CUDA=0|1``  skip / force the CUDA extension (likewise).
* ``TORCH_CUDA_ARCH_LIST``       architectures for the CUDA build (default ``8.0;9.0+PTX``: sm_80 and sm_90 code,
  plus sm_90 PTX that newer GPUs compile at load).
* ``CALIBPRUNE_PTXAS_VERBOSE=1`` pass ``-Xptxas=-v`` (registers, spills, shared memory per kernel) to nvcc.
* ``CALIBPRUNE_DEBUG_SYMBOLS=1`` keep the host compiler's debug information. By default ``-g0`` overrides the
  ``-g`` that Python's own ``CFLAGS`` add: with it, the C++ extension was a 20.7 MB shared object.

The Triton kernels live in the repository's top-level ``kernels/`` folder, which has no ``__init__.py``: it is
never a regular top-level package, so a checkout on ``sys.path`` cannot shadow an installed distribution named
``kernels`` (Hugging Face's, which transformers >= 5.25 imports). ``calibprune/kernels`` is a symbolic link to that
folder, so ``calibprune.kernels`` is a namespace subpackage of ``calibprune`` both in an editable install and in
the wheel (where the files are copied in).

The C++ standard is not set here: torch's ``BuildExtension`` adds the one its headers need (C++20 from torch 2.13;
hard-coding C++17 broke the build on torch >= 2.14). Torch must already be installed (``pip install
--no-build-isolation .``) for the extensions to build. In ``auto`` mode a failed build does not fail the install:
it prints a banner, and records the failure in ``calibprune/_build_status.json``, which the runtime reads to say in
its first fallback log line which extension is missing and why.
"""
from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import sys
import textwrap

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

# Flags of record: .ci/check_cuda.sh reads these three assignments (keep them literal).
CXX_FLAGS = ["-O3", "-fopenmp"]
# No --use_fast_math: the OBS kernel claims the reference's exact arithmetic (fast math flushes denormals and
# approximates division), and no other kernel here has a transcendental or divide hot spot where it would pay.
NVCC_FLAGS = ["-O3", "-lineinfo"]
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

STATUS_NAME = "_build_status.json"


def _host_debug_flags() -> list[str]:
    return [] if os.environ.get("CALIBPRUNE_DEBUG_SYMBOLS") == "1" else ["-g0"]


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in {"0", "1", "auto"}:
        raise SystemExit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def _banner(ext_name: str, exc: BaseException, switch: str) -> str:
    detail = textwrap.indent(textwrap.shorten(str(exc) or type(exc).__name__, 600), "    ")
    line = "!" * 100
    return (f"\n{line}\n"
            f"WARNING: the optional native extension {ext_name} FAILED TO BUILD; calibprune is installed without it.\n"
            f"{detail}\n"
            f"  The {'cpp' if ext_name.endswith('_cpp') else 'cuda'} backend is unavailable: backend='auto' falls "
            "back to the torch/Triton backends (slower), and an explicit backend raises.\n"
            f"  Diagnose: {switch}=1 pip install -v --no-build-isolation -e .   (forces the build and shows the "
            "compiler's full error)\n"
            f"  Skip it quietly: {switch}=0.   Check what the runtime sees: python -c \"import calibprune.ops as o; "
            "print(o.available_backends('cpu'))\"\n"
            f"{line}\n")


def make_build_ext(base: type[build_ext], forced: set[str], status: dict) -> type[build_ext]:
    """``base`` (torch's ``BuildExtension``) made optional per extension: in auto mode a failure prints a banner and
    is recorded in ``status`` (written to ``_build_status.json`` next to the built extensions — in the source tree
    for editable installs), never failing the install; an extension in ``forced`` fails it."""

    class OptionalBuildExt(base):
        def run(self):
            try:
                super().run()
            finally:
                self._write_status()

        def build_extension(self, ext):
            switch = "CALIBPRUNE_BUILD_CPP" if ext.name.endswith("_cpp") else "CALIBPRUNE_BUILD_CUDA"
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                status[ext.name] = {"status": "failed", "error": textwrap.shorten(str(exc) or repr(exc), 400),
                                    "switch": switch}
                if ext.name in forced:
                    raise
                sys.stderr.write(_banner(ext.name, exc, switch))
                sys.stderr.flush()
            else:
                status[ext.name] = {"status": "built"}

        def _write_status(self):
            status["time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            target = os.path.dirname(self.get_ext_fullpath("calibprune._status"))
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, STATUS_NAME), "w") as fh:
                json.dump(status, fh, indent=1, sort_keys=True)

    return OptionalBuildExt


def _extensions() -> tuple[list, type[build_ext], dict]:
    cpp_switch, cuda_switch = _switch("CALIBPRUNE_BUILD_CPP"), _switch("CALIBPRUNE_BUILD_CUDA")
    status: dict = {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if "1" in (cpp_switch, cuda_switch):
            raise SystemExit("native extensions were forced but torch is not importable in the build environment; "
                             "install torch first and use pip install --no-build-isolation") from None
        reason = "torch was not importable at build time (use pip install --no-build-isolation)"
        status = {name: {"status": "skipped", "reason": reason} for name in ("calibprune._cpp", "calibprune._cuda")}
        return [], build_ext, status

    status["torch"] = torch.__version__
    forced: set[str] = set()
    exts = []
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if cpp_switch == "0":
        status["calibprune._cpp"] = {"status": "skipped", "reason": "CALIBPRUNE_BUILD_CPP=0"}
    elif cpp_sources:
        exts.append(cpp_extension.CppExtension("calibprune._cpp", cpp_sources,
                                               extra_compile_args=CXX_FLAGS + _host_debug_flags(),
                                               extra_link_args=["-fopenmp"]))
        if cpp_switch == "1":
            forced.add("calibprune._cpp")

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))
                          + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    has_cuda_toolchain = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if cuda_switch == "0":
        status["calibprune._cuda"] = {"status": "skipped", "reason": "CALIBPRUNE_BUILD_CUDA=0"}
    elif cuda_sources and (cuda_switch == "1" or has_cuda_toolchain):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        nvcc = list(NVCC_FLAGS)
        if os.environ.get("CALIBPRUNE_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        exts.append(cpp_extension.CUDAExtension("calibprune._cuda", cuda_sources,
                                                extra_compile_args={"cxx": ["-O3", *_host_debug_flags()],
                                                                    "nvcc": nvcc}))
        status["cuda_arch_list"] = os.environ["TORCH_CUDA_ARCH_LIST"]
        if cuda_switch == "1":
            forced.add("calibprune._cuda")
    else:
        why = ("torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA toolkit found (CUDA_HOME / nvcc)")
        status["calibprune._cuda"] = {"status": "skipped", "reason": f"auto mode: {why}"}

    cls = make_build_ext(cpp_extension.BuildExtension, forced, status)
    return exts, cls.with_options(use_ninja=os.environ.get("CALIBPRUNE_USE_NINJA", "1") == "1"), status


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import its helpers
    ext_modules, build_ext_cls, _status = _extensions()
    setup(
        packages=find_packages(include=["calibprune", "calibprune.*"]) + ["calibprune.kernels"],
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext_cls},
    )
