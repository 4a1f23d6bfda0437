"""The layer-wise pipeline on tiny random decoders of several architectures."""
from __future__ import annotations

import copy

import pytest
import torch
from _compare import assert_close, assert_masks_equal
from tiny_models import ARCHS, random_ids, tiny_model
from transformers import AutoModelForCausalLM

from calibprune import (
    prune_magnitude,
    prune_sparsegpt_fused,
    prune_sparsegpt_reference,
    prune_wanda,
    save_pruned,
)
from calibprune.ops import BACKENDS
from calibprune.pruning import capture_layer_inputs, find_decoder_layers, select_targets


def _targets(model):
    prefix, layers = find_decoder_layers(model)
    return {f"{prefix}.{i}.{name}": mod for i, layer in enumerate(layers)
            for name, mod in select_targets(layer).items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_the_model_own_forward(arch):
    """Replaying the captured inputs and kwargs through all layers reproduces the model's hidden states."""
    model = tiny_model(arch)
    ids = random_ids(5, 19)
    _, layers = find_decoder_layers(model)
    inputs, kwargs = capture_layer_inputs(model, layers, ids, 2, torch.device("cpu"), torch.device("cpu"))
    assert [x.shape[0] for x in inputs] == [2, 2, 1]
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-2]
        got = []
        for x, kw in zip(inputs, kwargs):
            for layer in layers[:-1]:
                out = layer(x, **kw)
                x = out[0] if isinstance(out, tuple) else out
            got.append(x)
    assert_close(torch.cat(got), expected, rtol=1e-5, name=f"{arch} hidden states")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_equals_reference(arch, pattern):
    model = tiny_model(arch)
    ids = random_ids(6, 24, seed=1)
    ref, fused = copy.deepcopy(model), copy.deepcopy(model)
    sparsity = None if pattern == "2:4" else 0.6
    rep_ref = prune_sparsegpt_reference(ref, ids, sparsity=sparsity, pattern=pattern, blocksize=32, batch_size=4)
    rep_fused = prune_sparsegpt_fused(fused, ids, sparsity=sparsity, pattern=pattern, blocksize=32, batch_size=4,
                                      backend="torch")
    targets_ref, targets_fused = _targets(ref), _targets(fused)
    assert targets_ref.keys() == targets_fused.keys() and len(targets_ref) >= 4
    for name in targets_ref:
        w_ref, w_fused = targets_ref[name].weight, targets_fused[name].weight
        assert_masks_equal(w_fused == 0, w_ref == 0, name=f"{arch} {name} mask")
        assert torch.equal(w_fused, w_ref), f"{arch} {name}: fused weights are not bitwise the reference's"
    assert len(rep_ref.modules) == len(rep_fused.modules) == len(targets_ref)
    target = 0.5 if pattern == "2:4" else 0.6
    for rec in rep_fused.modules:
        assert abs(rec.sparsity - target) < 0.02, rec
        assert rec.recon_error is not None and rec.recon_error >= 0
    # untouched parts stay untouched
    for (n1, p1), (_, p0) in zip(fused.named_parameters(), model.named_parameters()):
        if not any(n1.startswith(t + ".") or n1 == t + ".weight" for t in targets_ref):
            assert torch.equal(p1, p0), n1


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_baselines_reach_target_sparsity(arch, method):
    model = tiny_model(arch)
    ids = random_ids(4, 16)
    fn = prune_wanda if method == "wanda" else prune_magnitude
    report = fn(model, ids, sparsity=0.5)
    for rec in report.modules:
        assert abs(rec.sparsity - 0.5) < 0.02, rec
    nm_model = tiny_model(arch)
    nm = fn(nm_model, ids, pattern="2:4")
    assert abs(nm.sparsity - 0.5) < 1e-6
    for name, mod in _targets(nm_model).items():
        groups = (mod.weight == 0).reshape(mod.weight.shape[0], -1, 4).sum(-1)
        assert torch.all(groups >= 2), name


def test_wanda_scores_each_row():
    """Wanda prunes exactly int(cols * s) weights in every output row, the lowest |W|·‖X_j‖."""
    from calibprune.pruning.methods.wanda import wanda_mask

    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 20, generator=g)
    scaler = torch.rand(20, generator=g) + 0.1
    mask = wanda_mask(W, scaler, 0.45)
    assert torch.all(mask.sum(1) == 9)
    score = W.abs() * scaler.sqrt()
    assert torch.all(score[mask].reshape(7, 9).max(1).values <= score[~mask].reshape(7, 11).min(1).values)


def test_targets_and_ignore_patterns():
    model = tiny_model("llama")
    report = prune_sparsegpt_fused(model, random_ids(4, 16), sparsity=0.5, targets=("mlp.*",),
                                   ignore=("mlp.down_proj",))
    assert {r.name for r in report.modules} == {"mlp.gate_proj", "mlp.up_proj"}
    _, layers = find_decoder_layers(model)
    assert (layers[0].self_attn.q_proj.weight != 0).all()


def test_shared_hessian_groups():
    """q/k/v share one Hessian, gate/up share one: the fused path accumulates 4 per Llama layer, not 7."""
    from calibprune.pruning.methods.sparsegpt import SparseGPTMethod

    calls = []

    class Counting(SparseGPTMethod):
        def add_batch(self, leader, x):
            calls.append(leader)
            super().add_batch(leader, x)

    from calibprune.pruning.loop import prune_layerwise
    from calibprune.pruning.methods.sparsegpt import SparseGPTConfig
    from calibprune.pruning.report import PruneReport

    model = tiny_model("llama")
    config = SparseGPTConfig(sparsity=0.5, batch_size=4, backend="torch")
    method = Counting(config)
    method.resolve(torch.device("cpu"))
    prune_layerwise(model, random_ids(4, 16), config, method, PruneReport("x", {}))
    assert sorted(set(calls)) == ["mlp.down_proj", "mlp.gate_proj", "self_attn.o_proj", "self_attn.q_proj"]


def test_save_and_reload(tmp_path):
    model = tiny_model("llama")
    report = prune_sparsegpt_fused(model, random_ids(4, 16), sparsity=0.6)
    out = save_pruned(model, None, tmp_path / "pruned", report, extra={"note": "test"})
    import json

    sidecar = json.loads((out / "calibprune.json").read_text())
    assert sidecar["report"]["achieved_sparsity"] == pytest.approx(report.sparsity)
    assert "versions" in sidecar["provenance"] and sidecar["note"] == "test"
    resolved = sidecar["report"]["resolved_backends"]
    assert resolved["hessian_update"] in BACKENDS and resolved["obs_prune"] in BACKENDS
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (n1, p1), (_, p2) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p1, p2), n1
    assert not any(p.name.startswith(".pruned") for p in tmp_path.iterdir())
