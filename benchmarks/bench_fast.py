"""``numerics="fast"`` on this CPU: which way of using every core is fastest, and what its perplexity costs.

**Speed** (``--candidates``): the fused SparseGPT prune with ``numerics="fast"`` under each candidate, round-robin
over ``--repeats`` (so the machine's noise falls on all alike), on the same SmolLM2-135M tokens. A candidate is
``MODE:K:B``:

* ``workers:K:B`` — K sample-parallel workers with one intra-op thread each (the library's way), B sequences per
  batched forward and statistics update;
* ``threads:K:B`` — one worker whose ops use K intra-op threads (torch's BLAS threading), B sequences per batch.
  The library does not offer this mode; the benchmark measures it, through a pool that leaves torch's threads
  alone, to show whether it should.

Prints per candidate the median seconds, min–max, each repeat's ratio to the first candidate, and the phases.

**Quality** (``--seeds``): per calibration seed (other C4 windows), the fused prune with reference numerics and with
``numerics="fast"`` under the first candidate, each scored on WikiText-2; prints each numerics' mean ± sd over
the seeds, the per-seed fast − reference difference, its mean and standard error. The quality contract of
``fast`` is a perplexity within the reference's seed spread.

Rows go to ``benchmarks/results/fast.jsonl``.

    python benchmarks/bench_fast.py [--candidates workers:2:1,workers:2:4,threads:2:1,threads:2:8]
                                    [--n 32] [--repeats 2] [--seeds 0,1,2]
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

import calibprune.pruning.loop as layer_loop
from calibprune import build_calibration, load_model, prune_sparsegpt_fused
from calibprune.evaluation import wikitext2_perplexity
from calibprune.pruning.workers import WorkerPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table, write_rows  # noqa: E402

log = logging.getLogger("bench_fast")


class _ThreadedPool(WorkerPool):
    """A pool that leaves torch's intra-op threads as they are (the ``threads`` candidates)."""

    def __init__(self, workers: int, *, one_thread: bool = True):
        super().__init__(workers, one_thread=False)


def parse_candidate(text: str) -> tuple[str, int, int]:
    mode, k, b = text.split(":")
    if mode not in ("workers", "threads"):
        raise ValueError(f"candidate mode must be workers or threads: {text!r}")
    return mode, int(k), int(b)


def prune_fast(model, calib, candidate: tuple[str, int, int], sparsity: float):
    mode, k, b = candidate
    threads = torch.get_num_threads()
    pool = layer_loop.WorkerPool
    try:
        if mode == "threads":
            torch.set_num_threads(k)
            layer_loop.WorkerPool = _ThreadedPool
        return prune_sparsegpt_fused(model, calib, sparsity=sparsity, numerics="fast", batch_size=b,
                                     workers=1 if mode == "threads" else k)
    finally:
        layer_loop.WorkerPool = pool
        torch.set_num_threads(threads)


def speed(dense, calib, candidates: list[str], sparsity: float, repeats: int, config: dict, env: dict) -> list[dict]:
    parsed = {c: parse_candidate(c) for c in candidates}
    seconds: dict[str, list[float]] = {c: [] for c in candidates}
    phases: dict[str, dict] = {}
    for r in range(repeats):
        for c in candidates:
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = prune_fast(model, calib, parsed[c], sparsity)
            seconds[c].append(time.perf_counter() - t0)
            phases[c] = report.phase_seconds | {f"{k} (sub)": v for k, v in report.timings.items()}
            log.info("repeat %d/%d: %s %.1f s", r + 1, repeats, c, seconds[c][-1])
            del model
    anchor = seconds[candidates[0]]
    rows = []
    for c in candidates:
        mode, k, b = parsed[c]
        ratios = [a / s for a, s in zip(anchor, seconds[c])]
        rows.append({"bench": "fast", "part": "speed", "candidate": c, "mode": mode, "cores": k, "batch_size": b,
                     "seconds": statistics.median(seconds[c]), "all_seconds": seconds[c],
                     "speedup_vs_first": statistics.median(ratios), "speedup_repeats": ratios, "phases": phases[c],
                     **config, **env})
    print(f"\nnumerics='fast' candidates, {config['n']}x{config['seqlen']}, {env['device']}, {env['cpu_capability']}"
          f", {repeats} repeat(s)")
    print_table(rows, ["candidate", "seconds", "speedup_vs_first"])
    for row in rows:
        print(f"  {row['candidate']}: per repeat " + ", ".join(f"{s:.1f}" for s in row["all_seconds"])
              + " s; ratio to the first " + ", ".join(f"{x:.2f}" for x in row["speedup_repeats"])
              + "; phases " + ", ".join(f"{k} {v:.1f}" for k, v in row["phases"].items()))
    return rows


