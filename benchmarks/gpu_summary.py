"""The SUMMARY block of ``benchmarks/gpu_check.sh``: stage outcomes, the issue-9 goals against what was measured,
and the correctness columns, from the stage status file, the benchmark rows and the test log.

    python benchmarks/gpu_summary.py --status STATUS --jsonl bench.jsonl --tests-log tests.log [--sanitizer-log L]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _fmt(v, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def _goal(ok: bool | None) -> str:
    return {True: "MET", False: "NOT MET", None: "not measured"}[ok]


def summarize(status_path: Path, jsonl: Path, tests_log: Path, sanitizer_log: Path | None) -> str:
    lines = ["=" * 100, "SUMMARY (benchmarks/gpu_check.sh)", "=" * 100]
    stages = [ln.split("\t") for ln in status_path.read_text().splitlines() if ln.strip()] if status_path.exists() \
        else []
    lines.append("stages:")
    for parts in stages:
        lines.append("  " + "  ".join(p.ljust(12) for p in parts))
    rows = _rows(jsonl)
    env = next((r for r in rows if "device" in r), {})
    if env:
        lines.append(f"device: {env.get('device')} | driver {env.get('driver', 'n/a')} | torch {env.get('torch')} | "
                     f"CUDA {env.get('cuda', 'n/a')} | triton {env.get('triton', 'n/a')} | git {env.get('git')}"
                     + (" | DRY RUN (CPU plumbing, numbers meaningless)" if env.get("dry_run") else ""))
    # tests
    if tests_log.exists():
        pattern = re.compile(r"\d+ (passed|failed|errors?|skipped)")
        tail = [ln for ln in tests_log.read_text().splitlines() if pattern.search(ln)]
        lines.append("tests: " + ("; ".join(t.strip("= ") for t in tail[-3:]) if tail else "no pytest summary line"))
    # roofline
    roof = {r["provider"]: r for r in rows if r.get("bench") == "gpu_roofline" and "error" not in r}
    bf16 = roof.get("gemm_bfloat16", {}).get("tflops")
    lines.append(f"roofline: bf16 GEMM {_fmt(bf16)} TFLOP/s, fp32 GEMM "
                 f"{_fmt(roof.get('gemm_float32', {}).get('tflops'))} TFLOP/s, copy "
                 f"{_fmt(roof.get('copy', {}).get('tb_per_s'))} TB/s")
    errors = [r for r in rows if "error" in r]
    # hessian
    hess = [r for r in rows if r.get("bench") == "gpu_hessian" and "error" not in r]
    if hess:
        lines.append("hessian (speed-up over reference add_batch | useful TFLOP/s | % of bf16 GEMM | rel err vs GPU "
                     "ref | vs fp64):")
        for r in hess:
            pct = 100 * r["useful_tflops"] / bf16 if bf16 else None
            lines.append(f"  {r['shape']:>16} {r['dtype']:>8} {r['provider']:>12}  "
                         f"{_fmt(r.get('speedup_vs_reference'))}x  {_fmt(r.get('useful_tflops'))}  "
                         f"{_fmt(pct, '.1f')}%  "
                         f"{_fmt(r.get('rel_err_vs_gpu_reference'))}  {_fmt(r.get('rel_err_vs_fp64'))}")
        best = {}
        for r in hess:
            if r["provider"] != "reference" and r["dtype"] == "bfloat16":
                key = r["shape"]
                if key not in best or r["speedup_vs_reference"] > best[key]["speedup_vs_reference"]:
                    best[key] = r
        for shape, r in best.items():
            pct = r["useful_tflops"] / bf16 if bf16 else None
            ok = r["speedup_vs_reference"] >= 10 and (pct is not None and pct >= 0.5)
            lines.append(f"  GOAL hessian {shape}: >= 10x reference and >= 50% of bf16 GEMM: {_goal(ok)} "
                         f"(best {r['provider']}: {r['speedup_vs_reference']:.1f}x, {_fmt(pct and 100 * pct, '.0f')}%)")
    # obs
    obs_all = [r for r in rows if r.get("bench") == "gpu_obs" and "error" not in r]
    factors = [r for r in obs_all if r["provider"].startswith("factor:")]
    obs = [r for r in obs_all if not r["provider"].startswith("factor:")]
    if factors:
        lines.append("obs inverse factor alone (O(cols^3), paid by every provider before its in-block loop):")
        for r in factors:
            lines.append(f"  {r['shape']:>11} {r['pattern']:>12} {r['provider']:>20}  {_fmt(r.get('p50'))} s")
    if obs:
        lines.append("obs (speed-up over reference fasterprune: whole | in-block loop alone | mask agreement vs GPU "
                     "ref | recon diff | contract | mask agreement vs fp64):")
        for r in obs:
            lines.append(f"  {r['shape']:>11} {r['pattern']:>12} {r['provider']:>12}  "
                         f"{_fmt(r.get('speedup_vs_reference'))}x  {_fmt(r.get('in_block_speedup_vs_reference'))}x  "
                         f"{_fmt(r.get('mask_agreement_vs_gpu_reference'), '.6f')}  "
                         f"{_fmt(r.get('recon_rel_diff_vs_gpu_reference'), '+.2e')}  {r.get('contract_ok')}  "
                         f"{_fmt(r.get('mask_agreement_vs_fp64'), '.4f')}")
        kernels = [r for r in obs if r["provider"].split("+")[0] in ("cuda", "triton")]
        if kernels:
            fastest = {}
            for r in kernels:
                key = (r["shape"], r["pattern"])
                if "+fast" not in r["provider"] and (key not in fastest or
                                                     r["speedup_vs_reference"] > fastest[key]["speedup_vs_reference"]):
                    fastest[key] = r
            ok = all(r["speedup_vs_reference"] >= 20 for r in fastest.values()) if fastest else None
            held = sum(bool(r["contract_ok"]) for r in kernels)
            worst = min((r["speedup_vs_reference"] for r in fastest.values()), default=0)
            loop = [r.get("in_block_speedup_vs_reference") for r in fastest.values()]
            worst_loop = min((x for x in loop if x is not None), default=None)
            lines.append(f"  GOAL obs >= 20x reference within the contract: {_goal(ok and held == len(kernels))} "
                         f"(min best speed-up {worst:.1f}x whole, {_fmt(worst_loop, '.1f')}x in-block loop alone; "
                         f"contract held in {held}/{len(kernels)} kernel rows)")
    # e2e
    e2e = {r["provider"]: r for r in rows if r.get("bench") == "gpu_e2e" and "error" not in r}
    profile = e2e.pop("profile:fused", None)
    if e2e:
        quality = next((r["quality"] for r in e2e.values() if r.get("quality")), None)
        lines.append("end to end (seconds | speed-up | sparsity | mask agreement vs reference)"
                     + (f"; quality {quality}" if quality else "") + ":")
        for name, r in e2e.items():
            lines.append(f"  {name:>10}  " + (f"skipped: {r['skipped']}" if r.get("skipped") else
                                               f"{_fmt(r.get('seconds'))} s  {_fmt(r.get('speedup_vs_reference'))}x  "
                                               f"{_fmt(r.get('sparsity'), '.4f')}  "
                                               f"{_fmt(r.get('mask_agreement_vs_reference'), '.5f')}"))
        def met(name: str, target: float) -> bool | None:
            speedup = e2e.get(name, {}).get("speedup_vs_reference")
            return None if not speedup else speedup >= target

        lines.append(f"  GOAL e2e fused >= 5x reference: {_goal(met('fused', 5))}; "
                     f"fast >= 10x: {_goal(met('fast', 10))}")
    if profile and profile.get("top_kernels"):
        lines.append(f"profile of the fused prune ({profile.get('calib')}, {_fmt(profile.get('profiled_seconds'))} s "
                     "of own device time), top kernels:")
        for k in profile["top_kernels"]:
            lines.append(f"  {100 * k['share']:5.1f}%  {_fmt(k['seconds'])} s  x{k['calls']}  {k['name']}")
    # The measured backend order, to set calibprune.ops._backend.AUTO_ORDER from.
    order_lines = []
    for bench, keys in (("gpu_hessian", ("shape", "dtype")), ("gpu_obs", ("shape", "pattern"))):
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if (r.get("bench") == bench and "error" not in r and r["provider"] != "reference" and r.get("p50")
                    and not r["provider"].startswith("factor:")):
                numerics = "fast" if "+fast" in r["provider"] else "reference"
                groups.setdefault((bench[4:], numerics) + tuple(r[k] for k in keys), []).append(r)
        for key, rs in groups.items():
            ranked = sorted(rs, key=lambda r: r["p50"])
            order_lines.append(f"  {' '.join(map(str, key))}: " + " < ".join(
                f"{r['provider'].split('+')[0]} ({r['p50']:.3g}s)" for r in ranked))
    if order_lines:
        lines.append("measured backend order (fastest first; for AUTO_ORDER):")
        lines.extend(order_lines)
    if sanitizer_log is not None and sanitizer_log.exists():
        text = sanitizer_log.read_text()
        summaries = re.findall(r"ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: .*", text)
        lines.append("sanitizer: " + ("; ".join(summaries) if summaries else "no compute-sanitizer summary"))
    if errors:
        lines.append(f"ERRORS in {len(errors)} benchmark rows:")
        for r in errors[:10]:
            lines.append(f"  {r.get('bench')} {r.get('provider')} {r.get('shape', '')}: {r['error']}")
    lines.append("=" * 100)
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status", required=True)
    parser.add_argument("--jsonl", required=True)
    parser.add_argument("--tests-log", required=True)
    parser.add_argument("--sanitizer-log")
    a = parser.parse_args()
    print(summarize(Path(a.status), Path(a.jsonl), Path(a.tests_log), Path(a.sanitizer_log) if a.sanitizer_log
                    else None))
