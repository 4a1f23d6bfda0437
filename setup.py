"""Build script for calibprune.

The Python package always installs. Native extensions are optional and built only when their toolchain is there:

* ``calibprune._cpp``  — C++/OpenMP CPU kernels from ``csrc/cpu/*.cpp`` (needs a C++ compiler and torch).
* ``calibprune._cuda`` — CUDA kernels from ``csrc/cuda/*.{cu,cpp}`` (needs nvcc and a CUDA-enabled torch).

Environment switches (``auto`` unless set):

* ``CALIBPRUNE_BUILD_CPP=0|1``   skip / force the C++ CPU extension.
* ``CALIBPRUNE_BUILD_CUDA=0|1``  skip / force the CUDA extension (force fails loudly if it cannot build).
* ``TORCH_CUDA_ARCH_LIST``       architectures for the CUDA build (default ``8.0;9.0``).

Torch must already be installed (``pip install --no-build-isolation .``) for the extensions to build; without it,
or when a build fails in ``auto`` mode, the install still succeeds and the Triton/torch backends serve.
"""
from __future__ import annotations

import glob
import logging
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

log = logging.getLogger("calibprune.setup")
HERE = os.path.dirname(os.path.abspath(__file__))


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in {"0", "1", "auto"}:
        raise SystemExit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def _extensions() -> tuple[list, type[build_ext]]:
    cpp_switch, cuda_switch = _switch("CALIBPRUNE_BUILD_CPP"), _switch("CALIBPRUNE_BUILD_CUDA")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if "1" in (cpp_switch, cuda_switch):
            raise SystemExit("native extensions were forced but torch is not importable in the build environment; "
                             "install torch first and use pip install --no-build-isolation") from None
        return [], build_ext

    forced: set[str] = set()
    exts = []
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if cpp_switch != "0" and cpp_sources:
        exts.append(cpp_extension.CppExtension(
            "calibprune._cpp", cpp_sources,
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17"], extra_link_args=["-fopenmp"]))
        if cpp_switch == "1":
            forced.add("calibprune._cpp")

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))
                          + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    has_cuda_toolchain = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if cuda_sources and (cuda_switch == "1" or (cuda_switch == "auto" and has_cuda_toolchain)):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        exts.append(cpp_extension.CUDAExtension(
            "calibprune._cuda", cuda_sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]}))
        if cuda_switch == "1":
            forced.add("calibprune._cuda")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds each extension; in auto mode a failure is a warning, never a failed install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if ext.name in forced:
                    raise
                sys.stderr.write(f"WARNING: optional extension {ext.name} was not built ({exc}); "
                                 "calibprune falls back to its torch/Triton backends.\n")

    return exts, OptionalBuildExt.with_options(use_ninja=os.environ.get("CALIBPRUNE_USE_NINJA", "1") == "1")


ext_modules, build_ext_cls = _extensions()

setup(
    packages=find_packages(include=["calibprune", "calibprune.*"]) + ["calibprune.kernels"],
    package_dir={"calibprune.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_cls},
)
