"""``calibprune study``: its arguments and its command (``calibprune/cli.py`` only wires them in)."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_study_arguments", "cmd_study", "study_settings"]


def _dotted(items: list[str], flag: str) -> dict[str, dict[str, Any]]:
    """``["igsp.pool_factor=3", "sgs.source=c4"]`` -> ``{"igsp": {"pool_factor": 3}, "sgs": {"source": "c4"}}``.

    Values are read as JSON when they parse (numbers, true/false, lists), else kept as strings.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        m = re.fullmatch(r"([a-z0-9_-]+)\.([a-z_]+)=(.*)", item)
        if not m:
            raise ValueError(f"{flag} takes NAME.KEY=VALUE (e.g. igsp.pool_factor=3), got {item!r}")
        gen, key, raw = m.groups()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(gen, {})[key] = value
    return out


def _variants(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["igsp-bos:igsp.include_bos=true", ...]`` -> ``{"igsp-bos": {"generator": "igsp", "options": {...}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not name:
            raise ValueError(f"--variant takes NAME:GENERATOR.KEY=VALUE (e.g. igsp-nofilter:igsp.max_sample_"
                             f"aggregation=1.0), got {item!r}")
        ((gen, opts),) = _dotted([rest], "--variant").items()
        v = out.setdefault(name, {"generator": gen, "options": {}})
        if v["generator"] != gen:
            raise ValueError(f"variant {name!r} names two generators ({v['generator']}, {gen})")
        v["options"].update(opts)
    return out


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF id, local checkpoint dir, .gguf file, or smollm2-135m")
    p.add_argument("--sources", default="all", help="'all' (every source available offline), a comma list or "
                   "'none'")
    p.add_argument("--constructed", default="mix,self-cal,sgs,igsp",
                   help="constructed sets: comma list of mix, self-cal, sgs, igsp, or 'none' (default: all)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:GEN.KEY=VALUE",
                   help="an extra generated entry, repeatable (same NAME adds options), e.g. "
                        "igsp-nostrata:igsp.strata=1")
    p.add_argument("--sparsity", default="0.6", help="comma list of sparsities (default: 0.6)")
    p.add_argument("--n", type=int, default=64, help="calibration samples per entry (default: 64)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sample (default: 512)")
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds, comma list (default: 0,1,2)")
    p.add_argument("--seeded", default="c4,best:2,mix,self-cal,sgs,igsp",
                   help="entries that run every seed; best:K = the K best single sources (default: "
                        "c4,best:2,mix,self-cal,sgs,igsp)")
    p.add_argument("--pruners", default="sparsegpt,wanda", help="pruner axis: any registered method "
                   "(sparsegpt, wanda, ...), the first is the main one")
    p.add_argument("--pruner-option", action="append", default=[], metavar="PRUNER.KEY=VALUE",
                   help="a pruner's config option, repeatable, e.g. wanda.pattern=2:4")
    p.add_argument("--pruner-entries", default="sources,mix", help="entries the other pruners run (default: "
                   "sources,mix)")
    p.add_argument("--split", default="test", choices=("test", "dev"), help="study-suite items (default: test)")
    p.add_argument("--benchmarks", default=None, help="comma list of study-suite benchmarks (default: all)")
    p.add_argument("--eval-option", action="append", default=[], metavar="BENCH.FIELD=VALUE",
                   help="study-suite field, repeatable, e.g. hellaswag.test=400")
    p.add_argument("--eval-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype the models are scored in (pruning runs in fp32; default bfloat16)")
    p.add_argument("--no-dtype-check", action="store_true", help="skip the fp32 re-scoring of dense + first run")
    p.add_argument("--device", default=None, help="where the model generates, prunes and is scored: cpu, cuda, "
                   "cuda:N (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    p.add_argument("--data-dir", default=None, help="offline data folder (default: $CALIBPRUNE_DATA_DIR, ...)")
    p.add_argument("--data-source", default="offline", choices=("auto", "offline", "hub"),
                   help="where sources are read (default: offline)")
    p.add_argument("--gen-batch-size", type=int, default=16, help="generation batch for Self-Cal/SGS/IGSP")
    p.add_argument("--gen-option", action="append", default=[], metavar="GEN.KEY=VALUE",
                   help="generator keyword, repeatable, e.g. igsp.pool_factor=3 or sgs.source=c4")
    p.add_argument("--pool-dir", default=None, help="generated-pool cache (default: <out>/cache/pools)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (resumable)")
    p.add_argument("--out", default=None, help="output folder (default: results/<model name>)")
    p.add_argument("--no-plots", action="store_true", help="write report.md without the PNG plots")
    p.add_argument("--report-only", action="store_true", help="rebuild study.json + report.md from runs/")


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    return dict(sources=args.sources, constructed=args.constructed, variants=_variants(args.variant),
                sparsities=args.sparsity, n=args.n, seqlen=args.seqlen, seeds=args.seeds, seeded=args.seeded,
                pruners=args.pruners, pruner_options=_dotted(args.pruner_option, "--pruner-option"),
                pruner_entries=args.pruner_entries, split=args.split,
                benchmarks=args.benchmarks, eval_overrides=_dotted(args.eval_option, "--eval-option"),
                eval_dtype=args.eval_dtype, dtype_check=not args.no_dtype_check, n_boot=args.n_boot,
                data_dir=args.data_dir, data_source=args.data_source, gen_batch_size=args.gen_batch_size,
                generator_options=_dotted(args.gen_option, "--gen-option"), pool_dir=args.pool_dir,
                device=args.device)


def cmd_study(args: argparse.Namespace) -> int:
    from . import load_runs, plan_study, run_study, write_report
    from .records import write_json
    from .run import summarise_study

    settings = study_settings(args)
    if args.report_only:
        spec = plan_study(args.model, out_dir=args.out, **settings)
        out = Path(spec["out_dir"])
        dense, runs = load_runs(out)
        if dense is None:
            raise FileNotFoundError(f"--report-only: no study results at {out / 'runs' / 'dense.json'}")
        study = summarise_study(spec, dense, runs)
        write_json(out / "study.json", study)
        print(f"wrote {write_report(study, out, plots=not args.no_plots)}")
        return 0
    try:
        study = run_study(args.model, out_dir=args.out, plots=not args.no_plots, max_runs=args.max_runs, **settings)
    except KeyboardInterrupt:
        print("calibprune study: interrupted; finished runs are saved in runs/, run the same command again to resume",
              file=sys.stderr)
        return 130
    out = Path(study["config"]["out_dir"])
    progress = study.get("progress", {})
    print(f"study: {progress.get('done')} of {progress.get('planned')} runs in {out / 'runs'}; "
          f"{out / 'study.json'} and {out / 'report.md'} written")
    for claim, v in study.get("verdicts", {}).items():
        print(f"  {claim}: {v['verdict']} ({v['estimate']:+.2f}, 95% {v['lo']:+.2f} .. {v['hi']:+.2f})"
              if v.get("lo") is not None else f"  {claim}: {v['verdict']}")
    return 0
