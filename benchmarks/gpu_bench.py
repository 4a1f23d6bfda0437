"""GPU benchmarks of issue 9 item 11, with correctness columns, one stage per process (``benchmarks/gpu_check.sh``).

Stages (``--stage``):

* ``hessian`` — ``hessian_update`` at d ∈ {4096, 14336} with 128×2048 tokens (X in bf16; fp32 too at 4096). The
  14336-wide X has 3.8·10⁹ elements: past int32 offsets. Providers: the reference ``add_batch``, the torch,
  Triton and CUDA backends, each also with ``numerics="fast"`` (upper triangle + one mirror). Columns: time,
  speed-up over the reference, useful TFLOP/s (t·d·(d+1) flops of XᵀX), relative error against the torch reference
  on the same GPU and against an fp64 truth (on the first and last 64 rows of H).
* ``obs`` — ``obs_prune`` at Llama-3-8B shapes (q/o 4096×4096, gate/up 14336×4096, down 4096×14336; 2:4 on
  4096×4096). Columns: time, speed-up over the reference ``fasterprune``, mask agreement and reconstruction-error
  difference against the torch reference on the same GPU (the contract of ``calibprune.ops.contract``) and against
  the reference run in fp64. The O(cols³) inverse factor is timed alone too (rows ``factor:chol_inverse`` and
  ``factor:reversed``), so each row also gives its in-block loop's time and speed-up without the factor.
* ``e2e`` — a random-initialised Llama-3-8B-shaped model (2 decoder layers, bf16) pruned at 60% from 32×2048
  random tokens: the reference pipeline, the fused one, and ``numerics="fast"`` when the prune API takes it.
  Columns: seconds, speed-up, achieved sparsity, mask agreement with the reference run; no quality (random weights
  and tokens: every row says so). Then one profiled fused prune on a quarter of the tokens: its top kernels.
* ``roofline`` — the device's bf16 and fp32 GEMM rates (8192³, random data) and device-to-device copy bandwidth.

``--dry`` runs every stage on CPU at tiny shapes (plumbing only, no meaningful numbers). Rows are appended as JSON
lines (device, driver, torch/Triton/CUDA versions in each) to ``--out``.

    python benchmarks/gpu_bench.py --stage hessian --out bench.jsonl [--dry]
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, measure, print_table, write_rows  # noqa: E402

from calibprune.ops import (  # noqa: E402
    available_backends,
    check_contract,
    hessian_finalize,
    hessian_update,
    hessian_update_reference,
    inverse_factor,
    mask_agreement,
    obs_prune,
    obs_prune_reference,
    reconstruction_error,
)

STAGES = ("hessian", "obs", "e2e", "roofline")
# Where rows go, written as each is measured: a stage stopped by its time limit keeps what it finished.
_OUT: str | None = None


def _device(dry: bool) -> torch.device:
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device (use --dry for the CPU plumbing run)")
    return torch.device("cuda")


def _providers(device: torch.device, candidates: tuple[str, ...]) -> list[str]:
    avail = set(available_backends(device))
    if device.type == "cpu":
        avail.discard("triton")  # the interpreter is not a provider
    found = ["reference"]
    for numerics in ("", "+fast"):
        found += [b + numerics for b in candidates if b in avail]
    return found


def _split(provider: str) -> tuple[str, str]:
    backend, _, fast = provider.partition("+")
    return backend, "fast" if fast else "reference"


def _row(stage: str, provider: str, env: dict, **fields) -> dict:
    return {"bench": f"gpu_{stage}", "provider": provider, **fields, **env}


def _guarded(rows: list[dict], stage: str, provider: str, env: dict, fn: Callable[[], dict], **ident) -> None:
    """Run one provider and write its row at once; an exception becomes a row with the error (the stage goes on
    unless the CUDA context is poisoned)."""
    try:
        row = _row(stage, provider, env, **ident, **fn())
    except Exception as exc:  # noqa: BLE001 - recorded, reported in the summary
        print(f"[{stage}] {provider} {ident} FAILED: {exc!r}", flush=True)
        traceback.print_exc()
        row = _row(stage, provider, env, **ident, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        if torch.cuda.is_available() and "CUDA error" in str(exc):
            rows.append(row)
            _write(stage, row)
            raise
    rows.append(row)
    _write(stage, row)


def _write(stage: str, row: dict) -> None:
    if _OUT is not None:
        write_rows(f"gpu_{stage}", [row], _OUT)


# --- hessian ---------------------------------------------------------------------------------------------------------

def _fp64_slab_truth(X2d: torch.Tensor, rows: slice, alpha: float, chunk: int = 32768) -> torch.Tensor:
    """α·(XᵀX)[rows] in fp64, accumulated over token chunks (never a full fp64 copy of X)."""
    d = X2d.shape[1]
    truth = torch.zeros(rows.stop - rows.start, d, dtype=torch.float64, device=X2d.device)
    for t0 in range(0, X2d.shape[0], chunk):
        c = X2d[t0:t0 + chunk].double()
        truth += c[:, rows].t() @ c
    return truth * alpha


def bench_hessian(device: torch.device, dry: bool, env: dict) -> list[dict]:
    cases = [(2, 16, 96, torch.bfloat16), (2, 16, 96, torch.float32)] if dry else \
        [(128, 2048, 4096, torch.bfloat16), (128, 2048, 4096, torch.float32), (128, 2048, 14336, torch.bfloat16)]
    rows: list[dict] = []
    for b, t, d, dtype in cases:
        gen = torch.Generator(device=device).manual_seed(d)
        X = torch.randn(b, t, d, generator=gen, device=device, dtype=dtype)
        H0 = torch.randn(d, d, generator=gen, device=device) / d
        H0 = H0 @ H0.t()
        nsamples = 0  # one calibration batch of b sequences: H = 0·H0 + 2/b·XᵀX
        expected = H0.clone()
        hessian_update_reference(expected, X, nsamples)
        X2d = X.reshape(-1, d)
        slabs = [slice(0, min(64, d)), slice(max(d - 64, 0), d)]
        truths = [_fp64_slab_truth(X2d, s, 2.0 / b) for s in slabs]
        repeats = 2 if d > 8192 else 3
        ref_p50 = None
        useful = float(b * t) * d * (d + 1)  # flops of XᵀX counted once per symmetric pair
        state: dict[str, torch.Tensor] = {}
        for provider in _providers(device, ("torch", "triton", "cuda")):
            backend, numerics = _split(provider)

            def setup() -> None:
                state["H"] = H0.clone()

            if provider == "reference":
                def fn():
                    hessian_update_reference(state["H"], X, nsamples)
            else:
                def fn(backend=backend, numerics=numerics):
                    hessian_update(state["H"], X, nsamples, backend=backend, numerics=numerics)
                    hessian_finalize(state["H"], numerics=numerics)

            def run(fn=fn, provider=provider) -> dict:
                nonlocal ref_p50
                tm = measure(fn, device=device, warmup=1, repeats=1 if dry else repeats, setup=setup)
                H = state["H"]
                if provider == "reference":
                    ref_p50 = tm["p50"]
                rel_ref = ((H - expected).norm() / expected.norm()).item()
                rel_fp64 = max(((H[s].double() - tr).norm() / tr.norm()).item() for s, tr in zip(slabs, truths))
                return {**tm, "speedup_vs_reference": (ref_p50 / tm["p50"]) if ref_p50 else None,
                        "useful_tflops": useful / tm["p50"] / 1e12, "rel_err_vs_gpu_reference": rel_ref,
                        "rel_err_vs_fp64": rel_fp64, "int32_overflow_case": b * t * d >= 2**31}

            _guarded(rows, "hessian", provider, env, run, shape=f"{b}x{t}x{d}", dtype=str(dtype).split(".")[-1])
            state.clear()
        X = X2d = expected = truths = None  # free the activations before the next (wider) case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["shape", "dtype", "provider", "p50", "speedup_vs_reference", "useful_tflops",
                       "rel_err_vs_gpu_reference", "rel_err_vs_fp64", "error"])
    return rows


# --- obs -------------------------------------------------------------------------------------------------------------

def realistic_hessian(cols: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """2/n·XᵀX of correlated inputs (a random mixing plus identity), n = max(2·cols, 256) tokens."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = max(2 * cols, 256)
    mix = torch.randn(cols, cols, generator=gen, device=device) / cols**0.5
    mix.diagonal().add_(1.0)
    X = torch.randn(tokens, cols, generator=gen, device=device) @ mix
    return 2 * X.t() @ X / tokens


