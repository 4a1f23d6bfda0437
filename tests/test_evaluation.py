"""Capability evaluation: retention arithmetic, offline lm-eval task configs, likelihood proxy, evaluate()."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from tiny_models import tiny_model

from calibprune.calibration.sources import resolve_data_dir
from calibprune.evaluation import capabilities
from calibprune.evaluation.benchmarks import BENCHMARKS, load_docs, render_lm_eval_task
from calibprune.evaluation.capabilities import SUITES, evaluate, resolve_plan, retention
from calibprune.evaluation.lm_eval_functions import (
    extract_boxed,
    gsm8k_process_results,
    humaneval_process_results,
    math_process_results,
    mbpp_process_results,
    normalize_math_answer,
)
from calibprune.evaluation.proxies import encode_pairs, solution_nll

DATA_DIR = resolve_data_dir()
HAS_DATA = DATA_DIR is not None and (DATA_DIR / "mmlu").is_dir()
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="offline eval data not found (set CALIBPRUNE_DATA_DIR)")
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install 'calibprune[eval]')")

LM_EVAL_BENCHMARKS = [n for n, b in BENCHMARKS.items() if b.kind == "lm_eval"]
# fields every converted document must have, by benchmark
EXPECTED_FIELDS = {
    "lambada": {"context", "target"},
    "winogrande": {"options", "continuation", "gold"},
    "humaneval": {"prompt", "solution", "test", "entry_point"},
    "mbpp": {"prompt", "solution", "test_list", "task_id"},
    "gsm8k": {"prompt", "target", "answer"},
    "math": {"prompt", "solution"},
}
MC_FIELDS = {"query", "choices", "gold"}


def byte_tokenizer():
    """A lossless byte-level tokenizer with 257 ids (256 bytes + ``<eos>``), built locally in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tiny_lm():
    tok = byte_tokenizer()
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------------------------
# Retention arithmetic
# ---------------------------------------------------------------------------------------------------------------


def _res(values: dict[str, float]) -> dict:
    return {"benchmarks": {n: {"dimension": BENCHMARKS[n].dimension, "metric": BENCHMARKS[n].metric,
                               "higher_is_better": BENCHMARKS[n].higher_is_better, "value": v, "n": 10}
                           for n, v in values.items()}}


def test_retention_arithmetic():
    dense = _res({"mmlu": 0.40, "lambada": 0.50, "wikitext2": 20.0, "hellaswag": 0.60, "piqa": 0.70,
                  "humaneval_nll": 1.0, "mbpp_nll": 2.0, "gsm8k_nll": 1.5, "math": 0.20})
    pruned = _res({"mmlu": 0.30, "lambada": 0.25, "wikitext2": 40.0, "hellaswag": 0.45, "piqa": 0.70,
                   "humaneval_nll": 1.5, "mbpp_nll": 2.0, "gsm8k_nll": 1.5 + math.log(4), "math": 0.05})
    r = retention(pruned, dense)
    b = r["benchmarks"]
    assert b["mmlu"]["retention"] == pytest.approx(0.75)
    assert b["wikitext2"]["retention"] == pytest.approx(0.5)  # dense ppl / pruned ppl
    assert b["humaneval_nll"]["retention"] == pytest.approx(math.exp(-0.5))  # exp(NLL_dense - NLL_pruned)
    assert b["gsm8k_nll"]["retention"] == pytest.approx(0.25)  # ppl ratio 1/4
    assert b["mbpp_nll"]["retention"] == pytest.approx(1.0)
    general = (0.75 + 0.5 + 0.5) / 3
    commonsense = (0.75 + 1.0) / 2
    code = (math.exp(-0.5) + 1.0) / 2
    maths = (0.25 + 0.25) / 2
    assert r["dimensions"] == pytest.approx({"general": general, "commonsense": commonsense, "code": code,
                                             "math": maths})
    assert r["total"] == pytest.approx((general + commonsense + code + maths) / 4)
    assert r["missing"] == []


