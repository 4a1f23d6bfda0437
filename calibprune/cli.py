"""Command line: ``calibprune prune | calib | eval | study | bench`` (also ``python -m calibprune``).

The ``prune`` options are generated from the config dataclasses and the method registry
(:mod:`calibprune.pruning.cli_options`), so the CLI and the API cannot drift.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
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
                        help="source name, comma list (uniform mix), name:weight list, a saved CalibrationSet .pt, or "
                             "a set the model generates: self-cal, sgs, igsp")
    parser.add_argument("--gen-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option of the generator named by --calib (repeatable), e.g. pool_factor=3")
    parser.add_argument("--gen-batch-size", type=int, default=16,
                        help="generation batch for self-cal / sgs / igsp (default: 16)")
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
    from .calibration import GENERATORS, check_available

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2, got {args.seqlen}")
    if args.calib in GENERATORS:
        return _Generated(args.calib, _generator_options(args))
    if args.gen_option:
        raise ValueError(f"--gen-option is for a generated set (--calib {' | '.join(GENERATORS)}), not {args.calib!r}")
    spec = _parse_sources(args.calib)
    for name in [spec] if isinstance(spec, str) else spec:
        if check_available(name, data_dir=args.data_dir, source=args.data_source) == "offline":
            from .calibration import load_texts

            load_texts(name, data_dir=args.data_dir, source="offline")  # a corrupt record fails now, not after the load
    return spec


@dataclasses.dataclass(frozen=True)
class _Generated:
    """A calibration set the dense model generates: the generator's name and its options."""

    name: str
    options: dict


def _generator_options(args: argparse.Namespace) -> dict:
    """``--gen-option KEY=VALUE`` items, values read as JSON when they parse, checked against the generator."""
    import inspect
    import json

    from .calibration import GENERATORS

    generator = GENERATORS[args.calib]
    allowed = {p for p in inspect.signature(generator).parameters
               if p not in ("model", "tokenizer", "n", "seqlen", "seed", "batch_size", "progress")}
    options: dict = {}
    for item in args.gen_option:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--gen-option takes KEY=VALUE, got {item!r}")
        if key not in allowed:
            raise ValueError(f"{args.calib} has no option {key!r}; it takes: {', '.join(sorted(allowed))}")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    if args.gen_batch_size < 1:
        raise ValueError(f"--gen-batch-size must be >= 1, got {args.gen_batch_size}")
    if args.calib == "sgs":
        options.setdefault("data_dir", args.data_dir)
        options.setdefault("data_source", args.data_source)
    return options


def _calibration(args: argparse.Namespace, spec, tokenizer, model=None):
    from .calibration import GENERATORS, CalibrationSet, build_calibration

    if isinstance(spec, Path):
        return CalibrationSet.load(spec)
    if isinstance(spec, _Generated):
        return GENERATORS[spec.name](model, tokenizer, n=args.n, seqlen=args.seqlen, seed=args.seed,
                                     batch_size=args.gen_batch_size, **spec.options)
    return build_calibration(tokenizer, spec, n=args.n, seqlen=args.seqlen, seed=args.seed, data_dir=args.data_dir,
                             data_source=args.data_source)


def _format_sparsity(value: float | tuple[float, ...]) -> str:
    if isinstance(value, tuple):
        return f"per layer {min(value):.2%}..{max(value):.2%}"
    return f"{value:.2%}"


def _preflight_config(config) -> None:
    """What the config asks of this machine (device, op backends), checked before the model loads."""
    from .pruning.device import resolve_device
    from .pruning.registry import METHODS, REFINERS

    try:
        device = resolve_device(config)
        METHODS[config.method](config).resolve(device)
        if config.refine:
            REFINERS[config.refine](config.refine_options, config).resolve(device)
    except RuntimeError as exc:  # unavailable here: bad input for this machine, not a crash
        raise ValueError(str(exc)) from exc


