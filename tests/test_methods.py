"""The method layer: registry, typed configs, the generic prune(), OWL, DSnoT, recipes and the generated CLI."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from _compare import assert_close
from tiny_models import random_ids, tiny_model, tiny_tokenizer

from calibprune import make_config, prune, prune_sparsegpt_fused, prune_wanda
from calibprune.cli import main
from calibprune.pruning import (
    CONFIGS,
    METHODS,
    MagnitudeConfig,
    ModuleResult,
    PruneConfig,
    PruningMethod,
    SparseGPTConfig,
    WandaConfig,
    find_decoder_layers,
    load_recipe,
    select_targets,
)
from calibprune.pruning.methods.dsnot import DSnoTOptions, dsnot_refine
from calibprune.pruning.methods.owl import owl_layer_sparsities


def _weights(model):
    prefix, layers = find_decoder_layers(model)
    return {f"{i}.{n}": m.weight.detach().clone() for i, layer in enumerate(layers)
            for n, m in select_targets(layer).items()}


# --- registry and configs ---------------------------------------------------------------------------------------

def test_every_registered_method_has_its_own_config():
    for name, cls in METHODS.items():
        assert issubclass(cls, PruningMethod) and CONFIGS[name].method == name
        assert make_config(name).method == name


def test_base_config_names_no_method():
    with pytest.raises(TypeError, match="common base"):
        PruneConfig()


def test_configs_are_validated_for_their_own_method_only():
    # Wanda has no blocks: an N:M pattern whose M does not divide SparseGPT's blocksize is fine for it.
    assert WandaConfig(pattern="3:5").prune_m == 5
    assert MagnitudeConfig(pattern="3:5").sparsity == pytest.approx(0.6)
    with pytest.raises(ValueError, match="multiple of M"):
        SparseGPTConfig(pattern="3:5")
    with pytest.raises(ValueError, match="takes no option.*blocksize"):
        make_config("wanda", blocksize=64)
    with pytest.raises(ValueError, match="unknown method"):
        make_config("obs")


@pytest.mark.parametrize("kwargs,match", [
    (dict(pattern="2:4", sparsity=0.9), "contradicts"),
    (dict(sparsity_profile="owl", pattern="2:4"), "N:M pattern"),
    (dict(sparsity_profile="owl", sparsity=[0.5, 0.6]), "not both"),
    (dict(sparsity_profile="flat"), "unknown sparsity_profile"),
    (dict(refine="dsnot", refine_options={"cycles": 3}), "unknown option"),
    (dict(refine_options={"max_cycles": 3}), "without a refine"),
    (dict(numerics="turbo"), "numerics"),
    (dict(targets=("re:([",)), "regular expression"),
    (dict(sparsity=[]), "must not be empty"),
    (dict(sparsity=[0.5, 1.2]), r"sparsity must be in \(0, 1\)"),
])
def test_common_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_config("wanda", **kwargs)


def test_nm_sparsity_may_be_given_exactly():
    assert SparseGPTConfig(pattern="2:4", sparsity=0.5).sparsity == 0.5
    assert SparseGPTConfig(pattern="2:4").sparsity == 0.5


def test_a_new_method_is_one_class_and_one_registry_line(monkeypatch):
    """A toy method (prune the last columns) plugs into prune(), the report and the CLI's config builder."""

    @dataclasses.dataclass(kw_only=True)
    class TailConfig(PruneConfig):
        method = "tail"

    class Tail(PruningMethod):
        config_class = TailConfig
        needs_calibration = False

        def prune_module(self, index, name, module, group, sparsity):
            cols = module.weight.shape[1]
            module.weight.data[:, cols - int(cols * sparsity):] = 0
            return ModuleResult()

    monkeypatch.setitem(METHODS, "tail", Tail)
    monkeypatch.setitem(CONFIGS, "tail", TailConfig)
    model = tiny_model("llama")
    report = prune(model, None, make_config("tail", sparsity=0.5))
    assert report.method == "tail" and abs(report.sparsity - 0.5) < 0.02


