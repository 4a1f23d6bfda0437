"""The failure-mode table in ``docs/failure_modes.md`` is generated from these cases and must stay current.

Each case is a user mistake run through the real CLI (or the API) in a sandbox: the test checks that it ends
with exit code 2 and one line ``calibprune <cmd>: error: ...`` (no traceback, nothing written), records when it
was caught (before or after the model load), and renders the table from what the user actually saw. If the
committed table differs, the test fails; regenerate it with

    CALIBPRUNE_UPDATE_DOCS=1 python -m pytest -q tests/test_reliability_failure_table.py
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from calibprune import models
from calibprune.calibration import CalibrationSet
from calibprune.calibration import sources as S
from calibprune.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "failure_modes.md"
VOCAB = 96
UNREACHABLE = "the hub (huggingface.co:443) is not reachable: Name or service not known"


@dataclass(frozen=True)
class Case:
    group: str
    what: str  # the mistake, in the user's words
    argv: Callable[[dict], list[str]] | None = None  # CLI case: sandbox -> argv (command first)
    shown: str = ""  # the command as shown in the table
    api: Callable[[dict], None] | None = None  # API case instead of a CLI one
    expect: str = ""  # a part of the message that must be there


def _prune(s: dict, *extra: str, out: str | None = None) -> list[str]:
    return ["prune", "--model", s["model"], "--out", out or s["out"], "--no-eval", "--n", "2", "--seqlen", "8",
            "--data-dir", s["data"], *extra]


def _nan_save(s: dict) -> None:
    from calibprune.pruning.report import PruneReport
    from calibprune.save import save_pruned

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    save_pruned(model, None, s["out"], PruneReport(method="sparsegpt", config={}))


CASES = [
    Case("output", "`--out .` with `--overwrite` (the current directory)", lambda s: _prune(s, "--overwrite", out="."),
         "prune ... --out . --overwrite", expect="current directory"),
    Case("output", "`--overwrite` onto a folder that is not a calibprune output",
         lambda s: _prune(s, "--overwrite", out=s["foreign"]), "prune ... --out notes/ --overwrite",
         expect="replaces only a previous calibprune output"),
    Case("output", "`--out` names a non-empty folder, no `--overwrite`", lambda s: _prune(s, out=s["foreign"]),
         "prune ... --out notes/", expect="not empty"),
    Case("output", "`--out` under `/proc`", lambda s: _prune(s, out="/proc/pruned"), "prune ... --out /proc/pruned",
         expect="not writable"),
    Case("output", "`--out` under `/sys`", lambda s: _prune(s, out="/sys/pruned"), "prune ... --out /sys/pruned",
         expect="not writable"),
    Case("output", "`--out` below a file", lambda s: _prune(s, out=s["afile"] + "/sub"), "prune ... --out afile/sub",
         expect="is a file"),
    Case("output", "`calib --out foo` while `foo.pt` exists",
         lambda s: ["calib", "--model", s["model"], "--out", s["existing_set"], "--data-dir", s["data"]],
         "calib ... --out foo", expect="pass --overwrite"),
    Case("calibration", "a source named twice", lambda s: _prune(s, "--calib", "c4,c4"), "prune ... --calib c4,c4",
         expect="twice"),
    Case("calibration", "a negative mix weight", lambda s: _prune(s, "--calib", "c4:-1,gsm8k:1"),
         "prune ... --calib c4:-1,gsm8k:1", expect=">= 0"),
    Case("calibration", "all mix weights zero", lambda s: _prune(s, "--calib", "c4:0,gsm8k:0"),
         "prune ... --calib c4:0,gsm8k:0", expect="all zero"),
    Case("calibration", "a mistyped source name", lambda s: _prune(s, "--calib", "c44"), "prune ... --calib c44",
         expect="Did you mean"),
    Case("calibration", "a `.pt` that is not a calibration set (garbage)",
         lambda s: _prune(s, "--calib", s["sets"]["garbage"]), "prune ... --calib garbage.pt",
         expect="not a readable calibration set"),
    Case("calibration", "a truncated `.pt`", lambda s: _prune(s, "--calib", s["sets"]["truncated"]),
         "prune ... --calib truncated.pt", expect="not a readable calibration set"),
    Case("calibration", "a `.pt` holding a plain tensor", lambda s: _prune(s, "--calib", s["sets"]["plain"]),
         "prune ... --calib plain.pt", expect="plain tensor"),
    Case("calibration", "negative token ids in a `.pt`", lambda s: _prune(s, "--calib", s["sets"]["negative"]),
         "prune ... --calib negative.pt", expect="negative"),
    Case("calibration", "token ids outside the model's vocabulary", lambda s: _prune(s, "--calib", s["sets"]["oov"]),
         "prune ... --calib oov.pt", expect="outside the tokenizer's vocabulary"),
    Case("data", "a corrupt line in an offline JSONL file", lambda s: _prune(s, "--data-dir", s["corrupt"]),
         "prune ... --data-dir corrupt/", expect="line 2"),
    Case("data", "a mistyped `--data-dir`", lambda s: _prune(s, "--data-dir", s["root"] + "/dta"),
         "prune ... --data-dir dta/", expect="does not exist"),
    Case("data", "no offline copy, and the hub is unreachable",
         lambda s: _prune(s, "--calib", "gsm8k"), "prune ... --calib gsm8k (no gsm8k/ in the data dir)",
         expect="not reachable"),
    Case("model", "a model folder whose config.json is empty", lambda s: _prune(s) [:2] + [s["broken"]] + _prune(s)[3:],
         "prune --model broken/ ...", expect="not valid JSON"),
    Case("model", "a relative model path that does not exist",
         lambda s: ["prune", "--model", "models/llama-typo", "--out", s["out"]], "prune --model models/llama-typo ...",
         expect="no such folder"),
    Case("model", "a `.gguf` file that does not exist", lambda s: ["prune", "--model", "nope.gguf", "--out", s["out"]],
         "prune --model nope.gguf ...", expect="GGUF file not found"),
    Case("model", "an unknown `--dtype`", lambda s: _prune(s, "--dtype", "float8"), "prune ... --dtype float8",
         expect="unknown dtype"),
    Case("pruning", "a sparsity outside (0, 1)", lambda s: _prune(s, "--sparsity", "1.5"), "prune ... --sparsity 1.5",
         expect="sparsity"),
    Case("pruning", "an N:M pattern with N >= M", lambda s: _prune(s, "--pattern", "2:2"), "prune ... --pattern 2:2",
         expect="N < M"),
    Case("pruning", "`--targets` that match no module", lambda s: _prune(s, "--targets", "nomatch"),
         "prune ... --targets nomatch", expect="match no"),
    Case("pruning", "an N:M width that does not divide the layers", lambda s: _prune(s, "--pattern", "2:32"),
         "prune ... --pattern 2:32 (widths 48, 88)", expect="in_features"),
    Case("numerics", "a model that holds NaN reaches `save_pruned`", api=_nan_save,
         shown="save_pruned(model_with_nan, ...)", expect="NaN/Inf"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny") / "dense"
    tiny_model("llama").save_pretrained(path)
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "</s>": VOCAB - 1}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>",
                            eos_token="</s>").save_pretrained(path)
    return path


def _sandbox(root: Path, tiny: Path) -> dict:
    root.mkdir(parents=True)
    (root / "models").mkdir()
    (root / "afile").write_text("a file")
    foreign = root / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("user file")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("")
    data = root / "data"
    (data / "c4_sample").mkdir(parents=True)
    (data / "c4_sample" / "c4_demo.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(f"w{(i + j) % 90}" for j in range(30))}) + "\n" for i in range(10)))
    corrupt = root / "corrupt"
    (corrupt / "c4_sample").mkdir(parents=True)
    (corrupt / "c4_sample" / "c4_demo.jsonl").write_text('{"text": "fine"}\n{"text": "tab\there"}\n')
    sets = root / "sets"
    sets.mkdir()
    good = CalibrationSet(ids=torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))).save(
        sets / "good.pt")
    (sets / "garbage.pt").write_bytes(b"\x80\x02not a pickle at all" * 4)
    (sets / "truncated.pt").write_bytes(good.read_bytes()[:-64])
    torch.save(torch.ones(2, 8, dtype=torch.long), sets / "plain.pt")
    torch.save({"ids": torch.tensor([[1, -2, 3], [4, 5, 6]])}, sets / "negative.pt")
    torch.save({"ids": torch.tensor([[1, 2, 3], [4, 5, 1000]])}, sets / "oov.pt")
    CalibrationSet(ids=torch.ones(1, 4, dtype=torch.long)).save(root / "foo.pt")
    return {"root": str(root), "model": str(tiny), "out": str(root / "pruned"), "foreign": str(foreign),
            "afile": str(root / "afile"), "broken": str(broken), "data": str(data), "corrupt": str(corrupt),
            "existing_set": str(root / "foo"), "sets": {p.stem: str(p) for p in sets.glob("*.pt")}}


def _normalise(text: str, s: dict) -> str:
    for path, name in sorted([(s["root"], "<tmp>"), (str(Path(s["root"]).resolve()), "<tmp>"),
                              (s["model"], "<model>"), (str(Path(s["model"]).resolve()), "<model>")],
                             key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return text


def _run_case(case: Case, root: Path, tiny: Path, monkeypatch) -> dict:
    s = _sandbox(root, tiny)
    loaded = []
    real_load = models.load_model

    def recording_load(*a, **k):
        loaded.append(True)
        return real_load(*a, **k)

    monkeypatch.setattr(models, "load_model", recording_load)
    monkeypatch.setattr(S, "hub_unavailable_reason", lambda **k: UNREACHABLE)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(root)
    before = sorted(str(p) for p in root.rglob("*"))
    err = io.StringIO()
    if case.api is not None:
        with pytest.raises(Exception) as exc:
            case.api(s)
        code, line = "exception", f"{type(exc.value).__name__}: {exc.value}"
    else:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(case.argv(s))
        # Above the error there may be progress bars of a model load (tqdm on stderr); the error is one line.
        *progress, line = err.getvalue().strip().splitlines() or [""]
        assert code == 2 and line.startswith(("calibprune prune: error: ", "calibprune calib: error: ")), (
            case.what, code, line)
        assert not [p for p in progress if "error" in p.lower()], (case.what, progress)
    assert case.expect in line, (case.what, line)
    assert sorted(str(p) for p in root.rglob("*")) == before, f"{case.what}: files were written"
    when = ("before anything is written" if case.api is not None else
            "after the model load, before any work" if loaded else "before the model loads")
    return {"code": code, "when": when, "line": _normalise(line, s)}


def render(rows: list[tuple[Case, dict]]) -> str:
    lines = [
        "# Failure modes: what the user sees",
        "",
        "Generated by `tests/test_reliability_failure_table.py` from real runs of the CLI (and the API for the last",
        "group) in a sandbox; the test fails when this file is out of date. Regenerate it with",
        "`CALIBPRUNE_UPDATE_DOCS=1 python -m pytest -q tests/test_reliability_failure_table.py`.",
        "",
        "Every case ends with exit code 2 and one line on stderr, and writes nothing. `<tmp>` stands for the",
        "sandbox folder and `<model>` for a small local checkpoint. The fuzz tests (`tests/test_fuzz_*.py`) check the",
        "same promise (a clean error or a valid result, never a traceback or a partial output) over random inputs.",
        "",
        "| Group | Mistake | Command | Caught | What the user sees |",
        "|---|---|---|---|---|",
    ]
    for case, r in rows:
        msg = r["line"].replace("|", "\\|")
        lines.append(f"| {case.group} | {case.what} | `{case.shown}` | {r['when']} | `{msg}` |")
    return "\n".join(lines) + "\n"


def test_failure_table_is_current(tmp_path, tiny_dir, monkeypatch):
    rows = []
    for i, case in enumerate(CASES):
        with monkeypatch.context() as m:
            rows.append((case, _run_case(case, tmp_path / f"case{i:02d}", tiny_dir, m)))
    text = render(rows)
    if os.environ.get("CALIBPRUNE_UPDATE_DOCS"):
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/failure_modes.md is out of date; regenerate it with "
        "CALIBPRUNE_UPDATE_DOCS=1 python -m pytest -q tests/test_reliability_failure_table.py")
