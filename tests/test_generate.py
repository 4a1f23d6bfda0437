"""Self-generated calibration sets (Self-Cal, SGS, IGSP) on a tiny random Llama: shapes, determinism, no padding,
temperature schedule, SGS perplexity filter, IGSP quotas and greedy 4-gram selection, pool caching, errors."""
from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import tiny_model

from calibprune.calibration import CalibrationSet, igsp, self_cal, sgs
from calibprune.calibration.igsp import IGSP_SEED_PROMPTS, greedy_min_aggregation
from calibprune.calibration.sampling import ScheduledTemperature
from calibprune.metrics import calibration_perplexity, ngram_aggregation

VOCAB = 96
EOS, BOS = 0, 1
TEXTS = ["The quick brown fox jumps.", "Alpha beta gamma delta.", "In 1990 the city grew.", "Zebras run fast.",
         "Quantum fields vary.", "Rivers flow to the sea.", "Music is sound in time.", "Hello world again."]


class TinyTokenizer:
    """Stand-in tokenizer for the 96-token test model: EOS = 0, BOS = 1, byte b -> 2 + b % 94."""

    eos_token_id = EOS
    bos_token_id: int | None = BOS
    name_or_path = "tiny-bytes"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + b % 94 for b in t.encode()] for t in texts]}

    def decode(self, ids):
        return "".join(chr(32 + (int(i) - 2) % 94) for i in ids if int(i) > 1)


class NoBosTokenizer(TinyTokenizer):
    bos_token_id = None


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def tok():
    return TinyTokenizer()


@pytest.fixture
def cache(tmp_path):
    return {"cache_dir": tmp_path / "pools", "progress": False}


def _check_rows(calib: CalibrationSet, n: int, seqlen: int) -> None:
    assert isinstance(calib, CalibrationSet)
    assert calib.ids.shape == (n, seqlen) and calib.ids.dtype == torch.int64
    assert int(calib.ids.min()) >= 0 and int(calib.ids.max()) < VOCAB


# --- temperature schedule ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("step,expected", [(0, 2.0), (1, 1.875), (4, 1.5), (8, 1.0), (9, 1.0), (100, 1.0)],
                         ids=lambda v: str(v))
def test_scheduled_temperature_values(step, expected):
    proc = ScheduledTemperature(2.0, 1.0, 8, prompt_len=3)
    assert proc.temperature(step) == pytest.approx(expected)
    scores = torch.randn(2, VOCAB)
    out = proc(torch.zeros(2, 3 + step, dtype=torch.int64), scores)
    torch.testing.assert_close(out, scores / expected)


def test_scheduled_temperature_no_schedule_is_final():
    proc = ScheduledTemperature(3.0, 0.7, 0, prompt_len=1)
    assert proc.temperature(0) == proc.temperature(50) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        ScheduledTemperature(0.0, 1.0, 4, prompt_len=1)


# --- Self-Cal ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,seqlen,batch_size", [(3, 37, 2), (1, 2, 8), (4, 29, 3)],
                         ids=lambda v: str(v))
def test_self_cal_shapes_and_determinism(model, tok, cache, n, seqlen, batch_size):
    a = self_cal(model, tok, n=n, seqlen=seqlen, seed=3, batch_size=batch_size, cache=False, progress=False)
    b = self_cal(model, tok, n=n, seqlen=seqlen, seed=3, batch_size=batch_size, cache=False, progress=False)
    c = self_cal(model, tok, n=n, seqlen=seqlen, seed=4, batch_size=batch_size, cache=False, progress=False)
    _check_rows(a, n, seqlen)
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)
    assert a.row_sources == ["self-cal"] * n
    assert a.provenance["kind"] == "self-cal" and a.provenance["seed"] == 3
    assert a.provenance["generator"]["sampling"]["t_init"] == 1.0


def test_self_cal_no_padding_only_eos_separators(model, tok):
    # A high start temperature over a 96-token vocabulary makes EOS frequent enough to see several generations.
    calib = self_cal(model, tok, n=4, seqlen=80, seed=0, t_init=3.0, t_final=3.0, cache=False, progress=False)
    _check_rows(calib, 4, 80)
    assert calib.provenance["generations"] > 4, "expected some early EOS, hence concatenated generations"
    ids = calib.ids
    assert not (ids[:, 0] == EOS).any(), "a row starts with a separator"
    assert not ((ids[:, 1:] == EOS) & (ids[:, :-1] == EOS)).any(), "doubled EOS: padding or an empty generation"


def test_self_cal_without_bos_starts_from_eos(model, caplog):
    with caplog.at_level(logging.INFO, logger="calibprune.calibration"):
        calib = self_cal(model, NoBosTokenizer(), n=2, seqlen=16, cache=False, progress=False)
    _check_rows(calib, 2, 16)
    assert calib.provenance["start_token"] == EOS and calib.provenance["start_token_is_eos"]
    assert "no BOS" in caplog.text


def test_self_cal_does_not_touch_global_rng(model, tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    self_cal(model, tok, n=1, seqlen=8, cache=False, progress=False)
    assert torch.equal(torch.rand(3), expected)


# --- SGS -----------------------------------------------------------------------------------------------------------

def test_sgs_drops_top_perplexity(model, tok, cache):
    calib = sgs(model, tok, n=8, seqlen=24, seed=1, texts=TEXTS, **cache)
    _check_rows(calib, 8, 24)
    prov = calib.provenance
    assert prov["pool_size"] == 10 and prov["n_dropped"] == 2
    ppl = torch.tensor(prov["pool_perplexity"], dtype=torch.float64)
    dropped = ppl[prov["dropped_pool_indices"]]
    assert set(prov["selected_pool_indices"]).isdisjoint(prov["dropped_pool_indices"])
    selected_ppl = calibration_perplexity(model, calib.ids, per_sample=True)
    torch.testing.assert_close(selected_ppl, ppl[prov["selected_pool_indices"]], rtol=1e-5, atol=0)
    assert selected_ppl.max() <= dropped.min()
    # Each row opens with 2 consecutive tokens of a source text (the start token is not part of the row).
    bigrams = {tuple(x[j:j + 2]) for x in tok(TEXTS)["input_ids"] for j in range(len(x) - 1)}
    assert all(tuple(r[:2].tolist()) in bigrams for r in calib.ids)
    assert prov["generator"]["sampling"] == {"t_init": 0.6, "t_final": 0.6, "schedule_tokens": 0, "top_k": 50,
                                             "top_p": 0.95, "repetition_penalty": 1.2}


def test_sgs_determinism_and_windows(model, tok):
    kw = dict(n=3, seqlen=16, texts=TEXTS, sample_tokens=30, cache=False, progress=False)
    a, b, c = sgs(model, tok, seed=2, **kw), sgs(model, tok, seed=2, **kw), sgs(model, tok, seed=5, **kw)
    _check_rows(a, 3, 16)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert all(0 <= s <= 14 for s in a.provenance["window_starts"])
    assert a.provenance["pool_path"] is None  # cache=False writes nothing
    heads = {tuple(x[:2]) for x in tok(TEXTS)["input_ids"]}
    full = sgs(model, tok, n=3, seqlen=30, seed=2, texts=TEXTS, prefix_position="start", cache=False, progress=False)
    assert full.provenance["generator"]["prefix_position"] == "start"
    assert all(tuple(r[:2].tolist()) in heads for r in full.ids)


# --- IGSP ----------------------------------------------------------------------------------------------------------

def test_igsp_quotas_strata_and_selection(model, tok, cache):
    calib = igsp(model, tok, n=15, seqlen=24, seed=0, **cache)
    _check_rows(calib, 15, 24)
    prov = calib.provenance
    groups = ["general", "commonsense", "code", "math", "bos"]
    assert prov["groups"] == groups
    counts = {g: calib.row_sources.count(f"igsp:{g}") for g in groups}
    assert counts == {g: 3 for g in groups}
    assert prov["stratum_quotas"] == {f"{g}:{s}": 1 for g in groups for s in range(3)}
    assert sorted(prov["row_strata"]) == sorted(f"{g}:{s}" for g in groups for s in range(3))
    # Strata are ordered by perplexity and do not overlap.
    for g, bounds in prov["strata_perplexity_bounds"].items():
        assert all(lo <= hi for lo, hi in bounds)
        assert all(bounds[s][1] <= bounds[s + 1][0] for s in range(len(bounds) - 1)), g
    assert prov["ngram_aggregation"] == pytest.approx(ngram_aggregation(calib.ids)["aggregation"])
    assert prov["ngram_aggregation"] <= prov["ngram_aggregation_random_selection"]
    code_rows = [r for r, s in zip(calib.ids, calib.row_sources) if s == "igsp:code"]
    seeds = {tuple(x) for x in tok(list(IGSP_SEED_PROMPTS["code"]))["input_ids"]}
    assert all(any(tuple(r[:len(s)].tolist()) == s for s in seeds) for r in code_rows)


def test_igsp_determinism(model, tok):
    kw = dict(n=4, seqlen=24, dimensions=["code", "math"], include_bos=False, cache=False, progress=False)
    a, b, c = igsp(model, tok, seed=1, **kw), igsp(model, tok, seed=1, **kw), igsp(model, tok, seed=2, **kw)
    assert torch.equal(a.ids, b.ids) and a.row_sources == b.row_sources
    assert not torch.equal(a.ids, c.ids)
    assert sorted(a.row_sources) == ["igsp:code"] * 2 + ["igsp:math"] * 2


def test_greedy_beats_random_selection():
    # Rows built from a few repeated blocks: a diverse choice exists, a random one often repeats 4-grams.
    from calibprune.ops import ngram_hashes

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(2, VOCAB, (4, 12), generator=g)
    rows = torch.stack([blocks[k % 4] if k % 3 else torch.randint(2, VOCAB, (12,), generator=g) for k in range(24)])
    slots = [k % 2 for k in range(24)]
    hashes, valid = ngram_hashes(rows, 4)
    keys = [set(hashes[r][valid[r]].tolist()) for r in range(24)]
    picked = greedy_min_aggregation(keys, slots, {0: 4, 1: 4})
    assert len(picked) == 8 and sorted(slots[i] for i in picked) == [0] * 4 + [1] * 4
    greedy_agg = ngram_aggregation(rows[picked])["aggregation"]
    rng = torch.Generator().manual_seed(1)
    for _ in range(20):
        rand = [i for s in (0, 1) for i in [j for j in torch.randperm(24, generator=rng).tolist() if slots[j] == s][:4]]
        assert greedy_agg <= ngram_aggregation(rows[rand])["aggregation"]
    with pytest.raises(ValueError, match="quota"):
        greedy_min_aggregation(keys, slots, {0: 13})


def test_igsp_short_group_generates_more_then_relaxes(model, tok, cache):
    """A group short of its quota after the filter generates more chunks (bounded), then admits its least
    repetitive dropped samples; both are in the provenance and nothing fails."""
    prompts = {"general": ["abcabcabcabcabcabc"]}  # every sample repeats 4-grams: a zero threshold drops them all
    calib = igsp(model, tok, n=3, seqlen=24, dimensions=["general"], include_bos=False, seed_prompts=prompts,
                 max_sample_aggregation=0.0, pool_factor=1.0, max_pool_factor=3.0, batch_size=2, **cache)
    _check_rows(calib, 3, 24)
    prov = calib.provenance
    assert prov["pool_sizes"]["general"] == 10  # chunks of 2 up to ceil(3.0 * 3) = 9 samples
    assert prov["topped_up"]["general"] == 10 - 4  # the first pool was ceil(1.0 * 3) -> 2 chunks = 4 samples
    assert prov["relaxed"]["general"]["samples"] == 3
    assert prov["generator"]["max_pool_factor"] == 3.0 and prov["generator"]["max_sample_aggregation"] == 0.0
    # the larger pool extends the cached chunks: a second call with a larger bound generates only new chunks
    again = igsp(model, tok, n=3, seqlen=24, dimensions=["general"], include_bos=False, seed_prompts=prompts,
                 max_sample_aggregation=0.0, pool_factor=1.0, max_pool_factor=4.0, batch_size=2, **cache)
    assert again.provenance["pool_chunks"]["general"] == {"cached": 5, "generated": 1}


def test_igsp_top_up_fills_without_relaxing(model, tok):
    # a loose threshold keeps everything: no top-up, no relaxation
    calib = igsp(model, tok, n=4, seqlen=24, dimensions=["code"], include_bos=True, cache=False, progress=False,
                 max_sample_aggregation=1.0, batch_size=4)
    assert calib.provenance["topped_up"] == {"code": 0, "bos": 0} and calib.provenance["relaxed"] == {}


def test_igsp_bos_share_and_prompts_per_dimension(model, tok):
    calib = igsp(model, tok, n=10, seqlen=24, dimensions=["code", "math"], bos_share=0.4, prompts_per_dimension=2,
                 cache=False, progress=False, max_sample_aggregation=1.0, strata=1, batch_size=4)
    prov = calib.provenance
    assert prov["quotas"] == {"code": 3, "math": 3, "bos": 4}
    assert sorted(calib.row_sources) == ["igsp:bos"] * 4 + ["igsp:code"] * 3 + ["igsp:math"] * 3
    assert prov["generator"]["seed_prompts"] == {"code": list(IGSP_SEED_PROMPTS["code"][:2]),
                                                 "math": list(IGSP_SEED_PROMPTS["math"][:2])}
    assert set(p for p, s in zip(prov["row_seed_prompts"], calib.row_sources) if s == "igsp:code") <= \
        set(IGSP_SEED_PROMPTS["code"][:2])
    only_bos = igsp(model, tok, n=5, seqlen=16, dimensions=[], include_bos=True, cache=False, progress=False,
                    max_sample_aggregation=1.0, batch_size=4)
    assert only_bos.row_sources == ["igsp:bos"] * 5 and only_bos.provenance["quotas"] == {"bos": 5}


# --- caching -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,kw", [(self_cal, {}), (sgs, {"texts": TEXTS}),
                                   (igsp, {"dimensions": ["general"], "include_bos": True})],
                         ids=["self-cal", "sgs", "igsp"])
