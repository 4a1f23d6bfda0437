"""Sample-parallel workers (``workers=K``): the masks and weights are bitwise the one-thread run at every K, for
every method and refiner, with uneven batches and with more workers than sequences; the pool itself runs in order,
bounds what is in flight, and reports errors."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from tiny_models import random_ids, tiny_model

from calibprune import make_config, prune
from calibprune.pruning.workers import WorkerPool, resolve_workers

# name -> (arch, method, config options, sequences, batch_size)
SCENARIOS = {
    "sparsegpt": ("llama", "sparsegpt", dict(sparsity=0.6), 6, 1),
    "sparsegpt-reference-2:4": ("opt", "sparsegpt-reference", dict(pattern="2:4", blocksize=16), 5, 1),
    "sparsegpt-fast": ("qwen2", "sparsegpt", dict(sparsity=0.5, numerics="fast"), 5, 1),
    "sparsegpt-uneven-batches": ("mistral", "sparsegpt", dict(sparsity=0.5), 7, 3),
    "wanda-dsnot": ("llama", "wanda", dict(sparsity=0.5, refine="dsnot", refine_options={"skip": ()}), 5, 2),
    "wanda-owl": ("qwen2", "wanda", dict(sparsity=0.5, sparsity_profile="owl", profile_options={"lmbda": 0.05}),
                  4, 1),
    "ria": ("gemma", "ria", dict(sparsity=0.5), 4, 1),
    "alps": ("llama", "alps", dict(sparsity=0.6, max_iter=20), 4, 1),
}


def _prune(name: str, workers: int):
    arch, method, options, n, batch_size = SCENARIOS[name]
    model = tiny_model(arch)
    config = make_config(method, workers=workers, batch_size=batch_size, **options)
    report = prune(model, random_ids(n, 20, seed=3), config, progress=False)
    return model.state_dict(), report


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_workers_are_bitwise_the_one_thread_run(name):
    """K = 2 and K above the sequence count give bitwise the weights (so the masks) of the one-thread run (K=1),
    and the same report of what was pruned."""
    threads = torch.get_num_threads()
    one, report_one = _prune(name, 1)
    assert torch.get_num_threads() == threads  # the pool restores the thread count
    assert report_one.workers == 1
    for workers in (2, SCENARIOS[name][3] + 2):
        weights, report = _prune(name, workers)
        assert report.workers == workers
        for key, tensor in one.items():
            assert torch.equal(weights[key], tensor), f"{name}, workers={workers}: {key} differs"
        assert [(m.layer, m.name, m.sparsity, m.obs_loss) for m in report.modules] == \
               [(m.layer, m.name, m.sparsity, m.obs_loss) for m in report_one.modules]


def test_the_default_is_the_thread_count_on_a_cpu_and_one_elsewhere():
    assert resolve_workers(None, torch.device("cpu")) == torch.get_num_threads()
    assert resolve_workers(3, torch.device("cpu")) == 3
    assert resolve_workers(None, torch.device("meta")) == 1
    assert resolve_workers(4, torch.device("meta")) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_worker_count_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        make_config("sparsegpt", workers=bad)


def test_the_cli_takes_workers():
    import argparse

    from calibprune.pruning.cli_options import add_prune_options, config_from_args

    parser = argparse.ArgumentParser()
    add_prune_options(parser)
    args = parser.parse_args(["--method", "sparsegpt", "--workers", "3"])
    assert config_from_args(args).workers == 3


def test_ordered_yields_in_order_with_at_most_k_in_flight():
    in_flight, peak, lock = 0, 0, threading.Lock()

    def work(i):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.002 * (7 - i % 7))  # later items finish first
        with lock:
            in_flight -= 1
        return i * i

    with WorkerPool(3) as pool:
        assert torch.get_num_threads() == 1
        assert list(pool.ordered(work, range(20))) == [i * i for i in range(20)]
    assert peak <= 3


def test_a_worker_error_is_raised_at_its_item_and_the_pool_closes():
    def work(i):
        if i == 4:
            raise ValueError("item 4")
        return i

    threads = torch.get_num_threads()
    seen = []
    with pytest.raises(ValueError, match="item 4"), WorkerPool(2) as pool:
        for value in pool.ordered(work, range(10)):
            seen.append(value)
    assert seen == [0, 1, 2, 3]
    assert torch.get_num_threads() == threads


def test_each_runs_a_share_in_order_on_one_worker():
    ran: dict[str, list[int]] = {}

    def work(item):
        share, i = item
        ran.setdefault(threading.current_thread().name + share, []).append(i)

    with WorkerPool(2) as pool:
        pool.each(work, [[("a", i) for i in range(5)], [("b", i) for i in range(3)]])
    assert sorted(ran.values()) == [[0, 1, 2], [0, 1, 2, 3, 4]]


def test_the_workers_compute_the_terms_and_nothing_is_folded_twice(monkeypatch):
    """The parallel path is really taken: with K = 2 every Hessian term is computed once, most of them on the
    workers (a batch folded at a count it did not expect would be recomputed here, on the loop's thread)."""
    from calibprune.pruning.statistics import HessianStatistic

    calls: list[str] = []
    original = HessianStatistic.update

    def update(self, state, x, n):
        calls.append(threading.current_thread().name)
        return original(self, state, x, n)

    monkeypatch.setattr(HessianStatistic, "update", update)
    _prune("sparsegpt", 1)
    serial = len(calls)
    calls.clear()
    _prune("sparsegpt", 2)
    assert len(calls) == serial
    on_workers = sum(name.startswith("calibprune-worker") for name in calls)
    assert on_workers == serial * 5 // 6  # 6 sequences, one per batch: all but the first batch's on the workers


def test_fewer_batches_are_in_flight_when_their_terms_would_not_fit():
    from calibprune.pruning.workers import batches_in_flight

    gib = 2**30
    assert batches_in_flight(16, gib, 64 * gib) == 16
    assert batches_in_flight(16, gib, 8 * gib) == 4  # half the available memory, 1 GiB each
    assert batches_in_flight(16, 10 * gib, 8 * gib) == 1
    assert batches_in_flight(4, gib, None) == 4


def test_ordered_takes_a_lower_limit():
    in_flight, peak, lock = 0, 0, threading.Lock()

    def work(i):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.002)
        with lock:
            in_flight -= 1
        return i

    with WorkerPool(4) as pool:
        assert list(pool.ordered(work, range(12), limit=2)) == list(range(12))
    assert peak <= 2
