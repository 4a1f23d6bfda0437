"""Backend plumbing: dtype fallback in ``auto``, empty shapes, the launch device guard, what a missing native
extension says, and the build flags (setup.py, .ci/check_cuda.sh)."""
from __future__ import annotations

import ast
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _compare import assert_masks_equal

from calibprune.ops import _backend, hessian_update, hessian_update_reference, obs_prune, obs_prune_reference

from ._backend_fixtures import backend_env  # noqa: F401 - pytest fixture

ROOT = Path(__file__).resolve().parents[2]


def _spd(d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 3 * d, generator=gen, dtype=torch.float64)
    return (A @ A.t() / (3 * d)).to(dtype)


# --- dtype: auto falls back, explicit raises -------------------------------------------------------------------------

def test_auto_takes_torch_for_fp64_obs():
    W = torch.randn(13, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H = _spd(24, 1, torch.float64)
    Wr = W.clone()
    mask_r, _ = obs_prune_reference(Wr, H.clone(), 0.5, blocksize=8)
    Wa = W.clone()
    mask = obs_prune(Wa, H.clone(), 0.5, blocksize=8, backend="auto")
    assert_masks_equal(mask, mask_r, name="mask (auto, fp64)")
    assert torch.equal(Wa, Wr) and Wa.dtype == torch.float64


def test_explicit_kernel_backend_refuses_fp64_clearly():
    if _backend.native_extension("_cpp") is None:
        pytest.skip("calibprune._cpp is not built")
    W = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot take these inputs: W is torch.float64"):
        obs_prune(W, _spd(8, 0, torch.float64), 0.5, blocksize=8, backend="cpp")


@pytest.mark.parametrize("H_dtype,X_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["X-fp64", "H-fp64"])
def test_auto_takes_torch_for_fp64_hessian(H_dtype, X_dtype):
    X = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2), dtype=X_dtype)
    H, expected = _spd(12, 3, H_dtype), _spd(12, 3, H_dtype)
    n = hessian_update(H, X, 3, backend="auto")
    assert n == hessian_update_reference(expected, X, 3)
    assert torch.equal(H, expected)


def test_auto_order_table():
    from calibprune.ops.hessian import SUPPORTED as HESSIAN
    from calibprune.ops.obs import SUPPORTED as OBS

    for (op, device, numerics), order in _backend.AUTO_ORDER.items():
        assert numerics in _backend.NUMERICS and device in ("cpu", "cuda")
        assert set(order) <= set({"obs_prune": OBS, "hessian_update": HESSIAN}[op]), (op, order)
        assert "triton" not in order or device == "cuda", "auto never picks the Triton interpreter on CPU"
    cpp = _backend.native_extension("_cpp") is not None
    for numerics in _backend.NUMERICS:
        got = _backend.resolve_backend("auto", "cpu", OBS, op="obs_prune", numerics=numerics)
        assert got == ("cpp" if cpp else "torch")


def test_resolve_backend_auto_skips_what_cannot_take():
    chosen = _backend.resolve_backend("auto", "cpu", ("torch", "cpp"), op="x", auto_order=("cpp", "torch"),
                                      cannot_take=lambda b: "no" if b == "cpp" else None)
    assert chosen == "torch"


# --- empty shapes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_env", ["torch", "cpp", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("shape", [(0, 16), (5, 0)], ids=["rows0", "cols0"])
def test_obs_empty_weight(backend_env, shape):
    backend, device, _ = backend_env
    rows, cols = shape
    W = torch.empty(rows, cols, device=device)
    mask, losses = obs_prune(W, torch.eye(cols, device=device), 0.5, blocksize=8, backend=backend,
                             return_losses=True)
    assert mask.shape == (rows, cols) and mask.dtype == torch.bool and losses.shape == (rows,)


