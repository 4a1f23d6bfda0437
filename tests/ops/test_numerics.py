"""``numerics="fast"``: the upper-triangle Hessian and the one-Cholesky OBS factor, judged by the quality contract
(mask agreement >= 99.9%, reconstruction error within 0.5% of the reference's) at odd shapes."""
from __future__ import annotations

import pytest
import torch
from _compare import RTOL, assert_close

from calibprune.ops import (
    check_contract,
    hessian_finalize,
    hessian_update,
    hessian_update_reference,
    obs_prune,
    obs_prune_reference,
    reconstruction_error,
)
from calibprune.ops.contract import mask_agreement

from ._backend_fixtures import backend_env  # noqa: F401 - pytest fixture

# (batch, tokens, d): odd widths, a width that spans several row blocks of the CPU upper-triangle update (256).
HESSIAN_SHAPES = [(3, 7, 45), (2, 33, 99), (1, 1, 17), (2, 40, 301)]
# (rows, cols, blocksize, n, m)
OBS_CASES = [(45, 99, 32, 0, 0), (33, 36, 32, 2, 4), (61, 128, 64, 0, 0), (40, 64, 32, 4, 8)]


def _hid(s) -> str:
    return f"B{s[0]}-T{s[1]}-D{s[2]}"


def _oid(c) -> str:
    return f"R{c[0]}-C{c[1]}-B{c[2]}-" + (f"{c[3]}:{c[4]}" if c[3] else "unstructured")


