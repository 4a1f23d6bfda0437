"""Fuzzing the CLI argument space (parse + preflight, no model load).

Property, for ``calibprune prune`` and ``calibprune calib`` with arguments drawn from the parser itself (every
option, valid and invalid values, odd paths, bad files): the command either

- stops with a clean error: argparse's usage exit (code 2), or ``main`` returning 2 with exactly one line
  ``calibprune <cmd>: error: ...`` on stderr; or
- passes every check and reaches the model load (a tripwire stands in for ``load_model`` and the data
  reading), or, for ``calib`` of a saved set, finishes and writes a complete, loadable set;

never a traceback, and never a change to the sandbox's files except a complete output of a command that
returned 0 (no partial output, no staging or probe files left, the user's sentinel files untouched).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from _fuzz import TRIED, fuzz_settings, report
from hypothesis import given
from tiny_models import tiny_model

import calibprune.calibration as calibration_pkg
from calibprune import models
from calibprune.calibration import CalibrationSet
from calibprune.cli import build_parser, main

VOCAB = 96


class _ReachedWork(Exception):
    """The tripwire: the command passed its checks and started loading the model or reading data."""


def _tripwire(*args, **kwargs):
    raise _ReachedWork()


# -- the sandbox -----------------------------------------------------------------------------------------------------

def _tiny_checkpoint(path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tiny_model("llama").save_pretrained(path)
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "</s>": VOCAB - 1}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>",
                            eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Models, data dirs, calibration files and output targets the strategies pick from."""
    root = tmp_path_factory.mktemp("fuzz")
    cwd = root / "cwd"
    (cwd / "data").mkdir(parents=True)
    (cwd / "thesis.tex").write_text("user file")
    (cwd / "data" / "results.csv").write_text("a,b\n")
    _tiny_checkpoint(root / "tiny")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    (root / "afile").write_text("a file")
    prev = root / "previous-output"
    prev.mkdir()
    (prev / "calibprune.json").write_text("{}")
    (prev / "model.safetensors").write_text("old")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    data = root / "data"
    for rel, text in {
        "c4_sample/c4_demo.jsonl": "".join(json.dumps({"text": " ".join(f"w{(i * 3 + j) % 90}" for j in range(30))})
                                           + "\n" for i in range(10)),
        "gsm8k/train.jsonl": json.dumps({"question": "w1 w2", "answer": "w3 #### 4"}) + "\n",
        "alpaca_en_demo/alpaca_en_demo.json": json.dumps([{"instruction": "w1", "input": "", "output": "w2"}]),
    }.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text)
    corrupt = root / "corrupt-data"
    (corrupt / "c4_sample").mkdir(parents=True)
    (corrupt / "c4_sample" / "c4_demo.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    sets = root / "sets"
    sets.mkdir()
    good = CalibrationSet(ids=torch.randint(0, VOCAB, (3, 8)), provenance={"kind": "fuzz"}).save(sets / "good.pt")
    (sets / "garbage.pt").write_bytes(os.urandom(100))
    (sets / "truncated.pt").write_bytes(good.read_bytes()[:-50])
    torch.save(torch.randint(0, VOCAB, (2, 4)), sets / "plain.pt")
    torch.save({"ids": torch.tensor([[1, -1], [2, 3]])}, sets / "negative.pt")
    torch.save({"ids": torch.tensor([[1, 2], [3, VOCAB + 5]])}, sets / "oov.pt")
    (root / "recipe.yaml").write_text("this: [is: not a recipe\n")
    (root / "empty.yaml").write_text("")
    return {
        "root": root, "cwd": cwd,
        "models": [str(root / "tiny"), str(broken), str(root / "afile"), str(root / "missing"), "no/such/model",
                   "x.gguf", str(root / "afile") + ".gguf", "", " ", "../tiny"],
        "outs": [".", "..", "/", "out-new", "deep/er/out", str(root / "afile"), str(root / "afile" / "sub"), str(prev),
                 str(foreign), "/proc/calibprune-fuzz", "/sys/calibprune-fuzz", str(root / "fresh-out"), "~"],
        "calibs": [str(p) for p in sorted(sets.glob("*.pt"))] + [str(sets / "missing.pt")],
        "data_dirs": [str(data), str(corrupt), str(root / "no-data"), str(root / "afile"),
                      os.environ.get("CALIBPRUNE_DATA_DIR", str(data))],
        "recipes": [str(root / "recipe.yaml"), str(root / "empty.yaml"), str(root / "missing.yaml")],
    }


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns) if p.is_file() else (-1, 0)
    return out


# -- strategies built from the parser ----------------------------------------------------------------------------------

_junk = st.text(max_size=12) | st.sampled_from(["", " ", "-", "--", "nan", "inf", "-inf", "1e999", "-0", "0x10",
                                                "None", "null", "\u00e9", "a,b", ":", "=", "../..", "/"])
_SOURCES = ["c4", "gsm8k", "alpaca", "wikitext2", "metamath", "the_stack", "c44", "self-cal", "sgs", "igsp"]
_weight = st.sampled_from(["", ":1", ":0", ":-1", ":0.5", ":nan", ":inf", ":abc", ":"])
_mix = st.lists(st.tuples(st.sampled_from(_SOURCES), _weight), min_size=1, max_size=3).map(
    lambda items: ",".join(name + w for name, w in items))


