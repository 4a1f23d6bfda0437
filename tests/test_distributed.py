"""Pruning in a process group (gloo on loopback, two processes): same result as one process, errors reach every
rank, the helpers deal work and shards as documented, and every prune flag survives torchrun's own parser."""
from __future__ import annotations

import datetime
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import random_ids, tiny_model

from calibprune import make_config, prune
from calibprune.pruning import find_decoder_layers, select_targets
from calibprune.pruning.distributed import assign_owners, shard_range

WORLD = 2
# name -> (arch, method, config options); the calibration is 8 sequences of 24 tokens, one per batch.
SCENARIOS = {
    "sparsegpt-reference": ("llama", "sparsegpt", dict(sparsity=0.6)),
    "sparsegpt-fast": ("llama", "sparsegpt", dict(sparsity=0.6, numerics="fast")),
    "sparsegpt-faithful-2:4": ("opt", "sparsegpt-reference", dict(pattern="2:4", blocksize=16)),
    "wanda-owl-dsnot": ("qwen2", "wanda", dict(sparsity=0.5, sparsity_profile="owl",
                                               profile_options={"lmbda": 0.05}, refine="dsnot",
                                               refine_options={"skip": ()})),
    "ria-2:4-reallocation": ("llama", "ria", dict(pattern="2:4", reallocation=True)),
    "alps": ("llama", "alps", dict(sparsity=0.6, max_iter=30)),  # its statistic is a sum, not a running mean
    "alps-fast": ("llama", "alps", dict(sparsity=0.6, max_iter=30, numerics="fast")),
    # sample-parallel workers inside each rank (the ranks run one thread each): still bitwise one process
    "sparsegpt-workers": ("llama", "sparsegpt", dict(sparsity=0.6, workers=2)),
    "wanda-dsnot-workers": ("llama", "wanda", dict(sparsity=0.5, refine="dsnot", refine_options={"skip": ()},
                                                   workers=3)),
    # the exact chain's later rank keeps its batches, not their d×d terms (the memory bound at 0 MB): same bits
    "sparsegpt-bounded-terms": ("llama", "sparsegpt", dict(sparsity=0.6)),
    "sparsegpt-bounded-terms-workers": ("llama", "sparsegpt", dict(sparsity=0.6, workers=2)),
}
#: environment a scenario's ranks run with
SCENARIO_ENV = {"sparsegpt-bounded-terms": {"CALIBPRUNE_DIST_DEFER_MB": "0"},
                "sparsegpt-bounded-terms-workers": {"CALIBPRUNE_DIST_DEFER_MB": "0"}}



def _checkpoint_tensors(folder):
    """Every tensor of a sharded safetensors checkpoint, by name."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out

def _ids() -> torch.Tensor:
    return random_ids(8, 24, seed=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str) -> None:
    """One rank: every scenario, then a failure injected on rank 1 in layer 1's prune."""
    import torch.distributed as dist

    from calibprune.pruning.methods.sparsegpt import SparseGPTMethod

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=90))
    results: dict = {}
    try:
        for name, (arch, method, options) in SCENARIOS.items():
            model = tiny_model(arch)
            saved = {k: os.environ.get(k) for k in SCENARIO_ENV.get(name, {})}
            os.environ.update(SCENARIO_ENV.get(name, {}))
            try:
                report = prune(model, _ids(), make_config(method, **options), progress=False)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k)
                    else:
                        os.environ[k] = v
            results[name] = {"weights": model.state_dict(), "report": report.to_dict()}
        original = SparseGPTMethod.prune_module

        def failing(self, index, name, module, group, sparsity):
            if rank == 1 and index == 1:
                raise ValueError("injected failure")
            return original(self, index, name, module, group, sparsity)

        SparseGPTMethod.prune_module = failing
        try:
            prune(tiny_model("llama"), _ids(), make_config("sparsegpt", sparsity=0.6), progress=False)
            results["failure"] = None
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results["failure"] = f"{type(exc).__name__}: {exc}"
        finally:
            SparseGPTMethod.prune_module = original
        results["stream"] = _stream_then_resume(rank, Path(folder))
    except Exception:  # noqa: BLE001
        results["crash"] = traceback.format_exc()
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _stream_then_resume(rank: int, folder: Path) -> str | None:
    """Both ranks stream the model from disk into one output; rank 0 dies after saving layer 0; both resume."""
    import torch.distributed as dist

    from calibprune.pruning import prune_and_save
    from calibprune.pruning.checkpoint import LayerCheckpoint

    if rank == 0:
        tiny_model("llama").save_pretrained(folder / "src")
    dist.barrier()
    original = LayerCheckpoint.commit

    def crash(self, index, *args):
        original(self, index, *args)
        if index == 0 and rank == 0:
            raise OSError("disk full (injected)")

    LayerCheckpoint.commit = crash
    try:
        prune_and_save(folder / "src", _ids(), make_config("sparsegpt", sparsity=0.6), folder / "streamed",
                       progress=False)
        message = None
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        message = f"{type(exc).__name__}: {exc}"
    finally:
        LayerCheckpoint.commit = original
    prune_and_save(folder / "src", _ids(), make_config("sparsegpt", sparsity=0.6, resume=True),
                   folder / "streamed", progress=False)
    return message


