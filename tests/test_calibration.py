"""build_calibration: exact window shapes, determinism, packing with EOS, mixing proportions, errors."""
from __future__ import annotations

import pytest
import torch

from calibprune.calibration import CalibrationSet, as_token_ids, build_calibration, resolve_data_dir
from calibprune.calibration.calibration_set import allocate_counts

needs_data = pytest.mark.skipif(resolve_data_dir() is None,
                                reason="offline data not found (set CALIBPRUNE_DATA_DIR to shared/data)")


class CharTokenizer:
    """A deterministic stand-in tokenizer: one id per byte, EOS = 0."""

    eos_token_id = 0
    name_or_path = "char"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[b + 1 for b in t.encode()[:4000]] for t in texts]}


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@needs_data
@pytest.mark.parametrize("source", ["c4", "wikitext2", "wikipedia", "gsm8k", "codealpaca", "alpaca"])
def test_exact_windows_and_determinism(tok, source):
    a = build_calibration(tok, source, n=5, seqlen=97, seed=3)
    b = build_calibration(tok, source, n=5, seqlen=97, seed=3)
    c = build_calibration(tok, source, n=5, seqlen=97, seed=4)
    assert a.ids.shape == (5, 97) and a.ids.dtype == torch.int64
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)
    assert a.row_sources == [source] * 5
    assert a.provenance["counts"] == {source: 5} and a.provenance["seed"] == 3


@needs_data
def test_short_documents_are_packed_with_eos(tok):
    calib = build_calibration(tok, "gsm8k", n=4, seqlen=1000, seed=0)
    eos_per_row = (calib.ids == tok.eos_token_id).sum(1)
    assert torch.all(eos_per_row >= 1), "GSM8K problems are shorter than 1000 bytes, so every row holds a separator"


@needs_data
def test_uniform_and_weighted_mix(tok):
    uniform = build_calibration(tok, ["c4", "gsm8k", "codealpaca"], n=9, seqlen=64)
    assert sorted(uniform.row_sources) == sorted(["c4"] * 3 + ["gsm8k"] * 3 + ["codealpaca"] * 3)
    weighted = build_calibration(tok, {"c4": 3, "gsm8k": 1}, n=8, seqlen=64)
    assert weighted.provenance["counts"] == {"c4": 6, "gsm8k": 2}
    assert weighted.provenance["weights"] == pytest.approx({"c4": 0.75, "gsm8k": 0.25})
    # a source's rows do not depend on its mix partners
    alone = build_calibration(tok, "gsm8k", n=2, seqlen=64)
    mixed_rows = weighted.ids[[i for i, s in enumerate(weighted.row_sources) if s == "gsm8k"]]
    assert {tuple(r.tolist()) for r in mixed_rows} == {tuple(r.tolist()) for r in alone.ids}


def test_allocate_counts_largest_remainder():
    assert allocate_counts({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10) == {"a": 4, "b": 3, "c": 3}
    assert allocate_counts({"a": 0.5, "b": 0.5}, 7) == {"a": 4, "b": 3}
    assert sum(allocate_counts({"a": 0.1, "b": 0.2, "c": 0.7}, 128).values()) == 128


@pytest.mark.parametrize("kwargs,match", [
    (dict(sources="c5"), "Did you mean 'c4'"),
    (dict(sources=[]), "no calibration source"),
    (dict(sources="c4", n=0), "n must be >= 1"),
    (dict(sources="c4", seqlen=1), "seqlen must be >= 2"),
    (dict(sources={"c4": -1.0, "gsm8k": 2.0}), "weights must be"),
    (dict(sources=["c4", "c4"]), "duplicate"),
])
def test_bad_requests_fail_before_reading(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_calibration(tok, **kwargs)


def test_missing_offline_file_names_the_path(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_calibration(tok, "c4", n=1, seqlen=8, data_dir=tmp_path, data_source="offline")


def test_save_load_and_plain_tensor(tmp_path):
    ids = torch.randint(0, 50, (3, 11))
    calib = CalibrationSet(ids=ids, provenance={"kind": "test"}, row_sources=["x"] * 3)
    path = calib.save(tmp_path / "set")
    again = CalibrationSet.load(path)
    assert torch.equal(again.ids, ids) and again.provenance == {"kind": "test"} and again.row_sources == ["x"] * 3
    assert as_token_ids(ids) is ids
    with pytest.raises(ValueError, match="empty or too short"):
        as_token_ids(torch.zeros(0, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        as_token_ids(torch.zeros(2, 5, dtype=torch.int32))


def test_few_long_documents_are_packed_not_repeated(tok, monkeypatch):
    """A long-document source whose long documents hold too little text is packed, so windows do not repeat."""
    from calibprune.calibration import calibration_set as cs

    # 3 long documents (2 x 40 + 1 x 30 bytes = 110 tokens) among 40 short ones
    texts = ["L" * 40, "M" * 40, "N" * 30] + [f"short {i:02d}" for i in range(40)]
    monkeypatch.setattr(cs, "check_available", lambda *a, **k: "offline")
    monkeypatch.setattr(cs, "load_texts", lambda *a, **k: list(texts))
    docs = [torch.tensor(x).numpy() for x in tok(texts)["input_ids"]]
    # 4 windows of 30 need 240 long-document tokens for random windows: 110 is too few
    assert not cs._use_random_windows(docs, 4, 30) and cs._use_random_windows(docs, 1, 30)
    packed = build_calibration(tok, "pubmed", n=4, seqlen=30, seed=0)
    assert packed.provenance["sampling"] == {"pubmed": "packed"}
    assert (packed.ids == tok.eos_token_id).any(), "packed rows hold EOS separators"
    assert len({tuple(r.tolist()) for r in packed.ids}) == 4
    windows = build_calibration(tok, "pubmed", n=1, seqlen=30, seed=0)
    assert windows.provenance["sampling"] == {"pubmed": "random windows"}
    assert not (windows.ids == tok.eos_token_id).any()