@pytest.mark.parametrize("backend_env", ["torch", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("shape", [(3, 0, 7), (2, 4, 0)], ids=["tokens0", "d0"])
def test_hessian_empty_inputs(backend_env, shape):
    backend, device, _ = backend_env
    b, t, d = shape
    H = _spd(d, 5) if d else torch.empty(0, 0)
    X = torch.randn(b, t, d)
    expected = H.clone()
    Hd = H.clone().to(device)
    assert hessian_update(Hd, X.to(device), 4, backend=backend) == 4 + b
    if d:  # (the reference itself cannot reshape a 0-wide X)
        hessian_update_reference(expected, X, 4)
        assert torch.equal(Hd.cpu(), expected)


# --- Triton: device guard and the ragged N:M group -------------------------------------------------------------------

def test_launch_guard_targets_the_tensor_device():
    from calibprune.kernels._launch import launch_guard, same_device

    guard = launch_guard(torch.device("cuda", 1))  # constructing it touches no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with launch_guard(torch.device("cpu")):
        pass
    with pytest.raises(ValueError, match="one device"):
        same_device(torch.empty(1), torch.empty(1, device="meta"))


class _Recorder:
    """Stands in for a Triton kernel and for ``launch_guard``: records the guard's device and whether each launch
    happened inside the guard."""

    def __init__(self):
        self.guard_devices: list[torch.device] = []
        self.active: torch.device | None = None
        self.launches: list[tuple[str, torch.device | None]] = []

    def guard(self, device):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.guard_devices.append(torch.device(device))
                rec.active = torch.device(device)

            def __exit__(self, *exc):
                rec.active = None

        return _Ctx()

    def kernel(self, real, label: str):
        rec = self

        class _K:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.launches.append((label, rec.active))
                    return real[grid](*args, **kwargs)

                return launch

        return _K()


@pytest.mark.parametrize("backend_env", ["triton"], indirect=True)
def test_every_triton_launch_is_under_the_tensors_device(backend_env, monkeypatch):
    _, device, _ = backend_env
    import importlib

    from calibprune.ops import ngram_hashes

    # Through sys.modules (the fixture re-imports the kernel modules; the package attribute may be a stale copy).
    kh, kn, ko = (importlib.import_module(f"calibprune.kernels.{m}") for m in ("hessian", "ngram", "obs"))

    rec = _Recorder()
    for mod, name in ((ko, "_obs_block_kernel"), (kh, "_hessian_syrk_kernel"), (kn, "_ngram_hash_kernel")):
        monkeypatch.setattr(mod, "launch_guard", rec.guard)
        monkeypatch.setattr(mod, name, rec.kernel(getattr(mod, name), name))
    W = torch.randn(9, 16, device=device)
    obs_prune(W, _spd(16, 0).to(device), 0.5, blocksize=8, backend="triton")
    hessian_update(_spd(16, 1).to(device), torch.randn(2, 3, 16, device=device), 0, backend="triton")
    ngram_hashes(torch.randint(0, 50, (2, 9), device=device), 4, backend="triton")
    labels = [label for label, _ in rec.launches]
    assert labels == ["_obs_block_kernel"] * 2 + ["_hessian_syrk_kernel", "_ngram_hash_kernel"], labels
    assert all(dev == W.device for _, dev in rec.launches), f"a launch ran outside the guard: {rec.launches}"
    assert all(dev == W.device for dev in rec.guard_devices)


@pytest.mark.parametrize("backend_env", ["triton"], indirect=True)
def test_triton_nm_group_cut_at_the_block_end(backend_env):
    """A block whose width is not a multiple of m (not reachable through obs_prune, which requires m | blocksize):
    the last, short group ranks only its own columns, like the torch loop does."""
    _, device, _ = backend_env
    from calibprune.kernels.obs import obs_prune_triton
    from calibprune.ops import inverse_factor
    from calibprune.ops.obs.torch_impl import obs_prune_torch

    gen = torch.Generator().manual_seed(7)
    W = torch.randn(21, 6, generator=gen)
    H = _spd(6, 8)
    results = []
    for fn in (obs_prune_torch, obs_prune_triton):
        Wc = W.clone().to(device)
        mask, _ = fn(Wc, inverse_factor(H.clone().to(device), 0.01), 0.5, prune_n=1, prune_m=4, blocksize=6)
        results.append((mask.cpu(), Wc.cpu()))
    assert_masks_equal(results[1][0], results[0][0], name="mask (ragged N:M group)")
    assert torch.equal(results[1][1], results[0][1])
    assert results[0][0][:, 4:].sum(1).eq(1).all(), "the short group prunes one of its two columns"


# --- missing native extensions say which and why ---------------------------------------------------------------------

def test_missing_extension_names_itself_and_the_build_failure(tmp_path, monkeypatch, caplog):
    status = {"calibprune._cpp": {"status": "failed", "error": "csrc/cpu/obs.cpp:3: error: boom"},
              "calibprune._cuda": {"status": "skipped", "reason": "auto mode: torch is a CPU-only build"}}
    path = tmp_path / "_build_status.json"
    path.write_text(json.dumps(status))
    monkeypatch.setattr(_backend, "BUILD_STATUS_FILE", path)
    msg = _backend.missing_reason("_cpp")
    assert "calibprune._cpp" in msg and "build failed at install time" in msg and "boom" in msg
    assert "CALIBPRUNE_BUILD_CPP=1" in msg
    assert "torch is a CPU-only build" in _backend.missing_reason("_cuda")

    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_backend.importlib, "import_module", fail)
    with caplog.at_level(logging.WARNING, logger="calibprune.ops._backend"):
        assert _backend.native_extension.__wrapped__("_cpp") is None
    first = caplog.records[0].getMessage()
    assert first.startswith("calibprune._cpp is not available: its build failed at install time"), first


def test_explicit_missing_backend_error_says_why(monkeypatch, tmp_path):
    path = tmp_path / "_build_status.json"
    path.write_text(json.dumps({"calibprune._cpp": {"status": "skipped", "reason": "CALIBPRUNE_BUILD_CPP=0"}}))
    monkeypatch.setattr(_backend, "BUILD_STATUS_FILE", path)
    monkeypatch.setattr(_backend, "native_extension", lambda name: None)
    why = r"calibprune._cpp is not available: it was not built \(CALIBPRUNE_BUILD_CPP=0"
    with pytest.raises(RuntimeError, match=why):
        _backend.resolve_backend("cpp", "cpu", ("torch", "cpp"), op="obs_prune")


# --- build flags -----------------------------------------------------------------------------------------------------

def _setup_constants() -> dict:
    consts = {}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in ("CXX_FLAGS", "NVCC_FLAGS", "DEFAULT_ARCH_LIST"):
                    consts[target.id] = ast.literal_eval(node.value)
    return consts


def test_setup_flags():
    consts = _setup_constants()
    flags = consts["CXX_FLAGS"] + consts["NVCC_FLAGS"]
    assert not [f for f in flags if f.startswith("-std")], "the C++ standard is torch's to choose"
    assert "--use_fast_math" not in consts["NVCC_FLAGS"], "fast math flushes denormals in the exact OBS kernel"
    assert consts["DEFAULT_ARCH_LIST"] == "8.0;9.0+PTX"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_check_cuda_mirrors_the_real_flags():
    out = subprocess.run(["bash", str(ROOT / ".ci" / "check_cuda.sh"), "--print-flags"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, env={**__import__("os").environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    flags = out.stdout.split()
    consts = _setup_constants()
    for f in consts["NVCC_FLAGS"]:
        assert f in flags
    assert "--use_fast_math" not in flags
    std = [f for f in flags if f.startswith("-std=")]
    assert len(std) == 1 and std[0] in ("-std=c++17", "-std=c++20", "-std=c++23")
    assert "-gencode=arch=compute_90,code=compute_90" in flags, "sm_90 PTX must be embedded for newer GPUs"
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags


def _load_setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibprune_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its setup() call runs only as __main__
    return module


@pytest.mark.slow
def test_failed_native_build_is_loud_and_recorded(tmp_path, capfd):
    """A broken extension in auto mode: the install goes on, a banner names the extension and the fix, and the
    failure lands in _build_status.json for the runtime; forced, the same failure fails the build."""
    from setuptools import Distribution
    from torch.utils import cpp_extension

    setup_mod = _load_setup_module()
    src = tmp_path / "broken.cpp"
    src.write_text("this is not C++;\n")

    def build(forced: set[str]) -> dict:
        status: dict = {}
        cls = setup_mod.make_build_ext(cpp_extension.BuildExtension, forced, status).with_options(use_ninja=False)
        ext = cpp_extension.CppExtension("calibprune._cpp", [str(src)])
        dist = Distribution({"name": "calibprune-test", "ext_modules": [ext]})
        cmd = cls(dist)
        cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
        cmd.ensure_finalized()
        cmd.run()
        return status

    status = build(set())
    err = capfd.readouterr().err
    assert "calibprune._cpp FAILED TO BUILD" in err and "CALIBPRUNE_BUILD_CPP=1 pip install -v" in err
    assert status["calibprune._cpp"]["status"] == "failed"
    recorded = json.loads((tmp_path / "lib" / "calibprune" / "_build_status.json").read_text())
    assert recorded["calibprune._cpp"]["status"] == "failed"
    with pytest.raises(Exception):  # noqa: B017 - the compiler's own error type
        build({"calibprune._cpp"})