def cmd_prune(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .pruning.distributed import init_from_env

    # Under torchrun: one process group, one rank per GPU (gloo on CPU); every rank runs this command, rank 0 alone
    # evaluates, prints and writes the output.
    ctx, device = init_from_env(getattr(args, "cfg__device", None))
    if ctx is not None:
        args.cfg__device = device
        if not ctx.is_main:
            logging.getLogger().setLevel(logging.WARNING)
    try:
        return _prune_and_save(args, ctx)
    finally:
        if ctx is not None and dist.is_initialized():
            dist.destroy_process_group()


def _prune_and_save(args: argparse.Namespace, ctx) -> int:
    from .calibration import GENERATORS, as_token_ids
    from .calibration.calibration_set import ids_sha256
    from .evaluation import wikitext2_perplexity
    from .models import checkpoint_folder, load_model, load_tokenizer, parse_dtype, resolve_model_path
    from .pruning import check_request
    from .pruning.cli_options import config_from_args
    from .pruning.device import resolve_device
    from .pruning.streaming import load_streamed, prune_and_save
    from .save import check_output_dir

    # Everything that can be checked without loading the model or data is checked first, then everything the
    # model decides (targets, widths, device, token ids) before the dense evaluation and the prune.
    main = ctx is None or ctx.is_main
    config = config_from_args(args)
    _preflight_config(config)
    check_output_dir(args.out, overwrite=args.overwrite)
    kind, where = resolve_model_path(args.model)
    dtype = parse_dtype(args.dtype)
    if args.stream and args.calib in GENERATORS:
        raise ValueError(f"--calib {args.calib} needs the whole model to generate the set; build it first with "
                         "calibprune calib (it loads the model once) and give the .pt file, or drop --stream")
    spec = _preflight_calib(args)
    t0 = time.perf_counter()
    if args.stream:
        tokenizer = load_tokenizer(args.model)
        model = load_streamed(checkpoint_folder(args.model), dtype=dtype, device=resolve_device(config))
        model.calibprune_source = {"reference": args.model, "kind": kind, "path": where}
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
    calib = _calibration(args, spec, tokenizer, model)
    check_request(model, calib, config)
    evaluate = not args.no_eval and not args.stream and main
    dense_ppl = None if not evaluate else wikitext2_perplexity(
        model, tokenizer, seqlen=args.eval_seqlen, max_windows=args.eval_windows, data_dir=args.data_dir)
    skipped = "skipped (--stream)" if args.stream else "skipped"

    evaluated: dict = {}

    def after_prune(pruned, report) -> dict:
        evaluated["pruned_ppl"] = None if not evaluate else wikitext2_perplexity(
            pruned, tokenizer, seqlen=args.eval_seqlen, max_windows=args.eval_windows, data_dir=args.data_dir)
        return {"wikitext2": {"dense_ppl": dense_ppl, "pruned_ppl": evaluated["pruned_ppl"],
                              "seqlen": args.eval_seqlen, "windows": args.eval_windows}}

    extra = {"model": args.model, "calibration": getattr(calib, "provenance", {}),
             "calibration_ids_sha256": ids_sha256(as_token_ids(calib))}
    report = prune_and_save(model, calib, config, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                            extra=extra, after_prune=after_prune)
    if not main:
        return 0
    out, pruned_ppl = Path(args.out), evaluated.get("pruned_ppl")
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
            ("WikiText-2 ppl dense", skipped if dense_ppl is None else f"{dense_ppl:.2f}"),
            ("WikiText-2 ppl pruned", skipped if pruned_ppl is None else f"{pruned_ppl:.2f}"),
            ("saved to", str(out))]
    if ctx is not None:
        rows.insert(4, ("ranks", f"{ctx.world} ({ctx.backend})"))
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
    if isinstance(spec, _Generated):  # the dense model writes the set itself
        from .models import load_model

        model, tokenizer = load_model(args.model, dtype=args.dtype)
        calib = _calibration(args, spec, tokenizer, model)
    else:
        calib = _calibration(args, spec, load_tokenizer(args.model))
    path = calib.save(out)
    what = calib.provenance.get("counts") or calib.provenance.get("method") or calib.provenance.get("kind")
    print(f"saved {calib.n} x {calib.seqlen} calibration tokens ({what}) to {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import wikitext2_perplexity
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    ppl = wikitext2_perplexity(model, tokenizer, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                               data_dir=args.data_dir)
    print(f"{args.model}: WikiText-2 perplexity {ppl:.3f} ({args.eval_windows} windows of {args.eval_seqlen} tokens)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study.cli import cmd_study as run

    return run(args)


BENCHES = ("prune", "quality", "obs", "hessian", "ngram")


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


LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_logging_options(parser: argparse.ArgumentParser, default) -> None:
    """-v / -q / --log-level, on the top-level parser and on every sub-command (``default`` SUPPRESS, so a flag
    given in either place is kept and an absent one leaves the other's value)."""
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="debug logging (a handled error's traceback included)")
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")
    group.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower, default=default,
                       help="the logging level (default: info); overrides -v and -q")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default,
                       help="progress bars (default: only when stderr is a terminal)")