def test_pool_cache_reused(model, tok, cache, monkeypatch, caplog, fn, kw):
    first = fn(model, tok, n=4, seqlen=16, seed=7, **kw, **cache)
    assert not first.provenance["pool_cached"]
    files = list(cache["cache_dir"].glob("*.pt"))
    assert len(files) == (2 if fn is igsp else 1) and not list(cache["cache_dir"].glob("*.tmp"))  # igsp: per chunk

    def refuse(*args, **kwargs):
        raise AssertionError("generate called although the pool is cached")

    monkeypatch.setattr(type(model), "generate", refuse)
    with caplog.at_level(logging.INFO, logger="calibprune.calibration"):
        second = fn(model, tok, n=4, seqlen=16, seed=7, **kw, **cache)
    assert second.provenance["pool_cached"] and "loaded cached pool" in caplog.text
    assert torch.equal(first.ids, second.ids) and first.row_sources == second.row_sources
    with pytest.raises(AssertionError, match="generate called"):  # another seed is another pool
        fn(model, tok, n=4, seqlen=16, seed=8, **kw, **cache)


def test_pool_cache_key_depends_on_weights(tok, cache):
    a = self_cal(tiny_model("llama", seed=0), tok, n=2, seqlen=8, **cache)
    b = self_cal(tiny_model("llama", seed=1), tok, n=2, seqlen=8, **cache)
    assert a.provenance["pool_path"] != b.provenance["pool_path"]
    assert a.provenance["model"]["fingerprint"] != b.provenance["model"]["fingerprint"]


