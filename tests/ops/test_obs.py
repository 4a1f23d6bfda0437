"""obs_prune: every available backend against SparseGPT's reference fasterprune, plus properties of the algorithm.

The reference runs on the device of the backend under test. On CPU every backend (torch, cpp, Triton interpreted) is
bitwise the reference, weights included; on a GPU the torch backend is bitwise and the kernels are judged by the
quality contract of ``calibprune.ops.contract``.
"""
from __future__ import annotations

import pytest
import torch
from _compare import RTOL, assert_close, assert_masks_equal

from calibprune.ops import obs_prune, obs_prune_reference
from calibprune.ops.contract import check_contract
from calibprune.ops.obs import inverse_factor
from calibprune.ops.obs.torch_impl import obs_prune_torch

from ._backend_fixtures import backend_env  # noqa: F401 - pytest fixture

BACKENDS = ["torch", "cpp", "triton", "cuda"]

# (rows, cols, blocksize, prune_n, prune_m): ragged tails, a one-column tail, a block wider than W, 2:4 and 4:8.
CASES = [
    (45, 99, 32, 0, 0),    # ragged tail of 3 columns
    (45, 33, 32, 0, 0),    # one-column tail
    (17, 20, 32, 0, 0),    # one block narrower than blocksize
    (45, 96, 32, 2, 4),
    (40, 64, 32, 4, 8),
    (33, 36, 32, 2, 4),    # N:M with a 4-column tail block
    (45, 99, 1, 0, 0),     # blocksize 1: every column its own block
]
# Bigger cases for compiled backends only (the Triton interpreter is for tiny shapes).
BIG_CASES = [(96, 320, 128, 0, 0), (96, 256, 128, 2, 4)]


def _id(case) -> str:
    rows, cols, bs, n, m = case
    return f"R{rows}-C{cols}-B{bs}-" + (f"{n}:{m}" if n else "unstructured")


def _hessian(cols: int, gen: torch.Generator, *, tokens: int = 256, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """A well-conditioned Hessian 2/n·XᵀX from correlated random inputs; ``dead`` columns never fire."""
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=gen) @ mix
    X[:, list(dead)] = 0
    return 2 * X.t() @ X / tokens


def _inputs(case, seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = case[:2]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen), _hessian(cols, gen, **kw)


def _reference(W: torch.Tensor, H: torch.Tensor, sparsity: float, case,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """The reference on ``device`` (never a CPU reference for a GPU result: cuSOLVER and LAPACK factor differently)."""
    _, _, bs, n, m = case
    Wr = W.clone().to(device)
    mask, losses = obs_prune_reference(Wr, H.clone().to(device), sparsity, prune_n=n, prune_m=m, blocksize=bs)
    return Wr, mask, losses


def _run(W, H, sparsity, case, backend, device):
    _, _, bs, n, m = case
    Wb = W.clone().to(device)
    mask, losses = obs_prune(Wb, H.clone().to(device), sparsity, prune_n=n, prune_m=m, blocksize=bs,
                             backend=backend, return_losses=True)
    return Wb, mask, losses


def _check(actual, expected, label: str, *, W0: torch.Tensor | None = None, H: torch.Tensor | None = None,
           bitwise: bool = True) -> None:
    """Bitwise masks and weights (CPU, or the torch backend anywhere), else the quality contract against the
    same-device reference (needs the dense ``W0`` and the undamped ``H``)."""
    (Wb, mask, losses), (Wr, mask_r, losses_r) = actual, expected
    assert bool((Wb.cpu()[mask.cpu()] == 0).all()), f"{label}: pruned weights are not zero"
    if bitwise:
        assert_masks_equal(mask, mask_r, name=f"mask ({label})")
        diff = (Wb.cpu() - Wr.cpu()).abs().max().item()
        assert torch.equal(Wb.cpu(), Wr.cpu()), f"W ({label}): max |diff| {diff:.3g}"
    else:
        result = check_contract(W0, H, Wr, mask_r, Wb, mask)
        assert result.ok, f"{label}: {result.describe()}"
    assert_close(losses, losses_r, rtol=RTOL[torch.float32], name=f"losses ({label})")


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES + BIG_CASES, ids=_id)
def test_obs_prune_matches_reference(backend_env, case):
    backend, device, interpreted = backend_env
    if interpreted and case in BIG_CASES:
        pytest.skip("the Triton interpreter is for tiny shapes")
    if interpreted and case[2] == 1:
        pytest.skip("blocksize 1 is one launch per column; too slow for the Triton interpreter")
    sparsity = 0.6
    W, H = _inputs(case, seed=case[0] * 1000 + case[1])
    expected = _reference(W, H, sparsity, case, device)
    _check(_run(W, H, sparsity, case, backend, device), expected, f"{backend} {_id(case)}", W0=W, H=H,
           bitwise=device.type == "cpu" or backend == "torch")
    if case[3]:
        mask = expected[1].reshape(case[0], -1, case[4])
        assert bool((mask.sum(-1) == case[3]).all()), "reference mask is not N:M"


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_obs_prune_dead_columns_and_strided_weights(backend_env):
    """Columns whose inputs never fire are zeroed; W may be a column slice of a wider matrix."""
    backend, device, _ = backend_env
    case = (24, 40, 16, 0, 0)
    gen = torch.Generator().manual_seed(11)
    parent = torch.randn(24, 47, generator=gen)
    H = _hessian(40, gen, dead=(3, 17))
    expected = _reference(parent[:, 5:45].clone(), H, 0.5, case, device)
    Wp = parent.clone().to(device)
    W = Wp[:, 5:45]
    mask, losses = obs_prune(W, H.clone().to(device), 0.5, blocksize=16, backend=backend, return_losses=True)
    _check((W, mask, losses), expected, f"{backend} strided+dead", W0=parent[:, 5:45], H=H,
           bitwise=device.type == "cpu" or backend == "torch")
    assert bool((W[:, [3, 17]] == 0).all())
    assert torch.equal(Wp[:, :5].cpu(), parent[:, :5]) and torch.equal(Wp[:, 45:].cpu(), parent[:, 45:])


