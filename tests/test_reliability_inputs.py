"""Bad inputs get one clear error naming the file and what is wrong, before any work (issue 13).

Calibration ``.pt`` files, offline data files (JSONL / JSON / TSV / text), missing offline copies with an
unreachable hub, and model references (broken config, mistyped relative path, unknown hub id offline).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from calibprune import models
from calibprune.calibration import CalibrationSet, build_calibration, load_texts
from calibprune.calibration import sources as S
from calibprune.calibration.calibration_set import CalibrationFileError, calibration_paths, ids_sha256
from calibprune.calibration.sources import DataFileError, DataUnavailableError, file_sha256

UNREACHABLE = "the hub (huggingface.co:443) is not reachable: test"


class CharTokenizer:
    """One id per byte, EOS = 0."""

    eos_token_id = 0
    name_or_path = "char"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[b + 1 for b in t.encode()[:4000]] for t in texts]}


# -- saved calibration sets -----------------------------------------------------------------------------------

def _good(tmp_path: Path) -> Path:
    ids = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))
    return CalibrationSet(ids=ids, provenance={"kind": "test"}, row_sources=["x"] * 3).save(tmp_path / "set")


def _bad_calibration_files(tmp_path: Path) -> dict[str, Path]:
    good = _good(tmp_path)
    cases: dict[str, Path] = {}
    cases["garbage"] = tmp_path / "garbage.pt"
    cases["garbage"].write_bytes(os.urandom(300))
    cases["truncated"] = tmp_path / "truncated.pt"
    cases["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["empty-file"] = tmp_path / "empty-file.pt"
    cases["empty-file"].write_bytes(b"")
    for name, blob in {
        "plain-tensor": torch.randint(0, 50, (3, 11)),
        "not-a-dict": [1, 2, 3],
        "no-ids": {"row_sources": []},
        "float-ids": {"ids": torch.rand(3, 11)},
        "one-dim": {"ids": torch.arange(11)},
        "no-rows": {"ids": torch.zeros(0, 11, dtype=torch.int64)},
        "one-column": {"ids": torch.zeros(3, 1, dtype=torch.int64)},
        "negative-ids": {"ids": torch.tensor([[1, 2, -3], [4, 5, 6]])},
        "bad-checksum": {"ids": torch.ones(2, 4, dtype=torch.int64), "ids_sha256": "0" * 64},
        "bad-row-sources": {"ids": torch.ones(2, 4, dtype=torch.int64), "row_sources": ["a"]},
    }.items():
        cases[name] = tmp_path / f"{name}.pt"
        torch.save(blob, cases[name])
    cases["bad-json"] = tmp_path / "bad-json.pt"
    torch.save({"ids": torch.ones(2, 4, dtype=torch.int64)}, cases["bad-json"])
    cases["bad-json"].with_suffix(".json").write_text("{not json")
    return cases


EXPECTED = {
    "garbage": "not a readable calibration set", "truncated": "not a readable calibration set",
    "empty-file": "not a readable calibration set", "plain-tensor": "plain tensor",
    "not-a-dict": "expected a dict", "no-ids": "expected a dict", "float-ids": "integer token ids",
    "one-dim": "integer token ids", "no-rows": "empty or too short", "one-column": "empty or too short",
    "negative-ids": "negative", "bad-checksum": "checksum", "bad-row-sources": "row_sources",
    "bad-json": "not valid JSON",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_calibration_file_named_in_one_clear_error(tmp_path, case):
    path = _bad_calibration_files(tmp_path)[case]
    with pytest.raises(CalibrationFileError) as exc:
        CalibrationSet.load(path)
    msg = str(exc.value)
    assert EXPECTED[case] in msg and path.name in msg and "\n" not in msg, msg


def test_out_of_vocabulary_ids(tmp_path):
    path = _good(tmp_path)  # ids in [0, 50)
    assert CalibrationSet.load(path, vocab_size=50).n == 3
    with pytest.raises(CalibrationFileError, match=r"outside the tokenizer's vocabulary \[0, 40\)"):
        CalibrationSet.load(path, vocab_size=40)


def test_save_is_atomic_and_names_are_predictable(tmp_path):
    assert calibration_paths(tmp_path / "a") == (tmp_path / "a.pt", tmp_path / "a.json")
    assert calibration_paths(tmp_path / "a.pt") == (tmp_path / "a.pt", tmp_path / "a.json")
    assert calibration_paths(tmp_path / "a.v2") == (tmp_path / "a.v2.pt", tmp_path / "a.v2.json")
    path = _good(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.json", "set.pt"]  # no temporary files left
    assert torch.load(path, weights_only=True)["ids_sha256"] == ids_sha256(CalibrationSet.load(path).ids)


# -- offline data files --------------------------------------------------------------------------------------

def _write(root: Path, rel: str, data: bytes | str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


GOOD_C4 = json.dumps({"text": "fine"}) + "\n"
DATA_CASES = {
    # name: (source, relative file, content, expected message part, line)
    "jsonl-control-char": ("c4", "c4_sample/c4_demo.jsonl", GOOD_C4 + '{"text": "a\tb\x01"}\n',
                           "not valid JSON", 2),
    "jsonl-truncated": ("c4", "c4_sample/c4_demo.jsonl", GOOD_C4 + '{"text": "cut', "not valid JSON", 2),
    "jsonl-not-object": ("c4", "c4_sample/c4_demo.jsonl", GOOD_C4 + "[1, 2]\n", "expected a JSON object", 2),
    "jsonl-missing-field": ("c4", "c4_sample/c4_demo.jsonl", GOOD_C4 * 2 + '{"txt": "x"}\n',
                            "no field 'text'", 3),
    "jsonl-number-text": ("c4", "c4_sample/c4_demo.jsonl", GOOD_C4 + '{"text": 12}\n', "expected text", 2),
    "jsonl-not-utf8": ("c4", "c4_sample/c4_demo.jsonl", GOOD_C4.encode() + b'{"text": "\xff\xfe"}\n',
                       "not UTF-8", None),
    "gsm8k-missing-answer": ("gsm8k", "gsm8k/train.jsonl", '{"question": "q"}\n', "no field 'answer'", 1),
    "mbpp-bad-task-id": ("mbpp", "mbpp/mbpp.jsonl", '{"task_id": "six", "text": "t", "code": "c"}\n',
                         "task_id 'six' is not an integer", 1),
    "json-array-broken": ("alpaca", "alpaca_en_demo/alpaca_en_demo.json", '[{"instruction": "i",\n "output": ',
                          "not valid JSON", 2),
    "json-not-array": ("alpaca", "alpaca_en_demo/alpaca_en_demo.json", '{"instruction": "i"}',
                       "expected a JSON array", None),
    "json-item-missing": ("alpaca", "alpaca_en_demo/alpaca_en_demo.json", '[{"instruction": "i"}]',
                          "item 0: record has no field 'output'", None),
    "tsv-missing-column": ("legal", "legal_ssla/test_old.tsv", "answer\tbody\nyes\tsome text\n",
                           "no field 'text'", 2),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_corrupt_data_file_names_file_and_line(tmp_path, case):
    source, rel, content, expected, line = DATA_CASES[case]
    path = _write(tmp_path, rel, content)
    with pytest.raises(DataFileError) as exc:
        load_texts(source, data_dir=tmp_path, source="offline")
    msg = str(exc.value)
    assert str(path) in msg and expected in msg and "\n" not in msg, msg
    if line is not None:
        assert f"line {line}:" in msg, msg


def test_corrupt_record_found_even_with_max_docs(tmp_path):
    _write(tmp_path, "c4_sample/c4_demo.jsonl", GOOD_C4 + '{"text": "a\x01"}\n')
    with pytest.raises(DataFileError, match="line 2"):
        load_texts("c4", data_dir=tmp_path, source="offline", max_docs=1)


# -- no offline copy, hub unreachable ------------------------------------------------------------------------

@pytest.fixture
def hub_down(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(S, "hub_unavailable_reason", lambda **k: UNREACHABLE)
    monkeypatch.setattr(models, "hub_unavailable_reason", lambda **k: UNREACHABLE)


def test_data_dir_typo_is_reported_not_sent_to_the_hub(tmp_path, hub_down):
    with pytest.raises(DataUnavailableError, match=r"data directory .*typo.* does not exist"):
        S.check_available("c4", data_dir=tmp_path / "typo")


def test_env_data_dir_typo_names_the_variable(tmp_path, monkeypatch, hub_down):
    monkeypatch.setenv(S.DATA_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(DataUnavailableError, match=r"\$CALIBPRUNE_DATA_DIR"):
        S.check_available("gsm8k")


def test_no_offline_copy_and_hub_unreachable_says_both(tmp_path, hub_down):
    with pytest.raises(DataUnavailableError) as exc:
        S.check_available("gsm8k", data_dir=tmp_path)
    msg = str(exc.value)
    assert "not reachable" in msg and str(tmp_path / "gsm8k" / "train.jsonl") in msg and "\n" not in msg


def test_no_data_dir_lists_the_searched_paths(tmp_path, monkeypatch, hub_down):
    monkeypatch.delenv(S.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(S, "_default_candidates", lambda: [tmp_path / "a" / "shared" / "data"])
    with pytest.raises(DataUnavailableError) as exc:
        S.check_available("c4")
    assert str(tmp_path / "a" / "shared" / "data") in str(exc.value) and "not reachable" in str(exc.value)


def test_hub_only_source_offline_machine(hub_down):
    with pytest.raises(DataUnavailableError, match="metamath.*not reachable"):
        S.check_available("metamath", source="hub")


def test_hub_failure_during_load_is_one_clear_error(tmp_path, monkeypatch):
    class Down:
        def load_dataset(self, *a, **k):
            raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(__import__("sys").modules, "datasets", Down())
    with pytest.raises(DataUnavailableError, match="gsm8k.*Couldn't reach") as exc:
        load_texts("gsm8k", data_dir=tmp_path)
    assert str(tmp_path / "gsm8k" / "train.jsonl") in str(exc.value)


# -- provenance of a built set -------------------------------------------------------------------------------

def test_build_records_data_dir_modes_file_hashes_and_ids_hash(tmp_path, monkeypatch):
    path = _write(tmp_path, "c4_sample/c4_demo.jsonl",
                  "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    monkeypatch.setenv(S.DATA_DIR_ENV, str(tmp_path))  # set by the environment: used to be recorded as null
    calib = build_calibration(CharTokenizer(), "c4", n=4, seqlen=32)
    prov = calib.provenance
    assert prov["data_dir"] == str(tmp_path.resolve())
    assert prov["data_modes"] == {"c4": "offline"}
    assert prov["data_files"] == {"c4_sample/c4_demo.jsonl": file_sha256(path)}
    assert prov["ids_sha256"] == ids_sha256(calib.ids)


# -- model references ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,match", [
    ("", "not valid JSON"),
    ("{", "not valid JSON"),
    ("[]", "no model_type"),
    ('{"hidden_size": 8}', "no model_type"),
])
def test_broken_model_config(tmp_path, config, match):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(config)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=match):
        models.resolve_model_path(str(tmp_path / "m"))


def test_model_dir_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileNotFoundError, match="no weights"):
        models.resolve_model_path(str(tmp_path / "m"))
    assert models.resolve_model_path(str(tmp_path / "m"), weights=False) == ("local", str(tmp_path / "m"))


def test_mistyped_relative_path_is_not_a_hub_id(tmp_path, monkeypatch, hub_down):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no such folder .*checkpoints/llama-pruend"):
        models.resolve_model_path("checkpoints/llama-pruend")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face hub id"):
        models.resolve_model_path("some dir/with spaces/model")


def test_unknown_hub_id_offline(tmp_path, monkeypatch, hub_down):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "_hub_cached", lambda repo: False)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*not reachable"):
        models.resolve_model_path("meta-llama/Llama-3.1-8B")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        models.resolve_model_path(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("name,expected", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                           ("torch.float32", torch.float32), (None, None)])
def test_dtype_names(name, expected):
    assert models.parse_dtype(name) == expected


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        models.parse_dtype("float8")


@pytest.mark.parametrize("name", ["", ".", "..", "some/dir/", "/"])
def test_calibration_path_needs_a_file_name(name):
    """Found by the CLI fuzzer: ``calib --out ''`` raised ``PosixPath('.') has an empty name``."""
    with pytest.raises(ValueError, match="is not a file name for a calibration set"):
        calibration_paths(name)


# --- the model's config, before any weight is read (issue 26) ------------------------------------------------------

def _config_only(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    return folder


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 48,
         "intermediate_size": 88, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("config,match", [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, r"not a causal decoder LM.*BertForMaskedLM"),
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "not a causal decoder LM.*encoder-decoder"),
    ({**LLAMA, "hidden_size": 50}, "cannot build a model from its config.json.*hidden size"),
])
def test_a_model_calibprune_cannot_prune_is_refused_from_its_config(tmp_path, config, match):
    """config.json and an empty weights file: the error comes before the tokenizer or any weight is read."""
    folder = _config_only(tmp_path / "m", config)
    with pytest.raises(ValueError, match=match):
        models.load_model(str(folder))
    with pytest.raises(ValueError, match=match):
        models.model_config(folder)


def test_a_causal_lm_config_passes(tmp_path):
    from transformers import LlamaConfig

    assert isinstance(models.model_config(_config_only(tmp_path / "llama", LLAMA)), LlamaConfig)


@pytest.mark.parametrize("where", ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"])
def test_a_non_finite_weight_is_named_when_the_model_loads(tmp_path, where):
    """A NaN in an input weight: one error naming that tensor when the model loads (in memory), or when its
    decoder layer loads (streamed: layers are read at their turn), before any calibration forward."""
    from tiny_models import tiny_model, tiny_tokenizer

    from calibprune.pruning.anatomy import LAYER_LOADER
    from calibprune.pruning.streaming import load_streamed

    model = tiny_model("llama")
    with torch.no_grad():
        model.get_parameter(where)[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    match = rf"weight '{re.escape(where)}' holds 1 non-finite value"
    with pytest.raises(ValueError, match=match):
        models.load_model(str(tmp_path / "m"))
    if "layers" in where:
        streamed = load_streamed(tmp_path / "m")
        loader = getattr(streamed, LAYER_LOADER)
        loader.load(0, streamed.model.layers[0], torch.device("cpu"))
        with pytest.raises(ValueError, match=match):
            loader.load(1, streamed.model.layers[1], torch.device("cpu"))
    else:
        with pytest.raises(ValueError, match=match):
            load_streamed(tmp_path / "m")
