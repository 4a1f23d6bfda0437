"""Why DSnoT hurts SmolLM2-135M: per-module reconstruction error of layer 0 after Wanda, with and without DSnoT.

Prunes only the first decoder layer (the same inputs for every variant), with Wanda at each sparsity, then with
DSnoT after it at several ``max_cycles``, and prints each attention matrix's reconstruction error (the report's
``recon_error``, exact from the Hessian) and the number of swaps DSnoT made in q_proj. Quoted in RESULTS.md
("CPU — quality").

    python benchmarks/diag_dsnot.py [--sparsities 0.6,0.7] [--cycles 5,50] [--n 8] [--seqlen 256]
"""
from __future__ import annotations

import argparse
import copy

import torch

from calibprune import build_calibration, load_model, make_config, prune

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.6,0.7")
    p.add_argument("--cycles", default="5,50")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_model(args.model)
    calib = build_calibration(tok, "c4", n=args.n, seqlen=args.seqlen, seed=0)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    print("sparsity  variant      " + "  ".join(f"{m.split('.')[-1]:>9s}" for m in MODULES) + "  q_proj swaps")
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        variants = [("wanda", make_config("wanda", sparsity=sparsity))]
        variants += [(f"+dsnot x{c}", make_config("wanda", sparsity=sparsity, refine="dsnot",
                                                  refine_options={"max_cycles": int(c)}))
                     for c in args.cycles.split(",")]
        for name, config in variants:
            report = prune(copy.deepcopy(model), calib, config, progress=False)
            by = {m: r for r in report.modules for m in MODULES if r.name.endswith(m)}
            swaps = (by["self_attn.q_proj"].extra or {}).get("dsnot", {}).get("swaps", "")
            print(f"{sparsity:<9} {name:12s} " + "  ".join(f"{by[m].recon_error:9.4g}" for m in MODULES)
                  + f"  {swaps}")


if __name__ == "__main__":
    main()
