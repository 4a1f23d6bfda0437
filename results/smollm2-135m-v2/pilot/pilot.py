"""Dense SmolLM2-135M on candidate benchmarks: scores on N TEST items in a given dtype.

Usage: python pilot.py bfloat16 300 out.json winogrande,openbookqa,arc_challenge,boolq
"""
import json
import logging
import sys
import time

import torch

import calibprune
from calibprune.evaluation import study_suite as ss

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
torch.set_grad_enabled(False)
dtype, n, out, names = getattr(torch, sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
for name in ("arc_challenge", "boolq", "openbookqa", "mmlu", "mmlu_cloze", "winogrande"):  # candidates
    if name not in ss.STUDY_SUITE:
        ss.STUDY_SUITE[name] = ss._mc(name, 600, 0, normalise="none" if name in ("boolq", "mmlu", "winogrande")
                                      else "chars")
model, tok = calibprune.load_model("smollm2-135m")
model = model.to(dtype).eval()
overrides = {k: {"test": min(n, 300) if k == "openbookqa" else n, "dev": 0} for k in names
             if ss.STUDY_SUITE[k].kind != "nll"}
t0 = time.time()
res = ss.evaluate_items(model, tok, benchmarks=names, overrides=overrides, cache_dir="/tmp/scratch/evalcache",
                        progress=False)
summary = {k: {"scores": v["scores"], "n": v["n"], "seconds": v["seconds"], "tokens": v["tokens"]}
           for k, v in res["benchmarks"].items()}
json.dump(summary, open(out, "w"), indent=1)
for k, v in summary.items():
    print(k, json.dumps(v))
print("total", time.time() - t0)