# --- checks against the model before any work --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(targets=("attn.nothing",)), ValueError, "match no Linear"),
    (dict(pattern="5:16", blocksize=32), ValueError, r"model\.layers\.0\..* in_features"),
    (dict(sparsity=[0.5, 0.5, 0.5]), ValueError, "3 per-layer sparsities.*2 decoder layers"),
    (dict(device="cuda"), RuntimeError, "no CUDA device"),
])
def test_request_errors_leave_the_model_untouched(kwargs, exc, match):
    if torch.cuda.is_available() and kwargs.get("device") == "cuda":
        pytest.skip("this machine has CUDA")
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        prune_sparsegpt_fused(model, random_ids(2, 8), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_out_of_vocabulary_ids_are_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        prune_wanda(tiny_model("llama"), random_ids(2, 8, vocab=200))


def test_unavailable_backend_is_refused_before_work():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="not available"):
        prune_sparsegpt_fused(tiny_model("llama"), random_ids(2, 8), backend="cuda")


def test_backend_an_op_lacks_falls_back_to_torch_and_says_so():
    pytest.importorskip("calibprune._cpp")
    report = prune_sparsegpt_fused(tiny_model("llama"), random_ids(2, 8), backend="cpp", blocksize=16)
    assert report.resolved_backends == {"hessian_update": "torch", "obs_prune": "cpp"}


def test_target_patterns_in_every_form():
    model = tiny_model("llama")
    _, layers = find_decoder_layers(model)
    rel = select_targets(layers[1], ("self_attn.*",), prefix="model.layers.1")
    full = select_targets(layers[1], ("model.layers.1.self_attn.*",), prefix="model.layers.1")
    regex = select_targets(layers[1], ("re:.*self_attn",), prefix="model.layers.1")
    assert set(rel) == set(full) == set(regex) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj"}
    assert len(select_targets(layers[0], ("Linear",), ("re:.*mlp",), prefix="model.layers.0")) == 4
    # an old-style llm-compressor target names the decoder layers themselves
    assert len(select_targets(layers[0], (r"re:model.layers.\d+$",), prefix="model.layers.0")) == 7


def test_a_plain_module_name_takes_its_subtree():
    """llm-compressor's meaning (its tests' recipes write ``targets: ["model.layers.0", "model.layers.1"]``): a
    plain name matches the module and every Linear under it, as a target and as an ignore."""
    model = tiny_model("llama")
    prefix, layers = find_decoder_layers(model)
    names = ("model.layers.0", "model.layers.1")
    assert [len(select_targets(layer, names, prefix=f"{prefix}.{i}")) for i, layer in enumerate(layers)] == [7, 7]
    assert len(select_targets(layers[1], ("model.layers.0",), prefix=f"{prefix}.1")) == 0
    assert set(select_targets(layers[0], ("mlp",), prefix=f"{prefix}.0")) == {"mlp.gate_proj", "mlp.up_proj",
                                                                              "mlp.down_proj"}
    assert set(select_targets(layers[0], ("Linear",), ("self_attn",), prefix=f"{prefix}.0")) == {
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    # a prefix is a whole dotted component: model.layers.1 does not take model.layers.10's modules
    assert len(select_targets(layers[0], ("model.layers.",), prefix="model.layers.10")) == 0
    assert len(select_targets(layers[0], ("model.layers.1",), prefix="model.layers.10")) == 0


# --- per-layer sparsity and OWL ----------------------------------------------------------------------------------

def test_per_layer_sparsity_list():
    model = tiny_model("llama")
    report = prune_wanda(model, random_ids(4, 16), sparsity=[0.3, 0.7])
    assert report.layer_targets == [0.3, 0.7]
    assert report.per_layer_sparsity() == pytest.approx([0.3, 0.7], abs=0.02)


@pytest.mark.parametrize("ratios,weights", [([1.0, 4.0, 2.0, 3.0], [1, 1, 1, 1]), ([0.5, 0.1, 0.9], [3, 1, 2])])
def test_owl_sparsities_keep_the_weighted_mean_within_lambda(ratios, weights):
    target, lmbda = 0.7, 0.08
    s = owl_layer_sparsities(ratios, weights, target, lmbda, "parameters")
    assert sum(w * x for w, x in zip(weights, s)) / sum(weights) == pytest.approx(target)
    assert max(s) - min(s) == pytest.approx(2 * lmbda)
    # more outliers, less pruning
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)


