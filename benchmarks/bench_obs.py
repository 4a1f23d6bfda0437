"""Benchmark ``obs_prune`` (SparseGPT OBS prune of one weight matrix) across backends.

Providers: ``reference`` (IST-DASLab fasterprune line for line), ``torch``, ``cpp`` (CPU), ``triton`` and ``cuda``
(GPU only; the Triton interpreter on CPU is not a meaningful provider), each also as ``<backend>+fast``
(``numerics="fast"``: the one-Cholesky reversed factor, one fused addmm per trailing update). Shapes: SmolLM2-135M
projections on CPU, Llama-3-8B projections on GPU. H is a realistic, well-conditioned Hessian 2/n·XᵀX from
correlated random inputs. Providers are timed round-robin (``measure_interleaved``). Each row records p20/p50/p80
seconds, the speed-up over the reference (median of per-round ratios), whether the weights are bitwise the
reference's, and the quality contract (mask agreement, reconstruction error against the reference's;
``calibprune.ops.contract``).

``--thresholds`` times the exact block-threshold candidates instead (sort, kthvalue, topk: the same value, so the
choice in ``obs/torch_impl.py`` changes no bit).

    python benchmarks/bench_obs.py [--device cpu|cuda] [--repeats 5] [--quick] [--thresholds]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, measure_interleaved, print_table, write_rows  # noqa: E402

from calibprune.ops import available_backends, check_contract, obs_prune, obs_prune_reference  # noqa: E402

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
    """Reference first, then every backend here, then each backend with ``numerics="fast"``."""
    found = ["reference", "torch"]
    avail = available_backends(device)
    for name in ("cpp", "triton", "cuda"):
        if name in avail and not (name == "triton" and device.type == "cpu"):
            found.append(name)
    return found + [p + "+fast" for p in found if p != "reference"]


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

            ref_mask = ref_W = None
            fns, checks = {}, {}
            for provider in providers(dev):
                if provider == "reference":
                    def fn():
                        return obs_prune_reference(state["W"], state["H"], sparsity, prune_n=n, prune_m=m,
                                                   blocksize=blocksize)[0]
                else:
                    backend, _, fast = provider.partition("+")
                    def fn(backend=backend, numerics="fast" if fast else "reference"):
                        return obs_prune(state["W"], state["H"], sparsity, prune_n=n, prune_m=m,
                                         blocksize=blocksize, backend=backend, numerics=numerics)
                setup()
                mask = fn()  # also the warm-up for compiled kernels
                if ref_mask is None:
                    ref_mask, ref_W = mask, state["W"].clone()
                checks[provider] = (check_contract(W0, H0, ref_W, ref_mask, state["W"], mask),
                                    bool(torch.equal(mask, ref_mask) and torch.equal(state["W"], ref_W)),
                                    bool(torch.equal(mask, ref_mask)))
                fns[provider] = fn
            # Round-robin timing: load on a shared machine hits every provider alike.
            timing = measure_interleaved(fns, reference="reference", device=dev, rounds=repeats, setup=setup)
            for provider, tm in timing.items():
                contract, bitwise, mask_equal = checks[provider]
                speedup = tm.pop("speedup")
                rows_out.append({
                    "bench": "obs_prune", "provider": provider, "shape": f"{rows}x{cols}", "pattern": pattern,
                    "blocksize": blocksize, "sparsity": sparsity if not n else None, **tm, "timing": "interleaved",
                    "speedup_vs_reference": speedup, "mask_equal_reference": mask_equal,
                    "bitwise_reference": bitwise, "mask_agreement": contract.mask_agreement,
                    "recon_rel_diff": contract.recon_rel_diff, "contract_ok": contract.ok, **env})
    print_table(rows_out, ["shape", "pattern", "provider", "p20", "p50", "p80", "speedup_vs_reference",
                           "bitwise_reference", "mask_agreement", "recon_rel_diff"])
    path = write_rows("bench_obs", rows_out)
    print(f"\nrows appended to {path}")
    return rows_out


def thresholds(device: str = "cpu", repeats: int = 20, blocksize: int = 128, sparsity: float = 0.5) -> list[dict]:
    """sorted(score)[k] three ways on one block of scores ``[rows, blocksize]``: full sort (the reference's), k-th
    value, and top-k (its largest of the k+1 smallest); all exact, so they agree bit for bit."""
    dev = torch.device(device)
    env = environment(dev)
    rows_out = []
    for rows in sorted({r for r, _ in (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES)}):
        score = torch.rand(rows, blocksize, generator=torch.Generator().manual_seed(rows)).square().to(dev)
        flat = score.flatten()
        k = int(flat.numel() * sparsity)
        cands = {"sort": lambda: torch.sort(flat)[0][k],
                 "kthvalue": lambda: torch.kthvalue(flat, k + 1).values,
                 "topk": lambda: torch.topk(flat, k + 1, largest=False, sorted=False).values.max()}
        values = {name: float(fn()) for name, fn in cands.items()}  # also the warm-up
        assert len(set(values.values())) == 1, f"threshold candidates disagree: {values}"
        timing = measure_interleaved(cands, reference="sort", device=dev, rounds=repeats)
        for name, tm in timing.items():
            speedup = tm.pop("speedup")
            rows_out.append({"bench": "obs_threshold", "provider": name, "shape": f"{rows}x{blocksize}", **tm,
                             "timing": "interleaved", "speedup_vs_sort": speedup, **env})
    print_table(rows_out, ["shape", "provider", "p20", "p50", "p80", "speedup_vs_sort"])
    path = write_rows("bench_obs", rows_out)
    print(f"\nrows appended to {path}")
    return rows_out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one shape, at most 2 repeats")
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--thresholds", action="store_true", help="time the exact block-threshold candidates")
    args = parser.parse_args()
    if args.thresholds:
        thresholds(args.device, args.repeats)
    else:
        main(args.device, args.repeats, args.quick, blocksize=args.blocksize)
