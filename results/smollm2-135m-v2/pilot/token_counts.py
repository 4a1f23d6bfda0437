"""Scored tokens per item, one row per choice vs the packed row (200 TEST items per benchmark)."""
from calibprune.calibration.sources import resolve_data_dir
from calibprune.evaluation import study_suite as ss
from calibprune.evaluation.scoring import _pack
from calibprune.models import load_tokenizer

tok = load_tokenizer("smollm2-135m")
data_dir = resolve_data_dir()
for name in ("hellaswag", "piqa", "arc_easy", "openbookqa"):
    bench = ss.STUDY_SUITE[name]
    pool = ss._pool(bench, tok, data_dir)
    docs = [pool[i] for i in ss.item_split(len(pool), bench, "test")[:200]]
    reqs, groups, _ = ss._requests(bench, docs, tok)
    packed = sum(len(_pack(reqs, g).ids) for g in groups) / len(groups)
    flat = sum(len(r.context) + len(r.continuation) for r in reqs) / len(groups)
    print(f"{name}: one row per choice {flat:.1f} tokens/item, packed {packed:.1f}, ratio {flat / packed:.2f}")
