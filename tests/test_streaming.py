"""Models larger than memory: built on the meta device, one decoder layer loaded at a time, written layer by layer
into a sharded checkpoint that loads with from_pretrained and equals the in-memory prune bitwise."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import random_ids, tiny_model
from transformers import AutoModelForCausalLM

from calibprune import make_config, prune, save_pruned
from calibprune.pruning import find_decoder_layers, load_streamed, prune_and_save
from calibprune.pruning.activations import ActivationStore
from calibprune.pruning.checkpoint import partial_dir
from calibprune.pruning.streaming import INDEX_FILE


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out


def _assert_same_tensors(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: tensor names differ: {sorted(set(got) ^ set(expected))}"
    for name in expected:
        if not torch.equal(got[name], expected[name]):
            diff = (got[name].double() - expected[name].double()).abs()
            raise AssertionError(f"{what}: {name} differs in {int((diff > 0).sum())} of {diff.numel()} entries "
                                 f"(max |diff| {float(diff.max()):.3g})")


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "src"
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "opt"])
def test_streamed_save_equals_the_in_memory_prune(tmp_path, arch):
    """Same tensors, bitwise, as prune() + save_pruned() on the loaded model; loads with from_pretrained."""
    src = tmp_path / "src"
    tiny_model(arch).save_pretrained(src)
    ids = random_ids(6, 20, seed=3)
    config = make_config("sparsegpt", sparsity=0.5, blocksize=16)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    report = prune(dense, ids, config, progress=False)
    save_pruned(dense, None, tmp_path / "memory", report)
    streamed = prune_and_save(src, ids, config, tmp_path / "streamed", progress=False)
    out = tmp_path / "streamed"
    _assert_same_tensors(_tensors(out), _tensors(tmp_path / "memory"), arch)
    index = json.loads((out / INDEX_FILE).read_text())
    n_layers = len(find_decoder_layers(dense)[1])
    assert len(set(index["weight_map"].values())) == n_layers + 1
    assert set(index["weight_map"]) == set(_tensors(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in dense.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert [r.recon_error for r in streamed.modules] == [r.recon_error for r in report.modules]
    assert json.loads((out / "calibprune.json").read_text())["source_model"]["kind"] == "local"
    assert not partial_dir(out).exists()


def test_one_layer_in_memory_at_a_time(source, tmp_path, monkeypatch):
    """While a streamed prune runs, at most one decoder layer holds real (non-meta) weights."""
    from calibprune.pruning.streaming import SafetensorsLayerLoader

    seen = []
    original = SafetensorsLayerLoader.load

    def load(self, index, layer, device):
        _, layers = find_decoder_layers(self.model)
        seen.append(sum(not next(block.parameters()).is_meta for block in layers))
        original(self, index, layer, device)

    monkeypatch.setattr(SafetensorsLayerLoader, "load", load)
    prune_and_save(source, random_ids(4, 16), make_config("wanda", sparsity=0.5), tmp_path / "out", progress=False)
    assert seen == [0, 0], seen
    model = load_streamed(source)
    _, layers = find_decoder_layers(model)
    assert all(p.is_meta for p in layers.parameters())
    assert not any(p.is_meta for n, p in model.named_parameters() if ".layers." not in n)


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_activation_stores_give_the_same_weights(source, tmp_path, kind):
    ids = random_ids(5, 16, seed=2)
    base = prune_and_save(source, ids, make_config("sparsegpt", sparsity=0.6), tmp_path / "device",
                          progress=False)
    other = prune_and_save(source, ids, make_config("sparsegpt", sparsity=0.6, activations=kind),
                           tmp_path / kind, progress=False)
    _assert_same_tensors(_tensors(tmp_path / kind), _tensors(tmp_path / "device"), kind)
    assert [r.sparsity for r in other.modules] == [r.sparsity for r in base.modules]


def test_disk_store_round_trips_and_cleans_up(tmp_path):
    store = ActivationStore("disk", torch.device("cpu"), tmp_path)
    xs = [torch.randn(2, 5, 7), torch.randn(1, 5, 7)]
    for x in xs:
        store.append(x)
    assert store.nbytes() == 0 and len(store) == 2
    assert torch.equal(store.get(1), xs[1])
    store.set(0, xs[0] * 2)
    assert torch.equal(store.get(0), xs[0] * 2)
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_streaming_needs_safetensors(tmp_path):
    (tmp_path / "bin").mkdir()
    tiny_model("llama").config.save_pretrained(tmp_path / "bin")
    with pytest.raises(FileNotFoundError, match="streaming reads safetensors"):
        load_streamed(tmp_path / "bin")


def test_config_checks_activation_store():
    with pytest.raises(ValueError, match="activations must be one of"):
        make_config("sparsegpt", activations="ram")
    with pytest.raises(ValueError, match="contradicts"):
        make_config("sparsegpt", activations="device", offload_activations=True)


def test_write_safetensors_round_trips(tmp_path):
    """The copy-free writer's files read back exactly with safetensors itself (odd shapes, 0-d, empty, bf16)."""
    from safetensors import safe_open

    from calibprune.pruning.checkpoint import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
               "c": torch.tensor(2.5, dtype=torch.float64), "d": torch.zeros(0, 4), "e": torch.arange(5) % 2 == 0,
               "f": torch.randint(0, 9, (2, 3), generator=g, dtype=torch.int64),
               "g": torch.randn(4, 6, generator=g).t()}  # not contiguous
    size = write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    assert size == (tmp_path / "x.safetensors").stat().st_size
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
