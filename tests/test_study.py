"""The calibration study: validation before any work, the staged run list, study.json from runs, the report with its
verdict table, compact run records, and kill-and-resume of the real command on a tiny model."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluation import HAS_DATA, byte_tokenizer

from calibprune.study import build_study, plan_runs, plan_study, spearman_table, write_report
from calibprune.study.plan import resolve_seeded, run_id, unresolved_runs
from calibprune.study.records import compact_record, expand_record

needs_data = pytest.mark.skipif(not HAS_DATA, reason="offline data not found (set CALIBPRUNE_DATA_DIR)")

SMALL = {"lambada": {"test": 6, "dev": 2, "primary": "nll"}, "piqa": {"test": 6, "dev": 2},
         "mbpp_nll": {"test": 5, "dev": 2}, "gsm8k_nll": {"test": 5, "dev": 2}}


def _spec(**kw):
    base = dict(sources="c4,gsm8k,mbpp,alpaca", constructed="mix,self-cal,sgs,igsp", n=8, seqlen=32,
                benchmarks=list(SMALL), eval_overrides=SMALL, seeds=[0, 1, 2], n_boot=400)
    return plan_study("m", **{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear error before any work
# ---------------------------------------------------------------------------------------------------------------


@needs_data
def test_plan_errors(tmp_path):
    spec = _spec()
    assert spec["entries"] == ["c4", "gsm8k", "mbpp", "alpaca", "mix", "self-cal", "sgs", "igsp"]
    assert spec["out_dir"] == str(Path("results") / "m")
    bad = [({"sources": "c4,gsm8"}, ValueError, "Did you mean 'gsm8k'"),
           ({"constructed": "mix,igps"}, ValueError, "unknown constructed set 'igps'"),
           ({"benchmarks": ["piqa", "hellaswg"], "eval_overrides": None}, ValueError, "not in the study suite"),
           ({"sparsities": [0.6, 1.2]}, ValueError, r"sparsity must be in \(0, 1\)"),
           ({"sources": "c4", "constructed": "self-cal"}, ValueError, "at least 3 entries"),
           ({"generator_options": {"igsp": {"pool_factr": 3}}}, ValueError, "unknown option.*pool_factr"),
           ({"eval_overrides": {"piqa": {"limit": 3}}}, ValueError, "unknown field.*limit"),
           ({"variants": {"v": {"generator": "igsp", "options": {"strat": 1}}}}, ValueError, "unknown option.*strat"),
           ({"variants": {"c4": {"generator": "igsp", "options": {}}}}, ValueError, "clashes"),
           ({"seeded": ["c4", "best"]}, ValueError, "seeded entry 'best'"),
           ({"pruners": ["sparsegpt", "obc"]}, ValueError, "unknown pruner 'obc'"),
           ({"pruner_options": {"wanda": {"percdmp": 0.1}}}, ValueError, "takes no option.*percdmp"),
           ({"pruner_options": {"magnitude": {}}}, ValueError, "not on the pruner axis"),
           ({"pruner_options": {"wanda": {"sparsity": 0.5}}}, ValueError, "the study sets sparsity"),
           ({"seeds": [0, 0]}, ValueError, "distinct"),
           ({"split": "train"}, ValueError, "split"),
           ({"eval_dtype": "float16"}, ValueError, "eval_dtype")]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            _spec(**kw)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):  # says where it looked
        _spec(data_dir=empty, data_source="offline")


@needs_data
def test_the_pruner_axis_is_the_method_registry():
    """Any registered method can be studied, with its own options; the run key of the historical settings (SparseGPT
    with blocksize and percdamp, Wanda with none) is unchanged, so committed runs still resume."""
    from calibprune.study.plan import pruner_settings
    from calibprune.study.run import _pruner_settings

    spec = _spec(pruners=["sparsegpt", "wanda", "magnitude"], pruner_options={"magnitude": {"pattern": "2:4"}})
    assert _pruner_settings(spec, "sparsegpt") == {"pruner": "sparsegpt", "blocksize": 128, "percdamp": 0.01}
    assert _pruner_settings(spec, "wanda") == {"pruner": "wanda"}
    assert pruner_settings(spec, "magnitude") == {"pattern": "2:4"}
    assert [r.id for r in plan_runs(spec) if r.pruner == "magnitude"][:1] == [run_id("c4", 0, "magnitude", 0.6)]


@needs_data
def test_run_list_stages():
    spec = _spec(seeds=[0, 1], seeded=["c4", "best:1", "mix"], pruners=["sparsegpt", "wanda"],
                 pruner_entries=["sources", "mix"], variants={"v": {"generator": "igsp", "options": {"strata": 1}}})
    first = plan_runs(spec)
    ids = [r.id for r in first]
    # stage 1: every entry but the variants, first seed, main pruner; stage 2: the named seeded entries;
    # stage 3: wanda; stage 4: the variants
    assert ids[:8] == [run_id(e, 0, "sparsegpt", 0.6) for e in spec["entries"][:8]]
    assert ids[8:10] == [run_id("c4", 1, "sparsegpt", 0.6), run_id("mix", 1, "sparsegpt", 0.6)]
    assert ids[10:15] == [run_id(e, 0, "wanda", 0.6) for e in ("c4", "gsm8k", "mbpp", "alpaca", "mix")]
    assert ids[15:] == [run_id("v", 0, "sparsegpt", 0.6)]
    assert unresolved_runs(spec) == 1  # best:1 waits for the single sources' stage-1 results
    totals = {"c4": 0.4, "gsm8k": 0.5, "mbpp": 0.55, "alpaca": 0.55}
    assert resolve_seeded(spec, totals) == (["c4", "alpaca", "mix"], 0)  # tie at 0.55: by name
    resolved = [r.id for r in plan_runs(spec, totals)]
    assert run_id("alpaca", 1, "sparsegpt", 0.6) in resolved and len(resolved) == len(ids) + 1
    assert resolve_seeded(spec, {**totals, "c4": 0.9}) == (["c4", "mix"], 0)  # c4 is also the best single


@needs_data
def test_time_estimate_uses_the_median_of_each_run_class():
    from calibprune.study.plan import RunSpec
    from calibprune.study.run import _eta

    spec = _spec(pruners=["sparsegpt", "wanda"], pruner_entries=["sources", "mix"])
    # one sparsegpt run slowed 4x by a busy machine must not move the estimate; a class with no finished run
    # yet (here wanda) falls back to the median of every finished run
    done = {"sparsegpt": [500.0, 520.0, 2000.0], "sparsegpt+generated": [1400.0]}
    remaining = [RunSpec("c4", 1, "sparsegpt", 0.6), RunSpec("igsp", 1, "sparsegpt", 0.6),
                 RunSpec("c4", 0, "wanda", 0.6)]
    assert _eta(done, remaining, spec) == pytest.approx(520.0 + 1400.0 + 960.0)
    assert _eta({}, remaining, spec) is None


# ---------------------------------------------------------------------------------------------------------------
# study.json from runs, and the report
# ---------------------------------------------------------------------------------------------------------------


def _records(rng, quality: float, ppl_shift: float) -> dict:
    """Per-item records of a model whose accuracy is ``quality`` x dense and whose NLL is dense + ``ppl_shift``."""
    out = {}
    for name in ("lambada", "piqa", "mbpp_nll", "gsm8k_nll"):
        n = SMALL[name]["test"]
        rec = {"items": list(range(n)), "n": n, "seconds": 1.0, "tokens": 10 * n, "dimension": "",
               "kind": "", "primary": ""}
        if name == "piqa":
            rec |= {"correct": (rng.random(n) < 0.8 * quality).astype(int).tolist(),
                    "margin": (rng.normal(quality, 0.1, n)).tolist(), "k": [2] * n}
        elif name == "lambada":
            rec |= {"correct": (rng.random(n) < 0.5 * quality).astype(int).tolist(),
                    "nll": (rng.normal(3 + ppl_shift, 0.05, n) * 2).tolist(), "ntok": [2] * n}
        else:
            rec |= {"nll": (rng.normal(1 + ppl_shift, 0.02, n) * 50).tolist(), "ntok": [50] * n}
        rec["scores"] = {}
        out[name] = rec
    return out


def _fake_study(tmp_path):
    """Dense + runs with known structure: perplexity rank of the single sources = rank of their general retention
    and the reverse of their code / math retention; the mix is best on total."""
    spec = _spec(seeds=[0, 1, 2], seeded=["c4", "best:1", "mix", "self-cal", "sgs", "igsp"], pruners=["sparsegpt"],
                 variants={"igsp-nostrata": {"generator": "igsp", "options": {"strata": 1}}})
    rng = np.random.default_rng(0)
    dense_recs = _records(rng, 1.0, 0.0)
    dense = {"model_fingerprint": "f", "split": "test", "dtype": "bfloat16",
             "benchmarks": {k: {**v, "scores": {"acc": 0.8}, "dimension": d, "kind": kd, "primary": p}
                            for (k, v), d, kd, p in zip(dense_recs.items(), ("general", "commonsense", "code", "math"),
                                   ("target", "choice", "nll", "nll"), ("acc", "acc", "nll", "nll"))}}
    dense["benchmarks"]["piqa"]["scores"]["chance"] = 0.5
    dense["benchmarks"]["piqa"]["correct"] = [1, 1, 1, 1, 1, 0]  # clearly above chance, so piqa counts
    ppl = {"c4": 30.0, "alpaca": 7.0, "gsm8k": 6.0, "mbpp": 5.0, "mix": 14.0, "self-cal": 50.0, "sgs": 17.0,
           "igsp": 7.5, "igsp-nostrata": 8.0}
    runs = {}
    for entry, p in ppl.items():
        for seed in ([0, 1, 2] if entry in ("c4", "mix", "self-cal", "sgs", "igsp") else [0]):
            r = np.random.default_rng(seed + 10 * len(runs))
            recs = {}
            quality = 0.5 + 0.01 * seed
            shift = {"lambada": 1.0 - p / 60, "mbpp_nll": 0.2 + p / 100, "gsm8k_nll": 0.2 + p / 100}
            for name, rec in _records(r, quality if entry != "mix" else 0.9, 0.0).items():
                if name in shift:
                    rec["nll"] = [v + shift[name] * (2 if name == "lambada" else 50) for v in
                                  dense["benchmarks"][name]["nll"]]
                if entry == "mix" and name != "piqa":
                    rec["nll"] = [v + 0.01 * seed for v in dense["benchmarks"][name]["nll"]]
                recs[name] = compact_record(rec | {"items": list(range(rec["n"]))})
            rid = run_id(entry, seed, "sparsegpt", 0.6)
            runs[rid] = {"id": rid, "entry": entry, "seed": seed, "pruner": "sparsegpt", "sparsity": 0.6,
                         "kind": "source" if entry in spec["sources"] else entry, "achieved_sparsity": 0.6,
                         "calibration": {"n": 8}, "metrics": {"perplexity": p + 0.1 * seed, "ngram_aggregation": 0.1},
                         "benchmarks": recs, "timings": {"total_s": 10.0, "prune_s": 5.0, "eval_s": 5.0}}
    return spec, dense, runs


@needs_data
def test_build_study_and_report(tmp_path):
    spec, dense, runs = _fake_study(tmp_path)
    study = build_study(spec, dense, runs)
    mix = study["entries"]["mix"]["runs"]["sparsegpt"]["0.6"]
    assert mix["seeds"] == [0, 1, 2] and mix["total"]["n_seeds"] == 3 and mix["total"]["sd"] is not None
    assert mix["total"]["se"] > 0 and set(mix["dimensions"]) == {"general", "commonsense", "code", "math"}
    c4 = study["entries"]["c4"]["runs"]["sparsegpt"]["0.6"]
    assert c4["dimensions"]["general"]["mean"] == pytest.approx(np.mean(c4["dimensions"]["general"]["values"]))
    # Spearman over the 4 single sources: general follows perplexity, code and math the reverse
    sp = study["spearman"]["sparsegpt"]["0.6"]["sources"]["perplexity"]
    assert sp["general"]["rho"] == pytest.approx(1.0) and sp["code"]["rho"] == pytest.approx(-1.0)
    assert sp["math"]["rho"] == pytest.approx(-1.0) and sp["general"]["n"] == 4
    diffs = study["differences"]["sparsegpt"]["0.6"]
    assert diffs["best_single"] in spec["sources"]
    assert set(diffs["pairs"]) >= {"mix − best single", "mix − c4", "igsp − self-cal", "igsp − sgs",
                                   "igsp − igsp-nostrata"}
    v = study["verdicts"]
    assert v["mix > c4"]["verdict"] == "confirmed" and v["mix > c4"]["estimate"] > 0
    assert v["ρ(perplexity, general) > 0"]["estimate"] == pytest.approx(1.0)
    for claim in v.values():
        assert claim["verdict"] in ("confirmed", "contradicted", "inconclusive")
        assert claim["lo"] <= claim["estimate"] <= claim["hi"]
    json.dumps(study)  # serialisable
    shuffled = dict(reversed(list(runs.items())))  # e.g. runs finished in this process after those read back
    again = build_study(spec, dense, shuffled)
    for part in ("verdicts", "spearman", "differences"):
        assert json.dumps(again[part]) == json.dumps(study[part])
    text = write_report(study, tmp_path, plots=False).read_text()
    assert "## Verdict" in text and "| mix > c4 |" in text and "**confirmed**" in text
    assert text.index("| mix |") < text.index("| c4 |")  # ranked by total retention
    assert "igsp − igsp-nostrata" in text


@needs_data
def test_one_seed_pruner_borrows_the_first_pruners_seed_variance(tmp_path):
    """Wanda runs one seed per entry: its differences borrow SparseGPT's pooled seed variance at that sparsity and
    say so (in the difference, the verdict's quantity and the report), instead of an item-only interval."""
    spec, dense, runs = _fake_study(tmp_path)
    spec = _spec(seeds=[0, 1, 2], seeded=["c4", "best:1", "mix", "self-cal", "sgs", "igsp"],
                 pruners=["sparsegpt", "wanda"], pruner_entries=["sources", "mix"],
                 variants={"igsp-nostrata": {"generator": "igsp", "options": {"strata": 1}}})
    for entry in ("c4", "gsm8k", "mbpp", "alpaca", "mix"):
        rid = run_id(entry, 0, "wanda", 0.6)
        runs[rid] = {**runs[run_id(entry, 0, "sparsegpt", 0.6)], "id": rid, "entry": entry, "pruner": "wanda",
                     "kind": "source" if entry in spec["sources"] else entry}
    study = build_study(spec, dense, runs)
    own = study["differences"]["sparsegpt"]["0.6"]["pairs"]["mix − c4"]
    lent = study["differences"]["wanda"]["0.6"]["pairs"]["mix − c4"]
    assert own["seed_variance_from"] == "sparsegpt" and lent["seed_variance_from"] == "sparsegpt"
    assert lent["total"]["borrowed_seed_variance"] and not lent["total"]["seed_variance_unknown"]
    assert lent["total"]["se_seed"] > 0 and lent["total"]["n_seeds"] == [1, 1]
    # the borrowed part is SparseGPT's pooled seed variance of the total, once per side
    totals = [v["runs"]["sparsegpt"]["0.6"]["total"]["values"] for v in study["entries"].values()]
    totals = [t for t in totals if len(t) > 1]
    ss = sum(np.var(t, ddof=1) * (len(t) - 1) for t in totals)
    df = sum(len(t) - 1 for t in totals)
    assert lent["total"]["se_seed"] == pytest.approx(np.sqrt(2 * ss / df), rel=1e-6)
    assert "seed variance borrowed from sparsegpt" in study["verdicts"]["mix > c4 [wanda 0.6]"]["quantity"]
    assert "borrowed" not in study["verdicts"]["mix > c4"]["quantity"]
    text = write_report(study, tmp_path, plots=False).read_text()
    assert "‡ Every wanda entry ran one seed" in text and "‡ Every sparsegpt" not in text


@needs_data
def test_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    spec, dense, runs = _fake_study(tmp_path)
    text = write_report(build_study(spec, dense, runs), tmp_path).read_text()
    for name in ("heatmap_sparsegpt_s0.6.png", "scatter_perplexity_sparsegpt_s0.6.png"):
        assert f"]({name})" in text
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_old_format(tmp_path):
    with pytest.raises(ValueError, match="format 2"):
        write_report({"format": 1}, tmp_path)


def test_compact_record_round_trip():
    rec = {"items": [5, 2, 9], "n": 3, "k": [4, 4, 2], "correct": [1, 0, 1], "margin": [0.123456, -1.0, 2.5],
           "scores": {"acc": 2 / 3}, "seconds": 1.23456}
    c = compact_record(rec)
    assert c["correct"] == "101" and c["margin"] == [0.1235, -1.0, 2.5] and "items" not in c
    back = expand_record(c, rec)
    assert back["correct"] == [1, 0, 1] and back["items"] == [5, 2, 9] and back["k"] == [4, 4, 2]
    with pytest.raises(ValueError, match="other items"):
        expand_record(c, {**rec, "items": [1, 2, 3]})


def test_spearman_table_point_values():
    rows = {f"e{i}": {"metrics": {"perplexity": x}, "retention": {"general": y}}
            for i, (x, y) in enumerate([(1, 0.1), (2, 0.3), (3, 0.2), (4, 0.4)])}
    cell = spearman_table(rows, ["perplexity"], ["general"])["perplexity"]["general"]
    assert cell["rho"] == pytest.approx(0.8) and cell["n"] == 4


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
            "--constructed", "mix,self-cal,sgs,igsp", "--variant", "igsp-bos:igsp.dimensions=[]", "--n", "5",
            "--seqlen", "48", "--seeds", "0,1", "--seeded", "c4,best:1,igsp", "--pruners", "sparsegpt,wanda",
            "--pruner-entries", "mix", "--benchmarks", "wikitext2,piqa,mbpp_nll,gsm8k_nll", "--gen-batch-size", "5",
            "--eval-option", "wikitext2.window=64", "--eval-option", "wikitext2.test=2",
            "--eval-option", "piqa.test=4", "--eval-option", "mbpp_nll.test=3", "--eval-option",
            "mbpp_nll.max_length=96", "--eval-option", "gsm8k_nll.test=3", "--eval-option",
            "gsm8k_nll.max_length=96", "--n-boot", "200", "--no-plots", "--out", str(out)]


