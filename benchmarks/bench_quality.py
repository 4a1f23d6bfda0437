"""Quality table: WikiText-2 perplexity of every method × sparsity × (plain, OWL, DSnoT) on the same calibration.

Default job: SmolLM2-135M, 32×512 C4 tokens (seed 0), 50 / 60 / 70 % unstructured and 2:4, for magnitude, Wanda,
SparseGPT (fused, reference numerics), RIA and ALPS, each plain, with OWL (unstructured only) and with DSnoT in the
authors' order and in calibprune's ``stop_when_exhausted`` order (after Wanda and SparseGPT); WikiText-2 perplexity
on 16 windows of 512 tokens. Each finished row is appended to ``benchmarks/results/quality.jsonl`` at once, and a
rerun skips every row already there with the same settings, so the job survives being killed and resumes across
sessions. Rows from before the DSnoT orders existed (no ``dsnot_order`` field) are kept in the file, never reused.

    python benchmarks/bench_quality.py [--sparsities 0.5,0.6,0.7,2:4] [--methods magnitude,wanda,sparsegpt,ria,alps]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

from calibprune import build_calibration, load_model, make_config, prune
from calibprune.evaluation import wikitext2_perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS_DIR, environment, print_table  # noqa: E402

log = logging.getLogger("bench_quality")

VARIANTS = ("plain", "owl", "dsnot", "dsnot-stop")
#: the methods DSnoT refines in the table (the authors' initial methods, and SparseGPT, our adaptation)
DSNOT_AFTER = ("wanda", "sparsegpt")


def plan(methods: list[str], settings: list[str], variants: list[str]) -> list[dict]:
    """Every (method, setting, variant) the table holds: OWL only for unstructured, DSnoT after Wanda and SparseGPT."""
    jobs = []
    for setting in settings:
        nm = ":" in setting
        for method in methods:
            for variant in variants:
                if (variant == "owl" and nm) or (variant.startswith("dsnot") and method not in DSNOT_AFTER):
                    continue
                jobs.append({"method": method, "setting": setting, "variant": variant,
                             "dsnot_order": {"dsnot": "faithful", "dsnot-stop": "stop_when_exhausted"}.get(variant)})
    return jobs


def job_config(job: dict, owl_m: float, owl_lmbda: float, batch_size: int):
    # The table is about perplexity: skip the reconstruction-error diagnostic (a Hessian per group for Wanda and
    # magnitude, which would cost them as much as SparseGPT's statistics).
    options: dict = {"batch_size": batch_size, "report_errors": False}
    if ":" in job["setting"]:
        options["pattern"] = job["setting"]
    else:
        options["sparsity"] = float(job["setting"])
    if job["variant"] == "owl":
        options |= {"sparsity_profile": "owl", "profile_options": {"m": owl_m, "lmbda": owl_lmbda}}
    elif job["variant"] == "dsnot":
        options["refine"] = "dsnot"
    elif job["variant"] == "dsnot-stop":
        options |= {"refine": "dsnot", "refine_options": {"stop_when_exhausted": True}}
    return make_config(job["method"], **options)


def _key(row: dict) -> tuple:
    # A DSnoT row carries its order; a row from before the orders existed has none, so it never matches a new job.
    order = row.get("dsnot_order", "legacy") if str(row.get("variant", "")).startswith("dsnot") else None
    return tuple(row.get(k) for k in ("model", "calib", "n", "seqlen", "seed", "method", "setting", "variant",
                                      "owl_m", "owl_lmbda", "batch_size", "eval")) + (order,)


def _done(path: Path) -> dict[tuple, dict]:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[_key(row)] = row
    return rows


def main(model_name: str = "smollm2-135m", n: int = 32, seqlen: int = 512, seed: int = 0, calib_source: str = "c4",
         methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt", "ria", "alps"),
         settings: tuple[str, ...] = ("0.5", "0.6", "0.7", "2:4"), variants: tuple[str, ...] = VARIANTS,
         owl_m: float = 5.0, owl_lmbda: float = 0.08, batch_size: int = 1, eval_windows: int = 16,
         eval_seqlen: int = 512, out: str | None = None) -> list[dict]:
    torch.set_grad_enabled(False)
    path = Path(out) if out else RESULTS_DIR / "quality.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"model": model_name, "calib": calib_source, "n": n, "seqlen": seqlen, "seed": seed, "owl_m": owl_m,
            "owl_lmbda": owl_lmbda, "batch_size": batch_size, "eval": f"wikitext2 {eval_windows}x{eval_seqlen}"}
    jobs = plan(list(methods), list(settings), list(variants))
    done = _done(path)
    todo = [j for j in jobs if _key(base | j) not in done]
    log.info("%d of %d rows already in %s; %d to run", len(jobs) - len(todo), len(jobs), path, len(todo))
    if todo:
        dense, tok = load_model(model_name)
        calib = build_calibration(tok, calib_source, n=n, seqlen=seqlen, seed=seed)
        dense_ppl = wikitext2_perplexity(dense, tok, seqlen=eval_seqlen, max_windows=eval_windows)
        env = environment("cpu")
        for i, job in enumerate(todo, 1):
            config = job_config(job, owl_m, owl_lmbda, batch_size)
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = prune(model, calib, config, progress=False)
            seconds = time.perf_counter() - t0
            ppl = wikitext2_perplexity(model, tok, seqlen=eval_seqlen, max_windows=eval_windows)
            row = base | job | {"bench": "quality", "ppl": ppl, "dense_ppl": dense_ppl, "sparsity": report.sparsity,
                                "seconds": seconds, "layer_targets": report.layer_targets,
                                "config": report.config} | env
            with path.open("a") as fh:  # one finished row at a time: a kill loses at most the running one
                fh.write(json.dumps(row, default=str) + "\n")
            done[_key(row)] = row
            log.info("[%d/%d] %s %s %s: ppl %.2f (%.0f s)", i, len(todo), job["method"], job["setting"],
                     job["variant"], ppl, seconds)
            del model
    rows = [done[_key(base | j)] for j in jobs]
    table = []
    for setting in settings:
        line: dict = {"setting": setting}
        for r in rows:
            if r["setting"] == setting:
                line[f"{r['method']} {r['variant']}"] = r["ppl"]
        table.append(line)
    columns = ["setting"] + [f"{m} {v}" for m in methods for v in variants
                             if any(f"{m} {v}" in line for line in table)]
    print(f"\nWikiText-2 perplexity ({model_name}, {n}x{seqlen} {calib_source}, dense "
          f"{rows[0]['dense_ppl']:.2f})" if rows else "")
    print_table(table, columns)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,ria,alps")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,2:4", help="unstructured fractions and N:M patterns")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--owl-lmbda", type=float, default=0.08)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON-lines file (default: benchmarks/results/quality.jsonl)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main(a.model, a.n, a.seqlen, a.seed, a.calib, tuple(a.methods.split(",")), tuple(a.sparsities.split(",")),
         tuple(a.variants.split(",")), a.owl_m, a.owl_lmbda, a.batch_size, a.eval_windows, out=a.out)
