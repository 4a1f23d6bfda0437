"""The CLI turns every checkable bad input into one line ``calibprune <cmd>: error: ...`` and exit code 2, before
the model loads, leaving nothing behind (issue 13). ``load_model`` is replaced by a tripwire in these tests, so a
check that happens too late fails the test instead of running a prune.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from calibprune import models
from calibprune.calibration import CalibrationSet
from calibprune.cli import main

VOCAB = 96


class _ModelLoaded(Exception):
    """Raised by the tripwire: the command got as far as loading the model."""


@pytest.fixture
def tripwire(monkeypatch):
    def load_model(*a, **k):
        raise _ModelLoaded()

    monkeypatch.setattr(models, "load_model", load_model)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A local checkpoint folder (tiny Llama, vocabulary of 96 words) that loads without any network."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny") / "dense"
    tiny_model("llama").save_pretrained(path)
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "</s>": VOCAB - 1}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>",
                            eos_token="</s>").save_pretrained(path)
    return path


def _sentinels(folder: Path) -> dict[Path, str]:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    files = {folder / "thesis.tex": "\\documentclass{article}", folder / "data" / "results.csv": "a,b\n"}
    for path, text in files.items():
        path.write_text(text)
    return files


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_clean_error(code: int, err: str, command: str, match: str) -> None:
    assert code == 2, (code, err)
    assert err.count("\n") == 0 and err.startswith(f"calibprune {command}: error: "), err
    assert match in err, err


def _prune(tiny_dir: Path, out: str, *extra: str) -> list[str]:
    return ["prune", "--model", str(tiny_dir), "--out", out, "--no-eval", "--n", "2", "--seqlen", "8", *extra]


# -- output folders ----------------------------------------------------------------------------------------------

def test_prune_out_dot_overwrite_keeps_the_users_files(tmp_path, monkeypatch, capsys, tripwire, tiny_dir):
    files = _sentinels(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, err = _run(_prune(tiny_dir, ".", "--overwrite"), capsys)
    _assert_clean_error(code, err, "prune", "current directory")
    assert all(p.read_text() == t for p, t in files.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "thesis.tex"]


@pytest.mark.parametrize("out,match", [("/proc/calibprune-x", "not writable"), ("/sys/calibprune-x", "not writable"),
                                       ("afile/sub", "is a file"), ("..", "parent of the current directory")])
def test_prune_bad_out_found_before_the_model_loads(tmp_path, monkeypatch, capsys, tripwire, tiny_dir, out, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    code, err = _run(_prune(tiny_dir, out), capsys)
    _assert_clean_error(code, err, "prune", match)


def test_prune_overwrite_of_a_foreign_folder_refused(tmp_path, capsys, tripwire, tiny_dir):
    files = _sentinels(tmp_path / "out")
    code, err = _run(_prune(tiny_dir, str(tmp_path / "out"), "--overwrite"), capsys)
    _assert_clean_error(code, err, "prune", "replaces only a previous calibprune output")
    assert all(p.read_text() == t for p, t in files.items())


# -- calibration requests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("calib,match", [
    ("c4,c4", "names 'c4' twice"),
    ("c4:0.5,c4:0.5", "names 'c4' twice"),
    ("c4:-1,gsm8k:2", "finite number >= 0"),
    ("c4:0,gsm8k:0", "all zero"),
    ("c4:abc", "must be a number"),
    ("c4:nan", "finite number >= 0"),
    (":0.5", "no source name"),
    (",", "--calib is empty"),
])
def test_bad_mix_specs(tmp_path, capsys, tripwire, tiny_dir, calib, match):
    code, err = _run(_prune(tiny_dir, str(tmp_path / "out"), "--calib", calib), capsys)
    _assert_clean_error(code, err, "prune", match)
    assert not (tmp_path / "out").exists()


def _saved(tmp_path: Path, name: str, blob) -> Path:
    path = tmp_path / f"{name}.pt"
    if isinstance(blob, bytes):
        path.write_bytes(blob)
    else:
        torch.save(blob, path)
    return path


@pytest.mark.parametrize("name,blob,match", [
    ("garbage", os.urandom(200), "not a readable calibration set"),
    ("plain", torch.randint(0, VOCAB, (2, 8)), "plain tensor"),
    ("negative", {"ids": torch.tensor([[1, -2, 3], [4, 5, 6]])}, "negative"),
    ("oov", {"ids": torch.tensor([[1, 2, 3], [4, 5, VOCAB + 7]])}, "outside the tokenizer's vocabulary [0, 96)"),
])
def test_bad_calibration_file_before_the_model_loads(tmp_path, capsys, tripwire, tiny_dir, name, blob, match):
    path = _saved(tmp_path, name, blob)
    code, err = _run(_prune(tiny_dir, str(tmp_path / "out"), "--calib", str(path)), capsys)
    _assert_clean_error(code, err, "prune", match)
    assert str(path) in err


def test_truncated_calibration_file(tmp_path, capsys, tripwire, tiny_dir):
    good = CalibrationSet(ids=torch.randint(0, VOCAB, (2, 8))).save(tmp_path / "good")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:-100])
    code, err = _run(_prune(tiny_dir, str(tmp_path / "out"), "--calib", str(bad)), capsys)
    _assert_clean_error(code, err, "prune", "not a readable calibration set")


def test_corrupt_data_file_named_before_the_model_loads(tmp_path, capsys, tripwire, tiny_dir):
    data = tmp_path / "data"
    (data / "c4_sample").mkdir(parents=True)
    (data / "c4_sample" / "c4_demo.jsonl").write_text('{"text": "fine"}\n{"text": "a\tb"}\n')
    code, err = _run(_prune(tiny_dir, str(tmp_path / "out"), "--data-dir", str(data)), capsys)
    _assert_clean_error(code, err, "prune", "c4_demo.jsonl, line 2: not valid JSON")


def test_data_dir_typo(tmp_path, capsys, tripwire, tiny_dir):
    code, err = _run(_prune(tiny_dir, str(tmp_path / "out"), "--data-dir", str(tmp_path / "dta")), capsys)
    _assert_clean_error(code, err, "prune", f"the data directory {tmp_path / 'dta'} (from data_dir / --data-dir) "
                        "does not exist")


def test_no_offline_copy_and_no_hub(tmp_path, monkeypatch, capsys, tripwire, tiny_dir):
    from calibprune.calibration import sources

    monkeypatch.setattr(sources, "hub_unavailable_reason", lambda **k: "the hub (huggingface.co:443) is not "
                        "reachable: Name or service not known")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "data").mkdir()
    code, err = _run(_prune(tiny_dir, str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
                            "--calib", "gsm8k"), capsys)
    _assert_clean_error(code, err, "prune", "not reachable")
    assert str(tmp_path / "data" / "gsm8k" / "train.jsonl") in err


# -- model references ----------------------------------------------------------------------------------------------

def test_model_dir_with_empty_config(tmp_path, capsys, tripwire):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("")
    code, err = _run(["prune", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, err, "prune", "config.json is not valid JSON")


def test_relative_model_path_that_does_not_exist(tmp_path, monkeypatch, capsys, tripwire):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    code, err = _run(["prune", "--model", "models/llama-typo", "--out", "out"], capsys)
    _assert_clean_error(code, err, "prune", "no such folder")


def test_unknown_dtype(tmp_path, capsys, tripwire, tiny_dir):
    code, err = _run(_prune(tiny_dir, str(tmp_path / "out"), "--dtype", "float8"), capsys)
    _assert_clean_error(code, err, "prune", "unknown dtype 'float8'")


# -- calib --out ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given", ["foo", "foo.pt"])
def test_calib_out_refuses_to_overwrite(tmp_path, capsys, tiny_dir, given):
    existing = CalibrationSet(ids=torch.ones(1, 4, dtype=torch.long), provenance={"mine": True})
    existing.save(tmp_path / "foo.pt")
    before = (tmp_path / "foo.pt").read_bytes()
    code, err = _run(["calib", "--model", str(tiny_dir), "--out", str(tmp_path / given), "--n", "1",
                      "--seqlen", "4"], capsys)
    _assert_clean_error(code, err, "calib", "exists; pass --overwrite")
    assert (tmp_path / "foo.pt").read_bytes() == before
    assert json.loads((tmp_path / "foo.json").read_text()) == {"mine": True}


def test_calib_end_to_end_on_a_tiny_model(tmp_path, capsys, tiny_dir, monkeypatch):
    """The valid path still works: a set is built from offline-format data with the tiny tokenizer, and ids match."""
    data = tmp_path / "data"
    (data / "c4_sample").mkdir(parents=True)
    (data / "c4_sample" / "c4_demo.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 90}" for j in range(40))}) + "\n" for i in range(30)))
    code = main(["calib", "--model", str(tiny_dir), "--out", str(tmp_path / "set"), "--n", "4", "--seqlen", "16",
                 "--data-dir", str(data)])
    assert code == 0, capsys.readouterr().err
    calib = CalibrationSet.load(tmp_path / "set.pt", vocab_size=VOCAB)
    assert calib.ids.shape == (4, 16)
    assert calib.provenance["data_modes"] == {"c4": "offline"}
    assert calib.provenance["data_dir"] == str(data.resolve())


def test_prune_end_to_end_records_provenance(tmp_path, capsys, tiny_dir, monkeypatch):
    """calibprune.json holds the resolved data dir, offline/hub per source, hashes of ids, data files and source
    model, and the command line."""
    from calibprune.calibration.calibration_set import ids_sha256
    from calibprune.calibration.sources import file_sha256

    data = tmp_path / "data"
    (data / "c4_sample").mkdir(parents=True)
    jsonl = data / "c4_sample" / "c4_demo.jsonl"
    jsonl.write_text("".join(json.dumps({"text": " ".join(f"w{(i * 5 + j) % 90}" for j in range(60))}) + "\n"
                             for i in range(30)))
    monkeypatch.setenv("CALIBPRUNE_DATA_DIR", str(data))
    argv = _prune(tiny_dir, str(tmp_path / "out"), "--sparsity", "0.5")
    monkeypatch.setattr("sys.argv", ["calibprune", *argv])
    assert main(argv) == 0, capsys.readouterr().err
    sidecar = json.loads((tmp_path / "out" / "calibprune.json").read_text())
    calib = sidecar["calibration"]
    assert calib["data_dir"] == str(data.resolve()) and calib["data_modes"] == {"c4": "offline"}
    assert calib["data_files"] == {"c4_sample/c4_demo.jsonl": file_sha256(jsonl)}
    assert sidecar["calibration_ids_sha256"] == calib["ids_sha256"]
    assert len(calib["ids_sha256"]) == 64 and ids_sha256(torch.zeros(1, 2, dtype=torch.long)) != calib["ids_sha256"]
    assert sidecar["command"] == ["calibprune", *argv]
    assert sidecar["source_model"]["kind"] == "local"
    weights = sidecar["source_model"]["files"]["model.safetensors"]
    assert weights["sha256"] == file_sha256(tiny_dir / "model.safetensors")


# --- conventions: --version, logging flags in either place (issue 26) ----------------------------------------------

def test_version_prints_and_exits_zero(capsys):
    from calibprune._version import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"calibprune {__version__}"


@pytest.mark.parametrize("argv,level", [
    (["prune", "--model", "m", "--out", "o"], "INFO"),
    (["-v", "prune", "--model", "m", "--out", "o"], "DEBUG"),
    (["prune", "-v", "--model", "m", "--out", "o"], "DEBUG"),
    (["prune", "--model", "m", "--out", "o", "-q"], "WARNING"),
    (["-q", "eval", "--model", "m"], "WARNING"),
    (["prune", "--log-level", "ERROR", "-v", "--model", "m", "--out", "o"], "ERROR"),
    (["--log-level", "debug", "calib", "--model", "m", "--out", "o.pt"], "DEBUG"),
])
def test_logging_flags_before_or_after_the_sub_command(argv, level):
    import logging

    from calibprune.cli import build_parser, log_level

    assert log_level(build_parser().parse_args(argv)) == getattr(logging, level)


@pytest.mark.parametrize("flag,shown", [(None, False), ("--progress", True), ("--no-progress", False)])
def test_progress_bars_only_on_a_terminal_unless_forced(tmp_path, capsys, tiny_dir, flag, shown):
    """stderr captured (not a terminal): no bars, so a redirected log gets no endless \\r line; --progress forces
    them, --no-progress hides them."""
    code, err = _run(_prune(tiny_dir, str(tmp_path / "out"), *([flag] if flag else [])), capsys)
    assert code == 0, err
    assert ("sparsegpt layers" in err) == shown, err[-500:]


def test_a_library_call_shows_its_bars_as_asked():
    from calibprune._progress import cli_progress, progress_bar

    assert not progress_bar(range(3), show=True).disable
    assert progress_bar(range(3), show=False).disable
    with cli_progress(False):
        assert progress_bar(range(3), show=True).disable
    with cli_progress(True):
        assert progress_bar(range(3), show=False).disable
        assert not progress_bar(range(3), show=True).disable
    assert not progress_bar(range(3)).disable  # the CLI's decision ends with the command