_BITWISE_CASES = [pytest.param(c, id=_id(c)) for c in CASES + BIG_CASES]


@pytest.mark.parametrize("case", _BITWISE_CASES)
def test_torch_path_is_bitwise_reference(case):
    W, H = _inputs(case, seed=case[1])
    Wr, mask_r, losses_r = _reference(W, H, 0.5, case)
    Wt = W.clone()
    _, _, bs, n, m = case
    mask, losses = obs_prune_torch(Wt, inverse_factor(H.clone(), 0.01), 0.5, prune_n=n, prune_m=m, blocksize=bs)
    assert torch.equal(mask, mask_r)
    assert torch.equal(Wt, Wr), f"max |diff| {(Wt - Wr).abs().max().item():.3g}"
    assert_close(losses, losses_r, rtol=RTOL[torch.float32], name="losses")


def test_torch_rank1_update_is_not_an_fma():
    """The in-block update must round the product and the subtraction separately, like the reference's k=1 matmul
    then ``-=``. ``Tensor.addr_`` does not on this CPU (its vectorised loop fuses them), which inputs of comparable
    magnitude expose: with products as large as the weights, an FMA differs in most entries."""
    gen = torch.Generator().manual_seed(4)
    rows, cols = 37, 48
    W = torch.randn(rows, cols, generator=gen)
    # U with large off-diagonal entries: the rank-1 products are as large as the weights.
    U = torch.randn(cols, cols, generator=gen).triu() + 4 * torch.eye(cols)
    Err = torch.empty(rows, cols)
    W_ref = W.clone()
    mask = torch.rand(rows, cols, generator=gen) < 0.5
    # The reference's column loop on a fixed mask.
    for i in range(cols):
        w = W_ref[:, i]
        err1 = (w - torch.where(mask[:, i], 0.0, w)) / U[i, i]
        W_ref[:, i:] -= err1.unsqueeze(1).matmul(U[i, i:].unsqueeze(0))
    from calibprune.ops.obs.torch_impl import _rank1_sub

    W_t = W.clone()
    scratch = torch.empty(rows, cols)
    for i in range(cols):
        err = W_t[:, i] * mask[:, i] / U[i, i]
        Err[:, i] = err
        _rank1_sub(W_t[:, i + 1:], err, U[i, i + 1:], scratch)
    keep = ~mask
    assert torch.equal(W_t[keep], W_ref[keep]), f"{int((W_t[keep] != W_ref[keep]).sum())} entries differ"


@pytest.mark.parametrize("backend_env", ["torch", "cpp"], indirect=True)
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=_id)
def test_scale_invariance(backend_env, case):
    """Damping is relative to mean(diag H), so c·H prunes exactly like H: same mask, same weights."""
    backend, device, _ = backend_env
    W, H = _inputs(case, seed=3)
    base = _run(W, H, 0.5, case, backend, device)
    # A power of two scales every step of the factorisation exactly: bitwise equal.
    pow2 = _run(W, 4.0 * H, 0.5, case, backend, device)
    assert_masks_equal(pow2[1], base[1], name="mask (4·H)")
    assert torch.equal(pow2[0], base[0])
    # Any other constant: equal up to rounding.
    other = _run(W, 37.3 * H, 0.5, case, backend, device)
    assert_masks_equal(other[1], base[1], name="mask (37.3·H)")
    assert_close(other[0], base[0], rtol=RTOL[torch.float32], name="W (37.3·H)")


@pytest.mark.parametrize("cols", [33, 128, 257])
def test_inverse_factor_methods_agree(cols):
    gen = torch.Generator().manual_seed(cols)
    H = _hessian(cols, gen, tokens=4 * cols)
    U_ref, dead_ref, _, _ = inverse_factor(H.clone(), 0.01, method="chol_inverse")
    U_rev, dead_rev, _, _ = inverse_factor(H.clone(), 0.01, method="reversed")
    assert torch.equal(dead_ref, dead_rev)
    assert_close(U_rev, U_ref, rtol=RTOL[torch.float32], name="U (reversed vs chol_inverse)")
    assert torch.equal(U_rev, U_rev.triu()), "U must be upper-triangular"
    assert bool((U_rev.diagonal() > 0).all())


def test_auto_backend_matches_reference():
    case = CASES[0]
    W, H = _inputs(case, seed=5)
    _check(_run(W, H, 0.5, case, "auto", "cpu"), _reference(W, H, 0.5, case), "auto")
