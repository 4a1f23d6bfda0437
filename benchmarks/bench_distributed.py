"""One process vs N ranks of ``torch.distributed`` on the same prune: wall time, per-phase times, the cost of each
kind of collective, and how far the result is from one process.

Every run is a fresh child process (or N of them, in one gloo / NCCL group on loopback), pruning the same model with
the same calibration tokens. Rows:

* ``1 process`` with all the threads (``--threads``, default the CPU count) — the time to beat;
* ``1 process`` with ``threads / N`` threads — the numerical reference for the N-rank run: MKL's Cholesky rounds
  differently with the thread count, so only a one-process run with the ranks' threads per process can be bitwise
  equal (torchrun runs every rank with OMP_NUM_THREADS=1 unless told otherwise);
* ``N ranks`` with ``threads / N`` threads each;
* with ``--partial-sums``: one process whose SparseGPT Hessian is summed from N contiguous shards as
  ``Σ_r (n_r/N)·H_r`` (the simple all-reduce design), to show why reference numerics fold in order instead.

Each row reports the mask agreement and total reconstruction error against the reference row, and how many weight
matrices are bitwise equal. On GPUs: ``--device cuda --ranks 1,8`` (NCCL, one rank per GPU).

    python benchmarks/bench_distributed.py                              # SmolLM2-135M, 16 x 256 C4, 1 vs 2 ranks
    python benchmarks/bench_distributed.py --numerics reference,fast --partial-sums
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import environment, print_table, write_rows  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prune_once(spec: dict, out: Path, rank: int = 0, world: int = 1, port: int = 0) -> None:
    """Load the model, prune it (in a process group when ``world`` > 1), save targets and report to ``out``."""
    torch.set_num_threads(spec["threads"])
    torch.set_grad_enabled(False)
    import torch.distributed as dist

    from calibprune import load_model, make_config, prune
    from calibprune.pruning import find_decoder_layers, select_targets

    device = spec["device"]
    if world > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=3600))
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    model, _ = load_model(spec["model"])
    ids = torch.load(spec["ids"])
    config = make_config(spec["method"], sparsity=spec["sparsity"], numerics=spec["numerics"], device=dev)
    if spec.get("partial_sums"):
        _use_partial_sums(spec["partial_sums"])
    t0 = time.perf_counter()
    report = prune(model, ids, config, progress=False)
    wall = time.perf_counter() - t0
    if rank == 0:
        prefix, layers = find_decoder_layers(model)
        weights = {f"{i}.{n}": m.weight.detach().cpu().clone() for i, layer in enumerate(layers)
                   for n, m in select_targets(layer).items()}
        torch.save({"weights": weights, "report": report.to_dict(), "wall": wall}, out)
    if world > 1:
        dist.destroy_process_group()


def _use_partial_sums(parts: int) -> None:
    """SparseGPT's Hessian from ``parts`` contiguous shards combined as Σ_r (n_r/N)·H_r, in one process."""
    from calibprune.ops import hessian_update
    from calibprune.pruning import registry
    from calibprune.pruning.methods.sparsegpt import SparseGPTMethod

    class PartialSums(SparseGPTMethod):
        def start_layer(self, index, modules, device):
            super().start_layer(index, modules, device)
            self.shards: dict = {}

        def add_batch(self, group, x):
            shards = self.shards.setdefault(group, [])
            shards.append(x)  # kept until finalize, to know N

        def finalize_statistics(self, index):
            for group, xs in self.shards.items():
                total = len(xs)
                H = None
                for r in range(parts):
                    part = xs[r * total // parts : (r + 1) * total // parts]
                    Hr, n = torch.zeros(xs[0].shape[-1], xs[0].shape[-1], device=xs[0].device), 0
                    for x in part:
                        n = hessian_update(Hr, x, n, backend="torch")
                    H = Hr * (n / total) if H is None else H.add_(Hr * (n / total))
                self.hessian.values[group], self.hessian.counts[group] = H, total
            self.shards = {}

    registry.METHODS["sparsegpt"] = PartialSums


def _rank_entry(rank: int, spec: dict, out: str, world: int, port: int) -> None:
    _prune_once(spec, Path(out), rank, world, port)


def _run(spec: dict, world: int, folder: Path, name: str) -> dict:
    import torch.multiprocessing as mp

    out = folder / f"{name}.pt"
    if world == 1:
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_prune_once, args=(spec, out))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"{name} failed (exit {proc.exitcode})")
    else:
        mp.spawn(_rank_entry, args=(spec, str(out), world, _free_port()), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


def _compare(run: dict, ref: dict) -> dict:
    agree = total = bitwise = 0
    for name, w in ref["weights"].items():
        got = run["weights"][name]
        agree += int(((got == 0) == (w == 0)).sum())
        total += w.numel()
        bitwise += torch.equal(got, w)
    err = sum(m["recon_error"] or 0 for m in run["report"]["modules"])
    err_ref = sum(m["recon_error"] or 0 for m in ref["report"]["modules"])
    return {"mask_agreement": agree / total, "bitwise_matrices": f"{bitwise}/{len(ref['weights'])}",
            "error_ratio": err / err_ref if err_ref else float("nan")}


def _row(name: str, world: int, threads: int, run: dict, base_wall: float | None) -> dict:
    rep = run["report"]
    row = {"run": name, "ranks": world, "threads_per_rank": threads, "wall_s": run["wall"]}
    if base_wall:
        row["speedup"] = base_wall / run["wall"]
    ranks = (rep.get("distributed") or {}).get("ranks") or [{"phase_seconds": rep["phase_seconds"],
                                                              "collectives": {}}]
    for phase in ("capture", "statistics", "prune", "propagate"):
        row[f"{phase}_s"] = max(r["phase_seconds"][phase] for r in ranks)
    comm: dict[str, dict] = {}
    for r in ranks:
        for kind, c in r["collectives"].items():
            acc = comm.setdefault(kind, {"seconds": 0.0, "mb": 0.0, "calls": 0})
            acc["seconds"] = max(acc["seconds"], c["seconds"])
            acc["mb"] += c["mb"]
            acc["calls"] = max(acc["calls"], c["calls"])
    row["collectives"] = comm
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="c4")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--ranks", default="2", help="comma list of rank counts to compare with one process")
    p.add_argument("--numerics", default="reference", help="comma list: reference, fast")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the one-process baseline; "
                   "each of N ranks gets threads / N")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--partial-sums", action="store_true", help="also the one-process partial-sum Hessian row")
    args = p.parse_args()

    from calibprune import build_calibration, load_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    calib = build_calibration(load_tokenizer(args.model), args.calib, n=args.n, seqlen=args.seqlen, seed=0)
    torch.save(calib.ids, folder / "ids.pt")
    rows = []
    for numerics in args.numerics.split(","):
        spec = {"model": args.model, "ids": str(folder / "ids.pt"), "method": args.method,
                "sparsity": args.sparsity, "numerics": numerics, "device": args.device}
        base = _run(spec | {"threads": args.threads}, 1, folder, f"{numerics}-base")
        rows.append(_row("1 process", 1, args.threads, base, None) | {"numerics": numerics}
                    | {"vs": "itself"})
        for world in (int(w) for w in args.ranks.split(",")):
            threads = max(1, args.threads // world)
            ref = base if threads == args.threads else _run(spec | {"threads": threads}, 1, folder,
                                                            f"{numerics}-ref{threads}")
            if ref is not base:
                rows.append(_row(f"1 process, {threads} thread(s)", 1, threads, ref, base["wall"])
                            | {"numerics": numerics, "vs": f"1 process, {args.threads} threads"}
                            | _compare(ref, base))
            run = _run(spec | {"threads": threads}, world, folder, f"{numerics}-{world}")
            rows.append(_row(f"{world} ranks", world, threads, run, base["wall"]) | {"numerics": numerics,
                        "vs": f"1 process, {threads} thread(s)"} | _compare(run, ref))
            if args.partial_sums and numerics == "reference" and args.method == "sparsegpt":
                sim = _run(spec | {"threads": threads, "partial_sums": world}, 1, folder, f"partial-{world}")
                rows.append(_row(f"1 process, H = Σ (n_r/N)·H_r over {world} shards", 1, threads, sim, None)
                            | {"numerics": numerics, "vs": f"1 process, {threads} thread(s)"} | _compare(sim, ref))
    env = environment(args.device)
    for row in rows:
        row |= {"model": args.model, "n": args.n, "seqlen": args.seqlen, "method": args.method,
                "sparsity": args.sparsity, "backend": "nccl" if args.device == "cuda" else "gloo"} | env
    print_table(rows, ["numerics", "run", "threads_per_rank", "wall_s", "speedup", "capture_s", "statistics_s",
                       "prune_s", "propagate_s", "vs", "mask_agreement", "bitwise_matrices", "error_ratio"])
    print()
    print("collectives (per kind: slowest rank's seconds, MB sent by all ranks, calls per rank):")
    for row in rows:
        for kind, c in row["collectives"].items():
            print(f"  {row['numerics']:9s} {row['run']:12s} {kind:32s} {c['seconds']:8.3f} s {c['mb']:10.1f} MB "
                  f"{c['calls']:6d} calls")
    path = write_rows("bench_distributed", rows)
    print(f"rows appended to {path}")
    print(json.dumps({"folder": str(folder)}))


if __name__ == "__main__":
    main()
