"""Dense SmolLM2-135M scored in fp32 and in bf16 on the same TEST items: scores, item agreement and the paired 95%
bootstrap interval of (bf16 - fp32)."""
import json
import logging

import numpy as np
import torch

import calibprune
from calibprune.evaluation import study_suite as ss
from calibprune.study.statistics import bootstrap_counts

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
torch.set_grad_enabled(False)
model, tok = calibprune.load_model("smollm2-135m")
names = ["openbookqa", "piqa", "gsm8k_nll"]
overrides = {"piqa": {"test": 300}, "gsm8k_nll": {"test": 60}}
res = {}
for dt in ("float32", "bfloat16"):
    model = model.to(getattr(torch, dt))
    res[dt] = ss.evaluate_items(model, tok, benchmarks=names, overrides=overrides,
                                cache_dir="/tmp/scratch/evalcache", progress=False)["benchmarks"]
rng = np.random.default_rng(0)
out = {}
for b in names:
    for score in ss.STUDY_SUITE[b].scores:
        a_num, a_den = ss.score_terms(res["float32"][b], score)
        b_num, b_den = ss.score_terms(res["bfloat16"][b], score)
        w = bootstrap_counts(len(a_num), 4000, rng)
        diff = (w @ b_num) / (w @ b_den) - (w @ a_num) / (w @ a_den)
        agree = None
        if "correct" in res["float32"][b]:
            agree = float(np.mean(np.array(res["float32"][b]["correct"]) == np.array(res["bfloat16"][b]["correct"])))
        out[f"{b}.{score}"] = {"fp32": a_num.sum() / a_den.sum(), "bf16": b_num.sum() / b_den.sum(),
                               "diff_95": [float(np.quantile(diff, .025)), float(np.quantile(diff, .975))],
                               "item_agreement": agree, "n": len(a_num)}
        print(b, score, json.dumps(out[f"{b}.{score}"]))
json.dump(out, open("dtype_check_subset.json", "w"), indent=1)
