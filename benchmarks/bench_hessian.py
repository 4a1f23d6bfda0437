"""Benchmark ``hessian_update`` (running-average SparseGPT Hessian, H ← β·H + α·XᵀX) across backends.

Providers: ``reference`` (IST-DASLab add_batch), ``torch``, ``triton`` and ``cuda`` (GPU only; the Triton
interpreter on CPU is not a meaningful provider), each also as ``<backend>+fast`` (``numerics="fast"``: the upper
triangle only, plus the one mirror of ``hessian_finalize``, timed together). Shapes: SmolLM2-135M widths with
32×512 tokens on CPU, Llama-3-8B widths with 128×2048 tokens on GPU; X in fp32 and bf16. Providers are timed
round-robin (``measure_interleaved``); each row records p20/p50/p80 seconds, the speed-up over the reference (median
of per-round ratios) and the relative error against the reference's H.

``--variants`` times the CPU candidates for the fast update instead (the choice in ``hessian/torch_impl.py``):
one full ``addmm_(beta, alpha)``, and upper-triangle row blocks of 128/256/512 rows.

    python benchmarks/bench_hessian.py [--device cpu|cuda] [--repeats 5] [--quick] [--variants]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, measure_interleaved, print_table, write_rows  # noqa: E402

from calibprune.ops import (  # noqa: E402
    available_backends,
    hessian_finalize,
    hessian_update,
    hessian_update_reference,
)
from calibprune.ops.hessian.torch_impl import hessian_update_torch_fast  # noqa: E402

CPU_CASES = [(32, 512, 576), (32, 512, 1536)]          # (sequences, tokens per sequence, d): SmolLM2-135M
GPU_CASES = [(128, 2048, 4096), (128, 2048, 14336)]    # Llama-3-8B
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def providers(device: torch.device) -> list[str]:
    found = ["reference", "torch"]
    avail = available_backends(device)
    for name in ("triton", "cuda"):
        if name in avail and not (name == "triton" and device.type == "cpu"):
            found.append(name)
    return found + [p + "+fast" for p in found if p != "reference"]


def main(device: str = "cpu", repeats: int = 5, quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = GPU_CASES if dev.type == "cuda" else CPU_CASES
    if quick:
        cases, repeats = cases[:1], min(repeats, 2)
    env = environment(dev)
    rows_out: list[dict] = []
    for b, t, d in cases:
        gen = torch.Generator(device="cpu").manual_seed(d)
        A = torch.randn(d, d, generator=gen)
        H0 = (A @ A.t() / d).to(dev)
        for dname, dtype in DTYPES.items():
            # Built directly on the device so the 14336-wide GPU case never needs a host copy of X.
            X = torch.randn(b, t, d, device=dev, dtype=dtype)
            state: dict[str, torch.Tensor] = {}

            def setup() -> None:
                state["H"] = H0.clone()

            expected = H0.clone()
            hessian_update_reference(expected, X, 7)
            fns, errors = {}, {}
            for provider in providers(dev):
                backend, _, fast = provider.partition("+")
                numerics = "fast" if fast else "reference"
                if provider == "reference":
                    def fn():
                        return hessian_update_reference(state["H"], X, 7)
                else:
                    def fn(backend=backend, numerics=numerics):
                        hessian_update(state["H"], X, 7, backend=backend, numerics=numerics)
                        return hessian_finalize(state["H"], numerics=numerics)
                setup()
                fn()  # warm-up, and the result to check
                errors[provider] = ((state["H"] - expected).norm() / expected.norm()).item()
                fns[provider] = fn
            timing = measure_interleaved(fns, reference="reference", device=dev, rounds=repeats, setup=setup)
            flops = 2.0 * b * t * d * d  # as a full GEMM, for comparability across providers
            for provider, tm in timing.items():
                speedup = tm.pop("speedup")
                rows_out.append({
                    "bench": "hessian_update", "provider": provider, "shape": f"{b}x{t}x{d}", "dtype": dname, **tm,
                    "timing": "interleaved", "speedup_vs_reference": speedup,
                    "gflops_equiv": flops / tm["p50"] / 1e9, "rel_err_vs_reference": errors[provider], **env})
            X = None  # free the activations before the next (possibly 14336-wide) case
    print_table(rows_out, ["shape", "dtype", "provider", "p20", "p50", "p80", "speedup_vs_reference",
                           "gflops_equiv", "rel_err_vs_reference"])
    path = write_rows("bench_hessian", rows_out)
    print(f"\nrows appended to {path}")
    return rows_out


def variants(repeats: int = 5) -> list[dict]:
    """Time the CPU candidates for the fast update against the reference sequence, on SmolLM2-135M widths."""
    env = environment("cpu")
    rows_out = []
    for b, t, d in CPU_CASES:
        gen = torch.Generator().manual_seed(d)
        X2d = torch.randn(b * t, d, generator=gen)
        A = torch.randn(d, d, generator=gen)
        H0 = A @ A.t() / d
        state: dict[str, torch.Tensor] = {}
        beta, alpha = 7 / (7 + b), 2 / (7 + b)
        cands = {"reference sequence": lambda: hessian_update_reference(state["H"], X2d.reshape(b, t, d), 7),
                 "addmm_(beta, alpha), full": lambda: state["H"].addmm_(X2d.t(), X2d, beta=beta, alpha=alpha)}
        for block in (128, 256, 512):
            cands[f"upper row blocks of {block}"] = lambda block=block: hessian_update_torch_fast(
                state["H"], X2d, beta, alpha, block=block)
        for fn in cands.values():
            state.update(H=H0.clone())
            fn()  # warm-up
        timing = measure_interleaved(cands, reference="reference sequence", rounds=repeats,
                                     setup=lambda: state.update(H=H0.clone()))
        for name, tm in timing.items():
            speedup = tm.pop("speedup")
            rows_out.append({"bench": "hessian_fast_variants", "provider": name, "shape": f"{b}x{t}x{d}",
                             "dtype": "fp32", **tm, "timing": "interleaved", "speedup_vs_reference": speedup, **env})
    print_table(rows_out, ["shape", "provider", "p20", "p50", "p80", "speedup_vs_reference"])
    path = write_rows("bench_hessian", rows_out)
    print(f"\nrows appended to {path}")
    return rows_out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one shape, at most 2 repeats")
    parser.add_argument("--variants", action="store_true", help="time the CPU candidates for numerics='fast'")
    args = parser.parse_args()
    if args.variants:
        variants(args.repeats)
    else:
        main(args.device, args.repeats, args.quick)
