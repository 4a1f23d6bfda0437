"""Command line: ``calibprune prune | calib | eval | study | bench`` (also ``python -m calibprune``).

The ``prune`` options are generated from the config dataclasses and the method registry
(:mod:`calibprune.pruning.cli_options`), so the CLI and the API cannot drift.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("calibprune")


def _parse_sources(spec: str) -> str | dict[str, float]:
    """``"c4"`` → ``"c4"``; ``"c4,gsm8k"`` → uniform mix; ``"c4:0.7,gsm8k:0.3"`` → weighted mix.

    A source named twice, a weight that is not a finite number >= 0, or weights that are all zero is an error.
    """
    import math

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("--calib is empty")
    weights: dict[str, float] = {}
    for p in parts:
        name, sep, w = (s.strip() for s in p.partition(":"))
        if not name:
            raise ValueError(f"--calib: {p!r} has no source name (use NAME or NAME:WEIGHT)")
        if name in weights:
            raise ValueError(f"--calib names {name!r} twice; give each source once (use NAME:WEIGHT to weight it)")
        try:
            weights[name] = float(w) if sep else 1.0
        except ValueError:
            raise ValueError(f"--calib: the weight of {name!r} must be a number, got {w!r}") from None
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise ValueError(f"--calib: the weight of {name!r} must be a finite number >= 0, got {w!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"--calib: the weights are all zero ({spec!r}); at least one source needs weight > 0")
    if len(weights) == 1 and not any(":" in p for p in parts):
        return parts[0]
    return weights


def _add_calib_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", default="c4",
                        help="source name, comma list (uniform mix), name:weight list, or a saved CalibrationSet .pt")
    parser.add_argument("--num-samples", "--n", dest="n", type=int, default=128,
                        help="calibration sequences (default: 128)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence (default: 2048)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: 0)")
    parser.add_argument("--data-dir", default=None, help="offline data folder (default: $CALIBPRUNE_DATA_DIR, "
                        "./shared/data or ../shared/data)")
    parser.add_argument("--data-source", default="auto", choices=("auto", "offline", "hub"),
                        help="read sources offline, from the hub, or offline when available (default: auto)")


def _preflight_calib(args: argparse.Namespace):
    """Check the calibration request without reading data; returns the parsed sources or a Path."""
    if args.calib.endswith(".pt"):
        from .calibration import CalibrationSet
        from .models import load_tokenizer

        path = Path(args.calib)
        if not path.is_file():
            raise FileNotFoundError(f"calibration set {path} not found")
        CalibrationSet.load(path)  # the file itself first (cheap), then its ids against the model's tokenizer
        CalibrationSet.load(path, vocab_size=len(load_tokenizer(args.model)))
        return path
    from .calibration import check_available

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2, got {args.seqlen}")
    spec = _parse_sources(args.calib)
    for name in [spec] if isinstance(spec, str) else spec:
        if check_available(name, data_dir=args.data_dir, source=args.data_source) == "offline":
            from .calibration import load_texts

            load_texts(name, data_dir=args.data_dir, source="offline")  # a corrupt record fails now, not after the load
    return spec


def _calibration(args: argparse.Namespace, spec, tokenizer):
    from .calibration import CalibrationSet, build_calibration

    if isinstance(spec, Path):
        return CalibrationSet.load(spec)
    return build_calibration(tokenizer, spec, n=args.n, seqlen=args.seqlen, seed=args.seed, data_dir=args.data_dir,
                             data_source=args.data_source)


def _format_sparsity(value: float | tuple[float, ...]) -> str:
    if isinstance(value, tuple):
        return f"per layer {min(value):.2%}..{max(value):.2%}"
    return f"{value:.2%}"


def cmd_prune(args: argparse.Namespace) -> int:
    from .calibration import as_token_ids
    from .calibration.calibration_set import ids_sha256
    from .evaluation import wikitext2_perplexity
    from .models import load_model, parse_dtype, resolve_model_path
    from .pruning import check_request, prune
    from .pruning.cli_options import config_from_args
    from .save import check_output_dir, save_pruned

    # Everything that can be checked without loading the model or data is checked first, then everything the
    # model decides (targets, widths, device, token ids) before the dense evaluation and the prune.
    config = config_from_args(args)
    check_output_dir(args.out, overwrite=args.overwrite)
    resolve_model_path(args.model)
    parse_dtype(args.dtype)
    spec = _preflight_calib(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    calib = _calibration(args, spec, tokenizer)
    check_request(model, calib, config)
    dense_ppl = None if args.no_eval else wikitext2_perplexity(
        model, tokenizer, seqlen=args.eval_seqlen, max_windows=args.eval_windows, data_dir=args.data_dir)
    report = prune(model, calib, config)
    pruned_ppl = None if args.no_eval else wikitext2_perplexity(
        model, tokenizer, seqlen=args.eval_seqlen, max_windows=args.eval_windows, data_dir=args.data_dir)
    extra = {"model": args.model, "calibration": getattr(calib, "provenance", {}),
             "calibration_ids_sha256": ids_sha256(as_token_ids(calib)),
             "wikitext2": {"dense_ppl": dense_ppl, "pruned_ppl": pruned_ppl, "seqlen": args.eval_seqlen,
                           "windows": args.eval_windows}}
    out = save_pruned(model, tokenizer, args.out, report, extra=extra, overwrite=args.overwrite)
    how = [config.pattern, f"numerics {config.numerics}"]
    if config.sparsity_profile != "uniform":
        how.append(f"profile {config.sparsity_profile}")
    if config.refine:
        how.append(f"refine {config.refine}")
    if report.resolved_backends:
        how.append("backends " + ", ".join(f"{k}={v}" for k, v in report.resolved_backends.items()))
    rows = [("model", args.model), ("method", f"{config.method} ({'; '.join(how)})"),
            ("calibration", f"{args.calib}: {calib.n if hasattr(calib, 'n') else len(calib)} x {args.seqlen}"),
            ("prune time", f"{report.seconds:.1f} s"), ("total time", f"{time.perf_counter() - t0:.1f} s"),
            ("target sparsity", _format_sparsity(tuple(report.layer_targets) if config.sparsity_profile != "uniform"
                                                 else config.sparsity)),
            ("achieved sparsity", f"{report.sparsity:.2%}"),
            ("WikiText-2 ppl dense", "skipped" if dense_ppl is None else f"{dense_ppl:.2f}"),
            ("WikiText-2 ppl pruned", "skipped" if pruned_ppl is None else f"{pruned_ppl:.2f}"),
            ("saved to", str(out))]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0


def cmd_calib(args: argparse.Namespace) -> int:
    from ._io import probe_writable
    from .calibration.calibration_set import calibration_paths
    from .models import load_tokenizer, parse_dtype, resolve_model_path

    out, meta = calibration_paths(args.out)  # "foo" and "foo.pt" both write foo.pt + foo.json
    for path in (out, meta):
        if path.is_dir():
            raise IsADirectoryError(f"--out {path} is a directory; give a file name such as {path / 'calib.pt'}")
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    probe_writable(out.parent, f"the output folder of {out}")
    resolve_model_path(args.model, weights=False)
    parse_dtype(args.dtype)
    spec = _preflight_calib(args)
    calib = _calibration(args, spec, load_tokenizer(args.model))
    path = calib.save(out)
    print(f"saved {calib.n} x {calib.seqlen} calibration tokens ({calib.provenance.get('counts')}) to {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import wikitext2_perplexity
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    ppl = wikitext2_perplexity(model, tokenizer, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                               data_dir=args.data_dir)
    print(f"{args.model}: WikiText-2 perplexity {ppl:.3f} ({args.eval_windows} windows of {args.eval_seqlen} tokens)")
    return 0


def _dotted_options(items: list[str], flag: str) -> dict[str, dict]:
    """``["igsp.pool_factor=3", "sgs.source=c4"]`` -> ``{"igsp": {"pool_factor": 3}, "sgs": {"source": "c4"}}``.

    Values are read as JSON when they parse (numbers, true/false, lists), else kept as strings.
    """
    import json

    out: dict[str, dict] = {}
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


def cmd_study(args: argparse.Namespace) -> int:
    from .study import plan_study, run_study, write_report

    settings = dict(sources=args.sources, constructed=args.constructed, sparsities=args.sparsity, n=args.n,
                    seqlen=args.seqlen, seed=args.seed, suite=args.suite, limit=args.limit,
                    benchmarks=args.benchmarks, data_dir=args.data_dir, data_source=args.data_source,
                    gen_batch_size=args.gen_batch_size,
                    generator_options=_dotted_options(args.gen_option, "--gen-option"),
                    eval_overrides=_dotted_options(args.eval_option, "--eval-option"))
    if args.report_only:
        import json

        spec = plan_study(args.model, out_dir=args.out, **settings)
        path = Path(spec["out_dir"]) / "study.json"
        if not path.is_file():
            raise FileNotFoundError(f"--report-only: no study results at {path}")
        report = write_report(json.loads(path.read_text()), path.parent, plots=not args.no_plots)
        print(f"wrote {report}")
        return 0
    try:
        study = run_study(args.model, out_dir=args.out, plots=not args.no_plots, **settings)
    except KeyboardInterrupt:
        print("calibprune study: interrupted; finished steps are saved, run the same command again to resume",
              file=sys.stderr)
        return 130
    out = Path(study["config"]["out_dir"])
    key = next(iter(study["spearman"]))
    rho = study["spearman"][key]["sources"]["perplexity"]
    print(f"study of {len(study['entries'])} entries written to {out / 'study.json'} and {out / 'report.md'}")
    print(f"Spearman rho(calibration perplexity, retention) at sparsity {key}, single sources: "
          + ", ".join(f"{d} {'n/a' if c['rho'] is None else format(c['rho'], '+.2f')}" for d, c in rho.items()))
    return 0


BENCHES = ("prune", "obs", "hessian", "ngram")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/bench_<name>.py`` of this source checkout with the remaining arguments."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / f"bench_{args.name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"benchmark script {script} not found: the benchmarks ship with the source "
                                "checkout (git clone + pip install -e .), not with the installed package")
    cmd = [sys.executable, str(script), *args.args]
    log.info("running %s", " ".join(cmd))
    return subprocess.call(cmd, cwd=root)


def build_parser() -> argparse.ArgumentParser:
    from .pruning.cli_options import add_prune_options

    parser = argparse.ArgumentParser(prog="calibprune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="HF id, local checkpoint dir, .gguf file, or smollm2-135m")
        p.add_argument("--dtype", default=None, help="torch dtype name (default: fp32 on CPU)")

    def eval_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--eval-seqlen", type=int, default=512, help="WikiText-2 window length (default: 512)")
        p.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 windows (default: 16)")

    p = sub.add_parser("prune", help="prune a model and save it with a calibprune.json sidecar")
    model_options(p)
    _add_calib_options(p)
    add_prune_options(p)
    eval_options(p)
    p.add_argument("--no-eval", action="store_true", help="skip the dense/pruned WikiText-2 perplexity")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("calib", help="build a calibration set and save it (.pt + .json provenance)")
    model_options(p)
    _add_calib_options(p)
    p.add_argument("--out", required=True, help="output .pt path")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_calib)

    p = sub.add_parser("eval", help="WikiText-2 perplexity of a model")
    model_options(p)
    eval_options(p)
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("study", help="calibration study: every source + mix / Self-Cal / SGS / IGSP -> OIT metrics, "
                       "prune, per-capability retention, Spearman; resumable")
    p.add_argument("--model", required=True, help="HF id, local checkpoint dir, .gguf file, or smollm2-135m")
    p.add_argument("--sources", default="all", help="'all' (every source available offline) or a comma list")
    p.add_argument("--constructed", default=",".join(("mix", "self-cal", "sgs", "igsp")),
                   help="constructed sets to add: comma list of mix, self-cal, sgs, igsp, or 'none' (default: all)")
    p.add_argument("--sparsity", default="0.6", help="comma list of sparsities (default: 0.6)")
    p.add_argument("--n", type=int, default=64, help="calibration samples per entry (default: 64)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sample (default: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite", default="lite", choices=("lite", "paper"), help="evaluation suite (default: lite)")
    p.add_argument("--limit", type=int, default=None, help="items per benchmark (default: the suite's)")
    p.add_argument("--benchmarks", default=None, help="comma list of benchmarks (default: the suite's)")
    p.add_argument("--eval-option", action="append", default=[], metavar="BENCH.KEY=VALUE",
                   help="benchmark option, repeatable, e.g. mmlu.limit=100 or wikitext2.max_windows=8")
    p.add_argument("--data-dir", default=None, help="offline data folder (default: $CALIBPRUNE_DATA_DIR, ...)")
    p.add_argument("--data-source", default="offline", choices=("auto", "offline", "hub"),
                   help="where sources are read (default: offline)")
    p.add_argument("--gen-batch-size", type=int, default=16, help="generation batch for Self-Cal/SGS/IGSP")
    p.add_argument("--gen-option", action="append", default=[], metavar="GEN.KEY=VALUE",
                   help="generator keyword, repeatable, e.g. igsp.pool_factor=3 or sgs.source=c4")
    p.add_argument("--out", default=None, help="output folder (default: results/<model name>)")
    p.add_argument("--no-plots", action="store_true", help="write report.md without the PNG plots")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from an existing study.json")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("bench", help="run a benchmark script of the source checkout (prints a table, writes "
                       "benchmarks/results/)", description="Arguments after the name go to the script, e.g. "
                       "calibprune bench obs --quick; see python benchmarks/bench_<name>.py -h.")
    p.add_argument("name", choices=BENCHES)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, ImportError, PermissionError,
            NotADirectoryError, IsADirectoryError, KeyError) as exc:
        if args.verbose:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"calibprune {args.command}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
