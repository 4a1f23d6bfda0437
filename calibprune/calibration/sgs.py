"""SGS (Ji et al., ICLR 2025): self-generated text from short source prefixes, high-perplexity tail dropped.

Samples have a fixed length with EOS suppressed until that length (``min_new_tokens``), so every pool sample is
full. Sampling machinery: :mod:`.sampling`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from .calibration_set import CalibrationSet
from .pool_cache import save_pool
from .sampling import (
    SamplingSettings,
    cached_pool,
    check_common,
    environment,
    generate_fixed_length,
    per_sample_perplexity,
    start_token_id,
    tokenizer_name,
)
from .sources import load_texts

__all__ = ["sgs"]

log = logging.getLogger(__name__)


def sgs(model: torch.nn.Module, tokenizer: Any, *, n: int = 128, seqlen: int = 2048, seed: int = 0,
        source: str = "wikitext2", texts: Sequence[str] | None = None, prefix_tokens: int = 2,
        prefix_position: str = "random", pool_factor: float = 1.25, drop_fraction: float = 0.2,
        sample_tokens: int | None = None,
        temperature: float = 0.6, top_k: int = 50, top_p: float = 0.95, repetition_penalty: float = 1.2,
        batch_size: int = 8, ppl_batch_size: int = 8, data_dir: str | os.PathLike | None = None,
        data_source: str = "auto", cache_dir: str | os.PathLike | None = None, cache: bool = True,
        progress: bool = True) -> CalibrationSet:
    """SGS (Ji et al., ICLR 2025): self-generated text from short source prefixes, high-perplexity tail dropped.

    1. Pool of ⌈pool_factor · n⌉ samples. Each starts from ``prefix_tokens`` consecutive tokens of a source
       document (documents drawn without replacement while they last; the prompt is ``[start] + prefix``), taken at
       a random position (``prefix_position="random"``, default) or at the document start (``"start"``), and continued
       with temperature 0.6, top-k 50, top-p 0.95 and repetition penalty 1.2 until it holds ``sample_tokens``
       tokens (default ``seqlen``; prefix included, start token not; EOS suppressed until then).
    2. Per-sample perplexity under the model; the ⌊drop_fraction · pool⌉ (rounded) highest are dropped.
    3. ``n`` of the kept samples are drawn at random, and from each a random window of ``seqlen`` tokens
       (the whole sample when ``sample_tokens == seqlen``).

    Args:
        source, texts: where prefixes come from: a source name for :func:`load_texts`, or the texts themselves.
        prefix_position: ``"random"`` or ``"start"``. Random is the default because document starts are
            formulaic: the 60 WikiText-2 validation articles all open with ``" = Title ="``, so their first two
            tokens would give near-identical prompts.
        data_dir, data_source: passed to :func:`load_texts`.
        ppl_batch_size: rows per forward pass when scoring the pool.

    Returns:
        ``CalibrationSet`` ids ``[n, seqlen]`` int64; provenance holds the pool perplexities and the kept / dropped /
        selected pool indices.
    """
    check_common(n, seqlen, batch_size)
    sample_tokens = seqlen if sample_tokens is None else int(sample_tokens)
    if sample_tokens < seqlen:
        raise ValueError(f"sample_tokens ({sample_tokens}) must be >= seqlen ({seqlen})")
    if not 1 <= prefix_tokens < sample_tokens:
        raise ValueError(f"prefix_tokens must be in [1, sample_tokens), got {prefix_tokens}")
    if prefix_position not in ("random", "start"):
        raise ValueError(f"prefix_position must be 'random' or 'start', got {prefix_position!r}")
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    if not 0 <= drop_fraction < 1:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    pool_size = math.ceil(pool_factor * n)
    n_drop = int(round(drop_fraction * pool_size))
    if pool_size - n_drop < n:
        raise ValueError(f"a pool of {pool_size} minus {n_drop} dropped leaves fewer than n={n} samples; "
                         "raise pool_factor or lower drop_fraction")
    sampling = SamplingSettings(t_init=temperature, t_final=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
    start, start_is_eos = start_token_id(tokenizer)
    eos = int(tokenizer.eos_token_id)
    rng = np.random.default_rng([seed, 0x5C5])

    if texts is None:
        texts = load_texts(source, data_dir=data_dir, source=data_source)
        source_name = source
    else:
        source_name = "<texts>"
    if not texts:
        raise ValueError(f"source {source_name!r} returned no documents")
    # Documents drawn without replacement while they last, then again in a new order; only drawn ones are tokenised.
    reps = math.ceil(pool_size / len(texts))
    doc_order = np.concatenate([rng.permutation(len(texts)) for _ in range(reps)])[:pool_size]
    drawn = sorted(set(doc_order.tolist()))
    tokens = dict(zip(drawn, tokenizer([texts[k] for k in drawn], add_special_tokens=False)["input_ids"]))
    usable = {k for k, t in tokens.items() if len(t) >= prefix_tokens}
    if not usable:
        raise ValueError(f"no drawn document of {source_name!r} has {prefix_tokens} tokens for a prefix")
    if len(usable) < len(tokens):
        log.warning("sgs: %d of %d drawn documents are shorter than %d tokens; their draws go to the others",
                    len(tokens) - len(usable), len(tokens), prefix_tokens)
        cycle = [k for k in doc_order.tolist() if k in usable]
        doc_order = np.asarray([cycle[j % len(cycle)] for j in range(pool_size)])
    if reps > 1:
        log.info("sgs: %d documents for a pool of %d; documents repeat (prefix positions differ)", len(texts),
                 pool_size)
    starts_in_doc = []
    for k in doc_order.tolist():
        starts_in_doc.append(int(rng.integers(0, len(tokens[k]) - prefix_tokens + 1))
                             if prefix_position == "random" else 0)
    prefixes = [torch.tensor(tokens[k][s:s + prefix_tokens], dtype=torch.int64)
                for k, s in zip(doc_order.tolist(), starts_in_doc)]
    prefix_digest = hashlib.sha256(torch.stack(prefixes).numpy().tobytes()).hexdigest()

    settings = {"n": n, "seqlen": seqlen, "seed": seed, "pool_size": pool_size, "sample_tokens": sample_tokens,
                "prefix_tokens": prefix_tokens, "prefix_position": prefix_position, "prefixes_sha256": prefix_digest,
                "sampling": asdict(sampling), "batch_size": batch_size, "start_token": start, "eos": eos}
    t0 = time.perf_counter()
    pool, path, identity = cached_pool("sgs", model, settings, cache, cache_dir)
    cached = pool is not None
    if pool is None:
        prompts = [torch.cat([torch.tensor([start]), p]) for p in prefixes]
        ids = generate_fixed_length(model, prompts, sample_tokens, sampling=sampling, eos=eos, seed=seed,
                                     batch_size=batch_size, desc="sgs", progress=progress)
        gen_s = time.perf_counter() - t0
        ppl = per_sample_perplexity(model, ids, ppl_batch_size)
        pool = {"ids": ids, "perplexity": ppl, "doc_index": torch.as_tensor(doc_order, dtype=torch.int64),
                "prefix_start": torch.as_tensor(starts_in_doc, dtype=torch.int64),
                "meta": {"generation_s": gen_s, "perplexity_s": time.perf_counter() - t0 - gen_s}}
        if path is not None:
            save_pool(path, pool)
    t_sel = time.perf_counter()
    ids, ppl = pool["ids"], pool["perplexity"]
    by_ppl = sorted(range(pool_size), key=lambda i: (float(ppl[i]), i))
    kept, dropped = by_ppl[: pool_size - n_drop], by_ppl[pool_size - n_drop:]
    chosen = [kept[k] for k in rng.permutation(len(kept))[:n]]
    starts = rng.integers(0, sample_tokens - seqlen + 1, size=n)
    rows = torch.stack([ids[i, s:s + seqlen] for i, s in zip(chosen, starts)])
    log.info("sgs: pool %d, dropped %d with perplexity >= %.3f, selected %d x %d", pool_size, n_drop,
             float(ppl[dropped[0]]) if dropped else float("nan"), n, seqlen)
    provenance = {
        "kind": "sgs", "n": n, "seqlen": seqlen, "seed": seed, "model": identity,
        "tokenizer": tokenizer_name(tokenizer), "start_token": start, "start_token_is_eos": start_is_eos,
        "source": source_name, "data_source": data_source, "data_dir": str(data_dir) if data_dir else None,
        "generator": {"sampling": asdict(sampling), "prefix_tokens": prefix_tokens,
                      "prefix_position": prefix_position, "sample_tokens": sample_tokens,
                      "pool_factor": pool_factor, "drop_fraction": drop_fraction, "batch_size": batch_size,
                      "eos_suppressed_until_full": True},
        "pool_size": pool_size, "n_dropped": n_drop,
        "pool_perplexity": [float(x) for x in ppl], "kept_pool_indices": kept, "dropped_pool_indices": dropped,
        "selected_pool_indices": chosen, "window_starts": [int(s) for s in starts],
        "pool_cached": cached, "pool_path": str(path) if path else None,
        "timings": {"generation_s": pool["meta"]["generation_s"], "perplexity_s": pool["meta"]["perplexity_s"],
                    "selection_s": time.perf_counter() - t_sel, "total_s": time.perf_counter() - t0},
        "environment": environment(),
    }
    return CalibrationSet(ids=rows.contiguous(), provenance=provenance, row_sources=["sgs"] * n)
