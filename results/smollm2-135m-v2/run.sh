#!/usr/bin/env bash
# Driver of the v2 calibration study on SmolLM2-135M (see README.md in this folder). Run it from the repository root;
# it is resumable at any point (every finished run is a JSON under runs/; rerunning skips them), so after a kill,
# a reboot or on another machine the same command continues where it stopped:
#
#     nohup bash results/smollm2-135m-v2/run.sh > results/smollm2-135m-v2/cache/run.log 2>&1 &
#
# Step 1 chooses IGSP's design on DEV items (disjoint from the TEST items the study reports); step 2 is the study.
set -euo pipefail
export CALIBPRUNE_DATA_DIR="${CALIBPRUNE_DATA_DIR:-../shared/data}"
export TOKENIZERS_PARALLELISM=false
OUT=results/smollm2-135m-v2
DEV=results/smollm2-135m-v2-igsp-dev
POOLS="$OUT/cache/pools"   # generated pools shared by both steps
mkdir -p "$OUT/cache"

# 1. IGSP design on DEV: one knob at a time around the base (threshold 0.45, 3 strata, 7 prompts per dimension,
#    BOS an equal fifth); seed 0, SparseGPT 60%, DEV items only.
calibprune study --model smollm2-135m --split dev --sources none --constructed none --seeds 0 --seeded "" \
  --pruners sparsegpt --pruner-entries "" --no-dtype-check --pool-dir "$POOLS" --out "$DEV" \
  --variant igsp-base:igsp.max_sample_aggregation=0.45 \
  --variant igsp-t0.30:igsp.max_sample_aggregation=0.3 \
  --variant igsp-strata5:igsp.max_sample_aggregation=0.45 --variant igsp-strata5:igsp.strata=5 \
  --variant igsp-prompts3:igsp.max_sample_aggregation=0.45 --variant igsp-prompts3:igsp.prompts_per_dimension=3 \
  --variant igsp-bos0.4:igsp.max_sample_aggregation=0.45 --variant igsp-bos0.4:igsp.bos_share=0.4 \
  --variant igsp-nobos:igsp.max_sample_aggregation=0.45 --variant igsp-nobos:igsp.include_bos=false

# 2. The rule fixed before step 1 ran: the variant with the highest DEV total retention is IGSP's design.
GEN_OPTS=$(python - "$DEV" "$OUT" <<'PY'
import json, sys
dev, out = sys.argv[1], sys.argv[2]
study = json.load(open(f"{dev}/study.json"))
assert study["complete"], "the DEV design study is not finished"
totals = {e: v["runs"]["sparsegpt"]["0.6"]["total"]["mean"] for e, v in study["entries"].items()}
best = max(totals, key=totals.get)
options = study["config"]["variants"][best]["options"]
json.dump({"rule": "highest DEV total retention (seed 0, SparseGPT 60%)", "chosen": best, "options": options,
           "dev_total_retention": totals}, open(f"{out}/igsp_design.json", "w"), indent=1)
print(" ".join(f"--gen-option igsp.{k}={json.dumps(v)}" for k, v in options.items()))
PY
)
echo "IGSP design: $GEN_OPTS"

# 3. The study on TEST: 12 sources, mix, Self-Cal, SGS, IGSP (seeds 0-2 for C4, the 2 best sources, mix and the
#    generated sets), Wanda for the sources and the mix, then IGSP's ablations.
# shellcheck disable=SC2086
calibprune study --model smollm2-135m --sources all --constructed mix,self-cal,sgs,igsp $GEN_OPTS \
  --seeds 0,1,2 --seeded c4,best:2,mix,self-cal,sgs,igsp --pruners sparsegpt,wanda --pruner-entries sources,mix \
  --variant igsp-nofilter:igsp.max_sample_aggregation=1.0 \
  --variant igsp-nostrata:igsp.strata=1 \
  --variant 'igsp-bos:igsp.dimensions=[]' --variant igsp-bos:igsp.include_bos=true \
  --variant igsp-bos:igsp.bos_share=null \
  --pool-dir "$POOLS" --out "$OUT"
