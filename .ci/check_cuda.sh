#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu for sm_80 and sm_90 against torch's headers (no GPU needed).
# Usage: .ci/check_cuda.sh [file.cu ...]   (default: all of them; uses $NVCC or nvcc on PATH, and the active Python's torch). Fails on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
PY="${PYTHON:-python}"
command -v "$NVCC" >/dev/null || { echo "check_cuda: $NVCC not found" >&2; exit 1; }
mapfile -t INCS < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PYINC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
ABI="$("$PY" -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")"
flags=(-c -o /dev/null -O3 -std=c++17 --use_fast_math -lineinfo -Xcompiler -fPIC
       -DTORCH_EXTENSION_NAME=_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI="$ABI"
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
       -diag-suppress=3306 -Xcompiler -Wno-c++20-extensions -I"$PYINC")
for inc in "${INCS[@]}"; do flags+=(-I"$inc"); done
status=0
shopt -s nullglob
if [ $# -gt 0 ]; then sources=("$@"); else sources=(csrc/cuda/*.cu); fi
[ ${#sources[@]} -gt 0 ] || { echo "check_cuda: no csrc/cuda/*.cu files" >&2; exit 1; }
for src in "${sources[@]}"; do
  for arch in 80 90; do
    if "$NVCC" "${flags[@]}" -gencode "arch=compute_${arch},code=sm_${arch}" "$src"; then
      echo "ok    sm_${arch}  $src"
    else
      echo "FAIL  sm_${arch}  $src" >&2
      status=1
    fi
  done
done
exit $status
