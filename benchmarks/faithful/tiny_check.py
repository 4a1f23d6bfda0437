"""The authors' RIA options that are too slow to run on SmolLM2 here (channel reallocation with a linear sum
assignment: ~35 min per model on one core) against calibprune on tiny random Llamas (tests/tiny_models.py), 3 seeds.

Glue and authors' code as in faithful.py (FAITHFUL_AUTHORS with ria/lib). Prints one JSON line per run: how many of
the model's Linears are bitwise equal.

    FAITHFUL_AUTHORS=... python benchmarks/faithful/tiny_check.py
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))

import faithful  # noqa: E402
from tiny_models import random_ids, tiny_model, tiny_tokenizer  # noqa: E402

import calibprune  # noqa: E402

OPTIONS = ({"reallocation": True, "lsa": True, "importance_score": "sum"},
           {"reallocation": True, "lsa": False, "importance_score": "retained_degree_unstructured"},
           {"reallocation": True, "lsa": False, "importance_score": "retained_degree_per_outneuron"})


def main() -> None:
    torch.set_num_threads(1)
    for seed in (0, 1, 2):
        for opts in OPTIONS:
            base = tiny_model("llama", seed=seed)
            ids = random_ids(8, 32, seed=seed)
            theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
            faithful.authors_ria(theirs, tiny_tokenizer(), ids, 0.5, 2, 4, **opts)
            calibprune.prune(ours, ids, calibprune.make_config("ria", pattern="2:4", **opts), progress=False)
            wa, wb = faithful.linear_weights(theirs), faithful.linear_weights(ours)
            print(json.dumps({"seed": seed, **opts, "bitwise_equal": sum(torch.equal(wa[k], wb[k]) for k in wa),
                              "linears": len(wa)}), flush=True)


if __name__ == "__main__":
    main()
