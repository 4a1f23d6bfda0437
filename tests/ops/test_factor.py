"""inverse_factor: bitwise the reference's U when H is positive definite, damping escalation when it is not, and one
factor shared by several weight matrices changing no bit."""
from __future__ import annotations

import logging

import pytest
import torch
from _compare import assert_masks_equal

from calibprune.ops import InverseFactor, inverse_factor, obs_prune, obs_prune_reference
from calibprune.ops.obs import damping_schedule, inverse_factor_reference

from ._backend_fixtures import backend_env  # noqa: F401 - pytest fixture


def _hessian(cols: int, seed: int, *, tokens: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = tokens or 4 * cols
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=gen) @ mix
    return 2 * X.t() @ X / tokens


def _authors_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """IST-DASLab fasterprune's lines, verbatim (they fail when H is not positive definite)."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return torch.linalg.cholesky(H, upper=True)


def _rank_deficient(cols: int, rank: int, seed: int) -> torch.Tensor:
    """2/n·XᵀX of inputs spanning only ``rank`` directions (duplicate/dependent features)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
    return 2 * X.t() @ X / 64


@pytest.mark.parametrize("cols", [1, 17, 130])
def test_first_attempt_is_bitwise_the_authors(cols):
    H = _hessian(cols, seed=cols)
    H[:, 0] = H[0, :] = 0  # one dead input
    expected = _authors_factor(H.clone(), 0.01)
    for f in (inverse_factor(H.clone(), 0.01), inverse_factor_reference(H.clone(), 0.01)):
        assert isinstance(f, InverseFactor)
        assert torch.equal(f.U, expected)
        assert f.escalations == 0 and f.damp == 0.01
        assert f.dead.tolist() == [True] + [False] * (cols - 1)
        # The layout of U matters to the trailing GEMM's rounding: keep LAPACK's (column-major for cols > 1).
        assert f.U.stride() == expected.stride()


def test_schedule():
    assert damping_schedule(0.01, 3) == [0.01, 0.1, 0.01 * 100, 0.01 * 1000]
    assert damping_schedule(0.0, 2) == [0.0, 1e-4, 1e-3]


@pytest.mark.parametrize("method", ["chol_inverse", "reversed"])
@pytest.mark.parametrize("case", ["percdamp0-rank-deficient", "duplicate-columns", "percdamp0-single-token"])
def test_escalates_instead_of_failing(case, method, caplog):
    cols = 48
    if case == "percdamp0-rank-deficient":
        H, percdamp = _rank_deficient(cols, rank=5, seed=1), 0.0
    elif case == "duplicate-columns":
        H = _hessian(cols, seed=2)
        H[:, 7] = H[:, 6]
        H[7, :] = H[6, :]  # input 7 is a copy of input 6
        H[7, 7] = H[6, 6]
        percdamp = 0.0
    else:
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(1, cols, generator=gen)
        H, percdamp = 2 * x.t() @ x, 0.0
    with pytest.raises(torch.linalg.LinAlgError):
        _authors_factor(H.clone(), percdamp)  # what the reference does: fail
    with caplog.at_level(logging.WARNING, logger="calibprune.ops.obs.factor"):
        f = inverse_factor(H.clone(), percdamp, method=method, what="layers.0.mlp.up_proj")
    if method == "reversed" and f.escalations == 0:
        # The reversed order met no non-positive pivot in fp32 for this H: no failure, so no escalation (the rule is
        # "escalate only where the factorisation fails", which keeps every successful first attempt bitwise).
        assert bool(torch.isfinite(f.U).all())
        return
    assert f.escalations >= 1 and f.damp > percdamp
    assert f.damp == damping_schedule(percdamp)[f.escalations]
    assert bool(torch.isfinite(f.U).all()) and torch.equal(f.U, f.U.triu())
    assert any("layers.0.mlp.up_proj" in r.message and "damping" in r.message for r in caplog.records)
    # The factor is the plain factor of H + damp·mean(diag)·I: check UᵀU (H + λI) = I, to the accuracy fp32 allows
    # at the condition number a small damping leaves (~1e4 here).
    Hd = H.double() + f.damp * H.diagonal().double().mean() * torch.eye(cols, dtype=torch.float64)
    resid = (f.U.double().t() @ f.U.double() @ Hd - torch.eye(cols, dtype=torch.float64)).abs().max().item()
    assert resid < 0.1, f"UᵀU(H + λI) is {resid:.3g} away from I"


def test_reference_path_escalates_too():
    """The faithful reference prune gets the same escalation (it would otherwise raise)."""
    H = _rank_deficient(32, rank=3, seed=5)
    W = torch.randn(9, 32, generator=torch.Generator().manual_seed(6))
    mask, _ = obs_prune_reference(W.clone(), H.clone(), 0.5, percdamp=0.0, blocksize=16)
    f = inverse_factor_reference(H.clone(), 0.0)
    assert f.escalations >= 1 and mask.float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_nonfinite_is_a_clear_error():
    H = _hessian(8, seed=0)
    H[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        inverse_factor(H, 0.01)


def test_gives_up_with_a_clear_error():
    H = -torch.eye(6)  # negative definite: no damping of the schedule rescues it
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite even with"):
        inverse_factor(H, 0.01, max_escalations=2)


@pytest.mark.parametrize("backend_env", ["torch", "cpp", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)], ids=["unstructured", "2:4"])
def test_shared_factor_changes_no_bit(backend_env, pattern):
    """q/k/v read the same inputs: one factor for all three gives bitwise what three separate calls give."""
    backend, device, _ = backend_env
    n, m = pattern
    cols = 40
    H = _hessian(cols, seed=9).to(device)
    gen = torch.Generator().manual_seed(10)
    weights = [torch.randn(rows, cols, generator=gen).to(device) for rows in (24, 8, 8)]
    separate = []
    for W in weights:
        Wc = W.clone()
        mask = obs_prune(Wc, H.clone(), 0.5, prune_n=n, prune_m=m, blocksize=16, backend=backend)
        separate.append((Wc, mask))
    factor = inverse_factor(H.clone(), 0.01)
    for W, (W_sep, mask_sep) in zip(weights, separate):
        Wc = W.clone()
        mask = obs_prune(Wc, None, 0.5, prune_n=n, prune_m=m, blocksize=16, backend=backend, factor=factor)
        assert_masks_equal(mask, mask_sep, name=f"mask ({backend}, shared factor)")
        assert torch.equal(Wc, W_sep), f"{backend}: a shared factor changed the weights"


def test_factor_must_fit():
    f = inverse_factor(_hessian(12, seed=1), 0.01)
    with pytest.raises(ValueError, match="factor.U must be"):
        obs_prune(torch.randn(4, 10), None, 0.5, factor=f)
    with pytest.raises(ValueError, match="give H"):
        obs_prune(torch.randn(4, 12), None, 0.5)
