"""RIA: the score, the masks and the channel reallocation against plain loop references, on odd shapes."""
from __future__ import annotations

import pytest
import torch
from _compare import assert_masks_equal
from tiny_models import random_ids, tiny_model

from calibprune import make_config, prune
from calibprune.pruning import find_decoder_layers, select_targets
from calibprune.pruning.methods.ria import RIAConfig, channel_reallocation, ria_mask, ria_score
from calibprune.pruning.statistics import ColumnNormStatistic


def _score_reference(W: torch.Tensor, scaler: torch.Tensor, alpha: float) -> torch.Tensor:
    """Entry by entry: |W_ij| over its column's and its row's total magnitude, times ‖X_j‖^alpha."""
    rows, cols = W.shape
    A = W.abs()
    col_total = [sum(float(A[i, j]) for i in range(rows)) for j in range(cols)]
    row_total = [sum(float(A[i, j]) for j in range(cols)) for i in range(rows)]
    out = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            relative = float(A[i, j]) / col_total[j] + float(A[i, j]) / row_total[i]
            out[i, j] = relative * float(scaler[j]) ** (alpha / 2)
    return out


def _nm_reference(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row and group of m columns, the n lowest scores (ties: the lower column first)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    for i in range(score.shape[0]):
        for g in range(0, score.shape[1], m):
            order = sorted(range(g, g + m), key=lambda j: (float(score[i, j]), j))
            for j in order[:n]:
                mask[i, j] = True
    return mask


@pytest.mark.parametrize("rows,cols", [(7, 12), (5, 20), (13, 8)], ids=lambda v: str(v))
def test_score_is_the_papers_formula(rows, cols):
    gen = torch.Generator().manual_seed(rows * cols)
    W = torch.randn(rows, cols, generator=gen)
    scaler = torch.rand(cols, generator=gen) + 0.1
    for alpha in (0.5, 1.0, 0.0):
        got = ria_score(W, scaler, alpha).double()
        torch.testing.assert_close(got, _score_reference(W, scaler, alpha), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows,cols,sparsity", [(7, 12, 0.5), (9, 20, 0.6), (4, 8, 0.7)],
                         ids=lambda v: str(v))
def test_unstructured_masks_one_threshold_per_matrix_or_per_row(rows, cols, sparsity):
    gen = torch.Generator().manual_seed(cols)
    W = torch.randn(rows, cols, generator=gen)
    scaler = torch.rand(cols, generator=gen) + 0.1
    score = ria_score(W, scaler, 0.5)
    threshold = torch.sort(score.flatten())[0][int(rows * cols * sparsity)]
    assert_masks_equal(ria_mask(W, scaler, RIAConfig(sparsity=sparsity), sparsity), score <= threshold,
                       name="per matrix")
    per_row = torch.zeros_like(score, dtype=torch.bool)
    k = int(cols * sparsity)
    for i in range(rows):
        for j in sorted(range(cols), key=lambda j: (float(score[i, j]), j))[:k]:
            per_row[i, j] = True
    assert_masks_equal(ria_mask(W, scaler, RIAConfig(sparsity=sparsity, per_output=True), sparsity), per_row,
                       name="per row")


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_without_reallocation_is_n_lowest_of_every_m(pattern):
    n, m = map(int, pattern.split(":"))
    gen = torch.Generator().manual_seed(n * 10 + m)
    W, scaler = torch.randn(5, 24, generator=gen), torch.rand(24, generator=gen) + 0.1
    mask = ria_mask(W, scaler, RIAConfig(pattern=pattern), n / m)
    assert_masks_equal(mask, _nm_reference(ria_score(W, scaler, 0.5), n, m), name=pattern)


@pytest.mark.parametrize("importance", ["sum", "retained_degree_unstructured", "retained_degree_per_outneuron"])
@pytest.mark.parametrize("lsa", [False, True], ids=["heuristic", "lsa"])
def test_channel_reallocation_is_nm_in_its_own_order_and_keeps_at_least_as_much(importance, lsa):
    pytest.importorskip("scipy")
    gen = torch.Generator().manual_seed(3)
    score = torch.rand(9, 32, generator=gen)
    mask, order = channel_reallocation(score, 2, 4, importance, 0.5, lsa)
    assert sorted(order.tolist()) == list(range(32)), "order is a permutation of the input channels"
    permuted = mask[:, order]
    assert (permuted.reshape(9, 8, 4).sum(-1) == 2).all(), "every group of the permuted columns prunes exactly 2"
    assert_masks_equal(permuted, _nm_reference(score[:, order], 2, 4), name="the n lowest in each permuted group")
    kept = float((score * ~mask).sum())
    if lsa:  # each assignment round maximises the kept score given the other positions
        heuristic, _ = channel_reallocation(score, 2, 4, importance, 0.5, False)
        assert kept >= float((score * ~heuristic).sum()) - 1e-5


def test_reallocation_deals_ranked_channels_round_robin():
    """With the 'sum' ranking, the k-th slice of the ranked channels fills position k of every group, every second
    slice reversed: here column sums 0..7 give groups (0, 3, 4, 7), (1, 2, 5, 6)."""
    score = torch.arange(8, dtype=torch.float32).reshape(1, 8).repeat(3, 1)
    _, order = channel_reallocation(score, 2, 4)
    assert order.tolist() == [0, 3, 4, 7, 1, 2, 5, 6]


def test_config_errors():
    with pytest.raises(ValueError, match="N:M"):
        RIAConfig(reallocation=True)
    with pytest.raises(ValueError, match="reallocation=True too"):
        RIAConfig(pattern="2:4", lsa=True)
    with pytest.raises(ValueError, match="importance_score"):
        RIAConfig(pattern="2:4", reallocation=True, importance_score="mean")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_uses_the_wanda_statistic_and_reaches_the_target(pattern):
    """End to end on a tiny Llama: every target at its sparsity, and the mask is the one RIA gives from the layer's
    real input statistics (checked on layer 0's q_proj, whose inputs the hooks saw first)."""
    model = tiny_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in select_targets(find_decoder_layers(model)[1][0]).items()}
    ids = random_ids(4, 16)
    seen: list[torch.Tensor] = []
    layer0 = find_decoder_layers(model)[1][0]
    handle = layer0.self_attn.q_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    options = {"sparsity": 0.5} if pattern == "unstructured" else {"pattern": pattern}
    report = prune(model, ids, make_config("ria", **options), progress=False)
    handle.remove()
    assert report.method == "ria" and abs(report.sparsity - 0.5) < 0.01
    norms = ColumnNormStatistic()
    for x in seen[:4]:  # the statistics forward (the propagation forward comes after)
        norms.add("q", x)
    expected = ria_mask(dense["self_attn.q_proj"], norms["q"], make_config("ria", **options), 0.5)
    assert_masks_equal(layer0.self_attn.q_proj.weight == 0, expected, name="layer 0 q_proj")