# --- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,kw,match", [
    (self_cal, {"n": 0}, "n must be"),
    (self_cal, {"seqlen": 1}, "seqlen must be"),
    (self_cal, {"t_init": 0.0}, "temperatures"),
    (sgs, {"n": 0, "texts": TEXTS}, "n must be"),
    (sgs, {"seqlen": 1, "texts": TEXTS}, "seqlen must be"),
    (sgs, {"texts": ["x"], "prefix_tokens": 3}, "prefix"),
    (sgs, {"texts": TEXTS, "pool_factor": 1.0, "drop_fraction": 0.5}, "fewer than n"),
    (sgs, {"texts": TEXTS, "sample_tokens": 4}, "sample_tokens"),
    (igsp, {"n": 0}, "n must be"),
    (igsp, {"seqlen": 1}, "seqlen must be"),
    (igsp, {"dimensions": ["general", "poetry"]}, "unknown IGSP dimension"),
    (igsp, {"seqlen": 6, "dimensions": ["commonsense"]}, "no room"),
    (igsp, {"strata": 0}, "strata"),
    (igsp, {"bos_share": 1.5}, "bos_share"),
    (igsp, {"pool_factor": 3.0, "max_pool_factor": 2.0}, "max_pool_factor"),
    (igsp, {"prompts_per_dimension": 0}, "prompts_per_dimension"),
], ids=["selfcal-n0", "selfcal-seqlen1", "selfcal-t0", "sgs-n0", "sgs-seqlen1", "sgs-short-docs", "sgs-pool-small",
        "sgs-sample-tokens", "igsp-n0", "igsp-seqlen1", "igsp-dimension", "igsp-long-seed", "igsp-strata0",
        "igsp-bos-share", "igsp-max-pool", "igsp-prompts"])
def test_bad_input(model, tok, fn, kw, match):
    args = {"n": 2, "seqlen": 16, "cache": False, "progress": False, **kw}
    with pytest.raises(ValueError, match=match):
        fn(model, tok, **args)
