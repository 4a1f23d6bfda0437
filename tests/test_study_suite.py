"""The study suite: disjoint TEST/DEV items, per-item records, scores, the per-(model, benchmark, items) cache."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_evaluation import DATA_DIR, HAS_DATA, byte_tokenizer
from tiny_models import tiny_model

from calibprune.evaluation import study_suite
from calibprune.evaluation.benchmarks import DIMENSIONS
from calibprune.evaluation.scoring import encode_request, score_requests_naive
from calibprune.evaluation.study_suite import STUDY_SUITE, evaluate_items, item_split, resolve_suite
from calibprune.fingerprint import model_fingerprint

needs_data = pytest.mark.skipif(not HAS_DATA, reason="offline eval data not found (set CALIBPRUNE_DATA_DIR)")


def test_every_dimension_has_benchmarks_and_code_math_have_200_items():
    dims = {d: [b for b in STUDY_SUITE.values() if b.dimension == d] for d in DIMENSIONS}
    assert all(dims.values())
    for d in ("code", "math"):
        assert sum(b.test for b in dims[d]) >= 200, d


@pytest.mark.parametrize("name", list(STUDY_SUITE))
def test_item_split_disjoint_and_stable(name):
    bench = STUDY_SUITE[name]
    pool = bench.test + bench.dev + 17
    test, dev = item_split(pool, bench, "test"), item_split(pool, bench, "dev")
    assert len(test) == bench.test and len(dev) == bench.dev and not set(test) & set(dev)
    assert test == item_split(pool, bench, "test")  # fixed seed
    bigger = resolve_suite([name], {name: {"test": bench.test + 5}})[name]
    assert item_split(pool, bigger, "test")[:bench.test] == test  # more TEST items only add items


def test_near_chance_flag():
    def rec(n_right, n, k):
        return {"correct": [1] * n_right + [0] * (n - n_right), "k": [k] * n}

    # 55/100 two-way: 0.05 above chance, SE 0.0497 -> within 2 SE; 70/100 is not; LAMBADA-style kinds never are
    assert study_suite.near_chance(rec(55, 100, 2), "choice")
    assert not study_suite.near_chance(rec(70, 100, 2), "choice")
    assert not study_suite.near_chance(rec(0, 100, 2), "target")


def test_resolve_suite_errors():
    with pytest.raises(ValueError, match="not in the study suite"):
        resolve_suite(["hellaswag", "nope"])
    with pytest.raises(ValueError, match="unknown field"):
        resolve_suite(["piqa"], {"piqa": {"limit": 3}})
    with pytest.raises(ValueError, match="not among the selected"):
        resolve_suite(["piqa"], {"arc_easy": {"test": 3}})
    with pytest.raises(ValueError, match="pool holds only"):
        item_split(10, STUDY_SUITE["piqa"], "test")
    with pytest.raises(ValueError, match="split"):
        item_split(10_000, STUDY_SUITE["piqa"], "train")


def test_model_fingerprint_separates_pruned_and_dtype():
    import torch

    model = tiny_model("llama")
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(tiny_model("llama"))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, ::2] = 0
    assert model_fingerprint(model) != fp
    assert model_fingerprint(model.to(torch.bfloat16)) != model_fingerprint(model.to(torch.float32))


TINY = {"piqa": {"test": 3, "dev": 2}, "winogrande": {"test": 2, "dev": 1}, "lambada": {"test": 2, "dev": 1},
        "gsm8k_nll": {"test": 2, "dev": 1, "max_length": 96}, "wikitext2": {"test": 2, "dev": 1, "window": 48}}


@pytest.fixture(scope="module")
def tiny_lm():
    tok = byte_tokenizer()
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return model.eval(), tok


@needs_data
def test_evaluate_items_records_and_cache(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    # WinoGrande (near chance for SmolLM2, so not in the suite) exercises the several-contexts layout
    monkeypatch.setitem(STUDY_SUITE, "winogrande", study_suite._mc("winogrande", 600, 200))
    res = evaluate_items(model, tok, benchmarks=list(TINY), overrides=TINY, data_dir=DATA_DIR,
                         cache_dir=tmp_path, progress=False)
    b = res["benchmarks"]
    assert res["fingerprint"] == model_fingerprint(model) and res["dtype"] == "float32"
    assert len(b["winogrande"]["correct"]) == 2 and b["winogrande"]["k"] == [2, 2]
    assert len(b["piqa"]["correct"]) == 3 and b["piqa"]["k"] == [2, 2, 2] and 0 <= b["piqa"]["scores"]["acc"] <= 1
    assert b["piqa"]["scores"]["chance"] == pytest.approx(0.5)
    assert len(b["gsm8k_nll"]["nll"]) == 2 and all(t > 0 for t in b["gsm8k_nll"]["ntok"])
    assert b["wikitext2"]["ntok"] == [47, 47]  # 48-token windows, the first token is context
    assert math.isfinite(b["lambada"]["scores"]["nll"]) and set(b["lambada"]["correct"]) <= {0, 1}
    # a record recomputed by hand from the reference scorer: per-character normalised choice log-likelihoods
    pool = study_suite.load_docs("piqa", DATA_DIR)
    doc = pool[b["piqa"]["items"][0]]
    lls = [r.loglik for r in score_requests_naive(model, [encode_request(tok, doc["query"], " " + c)
                                                          for c in doc["choices"]])]
    norm = np.array(lls) / np.array([len(c) for c in doc["choices"]])
    assert b["piqa"]["correct"][0] == int(np.argmax(norm) == doc["gold"])
    assert b["piqa"]["margin"][0] == pytest.approx(norm[doc["gold"]] - norm[1 - doc["gold"]], abs=1e-5)
    dev = evaluate_items(model, tok, split="dev", benchmarks=["piqa"], overrides={"piqa": TINY["piqa"]},
                         data_dir=DATA_DIR, cache_dir=tmp_path, progress=False)
    assert not set(dev["benchmarks"]["piqa"]["items"]) & set(b["piqa"]["items"])

    def boom(*a, **k):
        raise AssertionError("scored although cached")

    monkeypatch.setattr(study_suite, "score_requests", boom)
    again = evaluate_items(model, tok, benchmarks=list(TINY), overrides=TINY, data_dir=DATA_DIR, cache_dir=tmp_path,
                           progress=False)
    assert again["benchmarks"]["piqa"]["correct"] == b["piqa"]["correct"]
    with pytest.raises(AssertionError, match="cached"):  # other items are another cache entry
        evaluate_items(model, tok, benchmarks=["piqa"], overrides={"piqa": {"test": 4}}, data_dir=DATA_DIR,
                       cache_dir=tmp_path, progress=False)


@needs_data
def test_evaluate_study_suite_summary(tiny_lm):
    from calibprune.evaluation import evaluate, retention

    model, tok = tiny_lm
    res = evaluate(model, tok, "study", benchmarks=["piqa", "gsm8k_nll"], data_dir=DATA_DIR,
                   overrides={"piqa": TINY["piqa"], "gsm8k_nll": TINY["gsm8k_nll"]})
    assert res["benchmarks"]["piqa"]["metric"] == "acc" and res["benchmarks"]["piqa"]["n"] == 3
    assert res["benchmarks"]["gsm8k_nll"]["metric"] == "nll" and not res["benchmarks"]["gsm8k_nll"]["higher_is_better"]
    assert res["benchmarks"]["gsm8k_nll"]["value"] == pytest.approx(res["benchmarks"]["gsm8k_nll"]["scores"]["nll"])
    assert retention(res, res)["dimensions"]["math"] == pytest.approx(1.0)  # piqa may be 0/0 for a random model