def test_retention_missing_undefined_and_mismatch(caplog):
    dense = _res({"mmlu": 0.0, "lambada": 0.5, "piqa": 0.7})
    pruned = _res({"mmlu": 0.1, "lambada": 0.4, "arc_easy": 0.5})
    r = retention(pruned, dense)
    assert r["missing"] == ["arc_easy", "piqa"]
    assert math.isnan(r["benchmarks"]["mmlu"]["retention"])  # dense 0: undefined, left out of the mean
    assert r["dimensions"]["general"] == pytest.approx(0.8)
    assert r["total"] == pytest.approx(0.8)  # only General is available (warned)
    bad = _res({"lambada": 0.4})
    bad["benchmarks"]["lambada"]["metric"] = "acc_norm"
    with pytest.raises(ValueError, match="lambada"):
        retention(bad, dense)
    with pytest.raises(ValueError, match="benchmarks"):
        retention({"mmlu": 1}, dense)


# ---------------------------------------------------------------------------------------------------------------
# Offline task configs (no model)
# ---------------------------------------------------------------------------------------------------------------


@needs_data
@needs_lm_eval
def test_offline_task_configs_load(tmp_path):
    from lm_eval.tasks import TaskManager

    for name in LM_EVAL_BENCHMARKS:
        docs = load_docs(name, DATA_DIR)[:3]
        render_lm_eval_task(name, docs, tmp_path, data_dir=DATA_DIR)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = manager.load([BENCHMARKS[n].task_name for n in LM_EVAL_BENCHMARKS])["tasks"]
    for name in LM_EVAL_BENCHMARKS:
        task = tasks[BENCHMARKS[name].task_name]
        docs = list(task.test_docs())
        assert len(docs) == 3, name
        assert EXPECTED_FIELDS.get(name, MC_FIELDS) <= set(docs[0]), name
        # the prompt renders, and multiple-choice targets index into the choices
        text = task.doc_to_text(docs[0])
        if name == "winogrande":
            assert text == docs[0]["gold"] and len(task.doc_to_choice(docs[0])) == 2
        else:
            assert isinstance(text, str) and text
        if "choices" in docs[0]:
            assert 0 <= task.doc_to_target(docs[0]) < len(task.doc_to_choice(docs[0]))
    # few-shot examples come from the non-test slices and carry their answers
    gsm8k = tasks["calibprune_gsm8k"]
    doc = next(iter(gsm8k.test_docs()))
    ctx = gsm8k.fewshot_context(doc, num_fewshot=2)
    assert ctx.count("#### ") == 2 and ctx.endswith(doc["prompt"])
    mbpp = tasks["calibprune_mbpp"]
    doc = next(iter(mbpp.test_docs()))
    ctx = mbpp.fewshot_context(doc, num_fewshot=3)
    assert ctx.count("[DONE]") == 3 and ctx.endswith(doc["prompt"])


@needs_data
def test_offline_docs_all_benchmarks():
    expected_min = {"mmlu": 10000, "hellaswag": 9000, "mbpp": 300, "humaneval": 124, "gsm8k": 1000}
    for name, bench in BENCHMARKS.items():
        if bench.kind == "perplexity":
            continue
        docs = load_docs(name, DATA_DIR)
        assert len(docs) >= expected_min.get(name.removesuffix("_nll"), 1), name
    mbpp_ids = {d["task_id"] for d in load_docs("mbpp", DATA_DIR)}
    assert min(mbpp_ids) >= 11 and max(mbpp_ids) <= 510  # test ids only
    mmlu = load_docs("mmlu", DATA_DIR)
    assert len({d["subject"] for d in mmlu[:57]}) == 57  # subjects interleaved
    five_shot = load_docs("mmlu", DATA_DIR, {"num_fewshot": 5})[0]["query"]
    assert five_shot.count("\nAnswer:") == 6
    assert "<<" not in load_docs("gsm8k_nll", DATA_DIR)[0]["solution"]


# ---------------------------------------------------------------------------------------------------------------
# Likelihood proxy vs a hand loop
# ---------------------------------------------------------------------------------------------------------------


