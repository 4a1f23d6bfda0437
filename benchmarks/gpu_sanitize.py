"""Small ragged launches of every GPU kernel, for ``compute-sanitizer`` (memcheck, racecheck) in ``gpu_check.sh``.

Shapes are deliberately awkward (widths that are not multiples of any tile, a one-column block tail, an N:M block
narrower than the tile, d not a multiple of 64) so that out-of-bounds reads and writes at edges would show.
Each launch is synchronised; the script exits non-zero on any Python-side error.

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py [--backends cuda,triton]
"""
from __future__ import annotations

import argparse

import torch

from calibprune.ops import available_backends, hessian_update, ngram_hashes, obs_prune


def main(backends: list[str]) -> None:
    dev = torch.device("cuda")
    avail = available_backends(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    for backend in backends:
        if backend not in avail:
            print(f"{backend}: not available, skipped")
            continue
        for rows, cols, bs, n, m in [(37, 45, 16, 0, 0), (5, 33, 32, 0, 0), (19, 44, 12, 2, 4), (1, 8, 8, 1, 4)]:
            W = torch.randn(rows, cols, generator=gen, device=dev)
            X = torch.randn(3 * cols, cols, generator=gen, device=dev)
            H = 2 * X.t() @ X / (3 * cols)
            for numerics in ("reference", "fast"):
                obs_prune(W.clone(), H.clone(), 0.5, prune_n=n, prune_m=m, blocksize=bs, backend=backend,
                          numerics=numerics)
                torch.cuda.synchronize()
        for d, tokens in [(77, 33), (130, 5), (1, 3)]:
            for dtype in (torch.float32, torch.bfloat16):
                for numerics in ("reference", "fast"):
                    H = torch.zeros(d, d, device=dev)
                    hessian_update(H, torch.randn(tokens, d, generator=gen, device=dev).to(dtype), 0,
                                   backend=backend, numerics=numerics)
                    torch.cuda.synchronize()
        ngram_hashes(torch.randint(0, 1000, (3, 37), generator=gen, device=dev), 4, backend=backend)
        torch.cuda.synchronize()
        print(f"{backend}: ok")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cuda,triton")
    main(parser.parse_args().backends.split(","))
