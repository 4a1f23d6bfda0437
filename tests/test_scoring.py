"""Per-item log-likelihood scoring: the packed fast path against the one-forward-per-request reference, on several
architectures and awkward groupings; lm-eval's tokenisation split; agreement with lm-eval's own scorer."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from _compare import assert_close
from tiny_models import ARCHS, tiny_model

from calibprune.evaluation.scoring import Request, encode_request, score_requests, score_requests_naive


def _random_items(seed: int, n_items: int = 9):
    """Items of 1-5 requests; most share their item's context (multiple choice), some have their own (WinoGrande)."""
    rng = random.Random(seed)
    reqs, items = [], []
    for _ in range(n_items):
        ctx = tuple(rng.randrange(2, 96) for _ in range(rng.randint(1, 13)))
        group = []
        for _ in range(rng.randint(1, 5)):
            c = ctx if rng.random() < 0.7 else tuple(rng.randrange(2, 96) for _ in range(rng.randint(1, 6)))
            group.append(len(reqs))
            reqs.append(Request(c, tuple(rng.randrange(2, 96) for _ in range(rng.randint(1, 7)))))
        items.append(group)
    return reqs, items


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_matches_naive(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    reqs, items = _random_items(seed=ARCHS.index(arch))
    ref = score_requests_naive(model, reqs)
    expected = torch.tensor([r.loglik for r in ref], dtype=torch.float64)
    # budget 1: every row runs alone; 37: a few rows per forward, ragged widths; unpacked: one request per row
    for label, kwargs in (("budget1", {"token_budget": 1}), ("budget37", {"token_budget": 37}),
                          ("unpacked", {"pack": False})):
        got = score_requests(model, reqs, items, progress=False, **kwargs)
        assert_close(torch.tensor([g.loglik for g in got], dtype=torch.float64), expected, atol=1e-5, rtol=1e-6,
                     name=f"{arch} {label} loglik per request")
        assert [g.greedy for g in got] == [r.greedy for r in ref], label
        assert [g.n_tokens for g in got] == [len(r.continuation) for r in reqs], label


def test_items_must_cover_requests():
    model = tiny_model("llama")
    reqs, _ = _random_items(1, 2)
    with pytest.raises(ValueError, match="exactly once"):
        score_requests(model, reqs, [[0]], progress=False)
    with pytest.raises(ValueError, match="context"):
        Request((), (1,))


class _WordTokenizer:
    """Whitespace-attached word tokenizer (like BPE's leading-space tokens): 'a b' -> ['a', ' b']."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        import re

        pieces = re.findall(r"\s*\S+|\s+$", text)
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab) + 2) for p in pieces]}


def test_encode_request_moves_trailing_space():
    tok = _WordTokenizer()
    a = encode_request(tok, "The cat sat on the", " mat")
    b = encode_request(tok, "The cat sat on the ", "mat")  # the space moves to the continuation (lm-eval)
    assert a == b and len(a.continuation) == 1
    cut = encode_request(tok, "x " * 20, "y z", max_length=5)  # the context loses tokens from the left
    assert cut.continuation == tuple(tok(" y z")["input_ids"]) and cut.context == tuple(tok(" x x x")["input_ids"])


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
def test_agrees_with_lm_eval_loglikelihood():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from test_evaluation import byte_tokenizer

    tok = byte_tokenizer()
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    pairs = [("Question: what is red?\nAnswer:", " a rose"), ("Question: what is red?\nAnswer:", " the sky"),
             ("The cat sat on the ", "mat"), ("def f(x):\n", "    return x + 1")]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=128)
    ref = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    reqs = [encode_request(tok, c, x) for c, x in pairs]
    got = score_requests(model, reqs, [[0, 1], [2], [3]], progress=False)
    for (ll, greedy), g in zip(ref, got):
        assert g.loglik == pytest.approx(ll, abs=1e-4) and g.greedy == greedy
