"""Shared benchmark plumbing: timing with warm-up and quantiles, environment facts, result rows.

Every benchmark prints a short table and appends machine-readable rows (one JSON object per line) to
``benchmarks/results/<bench>.jsonl``; ``benchmarks/plot.py`` draws them. Speed is always reported as a ratio
against the reference measured in the same run, because these machines are shared and noisy.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def git_revision() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device | str) -> dict:
    """Device, library versions and revision for a result row."""
    import calibprune

    env = {"device": device_name(device), "torch": torch.__version__, "calibprune": calibprune.__version__,
           "git": git_revision(), "python": platform.python_version(),
           "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update({"cuda": torch.version.cuda, "driver": cuda_driver_version(),
                    "capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count,
                    "gpu_memory_gib": round(props.total_memory / 2**30, 1)})
    return env


def cuda_driver_version() -> str:
    """The NVIDIA driver version (nvidia-smi, else NVML), or "unknown"."""
    try:
        out = subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                      stderr=subprocess.DEVNULL, text=True, timeout=20)
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - NVML absent or not initialisable
        return "unknown"


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 1, repeats: int = 5,
            setup: Callable[[], object] | None = None) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then ``repeats`` timed times; return p20/p50/p80 seconds.

    ``setup`` (untimed) runs before every call, e.g. to clone inputs that ``fn`` modifies in place.
    """
    times = []
    for k in range(warmup + repeats):
        if setup is not None:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"p20": q[1], "p50": statistics.median(times), "p80": q[7], "repeats": repeats}


def measure_interleaved(fns: dict[str, Callable[[], object]], *, reference: str, device: torch.device | str = "cpu",
                        rounds: int = 5, setup: Callable[[], object] | None = None) -> dict[str, dict[str, float]]:
    """Time several providers round-robin (one call of each per round), for shared, noisy machines.

    Load that comes and goes then hits every provider alike, and ``speedup`` — the median over rounds of
    t(reference)/t(provider) in the same round — is steadier than a ratio of two separate medians. Call each ``fn``
    once beforehand as the warm-up. Returns, per provider, p20/p50/p80 seconds, ``speedup`` and ``repeats``.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if setup is not None:
                setup()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        srt = sorted(ts)
        q = statistics.quantiles(srt, n=10, method="inclusive") if len(srt) > 1 else srt * 9
        ratios = [r / t for r, t in zip(times[reference], ts)]
        out[name] = {"p20": q[1], "p50": statistics.median(ts), "p80": q[7], "repeats": rounds,
                     "speedup": statistics.median(ratios)}
    return out


def write_rows(bench: str, rows: list[dict], out: str | os.PathLike | None = None) -> Path:
    """Append ``rows`` as JSON lines to ``out`` (default ``benchmarks/results/<bench>.jsonl``)."""
    path = Path(out) if out else RESULTS_DIR / f"{bench}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print ``rows`` as an aligned text table with the given columns."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
