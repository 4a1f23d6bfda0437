"""Saving never destroys what is not ours: sandboxes with sentinel files around every ``--out``/``--overwrite``.

The data-loss report (issue 13): ``prune --out . --overwrite`` deleted the current directory's files, then
crashed and lost the pruned model too, because the staging directory was created inside the target and the
whole target was then deleted.
"""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from calibprune import save as save_mod
from calibprune.pruning.report import PruneReport
from calibprune.save import SIDECAR, STAGING_PREFIX, check_output_dir, save_pruned


def _report() -> PruneReport:
    return PruneReport(method="test", config={"sparsity": 0.5})


def _sentinels(folder: Path) -> dict[Path, str]:
    """A user's files: a text file and a data folder, as in the reported sandbox."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    files = {folder / "thesis.tex": "\\documentclass{article}", folder / "data" / "results.csv": "a,b\n1,2\n"}
    for path, text in files.items():
        path.write_text(text)
    return files


def _intact(files: dict[Path, str]) -> bool:
    return all(p.is_file() and p.read_text() == text for p, text in files.items())


def _previous_output(folder: Path, marker: str = "old") -> None:
    """What an earlier ``calibprune prune`` left: weights and the sidecar."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(marker)
    (folder / SIDECAR).write_text(json.dumps({"report": {}, "marker": marker}))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX))


# -- the data-loss case ------------------------------------------------------------------------------------------

def test_overwrite_cwd_refused_and_user_files_kept(tmp_path, monkeypatch):
    files = _sentinels(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current directory"):
        save_pruned(tiny_model("llama"), None, ".", _report(), overwrite=True)
    assert _intact(files)
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path.parent) == []


@pytest.mark.parametrize("where", ["parent-of-cwd", "home", "root"])
def test_overwrite_refuses_cwd_parents_home_and_root(tmp_path, monkeypatch, where):
    inner = tmp_path / "work" / "inner"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = {"parent-of-cwd": tmp_path / "work", "home": tmp_path / "home", "root": Path("/")}[where]
    with pytest.raises(ValueError, match="refusing"):
        check_output_dir(target, overwrite=True)


def test_overwrite_refuses_a_folder_that_is_not_a_calibprune_output(tmp_path):
    out = tmp_path / "out"
    files = _sentinels(out)
    with pytest.raises(FileExistsError, match=SIDECAR):
        save_pruned(tiny_model("llama"), None, out, _report(), overwrite=True)
    assert _intact(files)


def test_overwrite_replaces_a_previous_output(tmp_path):
    out = tmp_path / "out"
    _previous_output(out)
    files = _sentinels(tmp_path)  # siblings of the output must survive too
    save_pruned(tiny_model("llama"), None, out, _report(), overwrite=True)
    assert "marker" not in json.loads((out / SIDECAR).read_text())
    assert (out / "model.safetensors").stat().st_size > 1000
    assert _intact(files) and _leftovers(tmp_path) == []


