"""OIT information metrics against values counted by hand on tiny id tensors, and perplexity against a manual loop."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from calibprune.metrics import (
    as_ids,
    calibration_perplexity,
    information_metrics,
    ngram_aggregation,
    ngram_diversity,
    token_entropy,
    vocab_coverage,
    zipf_slope,
)

REPEAT = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]])


@dataclass
class _Calib:  # stands in for CalibrationSet: only ``.ids`` is read
    ids: torch.Tensor


def test_ngram_aggregation_hand_counted():
    # 4-grams: 1234, 2341, 3412, 4123, 1234 -> total 5, distinct 4; top-1 mass 2/5.
    agg = ngram_aggregation(REPEAT, 4, top_k=(1, 2, 10))
    assert (agg["total"], agg["distinct"], agg["exact"]) == (5, 4, True)
    assert agg["aggregation"] == pytest.approx(1 - 4 / 5, abs=1e-15)
    assert agg["top_k_mass"] == {1: 2 / 5, 2: 3 / 5, 10: 1.0}
    # Rows are separate: [1 2 3 4] twice gives the same 4-gram twice, never one spanning the rows.
    two = ngram_aggregation(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]), 4, top_k=(1,))
    assert (two["total"], two["distinct"], two["top_k_mass"][1]) == (2, 1, 1.0)
    assert ngram_aggregation(_Calib(REPEAT))["distinct"] == 4


def test_ngram_diversity_hand_counted():
    # n=1: 4/8, n=2: 4/7 (12 23 34 41 12 23 34), n=3: 4/6, n=4: 4/5.
    expected = (4 / 8 + 4 / 7 + 4 / 6 + 4 / 5) / 4
    assert ngram_diversity(REPEAT) == pytest.approx(expected, rel=1e-15)
    ids = torch.tensor([[5, 5, 6], [5, 6, 6]])
    # unigrams: 6 tokens {5, 6} -> 2/6; bigrams: 55 56 | 56 66 -> 4 total, 3 distinct.
    assert ngram_diversity(ids, max_n=2) == pytest.approx((2 / 6 + 3 / 4) / 2, rel=1e-15)


def test_token_entropy_and_coverage():
    assert token_entropy(REPEAT) == pytest.approx(2.0, rel=1e-15)  # four tokens, uniform
    # counts 2, 1, 1 -> p = 1/2, 1/4, 1/4 -> H = 0.5 + 0.5 + 0.5 = 1.5 bits
    assert token_entropy(torch.tensor([[7, 7, 8, 9]])) == pytest.approx(1.5, rel=1e-15)
    assert token_entropy(torch.tensor([[3, 3, 3]])) == 0.0
    assert vocab_coverage(REPEAT, 64) == 4 / 64
    assert vocab_coverage(torch.tensor([[0, 63], [63, 5]]), 64) == 3 / 64


def test_zipf_slope():
    # Two points (rank 1, count 8), (rank 2, count 1): slope ln(1/8)/ln 2 = -3.
    ids = torch.tensor([[1] * 8 + [2]])
    assert zipf_slope(ids) == pytest.approx(math.log(1 / 8) / math.log(2), rel=1e-12)
    # Counts 12, 6, 4, 3 = 12/r: slope exactly -1.
    ids = torch.tensor([[0] * 12 + [1] * 6 + [2] * 4 + [3] * 3])
    assert zipf_slope(ids) == pytest.approx(-1.0, rel=1e-12)
    # Three points (ranks 1, 2, 3; counts 4, 2, 2): OLS slope by hand.
    x = [math.log(1), math.log(2), math.log(3)]
    y = [math.log(4), math.log(2), math.log(2)]
    mx, my = sum(x) / 3, sum(y) / 3
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    assert zipf_slope(torch.tensor([[9, 9, 9, 9, 1, 1, 2, 2]])) == pytest.approx(slope, rel=1e-12)
    assert math.isnan(zipf_slope(torch.tensor([[4, 4, 4]])))


def test_information_metrics_set_and_per_sample():
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4], [5, 5, 5, 5, 5, 6, 7, 8]])
    m = information_metrics(_Calib(ids), vocab_size=16)
    assert "perplexity" not in m
    assert (m["n_samples"], m["seqlen"]) == (2, 8)
    # 4-grams over the set: row 0 gives 5 (4 distinct), row 1 gives 5 (5555, 5555, 5556, 5567, 5678 -> 4 distinct).
    assert m["ngram_aggregation"] == pytest.approx(1 - 8 / 10, abs=1e-15)
    assert m["top10_mass"] == 1.0 and m["top100_mass"] == 1.0
    assert m["vocab_coverage"] == 8 / 16
    assert m["token_entropy"] == pytest.approx(token_entropy(ids), rel=0)
    assert m["ngram_diversity"] == pytest.approx(ngram_diversity(ids), rel=0)
    assert m["zipf_slope"] == pytest.approx(zipf_slope(ids), rel=0)
    per = information_metrics(ids, vocab_size=16, per_sample=True)
    for key in ("ngram_aggregation", "top10_mass", "ngram_diversity", "token_entropy", "vocab_coverage",
                "zipf_slope"):
        assert per[key].shape == (2,) and per[key].dtype == torch.float64, key
    assert per["ngram_aggregation"].tolist() == pytest.approx([1 - 4 / 5, 1 - 4 / 5], abs=1e-15)
    assert per["token_entropy"][0].item() == pytest.approx(2.0, rel=1e-15)
    # row 1 counts 5:5, 6:1, 7:1, 8:1 -> p = 5/8, 1/8 x3
    h1 = -(5 / 8 * math.log2(5 / 8) + 3 * (1 / 8) * math.log2(1 / 8))
    assert per["token_entropy"][1].item() == pytest.approx(h1, rel=1e-12)
    assert per["vocab_coverage"].tolist() == [4 / 16, 4 / 16]


def test_as_ids_rejects_non_ids():
    assert as_ids(torch.tensor([1, 2, 3])).shape == (1, 3)
    with pytest.raises(TypeError):
        as_ids([[1, 2, 3]])
    with pytest.raises(ValueError):
        as_ids(torch.rand(2, 3))


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_calibration_perplexity_matches_manual_loop():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (5, 13), generator=torch.Generator().manual_seed(1))
    # Manual: one sequence at a time, log-softmax, pick the next token's log-probability, token by token.
    nll_rows = []
    with torch.no_grad():
        for row in ids:
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), dim=-1)
            nll_rows.append([-logp[j, row[j + 1]].item() for j in range(ids.shape[1] - 1)])
    per_row = torch.tensor([math.exp(sum(r) / len(r)) for r in nll_rows], dtype=torch.float64)
    whole = math.exp(sum(sum(r) for r in nll_rows) / sum(len(r) for r in nll_rows))
    # Batching changes the matmul shapes, hence fp32 rounding, so compare at fp32 tolerance.
    for batch_size in (1, 2, 8):
        got = calibration_perplexity(model, _Calib(ids), batch_size=batch_size)
        assert got == pytest.approx(whole, rel=1e-5)
        got_rows = calibration_perplexity(model, ids, batch_size=batch_size, per_sample=True)
        assert got_rows.shape == (5,)
        torch.testing.assert_close(got_rows, per_row, rtol=1e-5, atol=0)
    # A random model is close to uniform over 64 tokens.
    assert 30 < whole < 130
    m = information_metrics(ids, model=model)
    assert m["perplexity"] == pytest.approx(whole, rel=1e-5)
    assert m["vocab_coverage"] == pytest.approx(torch.unique(ids).numel() / 64, rel=0)
    assert model.training is False


def test_calibration_perplexity_restores_training_mode():
    model = _tiny_llama().train()
    calibration_perplexity(model, torch.randint(0, 64, (2, 6)))
    assert model.training is True
