#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu with the flags the real build uses (no GPU needed):
#   * setup.py's NVCC_FLAGS and DEFAULT_ARCH_LIST (read from the file, not copied here; the gencode list comes from
#     torch's own _get_cuda_arch_flags, as in BuildExtension; TORCH_CUDA_ARCH_LIST overrides it, as in setup.py),
#   * torch's COMMON_NVCC_FLAGS and the C++ standard torch's BuildExtension adds (setup.py sets none),
#   * torch's include paths (a CPU build of torch lacks the c10/cuda config header; csrc/cuda/common.cuh handles it).
# Usage: .ci/check_cuda.sh [--print-flags] [--ptxas-log FILE] [file.cu ...]
#   --print-flags    print the nvcc flags (one per line) and exit
#   --ptxas-log F    add -Xptxas=-v and collect its register/spill/shared-memory report in F
# Uses $NVCC or nvcc on PATH and the active Python's torch. Fails on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
PY="${PYTHON:-python}"
print_only=0
ptxas_log=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --print-flags) print_only=1 ;;
    --ptxas-log) ptxas_log="$2"; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

mapfile -t FLAGS < <("$PY" - <<'EOF'
import ast, inspect, os, re, sysconfig
import torch
from torch.utils import cpp_extension as ce

consts = {}
for node in ast.parse(open("setup.py").read()).body:
    if isinstance(node, ast.Assign):
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id in ("NVCC_FLAGS", "DEFAULT_ARCH_LIST"):
                consts[target.id] = ast.literal_eval(node.value)
m = re.search(r"cpp_flag_prefix \+ '(c\+\+\d+)'", inspect.getsource(ce.BuildExtension))
std = m.group(1) if m else "c++17"  # what BuildExtension appends when the extension sets no -std
os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or consts["DEFAULT_ARCH_LIST"]
flags = list(consts["NVCC_FLAGS"]) + list(ce.COMMON_NVCC_FLAGS) + ce._get_cuda_arch_flags() + [f"-std={std}"]
flags += ["-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
          f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
          "-diag-suppress=3306", "-I" + sysconfig.get_paths()["include"]]
flags += ["-I" + p for p in ce.include_paths()]
print("\n".join(flags))
EOF
)
[ ${#FLAGS[@]} -gt 0 ] || { echo "check_cuda: could not derive the flags from setup.py and torch" >&2; exit 1; }
if [ "$print_only" = 1 ]; then printf '%s\n' "${FLAGS[@]}"; exit 0; fi

command -v "$NVCC" >/dev/null || { echo "check_cuda: $NVCC not found" >&2; exit 1; }
extra=()
[ -n "$ptxas_log" ] && { extra+=(-Xptxas=-v); : > "$ptxas_log"; }
status=0
shopt -s nullglob
if [ ${#args[@]} -gt 0 ]; then sources=("${args[@]}"); else sources=(csrc/cuda/*.cu); fi
[ ${#sources[@]} -gt 0 ] || { echo "check_cuda: no csrc/cuda/*.cu files" >&2; exit 1; }
gencodes=$(printf '%s\n' "${FLAGS[@]}" | grep -- '-gencode' | sed 's/.*code=//' | tr '\n' ' ')
for src in "${sources[@]}"; do
  log=$(mktemp)
  if "$NVCC" -c -o /dev/null "${FLAGS[@]}" "${extra[@]}" "$src" 2>"$log"; then
    echo "ok    [$gencodes]  $src"
  else
    cat "$log" >&2
    echo "FAIL  [$gencodes]  $src" >&2
    status=1
  fi
  if [ -n "$ptxas_log" ]; then { echo "== $src"; cat "$log"; } >> "$ptxas_log"; fi
  rm -f "$log"
done
exit $status