@pytest.mark.parametrize("ratios", [[1.0, 4.0, 2.0, 3.0], [0.5, 0.1, 0.9, 0.3, 0.35], [7.25, 7.5]])
def test_owl_plain_mean_is_the_authors_arithmetic(ratios):
    """The default: luuyin/OWL's expression written out for each layer (min-max to [0, 2λ], minus the plain mean,
    plus the density), bitwise; the layer sizes play no part."""
    import statistics

    target, lmbda = 0.7, 0.08
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) * (1 / (hi - lo) * lmbda * 2) for r in ratios]
    expected = [1 - (x - float(np.mean(scaled)) + (1 - target)) for x in scaled]
    got = owl_layer_sparsities(ratios, [1] * len(ratios), target, lmbda)
    assert got == expected
    assert owl_layer_sparsities(ratios, list(range(1, len(ratios) + 1)), target, lmbda) == got
    assert statistics.fmean(got) == pytest.approx(target)


def test_owl_equal_ratios_is_uniform_and_bad_lambda_is_refused():
    assert owl_layer_sparsities([2.0, 2.0], [1, 1], 0.6, 0.08) == [0.6, 0.6]
    with pytest.raises(ValueError, match="outside"):
        owl_layer_sparsities([0.0, 1.0], [1, 1], 0.9, 0.2)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_owl_end_to_end(method):
    model = tiny_model("llama")
    config = make_config(method, sparsity=0.6, sparsity_profile="owl", profile_options={"m": 2.0, "lmbda": 0.1})
    report = prune(model, random_ids(4, 16), config)
    assert report.profile["name"] == "owl" and len(report.profile["outlier_ratio_pct"]) == 2
    assert sum(report.layer_targets) / 2 == pytest.approx(0.6)
    assert report.per_layer_sparsity() == pytest.approx(report.layer_targets, abs=0.02)
    assert json.loads(json.dumps(report.to_dict()))["layer_targets"] == report.layer_targets


# --- DSnoT -------------------------------------------------------------------------------------------------------

def _dsnot_reference(W, Wp, mean, var, scaler, options, prune_n=0, prune_m=0):
    """Row by row in plain Python: the swap loop of the DSnoT docstring, one row at a time."""
    out = Wp.clone()
    for r in range(W.shape[0]):
        w, wp = W[r].tolist(), Wp[r].tolist()
        pruned = [x == 0 for x in wp]
        first_pruned = list(pruned)  # a regrown weight is never pruned again
        err = sum((a - b) * m for a, b, m in zip(w, wp, mean.tolist()))
        key = [w[j] * mean[j].item() / (max(var[j].item(), 1e-12) ** options.var_power) for j in range(len(w))]
        grow = sorted([j for j in range(len(w)) if pruned[j]], key=lambda j: key[j])
        wanda = [abs(wp[j]) * scaler[j].item() ** 0.5 for j in range(len(w))]
        pm = [wp[j] * mean[j].item() for j in range(len(w))]
        neg = sorted([j for j in range(len(w)) if not pruned[j] and pm[j] < 0], key=lambda j: wanda[j])
        pos = sorted([j for j in range(len(w)) if not pruned[j] and pm[j] > 0], key=lambda j: wanda[j])
        lo, hi, cyc = 0, len(grow) - 1, 0
        taken = set()
        sign0 = (err > 0) - (err < 0)
        while cyc < options.max_cycles and abs(err) > options.update_threshold and lo <= hi:
            cyc += 1
            if err > 0:
                j = grow[hi]
                hi -= 1
            else:
                j = grow[lo]
                lo += 1
            if prune_n:
                start = j - j % prune_m
                cands = [k for k in range(start, start + prune_m) if not first_pruned[k] and k not in taken]
                if not cands:
                    break
                k = min(cands, key=lambda k: wanda[k])
            else:
                lst = neg if err > 0 else pos
                if not lst:
                    break
                k = lst.pop(0)
            after = err + pm[k] - w[j] * mean[j].item()
            if options.same_sign and (after > 0) - (after < 0) != sign0:
                break
            err = after
            out[r, j], out[r, k] = W[r, j], 0.0
            pruned[j], pruned[k] = False, True
            taken.add(k)
    return out


