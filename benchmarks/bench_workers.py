"""Sample-parallel workers: how the faithful prune scales with ``workers`` on this CPU, and that it changes no bit.

For each repeat, every worker count in ``--workers`` prunes the same SmolLM2-135M copy with the same calibration
tokens (SparseGPT fused, reference numerics, one sequence per batch), interleaved so that the machine's noise
falls on all of them alike; each run's Linear weights are compared with the first count's (``torch.equal``).
Prints per count the median seconds, the min–max over repeats, the speedup against the first count's median
(each repeat's ratio, min–max), the phases, and whether the weights were bitwise equal; rows go to
``benchmarks/results/workers.jsonl``.

    python benchmarks/bench_workers.py [--workers 1,2] [--n 16] [--seqlen 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from calibprune import build_calibration, load_model, prune_sparsegpt_fused
from calibprune.pruning import find_decoder_layers, select_targets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table, write_rows  # noqa: E402

log = logging.getLogger("bench_workers")


def linear_weights(model) -> dict[str, torch.Tensor]:
    prefix, layers = find_decoder_layers(model)
    return {f"{prefix}.{i}.{n}": m.weight.detach().clone() for i, layer in enumerate(layers)
            for n, m in select_targets(layer).items()}


def main(workers: tuple[int, ...] = (1, 2), n: int = 16, seqlen: int = 512, sparsity: float = 0.6,
         repeats: int = 3, out: str | None = None) -> list[dict]:
    if len(workers) < 2 or workers[0] != 1:
        raise ValueError(f"--workers must start with 1 (the one-thread anchor) and give another count: {workers}")
    torch.set_grad_enabled(False)
    dense, tok = load_model("smollm2-135m")
    calib = build_calibration(tok, "c4", n=n, seqlen=seqlen, seed=0)
    env = environment("cpu")
    config = {"model": "smollm2-135m", "calib": "c4", "n": n, "seqlen": seqlen, "sparsity": sparsity,
              "method": "sparsegpt (fused, reference numerics)", "batch_size": 1, "repeats": repeats}
    seconds: dict[int, list[float]] = {k: [] for k in workers}
    phases: dict[int, dict] = {}
    bitwise: dict[int, bool] = dict.fromkeys(workers, True)
    anchor_weights = None
    for r in range(repeats):
        for k in workers:
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = prune_sparsegpt_fused(model, calib, sparsity=sparsity, batch_size=1, workers=k)
            seconds[k].append(time.perf_counter() - t0)
            phases[k] = report.phase_seconds
            weights = linear_weights(model)
            if anchor_weights is None:
                anchor_weights = weights
            else:
                bitwise[k] &= all(torch.equal(weights[name], w) for name, w in anchor_weights.items())
            log.info("repeat %d, workers %d: %.1f s", r + 1, k, seconds[k][-1])
            del model
    anchor = seconds[workers[0]]
    rows = []
    for k in workers:
        ratios = [a / s for a, s in zip(anchor, seconds[k])]
        rows.append({"bench": "workers", "workers": k, "seconds": statistics.median(seconds[k]),
                     "seconds_min": min(seconds[k]), "seconds_max": max(seconds[k]), "all_seconds": seconds[k],
                     "speedup_vs_1": statistics.median(anchor) / statistics.median(seconds[k]),
                     "speedup_min": min(ratios), "speedup_max": max(ratios),
                     "bitwise_vs_1": bitwise[k], "phases": phases[k], **config, **env})
    print(f"\nworkers scaling, SmolLM2-135M {n}x{seqlen}, {env['device']}, {env['cpu_capability']}")
    print_table(rows, ["workers", "seconds", "seconds_min", "seconds_max", "speedup_vs_1", "speedup_min",
                       "speedup_max", "bitwise_vs_1"])
    for row in rows:
        print(f"  workers {row['workers']} phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in row["phases"].items()))
    path = write_rows("workers", rows, out)
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="worker counts, the first 1 (default: 1,2)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON-lines file (default: benchmarks/results/workers.jsonl)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main(tuple(int(k) for k in a.workers.split(",")), a.n, a.seqlen, a.sparsity, a.repeats, a.out)
