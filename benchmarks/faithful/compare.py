"""Compare saved Linear weights of two runs (out/A.pt vs out/B.pt): bitwise-equal Linears, mask agreement, max |dW|.

Usage: python compare.py A B [A2 B2 ...]   (pairs)    or    python compare.py --table   (the standard table)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

OUT = Path(os.environ.get("FAITHFUL_OUT", Path(__file__).resolve().parent / "out"))


def compare(a: str, b: str) -> dict:
    wa, wb = torch.load(OUT / f"{a}.pt"), torch.load(OUT / f"{b}.pt")
    assert wa.keys() == wb.keys(), (a, b)
    equal = 0
    agree = total = 0
    maxdiff = 0.0
    first_diff = None
    for k in wa:
        x, y = wa[k], wb[k]
        if torch.equal(x, y):
            equal += 1
        elif first_diff is None:
            first_diff = k
        agree += int(((x == 0) == (y == 0)).sum())
        total += x.numel()
        maxdiff = max(maxdiff, float((x - y).abs().max()))
    ja = json.loads((OUT / f"{a}.json").read_text())
    jb = json.loads((OUT / f"{b}.json").read_text())
    return dict(a=a, b=b, equal=equal, n=len(wa), agree=agree / total, maxdiff=maxdiff, first_diff=first_diff,
                ppl_a=ja["ppl"], ppl_b=jb["ppl"], sec_a=ja["seconds"], sec_b=jb["seconds"],
                backends_b=jb.get("resolved_backends"))


TABLE = [
    ("SparseGPT 60%", "auth_sgpt_60", ["cp_ref_60", "cp_fused_60", "cp_fused_torch_60", "cp_ref_60_bs8",
                                       "cp_fused_60_bs8"]),
    ("SparseGPT 2:4", "auth_sgpt_24", ["cp_ref_24", "cp_fused_24", "cp_fused_torch_24", "cp_ref_24_bs8",
                                       "cp_fused_24_bs8"]),
    ("Wanda 60%", "auth_wanda_60", ["cp_wanda_60", "cp_wanda_60_bs8"]),
    ("Wanda 2:4", "auth_wanda_24", ["cp_wanda_24", "cp_wanda_24_bs8"]),
    ("Magnitude 60%", "auth_mag_60", ["cp_mag_60"]),
    ("Magnitude 2:4", "auth_mag_24", ["cp_mag_24"]),
    ("RIA 60%", "auth_ria_60", ["cp_ria_60"]),
    ("RIA 2:4", "auth_ria_24", ["cp_ria_24"]),
    ("RIA 2:4 reallocation", "auth_ria_24_realloc", ["cp_ria_24_realloc"]),
    ("RIA 2:4 reallocation + LSA", "auth_ria_24_lsa", ["cp_ria_24_lsa"]),
    ("Wanda + OWL 70%", "auth_owl_70", ["cp_owl_70"]),
    ("Wanda + DSnoT 60%", "auth_dsnot_60", ["cp_dsnot_60", "cp_dsnot_60_stop"]),
    ("Wanda + DSnoT 70%", "auth_dsnot_70", ["cp_dsnot_70", "cp_dsnot_70_stop"]),
    ("Wanda + DSnoT 2:4", "auth_dsnot_24", ["cp_dsnot_24"]),
    ("ALPS 60%", "auth_alps_60", ["cp_alps_60"]),
    ("ALPS 2:4", "auth_alps_24", ["cp_alps_24"]),
]


def table() -> str:
    lines = ["| method | authors' run (ppl) | calibprune run | backends | bitwise-equal Linears | mask agreement "
             "| max abs weight diff | calibprune ppl |", "|---|---|---|---|---|---|---|---|"]
    for label, auth, runs in TABLE:
        for r in runs:
            if not (OUT / f"{auth}.pt").exists() or not (OUT / f"{r}.pt").exists():
                lines.append(f"| {label} | {auth} | {r} | (not run) | | | | |")
                continue
            c = compare(auth, r)
            be = c["backends_b"] or {}
            be_s = ", ".join(f"{k}={v}" for k, v in be.items()) or "-"
            lines.append(f"| {label} | {auth} ({c['ppl_a']:.3f}) | {r} | {be_s} | {c['equal']}/{c['n']} | "
                         f"{100 * c['agree']:.4f}% | {c['maxdiff']:.3g} | {c['ppl_b']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print(table())
    else:
        args = sys.argv[1:]
        for a, b in zip(args[::2], args[1::2]):
            print(json.dumps(compare(a, b)))