def log_level(args: argparse.Namespace) -> int:
    """The logging level the parsed options ask for: --log-level, else -v (debug), else -q (warning), else info."""
    name = getattr(args, "log_level", None)
    if name is None:
        name = "debug" if getattr(args, "verbose", False) else "warning" if getattr(args, "quiet", False) else "info"
    return getattr(logging, name.upper())


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .pruning.cli_options import add_prune_options

    parser = argparse.ArgumentParser(prog="calibprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"calibprune {__version__}")
    _add_logging_options(parser, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # taken after the sub-command too: `calibprune prune -q ...`
    _add_logging_options(common, argparse.SUPPRESS)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="HF id, local checkpoint dir, .gguf file, or smollm2-135m")
        p.add_argument("--dtype", default=None, help="torch dtype name (default: fp32 on CPU)")

    def eval_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--eval-seqlen", type=int, default=512, help="WikiText-2 window length (default: 512)")
        p.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 windows (default: 16)")

    p = sub.add_parser("prune", parents=[common], help="prune a model and save it with a calibprune.json sidecar")
    model_options(p)
    _add_calib_options(p)
    add_prune_options(p)
    eval_options(p)
    p.add_argument("--no-eval", action="store_true", help="skip the dense/pruned WikiText-2 perplexity")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--stream", action="store_true",
                   help="load one decoder layer at a time from the checkpoint (models larger than RAM; the "
                        "WikiText-2 evaluation is skipped)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("calib", parents=[common],
                       help="build a calibration set and save it (.pt + .json provenance)")
    model_options(p)
    _add_calib_options(p)
    p.add_argument("--out", required=True, help="output .pt path")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_calib)

    p = sub.add_parser("eval", parents=[common], help="WikiText-2 perplexity of a model")
    model_options(p)
    eval_options(p)
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("study", parents=[common],
                       help="calibration study: sources, mix, Self-Cal, SGS, IGSP x seeds x pruners -> OIT "
                            "metrics, per-capability retention with intervals, Spearman, verdicts; resumable")
    from .study.cli import add_study_arguments

    add_study_arguments(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("bench", parents=[common],
                       help="run a benchmark script of the source checkout (prints a table, writes "
                            "benchmarks/results/)",
                       description="Arguments after the name go to the script, e.g. calibprune bench obs --quick; "
                                   "see python benchmarks/bench_<name>.py -h.")
    p.add_argument("name", choices=BENCHES)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ._progress import cli_progress
    from .pruning.distributed import RankFailure

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=log_level(args), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    progress = getattr(args, "progress", None)
    try:
        with cli_progress(sys.stderr.isatty() if progress is None else progress):
            return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, ImportError, PermissionError,
            NotADirectoryError, IsADirectoryError, KeyError, RankFailure) as exc:
        log.debug("the handled error's traceback (-v / --log-level debug):", exc_info=True)
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"calibprune {args.command}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
