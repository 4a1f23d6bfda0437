"""Run llm-compressor's SparseGPTModifier on given calibration ids; print one JSON line with the seconds.

Invoked by bench_prune.py with the interpreter of an environment that has llmcompressor (it pins
transformers ≤ 5.17). Writes the pruned state dict to ``--out/state.pt``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="plain HF checkpoint directory")
    ap.add_argument("--calib", required=True, help="torch-saved LongTensor [n, seqlen]")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.load(args.calib, weights_only=True)
    n, seqlen = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = SparseGPTModifier(sparsity=args.sparsity, mask_structure="0:0", block_size=128, dampening_frac=0.01,
                               targets=["Linear"], ignore=["re:.*lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=n,
            max_seq_length=seqlen, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "state.pt")
    print(json.dumps({"seconds": seconds, "version": llmcompressor.__version__}))


if __name__ == "__main__":
    main()
