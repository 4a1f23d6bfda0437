"""Prunes that resume: a prune killed mid-way (SIGKILL) and run again with --resume writes output bitwise equal to an
uninterrupted run, and until it completes nothing on disk can be mistaken for a finished checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import random_ids
from transformers import AutoModelForCausalLM

from calibprune import make_config
from calibprune.cli import main
from calibprune.pruning import prune_and_save
from calibprune.pruning.checkpoint import STATE_FILE, LayerCheckpoint, partial_dir

VOCAB = 96
LAYERS = 4


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out


def _assert_same_checkpoint(got: Path, expected: Path) -> None:
    a, b = _tensors(got), _tensors(expected)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A 4-layer tiny Llama checkpoint with a tokenizer, and an offline C4 sample, for the CLI."""
    import transformers as tf
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    root = tmp_path_factory.mktemp("resume")
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=88, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(root / "dense")
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "</s>": VOCAB - 1}
    tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>",
                               eos_token="</s>").save_pretrained(root / "dense")
    data = root / "data" / "c4_sample"
    data.mkdir(parents=True)
    (data / "c4_demo.jsonl").write_text("".join(
        json.dumps({"text": " ".join(f"w{(i * 7 + j * 3) % 90}" for j in range(80))}) + "\n" for i in range(40)))
    return {"root": root, "model": root / "dense", "data": root / "data"}


def _argv(setup: dict, out: Path) -> list[str]:
    return ["prune", "--model", str(setup["model"]), "--out", str(out), "--no-eval", "--calib", "c4",
            "--num-samples", "4", "--seqlen", "16", "--sparsity", "0.6", "--blocksize", "16",
            "--data-dir", str(setup["data"])]