def test_without_overwrite_a_previous_output_is_kept(tmp_path):
    out = tmp_path / "out"
    _previous_output(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_pruned(tiny_model("llama"), None, out, _report())
    assert json.loads((out / SIDECAR).read_text())["marker"] == "old"


def test_symlink_output_not_followed_for_overwrite(tmp_path):
    real = tmp_path / "real"
    _previous_output(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(FileExistsError, match="symbolic link"):
        check_output_dir(link, overwrite=True)
    assert (real / SIDECAR).is_file()


# -- atomic replacement ------------------------------------------------------------------------------------------

class _Interrupt(BaseException):
    """Stands in for Ctrl-C (KeyboardInterrupt is a BaseException too)."""


@pytest.mark.parametrize("step", ["write", "swap"])
def test_interrupted_overwrite_keeps_the_old_output(tmp_path, monkeypatch, step):
    out = tmp_path / "out"
    _previous_output(out)
    if step == "write":  # Ctrl-C while the new checkpoint is being written
        monkeypatch.setattr(save_mod, "write_sidecar", lambda *a, **k: (_ for _ in ()).throw(_Interrupt()))
    else:  # Ctrl-C between moving the old output aside and moving the new one in
        real = os.replace
        calls = []

        def flaky(src, dst):
            if Path(dst) == out and Path(src).name.startswith(STAGING_PREFIX) and not calls:
                calls.append(src)  # the new output's move-in, after the old one went aside
                raise _Interrupt()
            return real(src, dst)

        monkeypatch.setattr(save_mod.os, "replace", flaky)
    with pytest.raises(_Interrupt):
        save_pruned(tiny_model("llama"), None, out, _report(), overwrite=True)
    assert json.loads((out / SIDECAR).read_text())["marker"] == "old"
    assert (out / "model.safetensors").read_text() == "old"
    assert _leftovers(tmp_path) == []
    assert step == "write" or calls, "the swap was never reached"


# -- staging beside the target, stale staging cleaned ------------------------------------------------------------

def test_staging_lives_beside_the_target_not_inside(tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = []
    real = save_mod.write_sidecar

    def spy(folder, *a, **k):
        seen.append(Path(folder))
        return real(folder, *a, **k)

    monkeypatch.setattr(save_mod, "write_sidecar", spy)
    save_pruned(tiny_model("llama"), None, out, _report())
    assert seen[0].parent == tmp_path and seen[0].name.startswith(STAGING_PREFIX)


def test_stale_staging_of_a_dead_process_is_cleaned(tmp_path):
    dead_pid = 2 ** 22 + 12345  # above pid_max on Linux by default, so no such process
    stale = tmp_path / f"{STAGING_PREFIX}out-{dead_pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    old = tmp_path / f"{STAGING_PREFIX}out-{os.getpid()}-old"  # our own pid but a day old
    old.mkdir()
    day_ago = time.time() - 2 * 86400
    os.utime(old, (day_ago, day_ago))
    live = tmp_path / f"{STAGING_PREFIX}out-{os.getpid()}-live"  # a running save (ours, fresh): kept
    live.mkdir()
    save_pruned(tiny_model("llama"), None, tmp_path / "out", _report())
    assert not stale.exists() and not old.exists() and live.exists()


# -- permissions and the writability probe -------------------------------------------------------------------------

def test_output_folder_has_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_pruned(tiny_model("llama"), None, tmp_path / "out", _report())
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


@pytest.mark.parametrize("target,match", [
    ("/proc/calibprune-x", "not writable"),
    ("/sys/calibprune-x", "not writable"),
    ("afile/sub", "is a file"),
])
def test_unwritable_output_found_before_work(tmp_path, monkeypatch, target, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file, not a folder")
    with pytest.raises((PermissionError, NotADirectoryError), match=match):
        check_output_dir(target)
    assert (tmp_path / "afile").read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_writability_probe_is_real_not_os_access(tmp_path, monkeypatch):
    """Running as root, ``os.access`` says yes to everything; the probe must create and remove a file."""
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    with pytest.raises(PermissionError, match="not writable"):
        check_output_dir("/proc/calibprune-x")


# -- nothing non-finite reaches a checkpoint -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_never_saved(tmp_path, bad, dtype):
    model = tiny_model("llama").to(dtype)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = bad
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        save_pruned(model, None, out, _report())
    assert not out.exists() and _leftovers(tmp_path) == []


# -- provenance: where the model came from, with file hashes, and the command line ---------------------------------

def test_sidecar_records_source_model_hashes_and_command(tmp_path, monkeypatch):
    import hashlib

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from calibprune.models import load_model

    src = tmp_path / "dense"
    tiny_model("llama").save_pretrained(src)
    vocab = {f"w{i}": i for i in range(95)} | {"<unk>": 95}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(src)
    model, _ = load_model(str(src))
    monkeypatch.setattr("sys.argv", ["calibprune", "prune", "--model", str(src), "--out", "x"])
    out = save_pruned(model, None, tmp_path / "out", _report())
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["command"] == ["calibprune", "prune", "--model", str(src), "--out", "x"]
    source = sidecar["source_model"]
    assert source["kind"] == "local" and source["hash"] == "sha256"
    weights = src / "model.safetensors"
    assert source["files"]["model.safetensors"] == {"bytes": weights.stat().st_size,
                                                    "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert "config.json" in source["files"]