@pytest.mark.parametrize("same_sign", [False, True], ids=["any-sign", "same-sign"])
@pytest.mark.parametrize("prune_n,prune_m", [(0, 0), (2, 4)], ids=["unstructured", "2:4"])
@pytest.mark.parametrize("rows,cols", [(5, 24), (9, 40)], ids=lambda v: str(v))
def test_dsnot_matches_a_row_by_row_reference(rows, cols, prune_n, prune_m, same_sign):
    from calibprune.pruning.masks import nm_mask, row_mask

    g = torch.Generator().manual_seed(rows * cols)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64).float()
    mean = torch.randn(cols, generator=g).float() * 3
    var = torch.rand(cols, generator=g).float() + 0.5
    scaler = torch.rand(cols, generator=g).float() + 0.1
    score = W.abs() * scaler.sqrt()
    mask = nm_mask(score, prune_n, prune_m) if prune_n else row_mask(score, 0.5)
    Wp = W.masked_fill(mask, 0)
    options = DSnoTOptions(max_cycles=6, update_threshold=0.05, same_sign=same_sign, skip=())
    got, info = dsnot_refine(W, Wp, mean, var, scaler, options, prune_n, prune_m)
    want = _dsnot_reference(W, Wp, mean, var, scaler, options, prune_n, prune_m)
    assert_close(got, want, rtol=0, atol=0, name="DSnoT weights")
    assert torch.equal((got == 0).sum(1), (Wp == 0).sum(1))
    if prune_n:
        assert torch.all((got == 0).reshape(rows, -1, prune_m).sum(-1) == prune_n)
    assert info["swaps"] > 0
    if same_sign:  # every accepted swap keeps the error's sign, so its size cannot grow past the start
        before = ((W - Wp) * mean).sum(1)
        after = ((W - got) * mean).sum(1)
        assert torch.all(torch.sign(after) * torch.sign(before) >= 0)


@pytest.mark.parametrize("base", ["sparsegpt", "wanda"])
def test_dsnot_after_a_method_keeps_the_sparsity(base):
    ids = random_ids(4, 16)
    plain = prune(tiny_model("llama"), ids, make_config(base, sparsity=0.6))
    config = make_config(base, sparsity=0.6, refine="dsnot", refine_options={"skip": ()})
    model = tiny_model("llama")
    report = prune(model, ids, config)
    assert [r.sparsity for r in report.modules] == [r.sparsity for r in plain.modules]
    assert all(r.extra and "dsnot" in r.extra for r in report.modules)
    assert sum(r.extra["dsnot"]["swaps"] for r in report.modules) > 0
    skipped = prune(tiny_model("llama"), ids, make_config(base, sparsity=0.6, refine="dsnot"))
    assert {r.name for r in skipped.modules if r.extra["dsnot"] == "skipped"} == {"mlp.gate_proj", "mlp.up_proj",
                                                                                    "mlp.down_proj"}


# --- damping -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prune_fn", ["fused", "reference"])
def test_rank_deficient_hessian_escalates_damping_and_says_so(prune_fn):
    """One 3-token sequence and percdamp=0: every Hessian is singular; the prune still succeeds, finite."""
    from calibprune import prune_sparsegpt_reference

    fn = prune_sparsegpt_fused if prune_fn == "fused" else prune_sparsegpt_reference
    model = tiny_model("llama")
    report = fn(model, random_ids(1, 3), sparsity=0.5, percdamp=0.0, blocksize=16)
    escalated = [r for r in report.modules if r.damping]
    assert escalated and all(r.damping["escalations"] >= 1 and r.damping["percdamp"] > 0 for r in escalated)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads(json.dumps(report.to_dict()))["modules"][0]["damping"] == report.modules[0].damping


# --- numerics="fast" ---------------------------------------------------------------------------------------------

def test_fast_numerics_prunes_to_the_same_quality():
    model = tiny_model("llama")
    ids = random_ids(8, 32, seed=3)
    ref = prune_sparsegpt_fused(copy.deepcopy(model), ids, sparsity=0.5, blocksize=16)
    fast = prune_sparsegpt_fused(copy.deepcopy(model), ids, sparsity=0.5, blocksize=16, numerics="fast")
    assert abs(fast.sparsity - 0.5) < 0.01
    if fast.resolved_backends.get("forwards") is None:
        pytest.skip("this CPU has no native bf16: fast numerics changes nothing in the forwards")
    err_ref = sum(r.recon_error for r in ref.modules)
    err_fast = sum(r.recon_error for r in fast.modules)
    assert err_fast == pytest.approx(err_ref, rel=0.05)


