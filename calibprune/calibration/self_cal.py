"""Self-Cal (Williams et al., NAACL 2025): calibration rows of the model's own text, generated from the start token.

Generations from ``[start]`` are concatenated, each ended by the model's own EOS, until a row holds ``seqlen``
tokens; a generation that stops early is followed by another. Sampling machinery: :mod:`.sampling`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Any

import torch

from .._progress import progress_bar
from .calibration_set import CalibrationSet
from .pool_cache import save_pool
from .sampling import (
    SamplingSettings,
    cached_pool,
    check_common,
    derived_seed,
    environment,
    sample,
    start_token_id,
    tokenizer_name,
)

__all__ = ["self_cal"]

log = logging.getLogger(__name__)


def self_cal(model: torch.nn.Module, tokenizer: Any, *, n: int = 128, seqlen: int = 2048, seed: int = 0,
             t_init: float = 1.0, t_final: float = 1.0, schedule_tokens: int = 0, top_k: int = 0,
             top_p: float = 1.0, batch_size: int = 8, max_rounds: int = 1000,
             cache_dir: str | os.PathLike | None = None, cache: bool = True,
             progress: bool = True) -> CalibrationSet:
    """Self-Cal (Williams et al., NAACL 2025): rows of the model's own text, generated from the start token alone.

    Each row concatenates generations from ``[start]`` (BOS, or EOS when the tokenizer has none) until it holds
    ``seqlen`` tokens: a generation that ends with EOS before the row is full keeps that EOS as the separator and
    is followed by a fresh generation; the last one is cut at the row end. Nothing is padded; a generation that
    is only an EOS adds nothing (no doubled EOS). The temperature follows :class:`ScheduledTemperature`
    (t_init → t_final over the first ``schedule_tokens`` tokens of each generation); the paper's main setting is
    t = 1.0 throughout, plain multinomial sampling (``top_k=0``, ``top_p=1.0``).

    Args:
        batch_size: rows generated together; part of the cache key (sampling depends on batch composition).
        max_rounds: bound on generate calls per row (guards against a model that only emits EOS).
        cache_dir, cache: pool cache folder (default ``$CALIBPRUNE_CACHE/pools``) and whether to use it.

    Returns:
        ``CalibrationSet`` with ids ``[n, seqlen]`` int64, ``row_sources`` all ``"self-cal"``.
    """
    check_common(n, seqlen, batch_size)
    sampling = SamplingSettings(t_init=t_init, t_final=t_final, schedule_tokens=schedule_tokens, top_k=top_k,
                                top_p=top_p)
    start, start_is_eos = start_token_id(tokenizer)
    eos = int(tokenizer.eos_token_id)
    settings = {"n": n, "seqlen": seqlen, "seed": seed, "sampling": asdict(sampling), "batch_size": batch_size,
                "start_token": start, "eos": eos}
    t0 = time.perf_counter()
    pool, path, identity = cached_pool("self-cal", model, settings, cache, cache_dir)
    cached = pool is not None
    if pool is None:
        generations, rounds = 0, 0
        rows: list[list[int]] = [[] for _ in range(n)]
        with progress_bar(total=n * seqlen, desc="self-cal", unit="tok", show=progress) as bar:
            while True:
                active = [i for i in range(n) if len(rows[i]) < seqlen]
                if not active:
                    break
                if rounds >= max_rounds:
                    raise RuntimeError(f"self-cal: rows still short after {max_rounds} rounds of generation")
                for b in range(0, len(active), batch_size):
                    batch = active[b:b + batch_size]
                    need = max(seqlen - len(rows[i]) for i in batch)
                    prompts = torch.full((len(batch), 1), start, dtype=torch.int64)
                    gens = sample(model, prompts, sampling=sampling, max_new_tokens=need, min_new_tokens=0,
                                   eos=eos, seed=derived_seed(seed, "self-cal", rounds, b))
                    for i, (tokens, ended) in zip(batch, gens):
                        before = len(rows[i])
                        piece = tokens.tolist() + ([eos] if ended else [])
                        if tokens.numel():
                            rows[i].extend(piece[: seqlen - before])
                            generations += 1
                        bar.update(len(rows[i]) - before)
                rounds += 1
        ids = torch.tensor(rows, dtype=torch.int64)
        pool = {"ids": ids, "meta": {"generation_s": time.perf_counter() - t0, "generations": generations,
                                     "rounds": rounds}}
        if path is not None:
            save_pool(path, pool)
    ids = pool["ids"]
    log.info("self-cal: %d x %d tokens (%d generations)", n, seqlen, pool["meta"]["generations"])
    provenance = {
        "kind": "self-cal", "n": n, "seqlen": seqlen, "seed": seed, "model": identity,
        "tokenizer": tokenizer_name(tokenizer), "start_token": start, "start_token_is_eos": start_is_eos,
        "generator": {"sampling": asdict(sampling), "batch_size": batch_size, "max_rounds": max_rounds,
                      "separator": "eos"},
        "pool_size": n, "generations": pool["meta"]["generations"], "rounds": pool["meta"]["rounds"],
        "pool_cached": cached, "pool_path": str(path) if path else None,
        "timings": {"generation_s": pool["meta"]["generation_s"], "total_s": time.perf_counter() - t0},
        "environment": environment(),
    }
    return CalibrationSet(ids=ids.clone(), provenance=provenance, row_sources=["self-cal"] * n)