def _value_strategy(action: argparse.Action, world: dict) -> st.SearchStrategy:
    """Mostly plausible values for ``action`` (so the deeper checks are reached), sometimes junk."""
    plausible = {
        "model": st.sampled_from(world["models"]),
        "out": st.sampled_from(world["outs"]),
        "calib": _mix | st.sampled_from(world["calibs"]),
        "data_dir": st.sampled_from(world["data_dirs"]),
        "recipe": st.sampled_from(world["recipes"]),
        "dtype": st.sampled_from(["float32", "bf16", "fp16", "float8", "int8", "torch.float32"]),
        "gen_option": st.sampled_from(["pool_factor=3", "temperature=0.5", "nope=1", "x", "=1"]),
    }.get(action.dest)
    if plausible is None and action.choices:
        plausible = st.sampled_from(list(action.choices))
    elif plausible is None and action.type is int:
        plausible = (st.integers(-2, 6) | st.sampled_from([2**31, 10**30, 4096])).map(str)
    elif plausible is None and (action.type is float or "sparsity" in action.dest or "percdamp" in action.dest):
        plausible = (st.floats(-0.5, 1.5).map(repr)
                     | st.sampled_from(["0", "0.5", "1", "1.0", "-0.1", "0.999999", "nan", "inf", "1e-300"]))
    elif plausible is None:
        plausible = st.sampled_from(["q_proj", "mlp.*", "re:.*proj", "cpu", "cuda", "cuda:7", "2:4", "4:8", "2:128"])
    return st.integers(0, 9).flatmap(lambda k: _junk if k in (3, 8) else plausible)


@st.composite
def _argv(draw, world: dict) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = draw(st.sampled_from(["prune", "calib"]))
    argv = [command]
    # Always a model and an output most of the time, so that the deeper checks are reached.
    if draw(st.integers(0, 9)) != 7:
        argv += ["--model", draw(st.sampled_from(world["models"][:1] * 3 + world["models"][1:2])
                                 | _value_strategy(sub.choices[command]._option_string_actions["--model"], world))]
    if draw(st.integers(0, 9)) != 7:
        argv += ["--out", draw(st.sampled_from(["fresh-out", str(world["root"] / "fresh-out")])
                               | _value_strategy(sub.choices[command]._option_string_actions["--out"], world))]
    actions = [a for a in sub.choices[command]._actions if a.option_strings and a.dest not in ("help", "model", "out")]
    for action in draw(st.lists(st.sampled_from(actions), max_size=5, unique_by=lambda a: a.dest)):
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
        elif action.nargs == "*":
            argv += [flag, *draw(st.lists(_value_strategy(action, world), max_size=3))]
        else:
            argv += [flag, draw(_value_strategy(action, world))]
    if draw(st.integers(0, 39)) == 17:
        argv.append(draw(st.sampled_from(["--unknown-flag", "stray", "-x"])))
    if command == "prune" and draw(st.booleans()):
        argv.append("--no-eval")
    return argv


# -- the property ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    for name in sorted(k for k in TRIED if k.startswith("cli")):
        report(name)


@fuzz_settings(250)
@given(data=st.data())
def test_fuzz_cli_clean_error_or_valid(world, monkeypatch, data):
    monkeypatch.setattr(models, "load_model", _tripwire)
    monkeypatch.setattr(calibration_pkg, "build_calibration", _tripwire)
    monkeypatch.setenv("CALIBPRUNE_DATA_DIR", world["data_dirs"][0])
    monkeypatch.setenv("HOME", str(world["root"] / "cwd"))
    monkeypatch.chdir(world["cwd"])
    argv = data.draw(_argv(world), label="argv")
    TRIED[f"cli {argv[0]}"] += 1
    before = _snapshot(world["root"])
    stderr = io.StringIO()
    outcome = None
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            outcome = main(argv)
        except SystemExit as exc:  # argparse: usage error (2) or --help (0)
            assert exc.code in (0, 2), (argv, exc.code)
            outcome = f"argparse {exc.code}"
        except _ReachedWork:
            outcome = "reached work"
    err = stderr.getvalue().strip()
    after = _snapshot(world["root"])
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if outcome == 2:
        assert err.count("\n") == 0 and err.startswith(f"calibprune {argv[0]}: error: "), (argv, err)
    elif outcome == 0:
        assert argv[0] == "calib", argv
        written = [world["root"] / k for k in changed if k.endswith((".pt", ".json"))]
        pt = next(p for p in written if p.suffix == ".pt")
        assert CalibrationSet.load(pt).n >= 1
        for p in written:  # keep the sandbox as it was for the next example
            p.unlink()
        # what is left that the run created: the folders it made for that output
        changed = [k for k in changed if (world["root"] / k).exists() and k not in before]
        for k in sorted(changed, reverse=True):  # folders created for that output
            p = world["root"] / k
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        changed = sorted(k for k in set(before) ^ set(_snapshot(world["root"])))
    else:
        assert outcome in ("reached work", "argparse 0", "argparse 2"), (argv, outcome, err)
    assert changed == [], (argv, outcome, changed)
    TRIED[f"cli outcome {outcome}"] += 1
