"""End-to-end prune benchmark: reference pipeline vs fused (reference and fast numerics) vs llm-compressor.

Default job: SmolLM2-135M, 32×512 C4 tokens, 60% unstructured SparseGPT; WikiText-2 perplexity on 16 windows
of 512 tokens of the raw test file. llm-compressor needs transformers ≤ 5.17, so it usually lives in its own
virtual environment: pass its interpreter with ``--llmcompressor-python`` (it runs
``benchmarks/_llmcompressor_job.py`` on the converted checkpoint and our saved calibration ids).

Providers: ``reference`` (``prune_sparsegpt_reference``), ``fused`` (``prune_sparsegpt_fused``, numerics
"reference": bitwise the reference under the same batches), ``fast`` (the fused path with ``numerics="fast"``:
bf16 calibration forwards where the CPU has them, upper-triangle Hessian, one-Cholesky inverse factor) and
``llmcompressor``. All see the same calibration tokens in the same order (one sequence per batch unless
``--batch-size`` says otherwise). Ours run with ``--workers`` sample-parallel workers (default: the cores),
llm-compressor with torch's default threads (the cores), each its own default.

Each row also gives the provider's GEMM floor (:mod:`_floor`): the forward, Hessian and solve flops its algorithm
computes, divided by this machine's rate at those shapes measured in the same run (K concurrent one-thread
products for ours, one product on all threads for llm-compressor), and the run's share of it (``% of floor``).

    python benchmarks/bench_prune.py [--providers reference,fused,fast,llmcompressor] [--llmcompressor-python PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from calibprune import build_calibration, load_model, prune_sparsegpt_fused, prune_sparsegpt_reference
from calibprune.evaluation import wikitext2_perplexity
from calibprune.models import _convert_gguf, resolve_model_path
from calibprune.pruning import find_decoder_layers, select_targets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _floor import RateTable, anatomy, job_products, total_flops  # noqa: E402
from _harness import environment, print_table, write_rows  # noqa: E402

log = logging.getLogger("bench_prune")


def target_masks(model) -> dict[str, torch.Tensor]:
    prefix, layers = find_decoder_layers(model)
    return {f"{prefix}.{i}.{n}": m.weight.detach() == 0 for i, layer in enumerate(layers)
            for n, m in select_targets(layer).items()}


def mask_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(a[k].numel() for k in a)


def run_llmcompressor(python: str, checkpoint: str, ids: torch.Tensor, sparsity: float, workdir: Path) -> dict:
    calib_path = workdir / "calib_ids.pt"
    torch.save(ids, calib_path)
    out = workdir / "llmc_model"
    job = Path(__file__).resolve().parent / "_llmcompressor_job.py"
    cmd = [python, str(job), "--model", checkpoint, "--calib", str(calib_path), "--sparsity", str(sparsity),
           "--out", str(out)]
    log.info("running llm-compressor: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor job failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out"] = str(out)
    return result


def prune_with(provider: str, model, calib, *, sparsity: float, backend: str, batch_size: int, workers: int | None,
               model_name: str, llmcompressor_python: str | None) -> tuple[float, dict]:
    """Prune ``model`` in place with ``provider``; return the seconds and the row's extra fields."""
    extra: dict = {}
    if provider == "reference":
        t0 = time.perf_counter()
        report = prune_sparsegpt_reference(model, calib, sparsity=sparsity, batch_size=batch_size, workers=workers)
        seconds = time.perf_counter() - t0
        extra |= {"phases": report.phase_seconds, "workers": report.workers}
    elif provider in ("fused", "fast"):
        numerics = "fast" if provider == "fast" else "reference"
        t0 = time.perf_counter()
        report = prune_sparsegpt_fused(model, calib, sparsity=sparsity, backend=backend, batch_size=batch_size,
                                       numerics=numerics, workers=workers)
        seconds = time.perf_counter() - t0
        extra |= {"workers": report.workers, "backend": backend, "resolved_backends": report.resolved_backends,
                  "numerics": numerics,
                  "phases": report.phase_seconds | {f"{k} (sub)": v for k, v in report.timings.items()}}
    elif provider == "llmcompressor":
        python = llmcompressor_python or sys.executable
        kind, where = resolve_model_path(model_name)
        checkpoint = str(_convert_gguf(Path(where))) if kind == "gguf" else where
        with tempfile.TemporaryDirectory() as tmp:
            result = run_llmcompressor(python, checkpoint, calib.ids, sparsity, Path(tmp))
            model.load_state_dict(torch.load(Path(result["out"]) / "state.pt", weights_only=True))
        seconds = result["seconds"]
        extra |= {"llmcompressor": result.get("version"), "threads": torch.get_num_threads()}
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return seconds, extra