@pytest.mark.parametrize("backend_env", ["torch", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", HESSIAN_SHAPES, ids=_hid)
def test_fast_hessian_upper_triangle(backend_env, shape, dtype):
    backend, device, interpreted = backend_env
    if interpreted and shape[2] > 128:
        pytest.skip("the Triton interpreter is for tiny shapes")
    b, t, d = shape
    gen = torch.Generator().manual_seed(d)
    batches = [torch.randn(b, t, d, generator=gen).to(dtype) for _ in range(3)]
    expected, n_ref = torch.zeros(d, d), 0
    for X in batches:
        n_ref = hessian_update_reference(expected, X, n_ref)
    sentinel = 123.0
    H = torch.full((d, d), sentinel, device=device).tril_(-1)  # upper triangle 0, strict lower triangle poisoned
    n = 0
    for X in batches:
        n = hessian_update(H, X.to(device), n, backend=backend, numerics="fast")
    assert n == n_ref
    # TF32 on a GPU rounds fp32 inputs to 10 mantissa bits: a bf16-level tolerance there.
    rtol = RTOL[torch.bfloat16] if device.type == "cuda" and dtype == torch.float32 else RTOL[torch.float32]
    # Before finalize only the upper triangle is defined. The SYRK kernels never touch the lower one (the torch
    # path's row blocks overwrite the lower part of their diagonal blocks: harmless, it is stale by contract).
    assert_close(H.triu(), expected.triu(), rtol=rtol, name=f"triu(H) ({backend}, fast, X {dtype})")
    if backend != "torch":
        assert bool((H.tril(-1) == torch.full_like(H, sentinel).tril(-1)).all()), "the kernel wrote below the diagonal"
    hessian_finalize(H, numerics="fast")
    assert torch.equal(H, H.t()), "finalize must mirror exactly"
    assert_close(H, expected, rtol=rtol, name=f"H ({backend}, fast, X {dtype})")


def test_finalize_reference_is_a_no_op():
    H = torch.randn(7, 7)  # not symmetric: a reference H is never touched
    before = H.clone()
    hessian_finalize(H, numerics="reference")
    assert torch.equal(H, before)
    with pytest.raises(ValueError, match="numerics must be one of"):
        hessian_finalize(H, numerics="quick")
    with pytest.raises(ValueError, match="numerics must be one of"):
        hessian_update(H, torch.randn(2, 7), 0, numerics="quick")


def _hessian(cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    X = torch.randn(4 * cols, cols, generator=gen) @ mix
    return 2 * X.t() @ X / (4 * cols)


@pytest.mark.parametrize("backend_env", ["torch", "cpp", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("case", OBS_CASES, ids=_oid)
def test_fast_obs_meets_the_contract(backend_env, case):
    backend, device, interpreted = backend_env
    rows, cols, bs, n, m = case
    if interpreted and cols > 100:
        pytest.skip("the Triton interpreter is for tiny shapes")
    gen = torch.Generator().manual_seed(rows * cols)
    W0 = torch.randn(rows, cols, generator=gen).to(device)
    H = _hessian(cols, seed=cols).to(device)
    W_ref = W0.clone()
    mask_ref, _ = obs_prune_reference(W_ref, H.clone(), 0.6, prune_n=n, prune_m=m, blocksize=bs)
    W = W0.clone()
    mask = obs_prune(W, H.clone(), 0.6, prune_n=n, prune_m=m, blocksize=bs, backend=backend, numerics="fast")
    result = check_contract(W0, H, W_ref, mask_ref, W, mask)
    assert result.ok, f"{backend} {_oid(case)} fast: {result.describe()}"


def test_fast_end_to_end_meets_the_contract():
    """Fast Hessian (upper triangle, mirrored once) and fast OBS together, against the reference pair, judged with
    the reference Hessian."""
    gen = torch.Generator().manual_seed(0)
    d, rows = 160, 96
    mix = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    batches = [torch.randn(4, 64, d, generator=gen) @ mix for _ in range(3)]
    H_ref, H_fast, n_ref, n_fast = torch.zeros(d, d), torch.zeros(d, d), 0, 0
    for X in batches:
        n_ref = hessian_update(H_ref, X, n_ref, backend="torch")
        n_fast = hessian_update(H_fast, X, n_fast, backend="torch", numerics="fast")
    hessian_finalize(H_fast, numerics="fast")
    W0 = torch.randn(rows, d, generator=gen)
    W_ref, W = W0.clone(), W0.clone()
    mask_ref = obs_prune(W_ref, H_ref.clone(), 0.6, blocksize=64, backend="torch")
    mask = obs_prune(W, H_fast.clone(), 0.6, blocksize=64, numerics="fast")
    result = check_contract(W0, H_ref, W_ref, mask_ref, W, mask)
    assert result.ok, result.describe()


def test_contract_helper():
    gen = torch.Generator().manual_seed(1)
    W0, H = torch.randn(20, 30, generator=gen), _hessian(30, 2)
    W_ref = W0.clone()
    mask_ref, _ = obs_prune_reference(W_ref, H.clone(), 0.5, blocksize=16)
    assert check_contract(W0, H, W_ref, mask_ref, W_ref.clone(), mask_ref.clone()).ok
    # The reconstruction error is ‖ΔW Xᵀ‖²·2/n for H = 2/n·XᵀX.
    X = torch.randn(50, 30, generator=gen, dtype=torch.float64)
    H2 = (2 * X.t() @ X / 50)
    dW = (W_ref - W0).double()
    assert reconstruction_error(W0, W_ref, H2) == pytest.approx(float((dW @ X.t()).square().sum() * 2 / 50), rel=1e-9)
    # A mask that differs in 1% of entries, or a 1% larger error, breaks the contract.
    flipped = mask_ref.clone()
    flipped.view(-1)[:6] ^= True
    assert mask_agreement(flipped, mask_ref) == pytest.approx(1 - 6 / 600)
    assert not check_contract(W0, H, W_ref, mask_ref, W_ref, flipped).ok
    worse = W0 + (W_ref - W0) * 1.01
    res = check_contract(W0, H, W_ref, mask_ref, worse, mask_ref)
    assert not res.ok and res.recon_rel_diff == pytest.approx(0.0201, rel=1e-3)
