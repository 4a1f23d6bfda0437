"""Tests for the calibration source registry (calibprune.calibration.sources).

Offline-data tests read the copies under the data dir (CALIBPRUNE_DATA_DIR or ../shared/data) and skip when it is
absent; the rest use tmp_path and a fake `datasets` module, so they need neither data nor network.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from calibprune.calibration import sources as S
from calibprune.calibration.sources import (
    DIMENSIONS,
    SOURCES,
    list_sources,
    load_texts,
    resolve_data_dir,
)

OFFLINE = ["c4", "wikitext2", "wikipedia", "shakespeare", "pubmed", "legal", "alpaca", "dolly", "gsm8k", "mbpp",
           "codealpaca", "cosqa"]
ALPACA_LAYOUT = ["alpaca", "dolly", "codealpaca"]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    d = resolve_data_dir()
    if d is None or not d.is_dir():
        pytest.skip("offline data dir not found: set CALIBPRUNE_DATA_DIR to the shared/data folder")
    return d


@pytest.fixture(scope="module")
def texts(data_dir: Path) -> dict[str, list[str]]:
    return {name: load_texts(name, data_dir=data_dir, source="offline") for name in OFFLINE}


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(S.DATA_DIR_ENV, raising=False)


def _fake_c4(root: Path, text: str) -> Path:
    (root / "c4_sample").mkdir(parents=True)
    (root / "c4_sample" / "c4_demo.jsonl").write_text(json.dumps({"text": text}) + "\n\n", encoding="utf-8")
    return root


class _FakeDatasets(types.ModuleType):
    """Stands in for `datasets`: records the load_dataset call and returns canned records."""

    def __init__(self, records: list[dict[str, Any]]):
        super().__init__("datasets")
        self.records = records
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def load_dataset(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        self.calls.append((args, kwargs))
        return self.records


# --------------------------------------------------------------------------------------------- registry


def test_registry_shape() -> None:
    assert len(SOURCES) >= 15
    for name, src in SOURCES.items():
        assert src.name == name
        assert src.dimension in DIMENSIONS
        assert src.hub_id and src.hub_split and src.description and src.licence
        loader = S._LOADERS[name]
        assert loader.hub_record is not None or loader.hub_all is not None, name
        assert (src.offline_path is None) == (loader.offline is None), name
    dims = {d: sorted(n for n, s in SOURCES.items() if s.dimension == d) for d in DIMENSIONS}
    assert {"gsm8k", "metamath", "openwebmath"} <= set(dims["math"])
    assert {"mbpp", "codealpaca", "cosqa"} <= set(dims["code"])
    assert {"alpaca", "dolly"} <= set(dims["commonsense"])
    assert "train" in SOURCES["gsm8k"].description.lower() and "601-974" in SOURCES["mbpp"].description


def test_list_sources_all() -> None:
    assert list_sources() == list(SOURCES)


# --------------------------------------------------------------------------------------------- offline data


def test_list_sources_offline(data_dir: Path) -> None:
    offline = list_sources(offline_only=True, data_dir=data_dir)
    assert len(offline) >= 12
    assert set(OFFLINE) <= set(offline)
    assert not {"metamath", "slimpajama", "openwebmath", "the_stack"} & set(offline)


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_source_loads(name: str, texts: dict[str, list[str]]) -> None:
    docs = texts[name]
    assert len(docs) > 0
    assert all(isinstance(d, str) and d and d == d.strip() and "\r" not in d for d in docs)
    assert len(set(docs)) == len(docs)


def test_offline_deterministic_and_max_docs(data_dir: Path, texts: dict[str, list[str]]) -> None:
    again = load_texts("gsm8k", data_dir=data_dir)  # "auto" must pick the offline copy here
    assert again == texts["gsm8k"]
    assert load_texts("c4", data_dir=data_dir, max_docs=5) == texts["c4"][:5]


def test_gsm8k_layout_and_train_only(data_dir: Path, texts: dict[str, list[str]]) -> None:
    docs = texts["gsm8k"]
    assert docs[0].startswith("Question: Natalia sold clips to 48 of her friends in April")
    assert "\nAnswer: Natalia sold 48/2" in docs[0] and docs[0].endswith("#### 72")
    assert all(d.startswith("Question: ") and "\nAnswer: " in d for d in docs)
    test_file = data_dir / "gsm8k" / "test.jsonl"
    if not test_file.is_file():
        pytest.skip(f"{test_file} absent: cannot check train/test disjointness")
    joined = "\n".join(docs)
    test_qs = [json.loads(line)["question"].strip() for line in test_file.read_text(encoding="utf-8").splitlines()]
    leaked = [q for q in test_qs if q in joined]
    assert not leaked, f"{len(leaked)} gsm8k test questions in calibration text, e.g. {leaked[0][:80]!r}"


def test_mbpp_train_ids_only(data_dir: Path, texts: dict[str, list[str]]) -> None:
    records = [json.loads(line) for line in (data_dir / "mbpp" / "mbpp.jsonl").read_text().splitlines() if line]
    by_id = {r["task_id"]: S._commented_code(r["text"], r["code"]) for r in records}
    docs = set(texts["mbpp"])
    ids = [i for i, doc in by_id.items() if doc in docs]
    outside = sorted(i for i in ids if not 601 <= i <= 974)
    assert ids and not outside, f"mbpp calibration holds non-train task ids {outside[:10]}"
    assert not {by_id[i] for i in by_id if not 601 <= i <= 974} & docs
    # every train task is kept except 704, an exact copy of test task 248
    assert by_id[704] == by_id[248] and by_id[704] not in docs
    assert len(docs) == sum(1 for i in by_id if 601 <= i <= 974) - 1
    assert all(d.startswith("# ") for d in docs)


def test_wikitext2_is_valid_split(data_dir: Path, texts: dict[str, list[str]]) -> None:
    docs = texts["wikitext2"]
    assert docs[0].startswith("= Homarus gammarus =")
    assert all(d.startswith("= ") for d in docs)  # one document per article
    test_file = data_dir / "wikitext-2" / "test.txt"
    if test_file.is_file():
        first_test_title = next(line.strip() for line in test_file.open(encoding="utf-8") if line.strip())
        assert not any(d.startswith(first_test_title) for d in docs)


@pytest.mark.parametrize("name", ALPACA_LAYOUT)
def test_instruction_layout(name: str, texts: dict[str, list[str]]) -> None:
    for d in texts[name]:
        assert d.startswith("Below is an instruction that describes a task")
        assert "\n\n### Instruction:\n" in d and "\n\n### Response:\n" in d


def test_other_layouts(texts: dict[str, list[str]]) -> None:
    assert texts["alpaca"][0].startswith(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDescribe a process of making crepes.\n\n### Response:\nMaking crepes"
    )
    assert texts["c4"][0].startswith("Don’t think you need all the bells and whistles?")
    assert texts["wikipedia"][0].startswith("Anarchism is a political philosophy")
    assert texts["shakespeare"][0].startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert all(len(d) < 4 * S.SHAKESPEARE_CHUNK_CHARS for d in texts["shakespeare"])
    assert len(texts["shakespeare"]) > 50
    pub = texts["pubmed"]
    assert pub[0].startswith("BACKGROUND. Programmed cell death (PCD)")
    assert not any("\nQuestion:" in d or d.startswith("Context:") or "\nAnswer:" in d for d in pub)
    assert texts["legal"][0].startswith("6. Plaintiff Don L. Gross")
    cosqa = texts["cosqa"]
    assert any(d.startswith("# ") and "\ndef " in d for d in cosqa)
    assert all("def " in d or "class " in d for d in cosqa)


# --------------------------------------------------------------------------------------------- data dir resolution


def test_data_dir_explicit_beats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _fake_c4(tmp_path / "explicit", "explicit doc\r\nsecond line  ")
    env = _fake_c4(tmp_path / "env", "env doc")
    monkeypatch.setenv(S.DATA_DIR_ENV, str(env))
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir() == env
    assert load_texts("c4", data_dir=explicit) == ["explicit doc\nsecond line"]
    assert load_texts("c4") == ["env doc"]
    assert list_sources(offline_only=True) == ["c4"]


def test_data_dir_default_candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_env: None) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _fake_c4(tmp_path / "shared" / "data", "from ../shared/data")  # ../shared/data relative to cwd
    assert resolve_data_dir() == (tmp_path / "shared" / "data").resolve()
    _fake_c4(work / "shared" / "data", "from ./shared/data")  # ./shared/data wins over ../shared/data
    assert resolve_data_dir() == (work / "shared" / "data").resolve()
    assert load_texts("c4") == ["from ./shared/data"]


# --------------------------------------------------------------------------------------------- errors


def test_unknown_source_suggests() -> None:
    with pytest.raises(ValueError, match="Unknown calibration source 'gsm8'") as exc:
        load_texts("gsm8")
    assert "Did you mean 'gsm8k'?" in str(exc.value)
    assert "Known sources:" in str(exc.value) and "wikitext2" in str(exc.value)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="source must be"):
        load_texts("c4", source="local")
    with pytest.raises(ValueError, match="max_docs"):
        load_texts("c4", max_docs=0)


def test_offline_missing_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        load_texts("gsm8k", data_dir=tmp_path, source="offline")
    msg = str(exc.value)
    assert str(tmp_path / "gsm8k" / "train.jsonl") in msg and "CALIBPRUNE_DATA_DIR" in msg
    with pytest.raises(FileNotFoundError) as exc:
        load_texts("codealpaca", data_dir=tmp_path, source="offline")
    assert str(tmp_path / "codealpaca" / "code_alpaca_2k.json") in str(exc.value)
    assert str(tmp_path / "codealpaca" / "new_codealpaca.json") in str(exc.value)


def test_offline_requested_for_hub_only(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no offline copy.*meta-math/MetaMathQA"):
        load_texts("metamath", data_dir=tmp_path, source="offline")


@pytest.mark.parametrize("mode", ["hub", "auto"])
def test_hub_without_datasets(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=r"pip install datasets.*hub must be reachable") as exc:
        load_texts("gsm8k", data_dir=tmp_path, source=mode)
    if mode == "auto":  # the fallback explains why it went to the hub
        assert str(tmp_path / "gsm8k" / "train.jsonl") in str(exc.value)


def test_hub_without_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(S._LOADERS, "metamath", S._Loader())
    with pytest.raises(ValueError, match="'metamath' has no hub loader"):
        load_texts("metamath", source="hub")


# --------------------------------------------------------------------------------------------- hub path (fake datasets)


def test_hub_gsm8k_uses_train(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeDatasets([{"question": " What is 2+2?\r\n", "answer": "2+2 = 4\n#### 4"},
                          {"question": "No answer?", "answer": " "}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_texts("gsm8k", source="hub") == ["Question: What is 2+2?\nAnswer: 2+2 = 4\n#### 4"]
    assert fake.calls == [(("openai/gsm8k", "main"), {"split": "train"})]
    monkeypatch.setitem(SOURCES, "gsm8k", dataclasses.replace(SOURCES["gsm8k"], hub_split="test"))
    with pytest.raises(RuntimeError, match="must use the hub split 'train'"):
        load_texts("gsm8k", source="hub")


def test_hub_mbpp_filters_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [{"task_id": i, "text": f"task {i}", "code": f"def f{i}():\r\n    return {i}"}
            for i in (5, 300, 600, 601, 704, 974)]
    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets(recs))
    assert load_texts("mbpp", source="hub") == ["# task 601\ndef f601():\n    return 601",
                                                 "# task 974\ndef f974():\n    return 974"]


def test_hub_formatters(monkeypatch: pytest.MonkeyPatch) -> None:
    cases: dict[str, tuple[list[dict[str, Any]], list[str]]] = {
        "wikitext2": ([{"text": ""}, {"text": " = A = \n"}, {"text": ""}, {"text": " Alpha text . \n"},
                       {"text": " = = Sub = = \n"}, {"text": " = B = \n"}, {"text": " Beta . \n"}],
                      ["= A =\nAlpha text .\n= = Sub = =", "= B =\nBeta ."]),
        "pubmed": ([{"context": {"contexts": ["Bg.", "Res."], "labels": ["BACKGROUND", "RESULTS"], "meshes": []}}],
                   ["BACKGROUND. Bg.\nRESULTS. Res."]),
        "dolly": ([{"instruction": "Why?", "context": "", "response": "Because."}],
                  [S._ALPACA_HEADER + "\n\n### Instruction:\nWhy?\n\n### Response:\nBecause."]),
        "metamath": ([{"query": "Q?", "response": "A."}], ["Question: Q?\nAnswer: A."]),
        "c4": ([{"text": "web"}], ["web"]),
    }
    for name, (records, expected) in cases.items():
        fake = _FakeDatasets(records)
        monkeypatch.setitem(sys.modules, "datasets", fake)
        assert load_texts(name, source="hub") == expected, name
        src = SOURCES[name]
        assert fake.calls[0][0] == (src.hub_id, src.hub_config) and fake.calls[0][1]["split"] == src.hub_split
    assert fake.calls[0][1].get("streaming") is True  # c4 streams


def test_auto_falls_back_to_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets([{"text": "hub doc"}]))
    assert load_texts("c4", data_dir=tmp_path) == ["hub doc"]
    _fake_c4(tmp_path, "offline doc")
    assert load_texts("c4", data_dir=tmp_path) == ["offline doc"]