def bench_obs(device: torch.device, dry: bool, env: dict) -> list[dict]:
    cases = [(48, 96, 32, 0, 0), (48, 96, 32, 2, 4)] if dry else \
        [(4096, 4096, 128, 0, 0), (4096, 4096, 128, 2, 4), (14336, 4096, 128, 0, 0), (4096, 14336, 128, 0, 0)]
    rows: list[dict] = []
    for r, c, bs, n, m in cases:
        gen = torch.Generator(device=device).manual_seed(r + c)
        W0 = torch.randn(r, c, generator=gen, device=device)
        H = realistic_hessian(c, device, seed=c)
        pattern = f"{n}:{m}" if n else "unstructured"
        kw = dict(prune_n=n, prune_m=m, blocksize=bs)
        # fp64 truth: the reference algorithm in float64 on the same device.
        W64 = W0.double()
        mask64, _ = obs_prune_reference(W64, H.double(), 0.6, **kw)
        err64 = reconstruction_error(W0, W64.float(), H)
        ref: dict[str, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        ref_p50 = None
        # The O(cols³) inverse factor every provider pays before its in-block loop, timed alone, so the OBS rows
        # can say how much of their time is the loop (the kernels' part) and how much the factor.
        factor_p50: dict[str, float] = {}
        for numerics, method in (("reference", "chol_inverse"), ("fast", "reversed")):
            def factor(method=method):
                inverse_factor(state["H"], 0.01, method=method)

            def run_factor(factor=factor, numerics=numerics) -> dict:
                tm = measure(factor, device=device, warmup=1, repeats=1 if dry else 2,
                             setup=lambda: state.update(H=H.clone()))
                factor_p50[numerics] = tm["p50"]
                return tm

            _guarded(rows, "obs", f"factor:{method}", env, run_factor, shape=f"{r}x{c}", pattern=pattern,
                     blocksize=bs, sparsity=None if n else 0.6)
        for provider in _providers(device, ("torch", "cpp", "triton", "cuda")):
            backend, numerics = _split(provider)

            def setup() -> None:
                state["W"], state["H"] = W0.clone(), H.clone()

            if provider == "reference":
                def fn():
                    state["mask"] = obs_prune_reference(state["W"], state["H"], 0.6, **kw)[0]
            else:
                def fn(backend=backend, numerics=numerics):
                    state["mask"] = obs_prune(state["W"], state["H"], 0.6, backend=backend, numerics=numerics,
                                              **kw)

            def run(fn=fn, provider=provider) -> dict:
                nonlocal ref_p50
                tm = measure(fn, device=device, warmup=1, repeats=1 if (dry or c > 8192) else 2, setup=setup)
                if provider == "reference":
                    ref_p50 = tm["p50"]
                    ref["W"], ref["mask"] = state["W"].clone(), state["mask"].clone()
                result = check_contract(W0, H, ref["W"], ref["mask"], state["W"], state["mask"])
                err = reconstruction_error(W0, state["W"], H)
                own, ref_factor = factor_p50.get(numerics), factor_p50.get("reference")
                in_block = tm["p50"] - own if own is not None else None
                ref_in_block = ref_p50 - ref_factor if ref_factor is not None else None
                return {**tm, "speedup_vs_reference": ref_p50 / tm["p50"],
                        "factor_p50": own, "in_block_p50": in_block,
                        "in_block_speedup_vs_reference": (ref_in_block / in_block
                                                          if in_block and ref_in_block and in_block > 0 else None),
                        "mask_agreement_vs_gpu_reference": result.mask_agreement,
                        "recon_rel_diff_vs_gpu_reference": result.recon_rel_diff, "contract_ok": result.ok,
                        "bitwise_equal_gpu_reference": bool(torch.equal(state["W"], ref["W"])),
                        "mask_agreement_vs_fp64": mask_agreement(state["mask"], mask64),
                        "recon_rel_diff_vs_fp64": (err - err64) / err64 if err64 else None}

            _guarded(rows, "obs", provider, env, run, shape=f"{r}x{c}", pattern=pattern, blocksize=bs,
                     sparsity=None if n else 0.6)
            state.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["shape", "pattern", "provider", "p50", "in_block_p50", "speedup_vs_reference",
                       "in_block_speedup_vs_reference", "mask_agreement_vs_gpu_reference",
                       "recon_rel_diff_vs_gpu_reference", "contract_ok", "mask_agreement_vs_fp64", "error"])
    return rows


