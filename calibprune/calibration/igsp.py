"""IGSP (our reconstruction of the paper's method): a balanced, low-repetition mix of the model's own generations.

Pipeline (every knob is an argument of :func:`igsp` and lands in the provenance):

1. **Groups and quotas**: one group per capability dimension, plus ``"bos"`` (generations from the start token
   alone). ``bos_share=None`` splits ``n`` equally over all groups; a number gives the BOS group that share of
   ``n`` and splits the rest equally over the dimensions.
2. **Pool, in chunks**: each group's samples are generated ``batch_size`` at a time; chunk ``c`` of group ``g``
   has its own derived seed and its own cache file, so a larger pool extends a smaller one instead of replacing it.
   A dimension's samples start from its short generic seed prompts (the first ``prompts_per_dimension`` of
   :data:`IGSP_SEED_PROMPTS`, round-robin); every sample is exactly ``seqlen`` tokens (EOS suppressed until then),
   with the temperature schedule t_init → t_final over the first ``schedule_tokens`` tokens.
3. **Repetition filter**: samples whose own ``ngram``-gram aggregation exceeds ``max_sample_aggregation`` are
   dropped (degenerate loops). A group left short of its quota **generates more chunks**, up to
   ``⌈max_pool_factor · quota⌉`` samples; if it is still short, the group is filled with its least repetitive
   dropped samples (the threshold is relaxed for that group only). Both are recorded (``topped_up``, ``relaxed``);
   nothing fails for lack of samples.
4. **Perplexity strata**: each group's survivors are sorted by perplexity under the model and cut into ``strata``
   equal-count strata; the group's quota is split equally over them.
5. **Selection**: :func:`greedy_min_aggregation` over all (group, stratum) slots at once minimises the set's
   ``ngram``-gram aggregation under those quotas (greedy, then ``swap_passes`` passes of same-slot swaps); the rows
   are shuffled (seeded) so groups interleave.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ..fingerprint import model_identity
from .calibration_set import CalibrationSet
from .pool_cache import load_pool, pool_key, pool_path, save_pool
from .sampling import (
    POOL_FORMAT,
    SamplingSettings,
    check_common,
    environment,
    generate_fixed_length,
    per_sample_perplexity,
    start_token_id,
    tokenizer_name,
)
from .sources import DIMENSIONS

__all__ = ["BOS_GROUP", "IGSP_SEED_PROMPTS", "greedy_min_aggregation", "igsp"]

log = logging.getLogger(__name__)

# Short, generic openings per capability dimension: they steer the model towards a kind of text without
# supplying any content from a capability-aligned corpus. No trailing spaces: BPE tokenisers attach a space to
# the following word, so "def " would end the prompt on a lone-space token the model rarely sees.
IGSP_SEED_PROMPTS: dict[str, tuple[str, ...]] = {
    "general": ("The", "In", "A", "It was", "According to", "One of the", "Today"),
    "commonsense": ("Question: Why do people", "If you drop a glass", "Q: What happens when", "To make a cup of tea,",
                    "Which is heavier", "After the rain,", "Most people"),
    "code": ("def", "import", "class", "for i in range(", "# Python function to", "function", "#include <"),
    "math": ("Let x be", "Question: If", "Solve for x:", "The sum of", "Calculate", "Problem: A", "Prove that"),
}
BOS_GROUP = "bos"


def greedy_min_aggregation(row_keys: Sequence[set[int]], slots: Sequence[Hashable],
                           quotas: Mapping[Hashable, int], *, swap_passes: int = 2) -> list[int]:
    """Pick rows, ``quotas[slot]`` from each slot, greedily minimising the set's n-gram aggregation.

    With rows of equal length every set of k rows has the same number of n-gram occurrences T, so aggregation
    1 − distinct/T is minimised by maximising the distinct n-grams of the union (rows' internal repeats are the
    same whichever rows are chosen). Two phases:

    1. Greedy: each step takes the row (from a slot with quota left) adding the most n-grams not yet in the set,
       ties to the lower index. Distinct-count coverage is submodular, so gains only shrink and lazy evaluation (a
       max-heap of stale gains) picks what the plain greedy would, up to ties.
    2. Swaps: up to ``swap_passes`` passes over the picked rows, each replaced by the unpicked row of the same slot
       that raises the distinct count most (if any does). The greedy is myopic across slots (an early pick can
       collide with the only candidates of a later slot); swaps repair that and never lower the distinct count.

    Args:
        row_keys: per candidate row, the set of its n-gram keys (e.g. from :func:`calibprune.ops.ngram_hashes`).
        slots: per candidate row, its slot (e.g. ``(dimension, stratum)``).
        quotas: rows to take per slot; a slot with fewer candidates than its quota raises ``ValueError``.

    Returns:
        Selected row indices (greedy order, swapped rows in place of the rows they replaced).
    """
    import heapq
    from collections import Counter

    if len(row_keys) != len(slots):
        raise ValueError(f"{len(row_keys)} rows but {len(slots)} slots")
    if swap_passes < 0:
        raise ValueError(f"swap_passes must be >= 0, got {swap_passes}")
    left = {s: int(q) for s, q in quotas.items() if q > 0}
    for s, q in left.items():
        have = sum(1 for x in slots if x == s)
        if have < q:
            raise ValueError(f"slot {s!r} has {have} candidates for a quota of {q}")
    covered: set[int] = set()
    heap = [(-len(row_keys[i]), i) for i in range(len(row_keys)) if slots[i] in left]
    heapq.heapify(heap)
    picked: list[int] = []
    while heap and any(left.values()):
        _, i = heapq.heappop(heap)
        if left.get(slots[i], 0) == 0:
            continue
        gain = len(row_keys[i] - covered)
        if heap and gain < -heap[0][0]:
            heapq.heappush(heap, (-gain, i))
            continue
        picked.append(i)
        covered |= row_keys[i]
        left[slots[i]] -= 1

    members: dict[Hashable, list[int]] = {}
    for j, slot in enumerate(slots):
        members.setdefault(slot, []).append(j)
    counts: Counter = Counter()
    for i in picked:
        counts.update(row_keys[i])
    in_set = set(picked)
    for _ in range(swap_passes):
        improved = False
        for pos, i in enumerate(picked):
            own = sum(1 for k in row_keys[i] if counts[k] == 1)  # distinct n-grams lost by removing i
            best, best_gain = None, own
            for j in members[slots[i]]:
                if j in in_set:
                    continue
                gain = sum(1 for k in row_keys[j] if counts[k] - (k in row_keys[i]) == 0)
                if gain > best_gain:
                    best, best_gain = j, gain
            if best is not None:
                counts.subtract(row_keys[i])
                counts.update(row_keys[best])
                in_set.discard(i)
                in_set.add(best)
                picked[pos] = best
                improved = True
        if not improved:
            break
    return picked


def _equal_split(total: int, names: Sequence[Hashable]) -> dict[Hashable, int]:
    """``total`` split as evenly as possible, the remainder going to the first names."""
    base, extra = divmod(total, len(names))
    return {name: base + (1 if k < extra else 0) for k, name in enumerate(names)}


def _quotas(n: int, dimensions: list[str], include_bos: bool, bos_share: float | None) -> dict[str, int]:
    groups = dimensions + ([BOS_GROUP] if include_bos else [])
    if bos_share is None or not include_bos:
        return _equal_split(n, groups)
    bos = min(n, max(0, round(bos_share * n)))
    if not dimensions:
        return {BOS_GROUP: n}
    return {**_equal_split(n - bos, dimensions), BOS_GROUP: bos}


def _check_prompt(text: str, body: Sequence[int], seqlen: int) -> None:
    if len(body) >= seqlen:
        raise ValueError(f"seed prompt {text!r} has {len(body)} tokens, no room in seqlen={seqlen}")


class _GroupPool:
    """The generated samples of one group, extended chunk by chunk (each chunk cached on its own)."""

    def __init__(self, group: str, prompts: list[torch.Tensor], texts: list[str], *, model, seqlen: int,
                 sampling: SamplingSettings, eos: int, seed: int, batch_size: int, ppl_batch_size: int,
                 identity: dict, settings: dict, cache: bool, cache_dir, progress: bool) -> None:
        self.group, self.prompts, self.texts = group, prompts, texts
        self.model, self.seqlen, self.sampling, self.eos, self.seed = model, seqlen, sampling, eos, seed
        self.batch_size, self.ppl_batch_size, self.progress = batch_size, ppl_batch_size, progress
        self.identity, self.settings, self.cache, self.cache_dir = identity, settings, cache, cache_dir
        self.ids: list[torch.Tensor] = []
        self.ppl: list[torch.Tensor] = []
        self.seed_texts: list[str] = []
        self.chunks_cached = self.chunks_generated = 0
        self.generation_s = self.perplexity_s = 0.0
        self.paths: list[str] = []

    def __len__(self) -> int:
        return sum(x.shape[0] for x in self.ids)

    def extend_to(self, size: int) -> None:
        """Generate (or load) chunks until the pool holds at least ``size`` samples."""
        while len(self) < size:
            c = len(self.ids)
            idx = range(c * self.batch_size, (c + 1) * self.batch_size)
            prompts = [self.prompts[j % len(self.prompts)] for j in idx]
            texts = [self.texts[j % len(self.texts)] for j in idx]
            for text, p in zip(texts, prompts):
                _check_prompt(text, p[1:].tolist(), self.seqlen)  # p = [start] + body
            key = pool_key(self.identity, {"kind": "igsp-chunk", "pool_format": POOL_FORMAT, "group": self.group,
                                           "chunk": c, **self.settings})
            path = pool_path(self.cache_dir, "igsp", key) if self.cache else None
            chunk = load_pool(path) if path is not None else None
            if chunk is not None:
                log.info("igsp: loaded cached pool chunk %s (%s, chunk %d); not generating", path, self.group, c)
                self.chunks_cached += 1
            else:
                t0 = time.perf_counter()
                ids = generate_fixed_length(self.model, prompts, self.seqlen, sampling=self.sampling, eos=self.eos,
                                            seed=self.seed, batch_size=self.batch_size,
                                            desc=f"igsp:{self.group}:{c}", progress=self.progress)
                t1 = time.perf_counter()
                ppl = per_sample_perplexity(self.model, ids, self.ppl_batch_size)
                chunk = {"ids": ids, "perplexity": ppl,
                         "meta": {"generation_s": t1 - t0, "perplexity_s": time.perf_counter() - t1}}
                if path is not None:
                    save_pool(path, chunk)
                self.chunks_generated += 1
            self.generation_s += chunk["meta"]["generation_s"]
            self.perplexity_s += chunk["meta"]["perplexity_s"]
            self.ids.append(chunk["ids"])
            self.ppl.append(chunk["perplexity"])
            self.seed_texts += texts
            if path is not None:
                self.paths.append(str(path))


def igsp(model: torch.nn.Module, tokenizer: Any, *, n: int = 128, seqlen: int = 2048, seed: int = 0,
         dimensions: Sequence[str] = DIMENSIONS, seed_prompts: Mapping[str, Sequence[str]] | None = None,
         prompts_per_dimension: int | None = None, include_bos: bool = True, bos_share: float | None = None,
         pool_factor: float = 2.0, max_pool_factor: float = 4.0, t_init: float = 1.2, t_final: float = 0.8,
         schedule_tokens: int = 64, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
         max_sample_aggregation: float = 0.3, ngram: int = 4, strata: int = 3, swap_passes: int = 2,
         batch_size: int = 8, ppl_batch_size: int = 8, cache_dir: str | os.PathLike | None = None, cache: bool = True,
         progress: bool = True) -> CalibrationSet:
    """IGSP (our reconstruction): a balanced, low-repetition mix of the model's own generations.

    See the module docstring for the five steps. Knobs:

    Args:
        dimensions, seed_prompts, prompts_per_dimension: the dimension groups, their seed prompts (default
            :data:`IGSP_SEED_PROMPTS`) and how many of each dimension's prompts to use (default: all).
        include_bos, bos_share: the start-token-only group and its share of ``n`` (default: an equal share).
        pool_factor, max_pool_factor: pool samples per group as a multiple of its quota, at first and at most
            (top-up after the filter).
        t_init, t_final, schedule_tokens, top_k, top_p, repetition_penalty: sampling.
        max_sample_aggregation, ngram: the per-sample repetition filter (1.0 keeps every sample).
        strata: perplexity strata per group (1 = no stratification). swap_passes: selection refinement.
        batch_size: samples per generated chunk (part of every chunk's cache key).

    Returns:
        ``CalibrationSet`` ids ``[n, seqlen]`` int64, ``row_sources[i] = "igsp:<group>"``; provenance holds every
        knob, quotas, pool / filter / top-up counts, strata perplexity bounds, the selected samples, the set's
        aggregation and that of a random selection with the same quotas.
    """
    from calibprune.ops import ngram_hashes, ngram_stats

    check_common(n, seqlen, batch_size)
    prompts_by_dim = {k: tuple(v) for k, v in (IGSP_SEED_PROMPTS if seed_prompts is None else seed_prompts).items()}
    dimensions = list(dimensions)
    unknown = [d for d in dimensions if d not in prompts_by_dim]
    if unknown:
        raise ValueError(f"unknown IGSP dimension(s) {unknown}; known: {sorted(prompts_by_dim)}")
    if len(set(dimensions)) != len(dimensions):
        raise ValueError(f"duplicate IGSP dimensions: {dimensions}")
    if BOS_GROUP in dimensions:
        raise ValueError(f"{BOS_GROUP!r} is reserved for start-token generations (include_bos)")
    if not dimensions and not include_bos:
        raise ValueError("IGSP needs at least one dimension or include_bos=True")
    if prompts_per_dimension is not None and prompts_per_dimension < 1:
        raise ValueError(f"prompts_per_dimension must be >= 1, got {prompts_per_dimension}")
    for d in dimensions:
        prompts_by_dim[d] = prompts_by_dim[d][:prompts_per_dimension]
        if not prompts_by_dim[d] or any(not p for p in prompts_by_dim[d]):
            raise ValueError(f"dimension {d!r} needs non-empty seed prompts")
    if bos_share is not None and not 0 <= bos_share <= 1:
        raise ValueError(f"bos_share must be in [0, 1], got {bos_share}")
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    if max_pool_factor < pool_factor:
        raise ValueError(f"max_pool_factor ({max_pool_factor}) must be >= pool_factor ({pool_factor})")
    if strata < 1:
        raise ValueError(f"strata must be >= 1, got {strata}")
    if not 0 <= max_sample_aggregation <= 1:
        raise ValueError(f"max_sample_aggregation must be in [0, 1], got {max_sample_aggregation}")
    if not 1 <= ngram <= seqlen:
        raise ValueError(f"ngram must be in [1, seqlen], got {ngram}")
    sampling = SamplingSettings(t_init=t_init, t_final=t_final, schedule_tokens=schedule_tokens, top_k=top_k,
                                top_p=top_p, repetition_penalty=repetition_penalty)
    start, start_is_eos = start_token_id(tokenizer)
    eos = int(tokenizer.eos_token_id)

    quotas = _quotas(n, dimensions, include_bos, bos_share)
    groups = list(quotas)
    seed_ids = {d: [tokenizer([p], add_special_tokens=False)["input_ids"][0] for p in prompts_by_dim[d]]
                for d in dimensions}
    first_size = {g: (max(math.ceil(pool_factor * q), q) if q else 0) for g, q in quotas.items()}
    for d in dimensions:  # the prompts the first pool uses (round-robin over whole chunks); top-ups check theirs
        used = min(len(seed_ids[d]), math.ceil(first_size[d] / batch_size) * batch_size)
        for text, body in zip(prompts_by_dim[d][:used], seed_ids[d][:used]):
            _check_prompt(text, body, seqlen)
    identity = model_identity(model)
    t0 = time.perf_counter()
    pools: dict[str, _GroupPool] = {}
    for g in groups:
        bodies = [[]] if g == BOS_GROUP else seed_ids[g]
        texts = [""] if g == BOS_GROUP else list(prompts_by_dim[g])
        settings = {"seqlen": seqlen, "seed": seed, "prompts": texts, "sampling": asdict(sampling),
                    "batch_size": batch_size, "start_token": start, "eos": eos}
        pools[g] = _GroupPool(g, [torch.tensor([start] + list(b), dtype=torch.int64) for b in bodies], texts,
                              model=model, seqlen=seqlen, sampling=sampling, eos=eos, seed=seed,
                              batch_size=batch_size, ppl_batch_size=ppl_batch_size, identity=identity,
                              settings=settings, cache=cache, cache_dir=cache_dir, progress=progress)

    def aggregation(ids: torch.Tensor) -> list[float]:
        return [ngram_stats(ids[i:i + 1], ngram, top_k=())["aggregation"] for i in range(ids.shape[0])]

    survivors: dict[str, list[int]] = {}
    sample_agg: dict[str, list[float]] = {}
    topped_up: dict[str, int] = {}
    relaxed: dict[str, dict[str, float]] = {}
    for g, q in quotas.items():
        if q == 0:
            survivors[g], sample_agg[g] = [], []
            continue
        pool = pools[g]
        pool.extend_to(first_size[g])
        initial = len(pool)
        limit = max(math.ceil(max_pool_factor * q), first_size[g])
        while True:
            sample_agg[g] = aggregation(torch.cat(pool.ids))
            survivors[g] = [i for i, a in enumerate(sample_agg[g]) if a <= max_sample_aggregation]
            if len(survivors[g]) >= q or len(pool) >= limit:
                break
            missing = q - len(survivors[g])
            kept_rate = max(len(survivors[g]) / len(pool), 1.0 / len(pool))
            need = min(limit, len(pool) + math.ceil(missing / kept_rate))
            log.info("igsp: group %r has %d of %d samples after the repetition filter; generating up to %d",
                     g, len(survivors[g]), q, need)
            pool.extend_to(need)
        topped_up[g] = len(pool) - initial
        if len(survivors[g]) < q:
            dropped = sorted((i for i in range(len(pool)) if i not in set(survivors[g])),
                             key=lambda i: (sample_agg[g][i], i))
            extra = dropped[:q - len(survivors[g])]
            relaxed[g] = {"samples": len(extra), "max_aggregation_admitted": float(sample_agg[g][extra[-1]])}
            log.warning("igsp: group %r still has %d of %d samples after %d generated; admitting the %d least "
                        "repetitive dropped ones (aggregation <= %.3f)", g, len(survivors[g]), q, len(pool),
                        len(extra), relaxed[g]["max_aggregation_admitted"])
            survivors[g] = sorted(survivors[g] + extra)

    t_sel = time.perf_counter()
    # one flat index space over all groups' pools
    offsets, flat_ids, flat_ppl, flat_group, flat_seed = {}, [], [], [], []
    for g in groups:
        offsets[g] = sum(x.shape[0] for x in flat_ids)
        if quotas[g] == 0:
            continue
        flat_ids.append(torch.cat(pools[g].ids))
        flat_ppl.append(torch.cat(pools[g].ppl))
        flat_group += [g] * len(pools[g])
        flat_seed += pools[g].seed_texts
    ids, ppl = torch.cat(flat_ids), torch.cat(flat_ppl)
    slots: dict[int, tuple[str, int]] = {}
    slot_quotas: dict[tuple[str, int], int] = {}
    strata_bounds: dict[str, list[list[float]]] = {}
    for g in groups:
        if quotas[g] == 0:
            continue
        members = [offsets[g] + i for i in survivors[g]]
        ordered = sorted(members, key=lambda i: (float(ppl[i]), i))
        chunks = np.array_split(np.asarray(ordered), strata)
        per_stratum = _equal_split(quotas[g], list(range(strata)))
        strata_bounds[g] = []
        for s, chunk in enumerate(chunks):
            for i in chunk.tolist():
                slots[i] = (g, s)
            slot_quotas[(g, s)] = per_stratum[s]
            strata_bounds[g].append([float(ppl[chunk[0]]), float(ppl[chunk[-1]])] if len(chunk) else [])
    candidates = sorted(slots)
    hashes, valid = ngram_hashes(ids[candidates], ngram)
    keys = [set(hashes[r][valid[r]].tolist()) for r in range(len(candidates))]
    picked_local = greedy_min_aggregation(keys, [slots[i] for i in candidates], slot_quotas,
                                          swap_passes=swap_passes)
    picked = [candidates[k] for k in picked_local]
    if len(picked) != n:  # every quota is fillable by construction; this guards the bookkeeping
        raise RuntimeError(f"igsp selected {len(picked)} rows for n={n}")

    rng = np.random.default_rng([seed, 0x165])
    random_pick = []
    for slot, q in slot_quotas.items():
        members = [i for i in candidates if slots[i] == slot]
        random_pick += [members[k] for k in rng.permutation(len(members))[:q]]
    order = rng.permutation(n)
    rows = ids[[picked[k] for k in order]].contiguous()
    agg = ngram_stats(rows, ngram, top_k=())["aggregation"]
    agg_random = ngram_stats(ids[random_pick], ngram, top_k=())["aggregation"]
    pool_sizes = {g: len(pools[g]) if quotas[g] else 0 for g in groups}
    dropped = {g: pool_sizes[g] - len(survivors[g]) + relaxed.get(g, {}).get("samples", 0) for g in groups}
    log.info("igsp: pool %d (%d topped up), %d dropped for repetition, selected %d x %d, %d-gram aggregation %.4f "
             "(random selection %.4f)", ids.shape[0], sum(topped_up.values()), sum(dropped.values()), n, seqlen,
             ngram, agg, agg_random)
    generation_s = sum(p.generation_s for p in pools.values())
    perplexity_s = sum(p.perplexity_s for p in pools.values())
    provenance = {
        "kind": "igsp", "n": n, "seqlen": seqlen, "seed": seed, "model": identity,
        "tokenizer": tokenizer_name(tokenizer), "start_token": start, "start_token_is_eos": start_is_eos,
        "generator": {"sampling": asdict(sampling), "dimensions": dimensions, "include_bos": include_bos,
                      "bos_share": bos_share, "seed_prompts": {d: list(prompts_by_dim[d]) for d in dimensions},
                      "prompts_per_dimension": prompts_per_dimension, "pool_factor": pool_factor,
                      "max_pool_factor": max_pool_factor, "max_sample_aggregation": max_sample_aggregation,
                      "ngram": ngram, "strata": strata, "swap_passes": swap_passes, "batch_size": batch_size,
                      "eos_suppressed_until_full": True, "pool_format": POOL_FORMAT},
        "groups": groups, "quotas": quotas, "pool_sizes": pool_sizes, "pool_size": int(ids.shape[0]),
        "topped_up": topped_up, "relaxed": relaxed,
        "dropped_for_repetition": dropped, "strata_perplexity_bounds": strata_bounds,
        "stratum_quotas": {f"{g}:{s}": q for (g, s), q in slot_quotas.items()},
        "selected_pool_indices": [picked[k] for k in order],
        "row_strata": ["{}:{}".format(*slots[picked[k]]) for k in order],
        "row_seed_prompts": [flat_seed[picked[k]] for k in order],
        "ngram_aggregation": agg, "ngram_aggregation_random_selection": agg_random,
        "pool_cached": all(p.chunks_generated == 0 for p in pools.values()),
        "pool_chunks": {g: {"cached": p.chunks_cached, "generated": p.chunks_generated} for g, p in pools.items()},
        "pool_path": pools[groups[0]].paths[0] if pools[groups[0]].paths else None,
        "timings": {"generation_s": generation_s, "perplexity_s": perplexity_s,
                    "selection_s": time.perf_counter() - t_sel, "total_s": time.perf_counter() - t0},
        "environment": environment(),
    }
    return CalibrationSet(ids=rows, provenance=provenance,
                          row_sources=[f"igsp:{flat_group[picked[k]]}" for k in order])
