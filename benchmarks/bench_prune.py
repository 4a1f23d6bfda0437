"""End-to-end prune benchmark: reference pipeline vs fused (reference and fast numerics) vs llm-compressor.

Default job: SmolLM2-135M, 32×512 C4 tokens, 60% unstructured SparseGPT; WikiText-2 perplexity on 16 windows
of 512 tokens of the raw test file. llm-compressor needs transformers ≤ 5.17, so it usually lives in its own
virtual environment: pass its interpreter with ``--llmcompressor-python`` (it runs
``benchmarks/_llmcompressor_job.py`` on the converted checkpoint and our saved calibration ids).

Providers: ``reference`` (``prune_sparsegpt_reference``), ``fused`` (``prune_sparsegpt_fused``, numerics
"reference": bitwise the reference under the same batches), ``fast`` (the fused path with ``numerics="fast"``:
bf16 calibration forwards where the CPU has them, upper-triangle Hessian, one-Cholesky inverse factor) and
``llmcompressor``. All see the same calibration tokens in the same order (one sequence per batch unless
``--batch-size`` says otherwise).

    python benchmarks/bench_prune.py [--providers reference,fused,fast,llmcompressor] [--llmcompressor-python PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
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


def main(model_name: str = "smollm2-135m", n: int = 32, seqlen: int = 512, sparsity: float = 0.6,
         calib_source: str = "c4", eval_windows: int = 16, eval_seqlen: int = 512,
         providers: tuple[str, ...] = ("reference", "fused", "fast", "llmcompressor"), backend: str = "auto",
         batch_size: int = 1, llmcompressor_python: str | None = None, out: str | None = None) -> list[dict]:
    torch.set_grad_enabled(False)
    dense, tok = load_model(model_name)
    calib = build_calibration(tok, calib_source, n=n, seqlen=seqlen, seed=0)
    dense_ppl = wikitext2_perplexity(dense, tok, seqlen=eval_seqlen, max_windows=eval_windows)
    env = environment("cpu")
    config = {"model": model_name, "calib": calib_source, "n": n, "seqlen": seqlen, "sparsity": sparsity,
              "eval": f"wikitext2 {eval_windows}x{eval_seqlen}", "batch_size": batch_size}
    rows, masks = [], {}
    for provider in providers:
        model = copy.deepcopy(dense)
        extra: dict = {}
        if provider == "reference":
            t0 = time.perf_counter()
            report = prune_sparsegpt_reference(model, calib, sparsity=sparsity, batch_size=batch_size)
            seconds = time.perf_counter() - t0
            extra["phases"] = report.phase_seconds
        elif provider in ("fused", "fast"):
            numerics = "fast" if provider == "fast" else "reference"
            t0 = time.perf_counter()
            report = prune_sparsegpt_fused(model, calib, sparsity=sparsity, backend=backend, batch_size=batch_size,
                                           numerics=numerics)
            seconds = time.perf_counter() - t0
            extra["phases"] = report.phase_seconds | {f"{k} (sub)": v for k, v in report.timings.items()}
            extra["backend"] = backend
            extra["resolved_backends"] = report.resolved_backends
            extra["numerics"] = numerics
        elif provider == "llmcompressor":
            python = llmcompressor_python or sys.executable
            try:
                kind, where = resolve_model_path(model_name)
                checkpoint = str(_convert_gguf(Path(where))) if kind == "gguf" else where
                with tempfile.TemporaryDirectory() as tmp:
                    result = run_llmcompressor(python, checkpoint, calib.ids, sparsity, Path(tmp))
                    state = torch.load(Path(result["out"]) / "state.pt", weights_only=True)
                    model.load_state_dict(state)
            except (RuntimeError, FileNotFoundError) as exc:
                print(f"llm-compressor skipped: {exc}", file=sys.stderr)
                continue
            seconds = result["seconds"]
            extra["llmcompressor"] = result.get("version")
        else:
            raise ValueError(f"unknown provider {provider!r}")
        masks[provider] = target_masks(model)
        ppl = wikitext2_perplexity(model, tok, seqlen=eval_seqlen, max_windows=eval_windows)
        total = sum(m.numel() for m in masks[provider].values())
        achieved = sum(int(m.sum()) for m in masks[provider].values()) / total
        rows.append({"bench": "prune", "provider": provider, "seconds": seconds, "ppl": ppl, "dense_ppl": dense_ppl,
                     "sparsity": achieved, **config, **extra, **env})
        del model
    by = {r["provider"]: r for r in rows}
    for r in rows:
        for base in ("reference", "llmcompressor"):
            if base in by:
                r[f"speedup_vs_{base}"] = by[base]["seconds"] / r["seconds"]
                r[f"ppl_ratio_vs_{base}"] = r["ppl"] / by[base]["ppl"]
        if "reference" in masks and r["provider"] in masks:
            r["mask_agreement_vs_reference"] = mask_agreement(masks[r["provider"]], masks["reference"])
    print(f"\nSmolLM2 prune benchmark on {env['device']} — dense WikiText-2 ppl {dense_ppl:.2f}")
    print_table(rows, ["provider", "seconds", "speedup_vs_reference", "speedup_vs_llmcompressor", "ppl",
                       "ppl_ratio_vs_llmcompressor", "sparsity", "mask_agreement_vs_reference"])
    for r in rows:
        if "phases" in r:
            print(f"  {r['provider']} phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()))
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
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main(a.model, a.n, a.seqlen, a.sparsity, a.calib, a.eval_windows, providers=tuple(a.providers.split(",")),
         backend=a.backend, batch_size=a.batch_size, llmcompressor_python=a.llmcompressor_python, out=a.out)