# --- end to end ------------------------------------------------------------------------------------------------------

def llama3_8b_shaped(device: torch.device, dry: bool, layers: int = 4):
    """A random-initialised Llama-3-8B-shaped causal LM (``layers`` decoder layers), built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if dry:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=layers, vocab_size=256, max_position_embeddings=64)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                          num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=8192,
                          rope_theta=500000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    dtype = torch.float32 if dry else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def _call_prune(fn: Callable, model, calib, **kwargs):
    """Call a prune entry point with the keyword arguments its signature takes; ``None`` if one it needs is absent
    (e.g. ``numerics`` before the prune API grew it)."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [k for k in kwargs if k not in params and not takes_any]
    if missing:
        return None, f"{fn.__name__} takes no {missing}"
    try:
        return fn(model, calib, **kwargs), None
    except TypeError as exc:
        if "unexpected keyword" in str(exc) or "got an unexpected" in str(exc):
            return None, f"{fn.__name__}: {exc}"
        raise


def _zero_masks(model) -> dict[str, torch.Tensor]:
    from calibprune.pruning import find_decoder_layers

    _, layers = find_decoder_layers(model)
    return {f"{i}.{name}": (mod.weight == 0).cpu() for i, layer in enumerate(layers)
            for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}


def bench_e2e(device: torch.device, dry: bool, env: dict) -> list[dict]:
    import calibprune

    n, seqlen = (4, 32) if dry else (32, 2048)
    dense = llama3_8b_shaped(device, dry, layers=2)  # 2 layers: the three timed prunes fit the stage's cap
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, dense.config.vocab_size, (n, seqlen), generator=gen)
    runs = [("reference", calibprune.prune_sparsegpt_reference, {"batch_size": 1}),
            ("fused", calibprune.prune_sparsegpt_fused, {"batch_size": 1}),
            ("fast", calibprune.prune_sparsegpt_fused, {"batch_size": 8, "numerics": "fast"})]
    rows: list[dict] = []
    ref_masks, ref_seconds = None, None
    for label, fn, extra in runs:
        dense.load_state_dict(dense_state)

        def run(fn=fn, extra=extra, label=label) -> dict:
            nonlocal ref_masks, ref_seconds
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            report, why = _call_prune(fn, dense, calib, sparsity=0.6, device=str(device), **extra)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if report is None:
                return {"skipped": why}
            masks = _zero_masks(dense)
            if label == "reference":
                ref_masks, ref_seconds = masks, seconds
            agree = None
            if ref_masks is not None:
                same = sum(int((masks[k] == ref_masks[k]).sum()) for k in masks)
                agree = same / sum(v.numel() for v in masks.values())
            rel = [m.rel_error for m in report.modules if getattr(m, "rel_error", None) is not None]
            return {"seconds": seconds, "speedup_vs_reference": ref_seconds / seconds if ref_seconds else None,
                    "sparsity": report.sparsity, "mask_agreement_vs_reference": agree,
                    "mean_rel_error": sum(rel) / len(rel) if rel else None,
                    "resolved_backends": getattr(report, "resolved_backends", None),
                    "phase_seconds": getattr(report, "phase_seconds", None)}

        _guarded(rows, "e2e", label, env, run, layers=dense.config.num_hidden_layers, calib=f"{n}x{seqlen}",
                 model="llama3-8b-shaped" if not dry else "tiny-llama", quality=E2E_QUALITY,
                 **{k: v for k, v in extra.items()})
    # Where the fused prune's device time goes: the top kernels of a profiled run on a quarter of the tokens (a
    # separate run, so the timed rows above carry no profiler overhead).
    dense.load_state_dict(dense_state)
    _guarded(rows, "e2e", "profile:fused", env, lambda: _profile_prune(calibprune.prune_sparsegpt_fused, dense,
                                                                        calib[: max(1, n // 4)], device),
             layers=dense.config.num_hidden_layers, calib=f"{max(1, n // 4)}x{seqlen}")
    print_table(rows, ["provider", "seconds", "speedup_vs_reference", "sparsity", "mask_agreement_vs_reference",
                       "mean_rel_error", "skipped", "error"])
    return rows


#: what the e2e rows can and cannot say
E2E_QUALITY = "not measured: random weights and random tokens (times, sparsity and mask agreement only)"


def _profile_prune(fn: Callable, model, calib, device: torch.device, top: int = 8) -> dict:
    """Prune under ``torch.profiler``; the ``top`` kernels (operators on CPU) by their own device time."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn(model, calib, sparsity=0.6, device=str(device), batch_size=1)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def own_us(e) -> float:
        for attr in (("self_device_time_total", "self_cuda_time_total") if device.type == "cuda"
                     else ("self_cpu_time_total",)):
            if hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0

    events = sorted(prof.key_averages(), key=own_us, reverse=True)
    total = sum(own_us(e) for e in events) or 1.0
    return {"top_kernels": [{"name": e.key[:120], "seconds": own_us(e) / 1e6, "share": own_us(e) / total,
                             "calls": e.count} for e in events[:top]],
            "profiled_seconds": total / 1e6}


# --- roofline --------------------------------------------------------------------------------------------------------

def _timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    for _ in range(2):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def bench_roofline(device: torch.device, dry: bool, env: dict) -> list[dict]:
    rows = []
    n = 256 if dry else 8192
    reps = 2 if dry else 10
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for dtype in (torch.bfloat16, torch.float32):
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            s = _timed(lambda a=a, b=b: a @ b, device, reps)
            rows.append(_row("roofline", f"gemm_{str(dtype).split('.')[-1]}", env, shape=f"{n}^3", seconds=s,
                             tflops=2 * n**3 / s / 1e12))
            _write("roofline", rows[-1])
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    nbytes = (64 if dry else 4096) * 2**20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    s = _timed(lambda: dst.copy_(src), device, reps)
    rows.append(_row("roofline", "copy", env, bytes=2 * nbytes, seconds=s, tb_per_s=2 * nbytes / s / 1e12))
    _write("roofline", rows[-1])
    print_table(rows, ["provider", "shape", "seconds", "tflops", "tb_per_s"])
    return rows


def main(stage: str, out: str, dry: bool) -> list[dict]:
    global _OUT
    _OUT = out
    device = _device(dry)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference numerics are plain fp32
    env = {**environment(device), "dry_run": dry}
    fn = {"hessian": bench_hessian, "obs": bench_obs, "e2e": bench_e2e, "roofline": bench_roofline}[stage]
    t0 = time.perf_counter()
    rows = fn(device, dry, env)
    print(f"[{stage}] {len(rows)} rows in {time.perf_counter() - t0:.1f} s, appended to {out}", flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--out", required=True, help="JSONL file the rows are appended to")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes: plumbing only")
    args = parser.parse_args()
    main(args.stage, args.out, args.dry)