@pytest.mark.slow
@needs_data
def test_study_killed_then_resumed(tmp_path):
    model = _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "study"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "CALIBPRUNE_CACHE": str(tmp_path / "cache")}
    runs = out / "runs"
    log1 = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_study_cmd(model, out), stdout=log1, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if runs.is_dir() and len(list(runs.glob("*__*.json"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study ended before it could be killed:\n" + \
            (tmp_path / "first.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log1.close()
    done = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in runs.glob("*.json")}
    assert len(done) >= 4  # dense.json + >= 3 runs
    for path in out.rglob("*.json"):  # a kill mid-write may leave a hidden .tmp, never a truncated result
        json.loads(path.read_text())
    assert json.loads((out / "study.json").read_text())["complete"] is False

    res = subprocess.run(_study_cmd(model, out), capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name, (mtime, blob) in done.items():  # finished work was neither redone nor lost
        path = runs / name
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == blob, name

    study = json.loads((out / "study.json").read_text())
    assert study["complete"] is True and study["progress"]["remaining"] == []
    assert list(study["entries"]) == ["c4", "gsm8k", "mbpp", "mix", "self-cal", "sgs", "igsp", "igsp-bos"]
    # best:1 = the single source with the highest seed-0 total (ties by name), known after stage 1
    seed0 = {e: study["entries"][e]["runs"]["sparsegpt"]["0.6"]["total"]["values"][0] for e in ("c4", "gsm8k", "mbpp")}
    best = sorted(seed0, key=lambda e: (-seed0[e], e))[0]
    # a random tiny model is at chance on PIQA: reported, not counted, so Commonsense has no benchmark left
    assert study["excluded_near_chance"] == ["piqa"] and study["dense"]["piqa"]["near_chance"]
    dims = {"general", "code", "math"}
    for entry, rec in study["entries"].items():
        seeds = rec["runs"]["sparsegpt"]["0.6"]["seeds"]
        assert seeds == ([0, 1] if entry in ("c4", "igsp", best) else [0]), entry
        assert set(rec["runs"]["sparsegpt"]["0.6"]["dimensions"]) == dims, entry
        assert math.isfinite(rec["runs"]["sparsegpt"]["0.6"]["total"]["mean"])
    assert set(study["entries"]["mix"]["runs"]) == {"sparsegpt", "wanda"}
    assert study["entries"]["igsp-bos"]["calibration"]["row_sources"] == {"igsp:bos": 5}
    assert "dtype_check" in study and (runs / "dtype_check.json").is_file()
    assert all(json.loads(p.read_text())["device"] == "cpu" for p in [runs / "dense.json", *runs.glob("*__*.json")])
    assert all(v["verdict"] in ("confirmed", "contradicted", "inconclusive") for v in study["verdicts"].values())
    assert "## Verdict" in (out / "report.md").read_text()
    # a third run redoes nothing
    before = {p: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    again = subprocess.run(_study_cmd(model, out), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*.json")} == before


@needs_data
def test_study_cli_bad_input_is_one_line(tmp_path, capsys):
    from calibprune.cli import main

    rc = main(["study", "--model", "smollm2-135m", "--sources", "c4,wikitext", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "Did you mean 'wikitext2'" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()  # nothing was started


@needs_data
def test_study_device_is_checked_before_any_work(tmp_path, capsys):
    from calibprune.cli import main
    from calibprune.study.plan import device_key

    assert _spec()["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    # CPU keys carry no device, so studies that ran before the study had a device keep their runs
    assert device_key({"device": "cpu"}) == {} and device_key({"device": "cuda:1"}) == {"device": "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            _spec(device="cuda")
    with pytest.raises(ValueError, match="Invalid device string"):
        _spec(device="tpu0")
    # a study scored on one device type is not continued on another (every run would be redone and overwritten)
    runs = tmp_path / "s" / "runs"
    runs.mkdir(parents=True)
    (runs / "dense.json").write_text(json.dumps({"device": "cuda:0"}))
    rc = main(["study", "--model", "smollm2-135m", "--sources", "c4,gsm8k,mbpp", "--device", "cpu", "--no-plots",
               "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "scored on cuda" in err and "--device cuda" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "s").rglob("*")] == ["runs", "dense.json"]  # nothing written


def test_dotted_options_parse():
    from calibprune.study.cli import _dotted, _variants

    assert _dotted(["igsp.pool_factor=3", "sgs.source=c4", "igsp.include_bos=false"], "--x") == {
        "igsp": {"pool_factor": 3, "include_bos": False}, "sgs": {"source": "c4"}}
    assert _variants(["v:igsp.strata=1", "v:igsp.bos_share=0.5"]) == {
        "v": {"generator": "igsp", "options": {"strata": 1, "bos_share": 0.5}}}
    with pytest.raises(ValueError, match="NAME.KEY=VALUE"):
        _dotted(["pool_factor=3"], "--x")
    with pytest.raises(ValueError, match="two generators"):
        _variants(["v:igsp.strata=1", "v:sgs.top_k=3"])


@needs_data
def test_design_study_compares_variants_with_the_first(tmp_path):
    """A study of IGSP variants alone (its design on DEV): each variant − the first, marked as item-only intervals
    (one seed each, no seed variance to borrow); no claim applies; a report rebuilt from runs/ knows it is done."""
    from calibprune.study.run import summarise_study

    variants = {v: {"generator": "igsp", "options": {"strata": s}} for v, s in (("base", 3), ("v5", 5), ("v1", 1))}
    spec = _spec(sources="none", constructed="none", seeds=[0], seeded=[], variants=variants, pruner_entries=[],
                 out_dir=str(tmp_path))
    _, dense, fake = _fake_study(tmp_path)
    source = {"base": "igsp", "v5": "igsp-nostrata", "v1": "c4"}  # borrow three fake runs' records
    runs = {}
    for v, src in source.items():
        rid = run_id(v, 0, "sparsegpt", 0.6)
        runs[rid] = {**fake[run_id(src, 0, "sparsegpt", 0.6)], "id": rid, "entry": v, "kind": "variant:igsp"}
    assert [r.id for r in plan_runs(spec)] == list(runs)
    study = summarise_study(spec, dense, runs)
    pairs = study["differences"]["sparsegpt"]["0.6"]["pairs"]
    assert list(pairs) == ["v5 − base", "v1 − base"]
    assert pairs["v1 − base"]["total"]["seed_variance_unknown"] and pairs["v1 − base"]["total"]["se_seed"] == 0
    assert study["verdicts"] == {} and study["complete"] is True and study["progress"]["done"] == 3
    text = write_report(study, tmp_path, plots=False).read_text()
    assert "No claim of the paper applies" in text and "| v1 − base | 1/1 |" in text and "† One seed" in text
    assert "seed 0 |" in text and "for ," not in text and "best single = None" not in text
    assert "Paper reference values (LLaMA-3.1-8B" in text and "{" not in text.split("Paper reference values")[1]
    missing = summarise_study(spec, dense, {k: v for k, v in runs.items() if not k.startswith("v1")})
    assert missing["complete"] is False and missing["progress"]["remaining"] == [run_id("v1", 0, "sparsegpt", 0.6)]