def quality(dense, tok, seeds: list[int], candidate: str, n: int, seqlen: int, sparsity: float, eval_windows: int,
            config: dict, env: dict) -> list[dict]:
    parsed = parse_candidate(candidate)
    ppl: dict[str, list[float]] = {"reference": [], "fast": []}
    for seed in seeds:
        calib = build_calibration(tok, "c4", n=n, seqlen=seqlen, seed=seed)
        for numerics in ppl:
            model = copy.deepcopy(dense)
            if numerics == "fast":
                prune_fast(model, calib, parsed, sparsity)
            else:
                prune_sparsegpt_fused(model, calib, sparsity=sparsity, batch_size=1)
            ppl[numerics].append(wikitext2_perplexity(model, tok, seqlen=512, max_windows=eval_windows))
            log.info("seed %d, numerics %s: ppl %.2f", seed, numerics, ppl[numerics][-1])
            del model
    diffs = [f - r for f, r in zip(ppl["fast"], ppl["reference"])]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    rows = [{"bench": "fast", "part": "quality", "numerics": k, "seeds": seeds, "ppl": v,
             "ppl_mean": statistics.mean(v), "ppl_sd": statistics.stdev(v) if len(v) > 1 else float("nan"),
             "fast_minus_reference": diffs, "diff_mean": statistics.mean(diffs), "diff_se": se,
             "candidate": candidate if k == "fast" else "workers (reference numerics)",
             "eval": f"wikitext2 {eval_windows}x512", **config, **env} for k, v in ppl.items()]
    print(f"\nperplexity over calibration seeds {seeds} (WikiText-2, {eval_windows} windows)")
    print_table(rows, ["numerics", "ppl_mean", "ppl_sd"])
    print("  per seed: " + "; ".join(f"seed {s}: reference {r:.2f}, fast {f:.2f}"
                                     for s, r, f in zip(seeds, ppl["reference"], ppl["fast"])))
    print(f"  fast - reference: mean {statistics.mean(diffs):+.2f}, standard error {se:.2f} ({len(diffs)} seeds)")
    return rows


def main(candidates: list[str], n: int = 32, seqlen: int = 512, sparsity: float = 0.6, repeats: int = 2,
         seeds: list[int] | None = None, eval_windows: int = 16, out: str | None = None) -> list[dict]:
    torch.set_grad_enabled(False)
    for c in candidates:
        parse_candidate(c)
    dense, tok = load_model("smollm2-135m")
    env = environment("cpu")
    config = {"model": "smollm2-135m", "calib": "c4", "n": n, "seqlen": seqlen, "sparsity": sparsity,
              "method": "sparsegpt (fused)", "repeats": repeats}
    rows = []
    if repeats > 0:
        calib = build_calibration(tok, "c4", n=n, seqlen=seqlen, seed=0)
        rows += speed(dense, calib, candidates, sparsity, repeats, config, env)
    if seeds:
        rows += quality(dense, tok, seeds, candidates[0], n, seqlen, sparsity, eval_windows, config, env)
    path = write_rows("fast", rows, out)
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = torch.get_num_threads()
    ap.add_argument("--candidates", default=f"workers:{cores}:1,workers:{cores}:4,threads:{cores}:1,threads:{cores}:8",
                    help="MODE:K:B list; the first is the anchor of the ratios and the quality part's fast run")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=2, help="speed repeats (0: skip the speed part)")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds of the quality part ('' skips it)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON-lines file (default: benchmarks/results/fast.jsonl)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main(a.candidates.split(","), a.n, a.seqlen, a.sparsity, a.repeats,
         [int(s) for s in a.seeds.split(",") if s.strip()], a.eval_windows, a.out)
