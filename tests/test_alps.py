"""ALPS: the projection, the masked conjugate gradients and the whole solve against plain references."""
from __future__ import annotations

import pytest
import torch
from tiny_models import random_ids, tiny_model

from calibprune import make_config, prune
from calibprune.pruning.masks import nm_mask
from calibprune.pruning.methods.alps import ALPSConfig, _masked_cg, _project, alps_prune
from calibprune.pruning.statistics import GramStatistic


def _problem(rows: int, cols: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=gen) * (torch.rand(cols, generator=gen) + 0.2)
    W = torch.randn(rows, cols, generator=gen)
    return W, X.t() @ X


def _error(W0, W, XtX) -> float:
    dW = (W - W0).double()
    return float(torch.trace(dW @ XtX.double() @ dW.t()))


@pytest.mark.parametrize("cols,rows,keep", [(12, 7, 30), (8, 5, 1), (20, 3, 59)], ids=lambda v: str(v))
def test_projection_keeps_the_largest_magnitudes(cols, rows, keep):
    Z = torch.randn(cols, rows, generator=torch.Generator().manual_seed(keep))
    out = _project(Z, keep, 0, 0)
    assert int((out != 0).sum()) == keep
    threshold = Z.abs().flatten().sort(descending=True)[0][keep - 1]
    assert torch.equal(out != 0, Z.abs() >= threshold)
    assert torch.equal(out[out != 0], Z[out != 0])


@pytest.mark.parametrize("keep_n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_projection_keeps_n_of_every_m_input_columns(keep_n, m):
    cols, rows = 16, 5
    Z = torch.randn(cols, rows, generator=torch.Generator().manual_seed(m))
    out = _project(Z, 0, keep_n, m)
    groups = (out.t() != 0).reshape(rows, cols // m, m)
    assert (groups.sum(-1) == keep_n).all()
    for r in range(rows):
        for g in range(cols // m):
            block = Z.t()[r, g * m:(g + 1) * m].abs()
            kept = set(torch.nonzero(groups[r, g]).flatten().tolist())
            assert kept == set(block.argsort(descending=True)[:keep_n].tolist())


def test_masked_cg_converges_to_the_restricted_least_squares_fit():
    """With enough iterations, each output column's kept weights solve A[S, S] x = b[S] on its support S."""
    gen = torch.Generator().manual_seed(5)
    M = torch.randn(40, 9, generator=gen)
    A = (M.t() @ M + torch.eye(9)).double()
    rhs = torch.randn(9, 4, generator=gen).double()
    support = (torch.rand(9, 4, generator=gen) > 0.4).double()
    X0 = torch.randn(9, 4, generator=gen).double() * support
    X = _masked_cg(A, rhs, support, X0, rtol=1e-12, maxiter=200)
    for j in range(4):
        S = support[:, j].bool()
        expected = torch.linalg.solve(A[S][:, S], rhs[S, j])
        torch.testing.assert_close(X[S, j], expected, rtol=1e-8, atol=1e-10)
        assert (X[~S, j] == 0).all(), "the weights off the support stay zero"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_beats_the_magnitude_mask_and_reaches_the_pattern(pattern):
    W0, XtX = _problem(11, 24, 200, seed=1)
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    W, info = alps_prune(W0, XtX, 0.5, n, m)
    assert torch.equal(XtX, _problem(11, 24, 200, seed=1)[1]), "the caller's XᵀX is left unchanged"
    if m:
        assert ((W == 0).reshape(11, 6, 4).sum(-1) == 2).all()
    else:
        assert int((W == 0).sum()) == 11 * 24 // 2
    # the magnitude mask of the same pattern, kept weights unchanged
    magnitude = W0.clone()
    if m:
        magnitude[nm_mask(W0.abs(), n, m)] = 0
    else:
        flat = magnitude.abs().flatten()
        magnitude[magnitude.abs() <= flat.kthvalue(int(flat.numel() * 0.5)).values] = 0
    assert _error(W0, W, XtX) < _error(W0, magnitude, XtX)
    assert 0 <= info["error"] < 1 and info["iterations"] >= 1


def test_gram_statistic_is_the_plain_sum_over_tokens():
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 7, 5, generator=gen) for _ in range(3)]
    stat = GramStatistic()
    for x in xs:
        stat.add("g", x)
    X = torch.cat([x.reshape(-1, 5) for x in xs])
    torch.testing.assert_close(stat["g"], X.t() @ X, rtol=1e-6, atol=1e-6)
    assert stat.counts["g"] == 3


def test_config_errors():
    with pytest.raises(ValueError, match="rho"):
        ALPSConfig(rho=0)
    with pytest.raises(ValueError, match="max_iter"):
        ALPSConfig(max_iter=0)


def test_prune_end_to_end_reconstructs_better_than_wanda():
    ids = random_ids(8, 16)
    alps = prune(tiny_model("llama"), ids, make_config("alps", sparsity=0.6), progress=False)
    wanda = prune(tiny_model("llama"), ids, make_config("wanda", sparsity=0.6), progress=False)
    assert abs(alps.sparsity - 0.6) < 0.01
    mean = lambda rep: sum(r.rel_error for r in rep.modules) / len(rep.modules)  # noqa: E731
    assert mean(alps) < mean(wanda)
    assert all("alps" in (r.extra or {}) for r in alps.modules)
