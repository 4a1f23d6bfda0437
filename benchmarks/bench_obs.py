"""Benchmark ``obs_prune`` (SparseGPT OBS prune of one weight matrix) across backends.

Providers: ``reference`` (IST-DASLab fasterprune line for line), ``torch``, ``cpp`` (CPU), ``triton`` and ``cuda``
(GPU only; the Triton interpreter on CPU is not a meaningful provider). Shapes: SmolLM2-135M projections on CPU,
Llama-3-8B projections on GPU. H is a realistic, well-conditioned Hessian 2/n·XᵀX from correlated random inputs.
Each row records p20/p50/p80 seconds and the speed-up over the reference measured in the same run.

    python benchmarks/bench_obs.py [--device cpu|cuda] [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, measure, print_table, write_rows  # noqa: E402

from calibprune.ops import available_backends, obs_prune, obs_prune_reference  # noqa: E402

CPU_SHAPES = [(576, 576), (1536, 576), (576, 1536)]          # SmolLM2-135M: q/o, up/gate, down
GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]     # Llama-3-8B: q/o, up/gate, down
PATTERNS = {"unstructured": (0, 0), "2:4": (2, 4)}


def realistic_hessian(cols: int, device: torch.device, *, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """2/n·XᵀX for X = [tokens, cols] with correlated features (a random mixing plus identity)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    X = (torch.randn(tokens, cols, generator=gen) @ mix).to(device)
    return 2 * X.t() @ X / tokens


def providers(device: torch.device) -> list[str]:
    """Reference first, then every backend here; the fastest compiled one again with the cheaper U factor
    (``<backend>+reversed``: one Cholesky + one triangular inverse, equal to the reference's U up to rounding)."""
    found = ["reference", "torch"]
    avail = available_backends(device)
    for name in ("cpp", "triton", "cuda"):
        if name in avail and not (name == "triton" and device.type == "cpu"):
            found.append(name)
    found.append(found[-1] + "+reversed")
    return found


def main(device: str = "cpu", repeats: int = 5, quick: bool = False, sparsity: float = 0.5,
         blocksize: int = 128) -> list[dict]:
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference numerics are plain fp32
    shapes = GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES
    if quick:
        shapes, repeats = shapes[:1], min(repeats, 2)
    env = environment(dev)
    rows_out: list[dict] = []
    for rows, cols in shapes:
        gen = torch.Generator(device="cpu").manual_seed(rows + cols)
        W0 = torch.randn(rows, cols, generator=gen).to(dev)
        H0 = realistic_hessian(cols, dev)
        for pattern, (n, m) in PATTERNS.items():
            state: dict[str, torch.Tensor] = {}

            def setup() -> None:
                state["W"], state["H"] = W0.clone(), H0.clone()

            ref_mask = None
            ref_p50 = None
            for provider in providers(dev):
                if provider == "reference":
                    def fn():
                        return obs_prune_reference(state["W"], state["H"], sparsity, prune_n=n, prune_m=m,
                                                   blocksize=blocksize)[0]
                else:
                    backend, _, method = provider.partition("+")
                    def fn(backend=backend, method=method or "chol_inverse"):
                        return obs_prune(state["W"], state["H"], sparsity, prune_n=n, prune_m=m,
                                         blocksize=blocksize, backend=backend, inverse_method=method)
                setup()
                mask = fn()  # also the warm-up for compiled kernels
                if ref_mask is None:
                    ref_mask = mask
                mask_equal = bool(torch.equal(mask, ref_mask))
                t = measure(fn, device=dev, warmup=1, repeats=repeats, setup=setup)
                if provider == "reference":
                    ref_p50 = t["p50"]
                rows_out.append({
                    "bench": "obs_prune", "provider": provider, "shape": f"{rows}x{cols}", "pattern": pattern,
                    "blocksize": blocksize, "sparsity": sparsity if not n else None, **t,
                    "speedup_vs_reference": ref_p50 / t["p50"], "mask_equal_reference": mask_equal, **env})
    print_table(rows_out, ["shape", "pattern", "provider", "p20", "p50", "p80", "speedup_vs_reference",
                           "mask_equal_reference"])
    path = write_rows("bench_obs", rows_out)
    print(f"\nrows appended to {path}")
    return rows_out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one shape, at most 2 repeats")
    parser.add_argument("--blocksize", type=int, default=128)
    args = parser.parse_args()
    main(args.device, args.repeats, args.quick, blocksize=args.blocksize)