# --- recipes -----------------------------------------------------------------------------------------------------

RECIPE = """
sparsity_stage:
  run_type: oneshot
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      block_size: 64
      dampening_frac: 0.02
      targets: ["Linear"]
      ignore: ["re:.*lm_head", "re:.*down_proj"]
"""


def test_recipe_fields_map_onto_the_config():
    config = load_recipe(RECIPE)
    assert isinstance(config, SparseGPTConfig)
    assert (config.pattern, config.blocksize, config.percdamp, config.sparsity) == ("2:4", 64, 0.02, 0.5)
    assert config.targets == () and config.ignore == ("re:.*lm_head", "re:.*down_proj")
    owl = load_recipe({"s_stage": {"sparsity_modifiers": {"WandaPruningModifier": {
        "sparsity": 0.7, "sparsity_profile": "OWL", "owl_m": 7, "owl_lmbda": 0.05}}}}, batch_size=2)
    assert isinstance(owl, WandaConfig) and owl.profile_options.m == 7 and owl.batch_size == 2


@pytest.mark.parametrize("recipe,match", [
    ({"s_stage": {"m_modifiers": {"GPTQModifier": {}}}}, "cannot run.*GPTQModifier"),
    ({"s_stage": {"m_modifiers": {"SparseGPTModifier": {"sparsity": 0.5, "blocksize": 64}}}},
     r"unknown field\(s\) \['blocksize'\]"),
    ({"s_stage": {"m_modifiers": {"SparseGPTModifier": {}, "WandaPruningModifier": {}}}}, "2 pruning modifiers"),
    ({"s_stage": {"m_modifiers": {"WandaPruningModifier": {"owl_m": 5}}}}, "without sparsity_profile"),
    ({"s_stage": {"m_modifiers": {"SparseGPTModifier": {"preserve_sparsity_mask": True}}}}, "not supported"),
    ({"s_stage": {"run_type": "train"}}, "oneshot only"),
    ({"weird": 1}, "unknown top-level key"),
    ({}, "no modifier"),
])
def test_recipe_errors_name_the_culprit(recipe, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(recipe)


# The forms of llm-compressor's own SparseGPT test recipes (tests/sparsity/sparsegpt/recipes/ and
# tests/llmcompressor/transformers/compression/recipes/ in vllm-project/llm-compressor): whole decoder layers named
# as targets, more layers named than the model has, an anchored regex, "0:0" for unstructured, Linear + an ignored
# lm_head. Each runs unchanged and prunes exactly what it names.
LLMC_FORM_RECIPES = {
    "named layers": ('targets: ["model.layers.0", "model.layers.1"]\n      mask_structure: "0:0"', {0, 1}, None),
    "more layers than the model": ('mask_structure: "0:0"\n      targets: [\n        "model.layers.0",\n'
                                   '        "model.layers.1",\n        "model.layers.2",\n        "model.layers.5"\n'
                                   '      ]', {0, 1}, None),
    "one layer, 2:4": ('mask_structure: "2:4"\n      targets: [\n        "re:.*model.layers.0$",\n      ]', {0},
                       "2:4"),
    "Linear, lm_head ignored": ('mask_structure: "2:4"\n      targets: ["Linear"]\n      ignore: ["re:.*lm_head"]',
                                {0, 1}, "2:4"),
}


@pytest.mark.parametrize("form", list(LLMC_FORM_RECIPES))
def test_llm_compressor_recipe_forms_run_unchanged(form):
    body, layers, pattern = LLMC_FORM_RECIPES[form]
    recipe = ("test_stage:\n  obcq_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n      block_size: 16\n"
              f"      dampening_frac: 0.01\n      {body}\n")
    config = load_recipe(recipe)
    model = tiny_model("llama")
    report = prune(model, random_ids(4, 16), config, progress=False)
    assert {m.layer for m in report.modules} == layers
    assert all(len([m for m in report.modules if m.layer == i]) == 7 for i in layers)
    assert all(m.sparsity == pytest.approx(0.5, abs=0.02) for m in report.modules)
    if pattern == "2:4":
        prefix, decoder = find_decoder_layers(model)
        W = decoder[min(layers)].mlp.up_proj.weight
        assert int((W.reshape(-1, 4) != 0).sum(1).max()) <= 2


# --- the generated CLI, end to end on a saved tiny model ---------------------------------------------------------

@pytest.fixture()
def tiny_checkpoint(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    from calibprune import CalibrationSet

    CalibrationSet(ids=random_ids(4, 16), provenance={"kind": "test"}).save(tmp_path / "calib.pt")
    return tmp_path


def _run(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_cli_recipe_end_to_end(tiny_checkpoint, capsys):
    recipe = tiny_checkpoint / "recipe.yaml"
    recipe.write_text(RECIPE.replace('mask_structure: "2:4"', 'mask_structure: "0:0"').replace("block_size: 64",
                                                                                               "block_size: 16"))
    out = tiny_checkpoint / "out"
    code, cap = _run(["prune", "--model", str(tiny_checkpoint / "tiny"), "--calib", str(tiny_checkpoint / "calib.pt"),
                      "--recipe", str(recipe), "--batch-size", "2", "--no-eval", "--out", str(out)], capsys)
    assert code == 0, cap.err
    sidecar = json.loads((out / "calibprune.json").read_text())
    config = sidecar["report"]["config"]
    assert config["method"] == "sparsegpt" and config["blocksize"] == 16 and config["batch_size"] == 2
    assert {m["name"] for m in sidecar["report"]["modules"]} == {"self_attn.q_proj", "self_attn.k_proj",
                                                                 "self_attn.v_proj", "self_attn.o_proj",
                                                                 "mlp.gate_proj", "mlp.up_proj"}


def test_cli_owl_and_dsnot(tiny_checkpoint, capsys):
    out = tiny_checkpoint / "out"
    code, cap = _run(["prune", "--model", str(tiny_checkpoint / "tiny"), "--calib", str(tiny_checkpoint / "calib.pt"),
                      "--method", "wanda", "--sparsity-profile", "owl", "--owl-m", "2", "--owl-lmbda", "0.1",
                      "--refine", "dsnot", "--dsnot-skip", "--no-eval", "--out", str(out)], capsys)
    assert code == 0, cap.err
    report = json.loads((out / "calibprune.json").read_text())["report"]
    assert report["config"]["profile_options"] == {"m": 2.0, "lmbda": 0.1, "layer_mean": "plain"}
    assert report["config"]["refine_options"]["skip"] == []
    assert len(set(report["layer_targets"])) == 2 and "per layer" in cap.out


@pytest.mark.parametrize("extra,match", [
    (["--method", "wanda", "--blocksize", "64"], "--blocksize is not an option of method wanda"),
    (["--owl-m", "3"], "--owl-m needs --sparsity-profile owl"),
    (["--dsnot-max-cycles", "3"], "needs --refine dsnot"),
    (["--recipe", "r.yaml", "--sparsity", "0.5"], "--recipe sets --sparsity"),
    (["--pattern", "2:4", "--sparsity", "0.9"], "contradicts"),
    (["--device", "cuda"], "no CUDA device"),
    (["--backend", "cuda"], "backend 'cuda' is not available"),
])
def test_cli_option_errors(tmp_path, capsys, extra, match):
    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("this machine has CUDA")
    code, cap = _run(["prune", "--model", "smollm2-135m", "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and match in cap.err, cap.err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("generator", ["self-cal", "sgs", "igsp"])
def test_cli_builds_and_prunes_with_generated_calibration(tiny_checkpoint, capsys, generator):
    model = str(tiny_checkpoint / "tiny")
    pt = tiny_checkpoint / f"{generator}.pt"
    extra = ["--gen-option", "source=c4"] if generator == "sgs" else []
    code, cap = _run(["calib", "--model", model, "--calib", generator, "--n", "6", "--seqlen", "16",
                      "--gen-batch-size", "3", *extra, "--out", str(pt)], capsys)
    assert code == 0, cap.err
    from calibprune import CalibrationSet

    calib = CalibrationSet.load(pt)
    assert tuple(calib.ids.shape) == (6, 16)
    if generator != "self-cal":
        return  # generation is the slow part; one generator through prune shows the path
    code, cap = _run(["prune", "--model", model, "--calib", generator, "--n", "6", "--seqlen", "16", *extra,
                      "--method", "wanda", "--no-eval", "--out", str(tiny_checkpoint / "out")], capsys)
    assert code == 0, cap.err
    provenance = json.loads((tiny_checkpoint / "out" / "calibprune.json").read_text())["calibration"]
    assert provenance and provenance != {"kind": "tensor"}


@pytest.mark.parametrize("extra,match", [
    (["--calib", "igsp", "--gen-option", "bogus=1"], "igsp has no option 'bogus'"),
    (["--calib", "c4", "--gen-option", "t_init=1"], "--gen-option is for a generated set"),
    (["--calib", "self-cal", "--gen-option", "t_init"], "KEY=VALUE"),
])
def test_cli_generator_option_errors(tmp_path, capsys, extra, match):
    code, cap = _run(["calib", "--model", "smollm2-135m", "--out", str(tmp_path / "c.pt"), *extra], capsys)
    assert code == 2 and match in cap.err, cap.err


def test_prune_help_renders_every_registered_methods_flags(capsys):
    """The CLI flags are generated from the configs; their help text (docstrings, '%' signs and all) must render."""
    with pytest.raises(SystemExit) as done:
        main(["prune", "--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for name, cls in CONFIGS.items():
        own = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in
               {f.name for f in dataclasses.fields(PruneConfig)}]
        for field_name in own:
            assert f"--{field_name.replace('_', '-')}" in printed, f"{name}: no flag for {field_name}"


def _dsnot_authors_reference(W, Wp, mean, var, scaler, options, prune_n, prune_m):
    """The authors' DSnoT loop written out with Python lists, row by row inside each cycle: two pointers per list,
    never checked, moving for every row until every row has stopped (or max_cycles)."""
    rows, cols = W.shape
    pruned0 = (Wp == 0).tolist()
    kept_w = [[W[r, j].item() if pruned0[r][j] else Wp[r, j].item() for j in range(cols)] for r in range(rows)]
    metric = [[kept_w[r][j] * mean[j].item() for j in range(cols)] for r in range(rows)]
    score = [[abs(kept_w[r][j]) * scaler[j].sqrt().item() for j in range(cols)] for r in range(rows)]
    mask = [list(row) for row in pruned0]
    err = [sum(metric[r][j] for j in range(cols) if pruned0[r][j]) for r in range(rows)]
    sign0 = [(e > 0) - (e < 0) for e in err]
    key = [[(metric[r][j] if pruned0[r][j] else 0.0) / var[j].item() ** options.var_power for j in range(cols)]
           for r in range(rows)]
    regrow = [sorted(range(cols), key=lambda j, r=r: (key[r][j], j)) for r in range(rows)]
    g_ptr = [[0, cols - 1] for _ in range(rows)]
    same = options.same_sign_for(prune_n)
    if not prune_n:
        kept = [sorted((j for j in range(cols) if not pruned0[r][j]), key=lambda j, r=r: (score[r][j], j))
                for r in range(rows)]
        order = []
        for r in range(rows):
            neg = [j for j in kept[r] if metric[r][j] < 0]
            pos = [j for j in kept[r] if metric[r][j] > 0]
            zeros = [kept[r][0]] * (len(kept[r]) - len(neg) - len(pos))
            order.append(neg + zeros + pos[::-1])
        p_ptr = [[0, len(kept[r]) - 1] for r in range(rows)]
    else:
        block_score = [[float("inf") if pruned0[r][j] else score[r][j] for j in range(cols)] for r in range(rows)]
    active = [True] * rows
    for _ in range(options.max_cycles):
        if not any(active):
            break
        for r in range(rows):
            side = 1 if err[r] > 0 else 0
            j = regrow[r][min(max(g_ptr[r][side], 0), cols - 1)]
            g_ptr[r][side] += 1 if side == 0 else -1
            if not prune_n:
                pside = 1 if err[r] < 0 else 0
                k = order[r][min(max(p_ptr[r][pside], 0), len(order[r]) - 1)]
                p_ptr[r][pside] += 1 if pside == 0 else -1
            else:
                start = j - j % prune_m
                k = min(range(start, start + prune_m), key=lambda c, r=r: (block_score[r][c], c))
                block_score[r][k] = float("inf")
            after = err[r] + metric[r][k] - metric[r][j]
            active[r] = active[r] and abs(err[r]) > options.update_threshold
            if same:
                active[r] = active[r] and ((after > 0) - (after < 0)) == sign0[r]
            mask[r][k] = active[r]
            mask[r][j] = not active[r]
            if active[r]:
                err[r] = err[r] + metric[r][k]
                err[r] = err[r] - metric[r][j]
    return torch.tensor([[0.0 if mask[r][j] else kept_w[r][j] for j in range(cols)] for r in range(rows)])


@pytest.mark.parametrize("prune_n,prune_m", [(0, 0), (2, 4)], ids=["unstructured", "2:4"])
@pytest.mark.parametrize("rows,cols,cycles", [(5, 24, 6), (7, 16, 30), (3, 40, 50)], ids=lambda v: str(v))
def test_dsnot_faithful_order_matches_the_authors_loop(rows, cols, cycles, prune_n, prune_m):
    """Including rows that stop early (their pointers still move) and, at 30-50 cycles on 16-40 columns, pointers
    that run past the candidates of one sign into the other end of their list."""
    from calibprune.pruning.masks import nm_mask, row_mask
    from calibprune.pruning.methods.dsnot import dsnot_refine_faithful

    g = torch.Generator().manual_seed(rows * cols + cycles)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64).float()
    mean = torch.randn(cols, generator=g).float() * 3
    var = torch.rand(cols, generator=g).float() + 0.5
    scaler = torch.rand(cols, generator=g).float() + 0.1
    mask = nm_mask(W.abs() * scaler.sqrt(), prune_n, prune_m) if prune_n else row_mask(W.abs() * scaler.sqrt(), 0.5)
    Wp = W.masked_fill(mask, 0)
    options = DSnoTOptions(max_cycles=cycles, update_threshold=0.05, skip=())
    got, info = dsnot_refine_faithful(W, Wp, mean, var, scaler, options, prune_n, prune_m)
    want = _dsnot_authors_reference(W, Wp, mean, var, scaler, options, prune_n, prune_m)
    assert_close(got, want, rtol=1e-6, atol=1e-6, name="DSnoT weights (the authors' loop)")
    assert info["order"] == "faithful" and info["cycles"] <= cycles


def test_dsnot_orders_differ_where_a_row_runs_out_of_candidates_of_one_sign():
    """One row, e > 0, a single kept weight that can lower e: the authors' pointer walks on and prunes kept weights
    that raise e; stop_when_exhausted stops instead and keeps the row's count."""
    from calibprune.pruning.methods.dsnot import dsnot_refine_faithful

    W = torch.tensor([[4.0, 3.0, -1.0, 2.0, 1.5, 0.5]])
    Wp = torch.tensor([[0.0, 0.0, -1.0, 2.0, 1.5, 0.5]])  # the two largest positive pruned: e = 7 > 0
    ones = torch.ones(6)
    options = DSnoTOptions(max_cycles=4, update_threshold=0.1, skip=())
    faithful, _ = dsnot_refine_faithful(W, Wp, ones, ones, ones, options)
    stopping, info = dsnot_refine(W, Wp, ones, ones, ones, options)
    assert float((stopping == 0).sum()) == 2, "stop_when_exhausted keeps the row's number of pruned weights"
    assert not torch.equal(faithful, stopping)
    e = lambda Wn: float(((W - Wn) * ones).sum())  # noqa: E731
    assert abs(e(stopping)) <= abs(e(Wp))


def test_dsnot_refiner_falls_back_when_rows_prune_different_counts():
    """Magnitude's one threshold per matrix gives rows different counts: the authors' loop cannot take them."""
    ids = random_ids(4, 16)
    report = prune(tiny_model("llama"), ids, make_config("magnitude", sparsity=0.5, refine="dsnot",
                                                          refine_options={"skip": ()}))
    orders = {r.extra["dsnot"]["order"] for r in report.modules}
    assert orders == {"stop_when_exhausted"}
    report = prune(tiny_model("llama"), ids, make_config("wanda", sparsity=0.5, refine="dsnot",
                                                          refine_options={"skip": ()}))
    assert {r.extra["dsnot"]["order"] for r in report.modules} == {"faithful"}
