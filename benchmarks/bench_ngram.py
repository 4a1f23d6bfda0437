"""Benchmark n-gram statistics (``ngram_stats``): Python Counter, torch.unique, and every calibprune backend.

Usage: ``python benchmarks/bench_ngram.py [--batch 128 --seqlen 2048 --vocab 49152 --n 4 --dist zipf --threads 1]``.
Speeds are ratios against the Python ``Counter`` reference and against the plain ``torch.unique`` recipe
(``unique(dim=0)`` over the unfolded n-gram rows), both timed in the same run. Every provider's result is checked
against the reference before it is timed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import environment, measure, print_table, write_rows  # noqa: E402

from calibprune.ops import available_backends, ngram_hashes, ngram_stats  # noqa: E402
from calibprune.ops.ngram import ngram_stats_reference  # noqa: E402

TOP_K = (10, 100)


def make_ids(batch: int, seqlen: int, vocab: int, dist: str, seed: int = 0) -> torch.Tensor:
    """``[batch, seqlen] int64`` ids: uniform, or Zipf(1) over the vocabulary (text-like repetition)."""
    g = torch.Generator().manual_seed(seed)
    if dist == "uniform":
        return torch.randint(0, vocab, (batch, seqlen), generator=g)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    perm = torch.randperm(vocab, generator=g)  # frequent ids spread over the whole id range
    return perm[torch.multinomial(weights, batch * seqlen, replacement=True, generator=g)].view(batch, seqlen)


def torch_unique_stats(ids: torch.Tensor, n: int) -> dict:
    """The plain torch recipe: unique n-gram rows with counts, then top-k."""
    grams = ids.unfold(1, n, 1).reshape(-1, n)
    _, counts = torch.unique(grams, dim=0, return_counts=True)
    total = grams.shape[0]
    top = torch.topk(counts, min(max(TOP_K), counts.numel())).values.cumsum(0).tolist()
    return {"total": total, "distinct": counts.numel(), "aggregation": 1 - counts.numel() / total,
            "top_k_mass": {k: top[min(k, len(top)) - 1] / total for k in TOP_K}}


def main(batch: int = 128, seqlen: int = 2048, vocab: int = 49152, n: int = 4, dist: str = "zipf",
         device: str = "cpu", repeats: int = 7, counter_repeats: int = 3, out: str | None = None) -> list[dict]:
    ids_cpu = make_ids(batch, seqlen, vocab, dist)
    ids = ids_cpu.to(device)
    reference = ngram_stats_reference(ids_cpu, n, top_k=TOP_K)
    providers = {
        "python-counter": lambda: ngram_stats_reference(ids_cpu, n, top_k=TOP_K),
        "torch.unique(dim=0)": lambda: torch_unique_stats(ids, n),
    }
    for backend in available_backends(device):
        if backend == "triton" and torch.device(device).type == "cpu":
            continue  # the interpreter is for tests, not timing
        providers[f"calibprune[{backend}]"] = lambda b=backend: ngram_stats(ids, n, top_k=TOP_K, backend=b)

    env = environment(device)
    config = {"batch": batch, "seqlen": seqlen, "vocab": vocab, "n": n, "dist": dist}
    shape = f"B{batch}-T{seqlen}-V{vocab}-n{n}-{dist}"
    rows = []
    for name, fn in providers.items():
        got = fn()
        for key in ("total", "distinct", "aggregation", "top_k_mass"):
            if got[key] != reference[key]:
                raise AssertionError(f"{name}: {key} {got[key]} != reference {reference[key]}")
        reps = counter_repeats if name == "python-counter" else repeats
        rows.append({"kernel": "ngram_stats", "provider": name, "shape": shape, **config,
                     **measure(fn, device=device, warmup=1, repeats=reps), **env})
    base = {r["provider"]: r["p50"] for r in rows}
    for r in rows:
        r["x_vs_counter"] = base["python-counter"] / r["p50"]
        r["x_vs_torch_unique"] = base["torch.unique(dim=0)"] / r["p50"]
        r["ms_p50"] = r["p50"] * 1e3
    # Key computation alone, for the backends that have it.
    for backend in available_backends(device):
        if backend == "triton" and torch.device(device).type == "cpu":
            continue
        t = measure(lambda b=backend: ngram_hashes(ids, n, backend=b), device=device, repeats=repeats)
        rows.append({"kernel": "ngram_hashes", "provider": f"calibprune[{backend}]", "shape": shape, **config, **t,
                     "ms_p50": t["p50"] * 1e3, **env})
    print(f"ngram: {shape}, distinct {reference['distinct']} / total {reference['total']}, on {env['device']}")
    print_table(rows, ["kernel", "provider", "ms_p50", "p20", "p80", "x_vs_counter", "x_vs_torch_unique"])
    path = write_rows("ngram", rows, out)
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--dist", choices=["zipf", "uniform"], default="zipf")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--counter-repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (recorded in the device field)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.batch, a.seqlen, a.vocab, a.n, a.dist, a.device, a.repeats, a.counter_repeats, a.out)
