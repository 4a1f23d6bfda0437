"""The calibration study: Spearman statistics, validation before any work, report, kill-and-resume."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_evaluation import HAS_DATA, HAS_LM_EVAL, byte_tokenizer

from calibprune.study import METRICS, TARGETS, plan_study, spearman_table, write_report

needs_data = pytest.mark.skipif(not HAS_DATA, reason="offline data not found (set CALIBPRUNE_DATA_DIR)")
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install 'calibprune[eval]')")


# ---------------------------------------------------------------------------------------------------------------
# Spearman
# ---------------------------------------------------------------------------------------------------------------


def _rows(xs, ys, metric="perplexity", target="general"):
    return {f"e{i}": {"metrics": {metric: x}, "retention": {target: y}} for i, (x, y) in enumerate(zip(xs, ys))}


def test_spearman_matches_hand_formula():
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    xs = [12.0, 3.5, 40.0, 7.0, 25.0, 1.0]
    ys = [0.5, 0.9, 0.1, 0.7, 0.2, 0.6]
    rx = [sorted(xs).index(x) + 1 for x in xs]
    ry = [sorted(ys).index(y) + 1 for y in ys]
    n = len(xs)
    rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))
    cell = spearman_table(_rows(xs, ys), metrics=["perplexity"], targets=["general"])["perplexity"]["general"]
    assert cell["n"] == n and cell["rho"] == pytest.approx(rho)
    assert 0.0 <= cell["p"] <= 1.0


def test_spearman_edge_cases():
    up = spearman_table(_rows([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4]), ["perplexity"], ["general"])
    assert up["perplexity"]["general"]["rho"] == pytest.approx(1.0)
    down = spearman_table(_rows([1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1]), ["perplexity"], ["general"])
    assert down["perplexity"]["general"]["rho"] == pytest.approx(-1.0)
    # a non-finite value drops only that point; a constant column or < 3 points gives no rho
    nan = spearman_table(_rows([1, 2, 3, 4], [0.1, math.nan, 0.3, 0.4]), ["perplexity"], ["general"])
    assert nan["perplexity"]["general"]["n"] == 3 and nan["perplexity"]["general"]["rho"] == pytest.approx(1.0)
    const = spearman_table(_rows([1, 2, 3], [0.5, 0.5, 0.5]), ["perplexity"], ["general"])
    assert const["perplexity"]["general"]["rho"] is None
    few = spearman_table(_rows([1, 2], [0.1, 0.2]), ["perplexity"], ["general"])
    assert few["perplexity"]["general"] == {"rho": None, "p": None, "n": 2}


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear error before any work
# ---------------------------------------------------------------------------------------------------------------


@needs_data
@needs_lm_eval
def test_plan_errors(tmp_path):
    ok = dict(sources="c4,gsm8k", constructed="mix", n=4, seqlen=32, benchmarks="wikitext2,gsm8k_nll")
    spec = plan_study("m", **ok)
    assert spec["entries"] == ["c4", "gsm8k", "mix"] and spec["out_dir"] == str(Path("results") / "m")
    with pytest.raises(ValueError, match="Did you mean 'gsm8k'"):
        plan_study("m", **{**ok, "sources": "c4,gsm8"})
    with pytest.raises(ValueError, match="unknown constructed set 'igps'"):
        plan_study("m", **{**ok, "constructed": "mix,igps"})
    with pytest.raises(ValueError, match="unknown dimension|unknown benchmark 'gsm8k_nl'"):
        plan_study("m", **{**ok, "benchmarks": "wikitext2,gsm8k_nl"})
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
        plan_study("m", **ok, sparsities=[0.6, 1.2])
    with pytest.raises(ValueError, match="at least 3 entries"):
        plan_study("m", **{**ok, "constructed": "none"})
    with pytest.raises(ValueError, match="unknown option.*pool_factr"):
        plan_study("m", **ok, generator_options={"igsp": {"pool_factr": 3}})
    with pytest.raises(ValueError, match="unknown option.*max_windowz"):
        plan_study("m", **ok, eval_overrides={"wikitext2": {"max_windowz": 3}})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):  # says where it looked
        plan_study("m", **ok, data_dir=empty, data_source="offline")


def test_dotted_options_parse():
    from calibprune.cli import _dotted_options

    assert _dotted_options(["igsp.pool_factor=3", "sgs.source=c4", "igsp.include_bos=false"], "--x") == {
        "igsp": {"pool_factor": 3, "include_bos": False}, "sgs": {"source": "c4"}}
    with pytest.raises(ValueError, match="NAME.KEY=VALUE"):
        _dotted_options(["pool_factor=3"], "--x")


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _fake_study(entries: dict[str, tuple[str, float, dict[str, float]]]) -> dict:
    rows = {e: {"metrics": {"perplexity": p}, "retention": {**dims, "total": sum(dims.values()) / len(dims)}}
            for e, (_, p, dims) in entries.items()}
    return {
        "format": 1, "complete": True,
        "config": {"model": "tiny", "sources": [e for e, v in entries.items() if v[0] == "source"],
                   "constructed": [e for e, v in entries.items() if v[0] != "source"], "n": 4, "seqlen": 32,
                   "seed": 0, "method": "sparsegpt (fused)", "blocksize": 128, "percdamp": 0.01, "suite": "lite",
                   "benchmarks": ["wikitext2"], "eval_options": {"wikitext2": {"seqlen": 64, "max_windows": 2}},
                   "sparsities": [0.6]},
        "dense": {"wikitext2": {"dimension": "general", "metric": "perplexity", "value": 20.0, "n": 2}},
        "entries": {e: {"kind": kind, "metrics": {"perplexity": p},
                        "runs": {"0.6": {"dimensions": dims, "total": rows[e]["retention"]["total"],
                                         "benchmarks": {"wikitext2": {"retention": dims["general"]}}}}}
                    for e, (kind, p, dims) in entries.items()},
        "spearman": {"0.6": {"sources": spearman_table({e: r for e, r in rows.items() if entries[e][0] == "source"}),
                             "all": spearman_table(rows)}},
        "provenance": {"versions": {"calibprune": "0"}, "git_revision": None, "created": "now", "device": "cpu"},
    }


def test_report_tables_and_paper_comparison(tmp_path):
    d = lambda g, c, k, m: {"general": g, "commonsense": c, "code": k, "math": m}
    study = _fake_study({
        "c4": ("source", 30.0, d(0.8, 0.9, 0.3, 0.4)), "wikitext2": ("source", 20.0, d(0.7, 0.9, 0.4, 0.5)),
        "gsm8k": ("source", 5.0, d(0.5, 0.8, 0.5, 0.9)), "mix": ("mix", 15.0, d(0.7, 0.9, 0.6, 0.8)),
        "self-cal": ("self-cal", 8.0, d(0.6, 0.9, 0.5, 0.6)), "igsp": ("igsp", 9.0, d(0.65, 0.9, 0.55, 0.7))})
    path = write_report(study, tmp_path, plots=False)
    text = path.read_text()
    # perplexity is perfectly rank-correlated with general (+1) and anti-correlated with math (-1) here
    assert "| ρ(calibration perplexity, general retention) | +0.71 | +1.00" in text
    assert "| ρ(calibration perplexity, math retention) | -0.53 | -1.00" in text
    assert "mix > best single: yes" in text
    igsp_minus_selfcal = 100 * (study["entries"]["igsp"]["runs"]["0.6"]["total"]
                                - study["entries"]["self-cal"]["runs"]["0.6"]["total"])
    assert f"| IGSP − self-cal (total retention points) | +2.4 | {igsp_minus_selfcal:+.1f} | yes |" in text
    assert "| IGSP − sgs (total retention points) | +4.8 | – |" in text  # SGS did not run
    assert text.index("| mix |") < text.index("| c4 |")  # ranked by total retention
    assert set(METRICS) <= set(study["spearman"]["0.6"]["all"]) and set(TARGETS) == set(
        study["spearman"]["0.6"]["all"]["perplexity"])


def test_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    d = lambda g, m: {"general": g, "commonsense": 0.9, "code": 0.5, "math": m}
    study = _fake_study({"a": ("source", 3.0, d(0.5, 0.9)), "b": ("source", 9.0, d(0.7, 0.6)),
                         "c": ("source", 27.0, d(0.9, 0.3)), "mix": ("mix", 7.0, d(0.8, 0.8))})
    text = write_report(study, tmp_path).read_text()
    for name in ("heatmap_s0.6.png", "scatter_perplexity_s0.6.png"):
        assert f"]({name})" in text
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# Kill a running study and resume it
# ---------------------------------------------------------------------------------------------------------------


def _tiny_checkpoint(path: Path) -> Path:
    import transformers as tf

    tok = byte_tokenizer()
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _study_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "calibprune", "study", "--model", str(model), "--sources", "c4,gsm8k,mbpp",
            "--constructed", "mix,self-cal,sgs,igsp", "--n", "5", "--seqlen", "48", "--sparsity", "0.5,0.7",
            "--benchmarks", "wikitext2,gsm8k_nll,mbpp_nll,piqa", "--limit", "2", "--gen-batch-size", "5",
            "--eval-option", "wikitext2.seqlen=64", "--eval-option", "wikitext2.max_windows=2",
            "--eval-option", "gsm8k_nll.max_length=128", "--eval-option", "mbpp_nll.max_length=128",
            "--out", str(out)]


@pytest.mark.slow
@needs_data
@needs_lm_eval
def test_study_killed_then_resumed(tmp_path):
    model = _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "study"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "CALIBPRUNE_CACHE": str(tmp_path / "cache")}
    runs = out / "cache" / "runs"
    log1 = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_study_cmd(model, out), stdout=log1, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if runs.is_dir() and len(list(runs.glob("*.json"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study ended before it could be killed:\n" + \
            (tmp_path / "first.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log1.close()
    done = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in runs.glob("*.json")}
    assert len(done) >= 3
    for path in out.rglob("*.json"):  # a kill mid-write may leave a hidden .tmp, never a truncated result
        json.loads(path.read_text())
    partial = json.loads((out / "study.json").read_text())
    assert partial["complete"] is False

    res = subprocess.run(_study_cmd(model, out), capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name, (mtime, blob) in done.items():  # finished work was neither redone nor lost
        path = runs / name
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == blob, name
    assert res.stderr.count(": cached (") >= len(done)

    study = json.loads((out / "study.json").read_text())
    assert study["complete"] is True
    assert list(study["entries"]) == ["c4", "gsm8k", "mbpp", "mix", "self-cal", "sgs", "igsp"]
    for entry, rec in study["entries"].items():
        assert set(rec["runs"]) == {"0.5", "0.7"}, entry
        assert rec["calibration"]["n"] == 5 and rec["calibration"]["seqlen"] == 48
        for run in rec["runs"].values():
            assert set(run["dimensions"]) == {"general", "commonsense", "code", "math"}
            assert math.isfinite(run["total"]) and run["achieved_sparsity"] > 0.4
    assert study["entries"]["mix"]["calibration"]["row_sources"] == {"c4": 2, "gsm8k": 2, "mbpp": 1}
    assert len(list(runs.glob("*.json"))) == 14
    table = study["spearman"]["0.5"]
    assert table["sources"]["perplexity"]["general"]["n"] == 3 and table["all"]["perplexity"]["general"]["n"] == 7
    report = (out / "report.md").read_text()
    assert "## Sparsity 0.5" in report and "## Sparsity 0.7" in report and "Side by side with the paper" in report

    # a third run redoes nothing and only rewrites the summary
    before = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()}
    again = subprocess.run(_study_cmd(model, out), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()} == before


@needs_data
def test_study_cli_bad_input_is_one_line(tmp_path, capsys):
    from calibprune.cli import main

    rc = main(["study", "--model", "smollm2-135m", "--sources", "c4,wikitext", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "Did you mean 'wikitext2'" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()  # nothing was started


def test_retention_standard_error_by_hand():
    from calibprune.study import _retention_se

    dense = {"piqa": {"dimension": "commonsense", "metric": "acc_norm", "value": 0.5, "n": 20},
             "arc_easy": {"dimension": "commonsense", "metric": "acc_norm", "value": 0.4, "n": 10},
             "wikitext2": {"dimension": "general", "metric": "perplexity", "value": 20.0, "n": 4}}
    run = {"benchmarks": {"piqa": {"pruned": 0.4}, "arc_easy": {"pruned": 0.3}, "wikitext2": {"pruned": 30.0}}}
    se = _retention_se({"dense": dense, "entries": {"a": {"runs": {"0.6": run}}}}, "0.6")
    var = 0.4 * 0.6 / 20 / 0.5**2 + 0.3 * 0.7 / 10 / 0.4**2
    assert se["commonsense"] == pytest.approx(math.sqrt(var) / 2)
    assert se["general"] == 0.0  # perplexity is deterministic on its fixed windows