def test_solution_nll_matches_hand_loop(tiny_lm):
    model, tok = tiny_lm
    pairs = [("def f(x):\n", "    return x + 1\n"), ("Question: 2+3?\nAnswer:", " 5"),
             ("A much longer prompt that will be cut on the left " * 3, " and its tail.")]
    max_length = 96
    got = solution_nll(model, tok, pairs, max_length=max_length, batch_size=2, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt, sol in pairs:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            s = tok(sol, add_special_tokens=False)["input_ids"]
            p = p[len(p) - (max_length - len(s)):] if len(p) + len(s) > max_length else p
            ids = torch.tensor([p + s])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for j in range(len(p), len(p) + len(s)):
                nll -= float(logp[j - 1, ids[0, j]])
                count += 1
    assert got.n_tokens == count and got.n_items == 3
    assert got.nll_sum == pytest.approx(nll, rel=1e-4)
    assert got.mean_nll == pytest.approx(nll / count, rel=1e-4)


def test_encode_pairs_keeps_solution():
    tok = byte_tokenizer()
    (ids, n), = encode_pairs(tok, [("x" * 50, "abc")], max_length=10)
    assert len(ids) == 10 and n == 3 and tok.decode(ids[-3:]) == "abc"
    assert encode_pairs(tok, [("p", "")], max_length=10) == []


# ---------------------------------------------------------------------------------------------------------------
# Scorers of the generative tasks
# ---------------------------------------------------------------------------------------------------------------


def test_generative_scorers():
    doc = {"answer": "6 * 2 = <<6*2=12>>12\n#### 1,200"}
    assert gsm8k_process_results(doc, ["so #### 1200."]) == {"exact_match": 1}
    assert gsm8k_process_results(doc, ["the answer is 1200"]) == {"exact_match": 0}
    assert extract_boxed(r"so $\boxed{\frac{1}{2}}$ and \boxed{x^{2}}") == "x^{2}"
    assert normalize_math_answer(r"\left( 3, \dfrac{1}{2} \right)") == normalize_math_answer(r"(3,\frac{1}{2})")
    assert math_process_results({"solution": r"it is $\boxed{5}$."}, [r"We get \boxed{5.0}"]) == {"exact_match": 1}


@needs_data
def test_code_scorers_pass_reference_and_fail_wrong(monkeypatch):
    he = load_docs("humaneval", DATA_DIR)[0]
    mb = load_docs("mbpp", DATA_DIR)[0]
    with pytest.raises(RuntimeError, match="allow_code_execution"):
        humaneval_process_results(he, [he["solution"]])
    monkeypatch.setenv("CALIBPRUNE_ALLOW_CODE_EXECUTION", "1")
    assert humaneval_process_results(he, [he["solution"]]) == {"pass@1": 1}
    assert humaneval_process_results(he, ["    return None\n"]) == {"pass@1": 0}
    assert mbpp_process_results(mb, [mb["solution"] + "\n[DONE] trailing"]) == {"pass@1": 1}
    assert mbpp_process_results(mb, ["def nothing(): pass"]) == {"pass@1": 0}


# ---------------------------------------------------------------------------------------------------------------
# evaluate(): errors first, then a smoke run and the cache
# ---------------------------------------------------------------------------------------------------------------


def test_errors_before_any_evaluation(tmp_path):
    with pytest.raises(ValueError, match="unknown suite 'lightt'.*'lite'"):
        resolve_plan("lightt")
    with pytest.raises(ValueError, match="unknown benchmark 'hellaswg'"):
        resolve_plan("lite", benchmarks=["hellaswag", "hellaswg"])
    with pytest.raises(ValueError, match="unknown dimension 'maths'"):
        resolve_plan("lite", dimensions=["maths"])
    with pytest.raises(ValueError, match="unknown option"):
        resolve_plan("lite", overrides={"mmlu": {"limt": 3}})
    with pytest.raises(ValueError, match="limit"):
        resolve_plan("lite", limit=0)
    with pytest.raises(ValueError, match="unknown option.*max_windows"):  # WikiText-2 is sized by windows
        resolve_plan("lite", overrides={"wikitext2": {"limit": 3}})
    with pytest.raises(ValueError, match="not among the selected"):
        resolve_plan("lite", overrides={"boolq": {"limit": 3}})
    with pytest.raises(ValueError, match="allow_code_execution"):
        resolve_plan("paper", benchmarks=["humaneval"], data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gsm8k" / "test.jsonl")):
        resolve_plan("lite", benchmarks=["gsm8k_nll"], data_dir=tmp_path)
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "arc_easy.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="0 documents"):
        resolve_plan("lite", benchmarks=["arc_easy"], data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown suite"):  # evaluate() fails the same way, before the model runs
        evaluate(None, None, suite="nope")


@needs_data
def test_suites_resolve_offline():
    lite = resolve_plan("lite", limit=2)
    assert set(lite["options"]) == set(SUITES["lite"])
    dims = {BENCHMARKS[n].dimension for n in lite["options"]}
    assert dims == {"general", "commonsense", "code", "math"}
    for dim in dims:  # >= 2 benchmarks per dimension
        assert sum(BENCHMARKS[n].dimension == dim for n in lite["options"]) >= 2
    assert all(len(d) == 2 for d in lite["docs"].values() if d is not None)
    hub = resolve_plan("paper", offline=False, allow_code_execution=True)
    assert hub["docs"]["hellaswag"] is None  # the standard lm-eval task reads the hub at run time
    paper = resolve_plan("paper", allow_code_execution=True)
    assert paper["options"]["mmlu"]["num_fewshot"] == 5
    assert len(paper["docs"]["hellaswag"]) == 9842


TINY_OVERRIDES = {"wikitext2": {"seqlen": 64, "max_windows": 2}, "humaneval_nll": {"max_length": 128},
                  "mbpp_nll": {"max_length": 128}, "gsm8k_nll": {"max_length": 128}, "math_nll": {"max_length": 128}}


@pytest.mark.slow
@needs_data
@needs_lm_eval
def test_evaluate_lite_smoke(tiny_lm):
    model, tok = tiny_lm
    res = evaluate(model, tok, suite="lite", limit=2, overrides=TINY_OVERRIDES, batch_size=4, max_length=512)
    assert set(res["benchmarks"]) == set(SUITES["lite"])
    for name, b in res["benchmarks"].items():
        assert b["dimension"] == BENCHMARKS[name].dimension and math.isfinite(b["value"]), name
        if BENCHMARKS[name].kind == "lm_eval":
            assert b["n"] == 2 and 0.0 <= b["value"] <= 1.0, name
        elif BENCHMARKS[name].kind == "proxy":
            assert b["value"] > 0 and b["n"] == 2
    assert res["benchmarks"]["wikitext2"]["metric"] == "perplexity"
    assert set(res["dimensions"]) == {"general", "commonsense", "code", "math"}
    json.dumps(res)  # serialisable
    assert retention(res, res)["total"] == pytest.approx(1.0)


@needs_data
@needs_lm_eval
def test_evaluate_cache_hit(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    kwargs = dict(suite="lite", limit=2, benchmarks=["arc_easy", "gsm8k_nll", "wikitext2"],
                  overrides={k: TINY_OVERRIDES[k] for k in ("wikitext2", "gsm8k_nll")}, batch_size=4,
                  max_length=512, cache_dir=tmp_path / "cache", cache_key="tiny-llama-dense")
    res = evaluate(model, tok, **kwargs)
    assert res["provenance"]["cache"]["hit"] is False
    assert {b["n"] for b in res["benchmarks"].values()} == {2}
    assert set(res["dimensions"]) == {"general", "commonsense", "math"}

    def boom(*a, **k):
        raise AssertionError("the model must not be evaluated on a cache hit")

    monkeypatch.setattr(capabilities, "_run_lm_eval", boom)
    monkeypatch.setattr(capabilities, "solution_nll", boom)
    monkeypatch.setattr(capabilities, "perplexity", boom)
    again = evaluate(model, tok, **kwargs)
    assert again["provenance"]["cache"]["hit"] is True
    assert again["benchmarks"] == res["benchmarks"]
    with pytest.raises(AssertionError, match="cache hit"):  # a different limit is a different entry
        evaluate(model, tok, **{**kwargs, "limit": 3})


def test_cache_key_default_separates_pruned(tiny_lm):
    model, _ = tiny_lm
    fp = capabilities.model_fingerprint(model)
    pruned = tiny_model("llama")
    pruned.resize_token_embeddings(257, mean_resizing=False)
    with torch.no_grad():
        pruned.load_state_dict(model.state_dict())
        w = pruned.model.layers[0].mlp.down_proj.weight
        w[:, ::2] = 0
    assert capabilities.model_fingerprint(pruned) != fp