@pytest.fixture(scope="module")
def two_ranks_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def two_ranks(two_ranks_folder) -> list[dict]:
    """Run every scenario in a 2-process gloo group once for the module."""
    import torch.multiprocessing as mp

    folder = two_ranks_folder
    mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results


def _one_process(name: str):
    arch, method, options = SCENARIOS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: matmul blocking, and so rounding, may follow the thread count
    try:
        model = tiny_model(arch)
        report = prune(model, _ids(), make_config(method, **options), progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, report


def _targets(state: dict, model) -> list[str]:
    prefix, layers = find_decoder_layers(model)
    return [f"{prefix}.{i}.{n}.weight" for i, layer in enumerate(layers) for n in select_targets(layer)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_one_process(two_ranks, name):
    """Mask agreement >= 99.99% and total reconstruction error within 0.1% of one process, and bitwise the same
    weights with reference numerics; both ranks hold the same pruned model and the same report."""
    model, report = _one_process(name)
    expected = model.state_dict()
    got = [r[name]["weights"] for r in two_ranks]
    targets = _targets(expected, model)
    agree = total = 0
    for key in expected:
        assert torch.equal(got[0][key], got[1][key]), f"{name}: ranks differ on {key}"
        if key in targets:
            agree += int(((got[0][key] == 0) == (expected[key] == 0)).sum())
            total += expected[key].numel()
        else:
            assert torch.equal(got[0][key], expected[key]), f"{name}: {key} is not a target but changed"
    assert agree / total >= 0.9999, f"{name}: mask agreement {agree / total:.6%} < 99.99%"
    if make_config(SCENARIOS[name][1], **SCENARIOS[name][2]).numerics == "reference":
        # the ordered fold reproduces the one-process statistics exactly: every weight is bitwise the same
        for key in targets:
            assert torch.equal(got[0][key], expected[key]), f"{name}: {key} is not bitwise the one-process weight"
    rep = two_ranks[0][name]["report"]
    assert rep["modules"] == two_ranks[1][name]["report"]["modules"], f"{name}: the ranks' reports differ"
    assert [(m["layer"], m["name"]) for m in rep["modules"]] == [(m.layer, m.name) for m in report.modules]
    assert rep["distributed"]["world_size"] == WORLD
    errors = [m.recon_error for m in report.modules]
    if all(e is not None for e in errors):
        one, two = sum(errors), sum(m["recon_error"] for m in rep["modules"])
        assert abs(two - one) <= 1e-3 * one, f"{name}: reconstruction error {two:.6g} vs {one:.6g}"
    assert rep["layer_targets"] == pytest.approx(report.layer_targets, abs=1e-6)


@pytest.mark.slow
def test_one_rank_failure_stops_every_rank(two_ranks):
    """A failure on rank 1 in layer 1's prune raises the same clear error on both ranks (no hang)."""
    for r, res in enumerate(two_ranks):
        assert res["failure"] is not None, f"rank {r} did not fail"
        assert res["failure"].startswith("RankFailure: rank 1 failed in layer 1 prune: ValueError: injected failure"), \
            (r, res["failure"])


@pytest.mark.slow
def test_streamed_resumed_run_on_two_ranks(two_ranks, two_ranks_folder, tmp_path):
    """Two ranks streaming one model from disk: rank 0 fails saving layer 0, both stop with its error; resumed,
    the checkpoint equals a one-process streamed prune bitwise."""
    from calibprune.pruning import prune_and_save

    for r, res in enumerate(two_ranks):
        assert res["stream"] is not None and res["stream"].startswith(
            "RankFailure: rank 0 failed in layer 0 save: OSError: disk full (injected)"), (r, res["stream"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prune_and_save(two_ranks_folder / "src", _ids(), make_config("sparsegpt", sparsity=0.6), tmp_path / "one",
                       progress=False)
    finally:
        torch.set_num_threads(threads)

    one, two = _checkpoint_tensors(tmp_path / "one"), _checkpoint_tensors(two_ranks_folder / "streamed")
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []


@pytest.mark.slow
def test_ranks_split_the_work(two_ranks):
    """Both ranks pruned matrices (the solves were dealt out) and both sent and received weights."""
    ranks = two_ranks[0]["sparsegpt-reference"]["report"]["distributed"]["ranks"]
    assert len(ranks) == WORLD
    for r, info in enumerate(ranks):
        assert info["phase_seconds"]["prune"] > 0
        assert info["collectives"]["weights (broadcast)"]["calls"] >= 2, r
        assert info["collectives"]["statistics (ordered fold)"]["mb"] > 0, r


@pytest.mark.parametrize("count,world", [(8, 2), (7, 2), (5, 3), (3, 3), (1, 1), (10, 4)],
                         ids=lambda v: str(v))
def test_shard_range_is_contiguous_in_order(count, world):
    shards = [shard_range(count, world, r) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(count))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_assign_owners_deals_the_largest_first():
    # A 14336-wide down_proj costs more than everything else: it gets a rank of its own.
    costs = {"mlp.down_proj": 14336.0**3 + 4096 * 14336.0**2, "self_attn.q_proj": 3 * 4096.0**3,
             "self_attn.o_proj": 2 * 4096.0**3, "mlp.gate_proj": 4096.0**3 + 2 * 14336 * 4096.0**2}
    owners = assign_owners(costs, 2)
    assert owners["mlp.down_proj"] != owners["mlp.gate_proj"] == owners["self_attn.q_proj"] == \
        owners["self_attn.o_proj"]
    assert assign_owners(costs, 2) == owners  # deterministic
    assert set(assign_owners(costs, 8).values()) == {0, 1, 2, 3}
    assert assign_owners({"a": 1.0, "b": 1.0}, 2) == {"a": 0, "b": 1}


def test_prune_flags_survive_torchrun_parser():
    """torchrun parses its own options with abbreviations allowed, over the whole command line: a prune flag that
    is an ambiguous prefix of a torchrun option (``--n``) kills the launch. Every other flag must pass."""
    from torch.distributed.run import get_args_parser

    from calibprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    flags = sorted({s for a in sub.choices["prune"]._actions for s in a.option_strings if s.startswith("--")})
    runner = get_args_parser()
    bad = []
    for flag in flags:
        if flag in ("--n", "--help"):
            continue
        argv = ["--nproc-per-node", "2", "-m", "calibprune", "prune", flag, "1"]
        try:
            parsed = runner.parse_args(argv)
        except SystemExit:
            bad.append(flag)
            continue
        assert parsed.training_script_args == ["prune", flag, "1"], flag
    assert not bad, f"torchrun rejects {bad}"
    documented = ("--nproc-per-node 2 -m calibprune prune --model smollm2-135m --calib c4 --num-samples 8 --seqlen 128 "
                  "--sparsity 0.6 --out DIR").split()
    assert runner.parse_args(documented).training_script_args[0] == "prune"


def test_methods_without_a_reduction_are_refused():
    """A method whose statistics are not combined across ranks cannot silently prune from one shard."""
    from calibprune.pruning.loop import _check_distributable
    from calibprune.pruning.method import LayerStatistics
    from calibprune.pruning.statistics import ColumnNormStatistic

    class Local(LayerStatistics):
        """Collects its own state in add_batch and never combines it."""

        def add_batch(self, group, x):
            self.seen = x

    class Declared(LayerStatistics):
        """Only declared running statistics: the base class combines them."""

        def __init__(self):
            super().__init__()
            self.statistics = (ColumnNormStatistic(),)

    with pytest.raises(ValueError, match="does not combine its statistics across ranks"):
        _check_distributable([Local()], torch.zeros(2, 3, dtype=torch.long))
    _check_distributable([Local()], None)  # no data, nothing to combine
    _check_distributable([Declared()], torch.zeros(2, 3, dtype=torch.long))


def test_one_process_runs_no_collective():
    """Without a process group nothing of the distributed path runs: no 'distributed' entry in the report."""
    report = prune(tiny_model("llama"), _ids(), make_config("sparsegpt", sparsity=0.5), progress=False)
    assert report.distributed is None


@pytest.mark.slow
def test_torchrun_cli_writes_the_one_process_checkpoint(tmp_path):
    """``torchrun --nproc-per-node 2 -m calibprune prune ... --num-samples 8`` as documented (gloo on CPU): rank 0
    alone writes the output, and it is bitwise the checkpoint of the same command in one process with the same
    threads per process."""
    import json
    import subprocess
    import sys

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from calibprune.cli import main

    model = tmp_path / "dense"
    tiny_model("llama").save_pretrained(model)
    vocab = {f"w{i}": i for i in range(94)} | {"<unk>": 94, "</s>": 95}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>",
                            eos_token="</s>").save_pretrained(model)
    data = tmp_path / "data" / "c4_sample"
    data.mkdir(parents=True)
    (data / "c4_demo.jsonl").write_text("".join(
        json.dumps({"text": " ".join(f"w{(i * 7 + j * 3) % 90}" for j in range(80))}) + "\n" for i in range(40)))
    args = ["prune", "--model", str(model), "--calib", "c4", "--num-samples", "8", "--seqlen", "16",
            "--sparsity", "0.6", "--no-eval", "--data-dir", str(tmp_path / "data")]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "calibprune", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved to") == 1, run.stdout  # rank 0 alone reports
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun runs each rank with OMP_NUM_THREADS=1; MKL's Cholesky rounds by thread count
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    sidecar = json.loads((tmp_path / "two" / "calibprune.json").read_text())
    assert sidecar["report"]["distributed"]["world_size"] == 2

    one, two = _checkpoint_tensors(tmp_path / "one"), _checkpoint_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []
