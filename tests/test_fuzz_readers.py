"""Fuzzing the readers: offline data files (JSONL / JSON arrays / TSV / plain text) and saved calibration ``.pt``
files. Property: a valid result or one clear error (``DataFileError`` / ``CalibrationFileError``, one line, naming
the file), never any other exception.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from _fuzz import TRIED, fuzz_settings, report
from hypothesis import given

from calibprune.calibration import CalibrationSet, load_texts
from calibprune.calibration.calibration_set import CalibrationFileError
from calibprune.calibration.sources import _LOADERS, DataFileError

# -- strategies ------------------------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=40)
_scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | _text
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)
# Field names the readers look for, so that records often get past the "missing field" check.
_FIELDS = ["text", "question", "answer", "task_id", "code", "instruction", "input", "output", "response",
           "prompt", "context", "doc", "label"]
_field_values = _scalars | st.integers(0, 1000) | st.lists(_text, max_size=2)
_record = st.dictionaries(st.sampled_from(_FIELDS) | _text, _field_values, max_size=6)
_jsonl_line = (_record.map(json.dumps) | _json.map(json.dumps) | _text
               | st.binary(max_size=30).map(lambda b: b.decode("latin-1")))

JSONL_SOURCES = {name: _LOADERS[name].files[0] for name in ("c4", "gsm8k", "mbpp", "dolly", "pubmed")}
ARRAY_SOURCES = {"alpaca": _LOADERS["alpaca"].files}
TEXT_SOURCES = {name: _LOADERS[name].files[0] for name in ("wikitext2", "wikipedia", "shakespeare")}


def _check_load(source: str, root: Path, written: Path) -> None:
    try:
        docs = load_texts(source, data_dir=root, source="offline")
    except DataFileError as exc:
        msg = str(exc)
        assert "\n" not in msg and str(root) in msg, msg
        return
    assert isinstance(docs, list) and all(isinstance(d, str) and d and d == d.strip() for d in docs)


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    for name in sorted(k for k in TRIED if not k.startswith("cli")):
        report(name)


# -- JSONL -----------------------------------------------------------------------------------------------------

@fuzz_settings(300)
@given(source=st.sampled_from(sorted(JSONL_SOURCES)), lines=st.lists(_jsonl_line, max_size=8),
       raw_tail=st.binary(max_size=20))
def test_fuzz_jsonl_readers(source, lines, raw_tail):
    TRIED["jsonl records"] += 1
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        path = root / JSONL_SOURCES[source]
        path.parent.mkdir(parents=True)
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + raw_tail)
        _check_load(source, root, path)


# -- JSON arrays (alpaca layout) -------------------------------------------------------------------------------

@fuzz_settings(200)
@given(items=st.lists(_record | _json, max_size=5) | _json, cut=st.integers(0, 400))
def test_fuzz_json_array_reader(items, cut):
    TRIED["json arrays"] += 1
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (path,) = [root / f for f in ARRAY_SOURCES["alpaca"]]
        path.parent.mkdir(parents=True)
        text = json.dumps(items)
        path.write_text(text[: cut] if cut < len(text) and cut % 3 == 0 else text)  # sometimes truncated
        _check_load("alpaca", root, path)


# -- TSV (legal) -------------------------------------------------------------------------------------------------

_cell = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20) | st.sampled_from(
    ['"', '""', "a\tb", "x\ny", "\x00"])


@fuzz_settings(200)
@given(header=st.lists(st.sampled_from(["text", "answer", "idx"]) | _text, min_size=1, max_size=4),
       rows=st.lists(st.lists(_cell, max_size=5), max_size=6))
def test_fuzz_tsv_reader(header, rows):
    TRIED["tsv rows"] += 1
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        path = root / _LOADERS["legal"].files[0]
        path.parent.mkdir(parents=True)
        text = "\n".join("\t".join(r) for r in [header, *rows]) + "\n"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _check_load("legal", root, path)


# -- plain text --------------------------------------------------------------------------------------------------

@fuzz_settings(150)
@given(source=st.sampled_from(sorted(TEXT_SOURCES)), body=st.binary(max_size=300) | _text.map(str.encode))
def test_fuzz_text_readers(source, body):
    TRIED["text files"] += 1
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        path = root / TEXT_SOURCES[source]
        path.parent.mkdir(parents=True)
        path.write_bytes(body)
        _check_load(source, root, path)


# -- saved calibration sets ----------------------------------------------------------------------------------------

_dtypes = st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool])


@st.composite
def _tensors(draw):
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    dtype = draw(_dtypes)
    low, high = draw(st.sampled_from([(0, 100), (-5, 5), (0, 2**31 - 1)]))
    t = torch.randint(low, high, shape or [], generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    if dtype == torch.bool:
        return t > 0
    if dtype == torch.uint8:
        return t.clamp(0, 255).to(dtype)
    if dtype == torch.int16:
        return t.clamp(-2**15, 2**15 - 1).to(dtype)
    return t.to(dtype)


_blobs = st.one_of(
    _tensors(),
    st.fixed_dictionaries({"ids": _tensors()},
                          optional={"row_sources": st.lists(_text, max_size=6) | _scalars,
                                    "ids_sha256": st.sampled_from(["0" * 64, "x"]) | _scalars}),
    st.lists(_scalars, max_size=3),
    st.dictionaries(_text, _scalars, max_size=3),
    _scalars,
)


@fuzz_settings(250)
@given(blob=_blobs, corrupt=st.sampled_from(["none", "truncate", "flip", "garbage"]), cut=st.floats(0, 1),
       meta=st.none() | _text | _json.map(json.dumps), vocab=st.none() | st.integers(1, 200))
def test_fuzz_calibration_files(blob, corrupt, cut, meta, vocab):
    TRIED["calibration .pt files"] += 1
    buf = io.BytesIO()
    torch.save(blob, buf)
    data = buf.getvalue()
    if corrupt == "truncate":
        data = data[: int(len(data) * cut)]
    elif corrupt == "flip" and data:
        k = int((len(data) - 1) * cut)
        data = data[:k] + bytes([data[k] ^ 0xFF]) + data[k + 1:]
    elif corrupt == "garbage":
        data = bytes((i * 37 + int(cut * 255)) % 256 for i in range(int(cut * 500)))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "set.pt"
        path.write_bytes(data)
        if meta is not None:
            path.with_suffix(".json").write_text(meta, encoding="utf-8", errors="surrogatepass")
        try:
            calib = CalibrationSet.load(path, vocab_size=vocab)
        except CalibrationFileError as exc:
            assert "\n" not in str(exc) and str(path.parent) in str(exc), str(exc)
            return
        ids = calib.ids
        assert ids.dtype == torch.int64 and ids.dim() == 2 and ids.shape[0] >= 1 and ids.shape[1] >= 2
        assert int(ids.min()) >= 0 and (vocab is None or int(ids.max()) < vocab)
        assert isinstance(calib.provenance, dict)
