"""hessian_update: every available backend against the plain-PyTorch reference (H ← β·H + α·XᵀX)."""
from __future__ import annotations

import pytest
import torch
from _compare import RTOL, assert_close

from calibprune.ops import hessian_update, hessian_update_reference

from ._backend_fixtures import backend_env  # noqa: F401 - pytest fixture

BACKENDS = ["torch", "triton", "cuda"]

# (batch or None for a 2-D [t, d] input, tokens per sequence, d): odd widths, ragged tiles, a single token.
SHAPES = [(3, 7, 45), (None, 50, 37), (2, 33, 99), (1, 1, 17)]
# A wide shape (d >= 1024, many SYRK tiles) is only worth it on compiled backends.
WIDE_SHAPES = [(2, 40, 1100)]


def _id(shape) -> str:
    b, t, d = shape
    return f"B{b}-T{t}-D{d}" if b is not None else f"T{t}-D{d}"


def _random_psd(d: int, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(d, 2 * d, generator=gen)
    return A @ A.t() / (2 * d)


def _inputs(shape, dtype, seed: int):
    b, t, d = shape
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn((t, d) if b is None else (b, t, d), generator=gen).to(dtype)
    return _random_psd(d, gen), X


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + WIDE_SHAPES, ids=_id)
def test_hessian_update_matches_reference(backend_env, shape, dtype):
    backend, device, interpreted = backend_env
    if interpreted and shape in WIDE_SHAPES:
        pytest.skip("the Triton interpreter is for tiny shapes")
    H0, X = _inputs(shape, dtype, seed=shape[2])
    expected = H0.clone()
    n_expected = hessian_update_reference(expected, X, nsamples=5)
    H = H0.to(device)
    n = hessian_update(H, X.to(device), 5, backend=backend)
    assert n == n_expected
    # 16-bit inputs are upcast exactly and accumulated in fp32 on every path: judged at fp32 tolerance.
    assert_close(H, expected, rtol=RTOL[torch.float32], name=f"H ({backend}, X {dtype})")
    if backend != "torch":
        # SYRK writes each upper tile and its mirror: H must come out exactly symmetric.
        assert torch.equal(H, H.t()), f"{backend}: H is not exactly symmetric"


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_hessian_update_running_average(backend_env):
    """Folding batches one at a time equals one running average over all of them."""
    backend, device, _ = backend_env
    gen = torch.Generator().manual_seed(7)
    d = 29
    batches = [torch.randn(b, 5, d, generator=gen) for b in (2, 1, 3)]
    expected = torch.zeros(d, d)
    n_ref = 0
    for X in batches:
        n_ref = hessian_update_reference(expected, X, n_ref)
    H = torch.zeros(d, d, device=device)
    n = 0
    for X in batches:
        n = hessian_update(H, X.to(device), n, backend=backend)
    assert n == n_ref == 6
    assert_close(H, expected, rtol=RTOL[torch.float32], name=f"H ({backend})")
    all_x = torch.cat([X.reshape(-1, d) for X in batches])
    assert_close(H, 2 * all_x.t() @ all_x / 6, rtol=RTOL[torch.float32], name="H vs 2/n·XᵀX")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + WIDE_SHAPES + [(4, 64, 576)], ids=_id)
def test_torch_backend_is_bitwise_reference(shape, dtype):
    """The torch path keeps the reference's exact op sequence, so SparseGPT masks cannot flip on near-ties."""
    H0, X = _inputs(shape, dtype, seed=3)
    expected, H = H0.clone(), H0.clone()
    n_ref = n = 3
    for _ in range(3):
        n_ref = hessian_update_reference(expected, X, n_ref)
        n = hessian_update(H, X, n, backend="torch")
    assert n == n_ref and torch.equal(H, expected)