# The child slows every module's prune so that a kill lands inside a layer, after at least one finished layer.
_CHILD = textwrap.dedent("""
    import sys, time
    from calibprune.pruning.methods.sparsegpt import SparseGPTMethod
    original = SparseGPTMethod.prune_module
    def slow(self, *args, **kwargs):
        time.sleep(0.25)
        return original(self, *args, **kwargs)
    SparseGPTMethod.prune_module = slow
    from calibprune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _finished_layers(partial: Path) -> int:
    try:
        return len(json.loads((partial / STATE_FILE).read_text())["layers"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(setup, tmp_path, capsys):
    out, partial = tmp_path / "pruned", partial_dir(tmp_path / "pruned")
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    child = subprocess.Popen([sys.executable, str(script), *_argv(setup, out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=os.environ | {"CALIBPRUNE_DATA_DIR": str(setup["data"])})
    try:
        deadline = time.monotonic() + 300
        while _finished_layers(partial) < 1:
            assert child.poll() is None, f"the prune ended before it could be killed: {child.stderr.read()!r}"
            assert time.monotonic() < deadline, "no layer finished within 300 s"
            time.sleep(0.05)
        time.sleep(0.6)  # into the next layer's prune (seven modules of 0.25 s each)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    done = _finished_layers(partial)
    assert 1 <= done < LAYERS, f"killed after {done} finished layers; the test wants a kill mid-way"

    # Nothing on disk passes for a finished checkpoint.
    assert not out.exists()
    for folder in (partial, out):
        with pytest.raises((OSError, ValueError)):
            AutoModelForCausalLM.from_pretrained(folder)
    assert not any((partial / name).exists() for name in ("config.json", "model.safetensors.index.json",
                                                          "calibprune.json"))

    # Without --resume the leftover run is not silently overwritten or reused.
    assert main(_argv(setup, out)) == 2
    assert "--resume" in capsys.readouterr().err

    assert main([*_argv(setup, out), "--resume"]) == 0
    assert main(_argv(setup, tmp_path / "uninterrupted")) == 0
    _assert_same_checkpoint(out, tmp_path / "uninterrupted")
    assert not partial.exists()
    resumed = json.loads((out / "calibprune.json").read_text())["report"]
    whole = json.loads((tmp_path / "uninterrupted" / "calibprune.json").read_text())["report"]
    strip = ("seconds",)
    assert [{k: v for k, v in m.items() if k not in strip} for m in resumed["modules"]] == \
        [{k: v for k, v in m.items() if k not in strip} for m in whole["modules"]]
    AutoModelForCausalLM.from_pretrained(out)


class _Crash(Exception):
    pass


def _crash_after(monkeypatch, layers: int) -> None:
    """Make the prune die (an exception, as a crash would) once ``layers`` layers are saved."""
    original = LayerCheckpoint.commit

    def commit(self, index, *args):
        original(self, index, *args)
        if index + 1 == layers:
            raise _Crash

    monkeypatch.setattr(LayerCheckpoint, "commit", commit)


def test_resume_refuses_another_request(setup, tmp_path, monkeypatch):
    """A resume whose model, calibration or settings differ is refused with the fields that differ; the same
    request resumes and equals an uninterrupted run (OWL's layer sparsities come back from the work folder)."""
    ids = random_ids(4, 16, seed=5, vocab=VOCAB)
    config = make_config("sparsegpt", sparsity=0.6, sparsity_profile="owl", profile_options={"lmbda": 0.05})
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_after(m, 2)
        with pytest.raises(_Crash):
            prune_and_save(setup["model"], ids, config, out, progress=False)
    assert _finished_layers(partial_dir(out)) == 2 and not out.exists()
    with pytest.raises(FileExistsError, match="resume"):
        prune_and_save(setup["model"], ids, config, out, progress=False)
    other = make_config("sparsegpt", sparsity=0.5, sparsity_profile="owl", profile_options={"lmbda": 0.05},
                        resume=True)
    with pytest.raises(ValueError, match="config.sparsity"):
        prune_and_save(setup["model"], ids, other, out, progress=False)
    with pytest.raises(ValueError, match="calibration_ids_sha256"):
        prune_and_save(setup["model"], random_ids(4, 16, seed=6, vocab=VOCAB),
                       make_config("sparsegpt", sparsity=0.6, sparsity_profile="owl",
                                   profile_options={"lmbda": 0.05}, resume=True), out, progress=False)

    import calibprune.pruning.methods.owl as owl

    def no_measuring(*args, **kwargs):
        raise AssertionError("a resumed OWL run must take its layer sparsities from the work folder")

    resumed_config = make_config("sparsegpt", sparsity=0.6, sparsity_profile="owl",
                                 profile_options={"lmbda": 0.05}, resume=True)
    with monkeypatch.context() as m:
        m.setattr(owl.OWL, "layer_sparsities", no_measuring)
        report = prune_and_save(setup["model"], ids, resumed_config, out, progress=False)
    whole = prune_and_save(setup["model"], ids, config, tmp_path / "whole", progress=False)
    _assert_same_checkpoint(out, tmp_path / "whole")
    assert report.layer_targets == whole.layer_targets
    assert [r.name for r in report.modules] == [r.name for r in whole.modules]


def test_resume_without_an_output_is_an_error():
    from tiny_models import tiny_model

    from calibprune import prune

    with pytest.raises(ValueError, match="prune_and_save"):
        prune(tiny_model("llama"), random_ids(2, 8), make_config("wanda", resume=True))


def test_kill_while_assembling_resumes_without_recomputing(setup, tmp_path, monkeypatch):
    """Killed after the last layer was saved (while the checkpoint is assembled): the staging folder is not a
    finished output, and the resumed run only assembles — no forward runs again."""
    import calibprune.pruning.loop as loop
    import calibprune.pruning.streaming as streaming

    ids = random_ids(4, 16, seed=7, vocab=VOCAB)
    config = make_config("wanda", sparsity=0.5, report_errors=False)
    out = tmp_path / "out"

    def dies(folder, *args, **kwargs):
        (folder / "config.json").write_text("{}")  # half-written staging folder
        raise _Crash

    with monkeypatch.context() as m:
        m.setattr(streaming, "_assemble", dies)
        with pytest.raises(_Crash):
            prune_and_save(setup["model"], ids, config, out, progress=False)
    assert not out.exists() and _finished_layers(partial_dir(out)) == LAYERS

    def no_forward(*args, **kwargs):
        raise AssertionError("every layer was finished: nothing needs to run through the model again")

    with monkeypatch.context() as m:
        m.setattr(loop, "_capture", no_forward)
        m.setattr(loop, "_layer_forward", no_forward)
        prune_and_save(setup["model"], ids, make_config("wanda", sparsity=0.5, report_errors=False, resume=True), out,
                       progress=False)
    prune_and_save(setup["model"], ids, config, tmp_path / "whole", progress=False)
    _assert_same_checkpoint(out, tmp_path / "whole")
