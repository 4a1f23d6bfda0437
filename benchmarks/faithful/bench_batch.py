"""Wall time of prune_sparsegpt_fused on SmolLM2-135M, 32x512 C4 tokens, 60%, batch_size=1 vs 8, interleaved.

Usage: python bench_batch.py [ORDER]    ORDER default "1,8,1,8"; appends one JSON line per run to out/bench_batch.jsonl
Each run loads a fresh model (not timed), then times the prune call alone.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("FAITHFUL_OUT", Path(__file__).resolve().parent / "out"))


def main() -> None:
    import calibprune

    torch.set_num_threads(int(os.environ.get("FAITHFUL_THREADS", "2")))
    order = [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1,8,1,8").split(",")]
    ids = torch.load(OUT / "calib_32x512.pt")
    for bs in order:
        model, _ = calibprune.load_model("smollm2-135m")
        load1 = os.getloadavg()[0]
        t0 = time.perf_counter()
        report = calibprune.prune_sparsegpt_fused(model, ids, sparsity=0.6, batch_size=bs)
        seconds = time.perf_counter() - t0
        rec = {"batch_size": bs, "seconds": seconds, "phase_seconds": report.phase_seconds,
               "timings": report.timings, "resolved_backends": report.resolved_backends,
               "loadavg_before": load1, "loadavg_after": os.getloadavg()[0], "threads": torch.get_num_threads(),
               "calibprune": calibprune.__file__, "time": time.strftime("%H:%M:%S")}
        with open(OUT / "bench_batch.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        del model


if __name__ == "__main__":
    main()