def provider_floor(provider: str, extra: dict, shape, rates: RateTable, n: int, seqlen: int,
                   batch_size: int) -> tuple[dict, dict]:
    """The provider's GEMM floor (seconds by kind) and its flops (by kind)."""
    ours = provider in ("fused", "fast")
    products = job_products(shape, n, seqlen, batch_size, shared=ours, stop_early=ours, syrk=provider == "fast")
    if provider == "llmcompressor":
        floor = rates.floor(products, "threads", extra["threads"])
    else:
        bf16 = extra.get("resolved_backends", {}).get("forwards") == "bfloat16"
        floor = rates.floor(products, "workers", extra["workers"], torch.bfloat16 if bf16 else torch.float32)
    return floor, total_flops(products)


def main(model_name: str = "smollm2-135m", n: int = 32, seqlen: int = 512, sparsity: float = 0.6,
         calib_source: str = "c4", eval_windows: int = 16, eval_seqlen: int = 512,
         providers: tuple[str, ...] = ("reference", "fused", "fast", "llmcompressor"), backend: str = "auto",
         batch_size: int = 1, llmcompressor_python: str | None = None, out: str | None = None,
         workers: int | None = None, repeats: int = 1) -> list[dict]:
    """Time every provider ``repeats`` times, round-robin (so slow drift of the machine hits them alike); the row's
    ``seconds`` is the median, the ratios are the medians of the per-repeat ratios, and perplexity and masks come
    from the first repeat (later repeats are checked to give the same masks)."""
    torch.set_grad_enabled(False)
    dense, tok = load_model(model_name)
    calib = build_calibration(tok, calib_source, n=n, seqlen=seqlen, seed=0)
    dense_ppl = wikitext2_perplexity(dense, tok, seqlen=eval_seqlen, max_windows=eval_windows)
    env = environment("cpu")
    config = {"model": model_name, "calib": calib_source, "n": n, "seqlen": seqlen, "sparsity": sparsity,
              "eval": f"wikitext2 {eval_windows}x{eval_seqlen}", "batch_size": batch_size, "repeats": repeats}
    shape = anatomy(dense)
    rates = RateTable()
    timed: dict[str, list[float]] = {p: [] for p in providers}
    extras: dict[str, dict] = {}
    masks: dict[str, dict[str, torch.Tensor]] = {}
    ppls: dict[str, float] = {}
    same_masks: dict[str, bool] = {}
    for repeat in range(repeats):
        for provider in list(timed):
            model = copy.deepcopy(dense)
            try:
                seconds, extra = prune_with(provider, model, calib, sparsity=sparsity, backend=backend,
                                            batch_size=batch_size, workers=workers, model_name=model_name,
                                            llmcompressor_python=llmcompressor_python)
            except (RuntimeError, FileNotFoundError) as exc:
                if provider != "llmcompressor":
                    raise
                print(f"llm-compressor skipped: {exc}", file=sys.stderr)
                del timed[provider]
                continue
            log.info("repeat %d/%d: %s %.1f s", repeat + 1, repeats, provider, seconds)
            timed[provider].append(seconds)
            if repeat == 0:
                extras[provider] = extra
                masks[provider] = target_masks(model)
                ppls[provider] = wikitext2_perplexity(model, tok, seqlen=eval_seqlen, max_windows=eval_windows)
                same_masks[provider] = True
            else:
                again = target_masks(model)
                same_masks[provider] &= all(torch.equal(again[k], masks[provider][k]) for k in again)
            del model
    rows = []
    for provider, seconds in timed.items():
        extra = extras[provider]
        floor, flops = provider_floor(provider, extra, shape, rates, n, seqlen, batch_size)
        total = sum(m.numel() for m in masks[provider].values())
        achieved = sum(int(m.sum()) for m in masks[provider].values()) / total
        median = statistics.median(seconds)
        rows.append({"bench": "prune", "provider": provider, "seconds": median, "seconds_repeats": seconds,
                     "same_masks_every_repeat": same_masks[provider], "ppl": ppls[provider],
                     "dense_ppl": dense_ppl, "sparsity": achieved, "floor_seconds": floor["total"],
                     "floor_by_kind": floor, "pct_of_floor": 100.0 * floor["total"] / median, "flops": flops,
                     **config, **extra, **env})
    by = {r["provider"]: r for r in rows}
    for r in rows:
        for base in ("reference", "llmcompressor"):
            if base in by:
                ratios = [b / s for b, s in zip(by[base]["seconds_repeats"], r["seconds_repeats"])]
                r[f"speedup_vs_{base}"] = statistics.median(ratios)
                r[f"speedup_vs_{base}_repeats"] = ratios
                r[f"ppl_ratio_vs_{base}"] = r["ppl"] / by[base]["ppl"]
        if "reference" in masks:
            r["mask_agreement_vs_reference"] = mask_agreement(masks[r["provider"]], masks["reference"])
    print(f"\nSmolLM2 prune benchmark on {env['device']}, {env['cpu_capability']} — dense WikiText-2 ppl "
          f"{dense_ppl:.2f}; median of {repeats} repeat(s)")
    print_table(rows, ["provider", "seconds", "floor_seconds", "pct_of_floor", "speedup_vs_reference",
                       "speedup_vs_llmcompressor", "ppl", "ppl_ratio_vs_llmcompressor", "sparsity",
                       "mask_agreement_vs_reference"])
    for r in rows:
        print(f"  {r['provider']} per repeat (s): " + ", ".join(f"{s:.1f}" for s in r["seconds_repeats"])
              + ("" if "speedup_vs_llmcompressor_repeats" not in r else
                 " — vs llm-compressor: " + ", ".join(f"{x:.2f}x" for x in r["speedup_vs_llmcompressor_repeats"]))
              + ("" if r["same_masks_every_repeat"] else " — MASKS DIFFER BETWEEN REPEATS"))
        if "phases" in r:
            print(f"  {r['provider']} phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()))
        print(f"  {r['provider']} floor (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["floor_by_kind"].items())
              + " — flops: " + ", ".join(f"{k} {v:.3g}" for k, v in r["flops"].items()))
    print("  rates measured (GFLOP/s): " + ", ".join(
        f"{m}x{k}x{nn} {str(dt).removeprefix('torch.')} {mode}{w} {rate / 1e9:.0f}"
        for (m, k, nn, dt, mode, w), rate in sorted(rates.rates.items(), key=str)))
    path = write_rows("prune", rows, out)
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--providers", default="reference,fused,fast,llmcompressor")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per batch (default: 1, the authors' order)")
    ap.add_argument("--llmcompressor-python", default=None,
                    help="python of an environment with llmcompressor installed (default: this one)")
    ap.add_argument("--out", default=None, help="JSON-lines file (default: benchmarks/results/prune.jsonl)")
    ap.add_argument("--workers", type=int, default=None, help="calibprune's sample-parallel workers (default: cores)")
    ap.add_argument("--repeats", type=int, default=1, help="time each provider this many times, round-robin")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main(a.model, a.n, a.seqlen, a.sparsity, a.calib, a.eval_windows, providers=tuple(a.providers.split(",")),
         backend=a.backend, batch_size=a.batch_size, llmcompressor_python=a.llmcompressor_python, out=a.out,
         workers=a.workers, repeats=a.repeats)
