"""Sampling machinery shared by the self-generated calibration sets (Self-Cal, SGS, IGSP).

All three sample with the KV cache (``model.generate(use_cache=True)``) from an explicit ``GenerationConfig`` that
sets every sampling knob (so a checkpoint's own ``generation_config`` cannot change the result), seeded per batch
inside ``torch.random.fork_rng`` (deterministic for a given seed and batch size; the caller's RNG state is left
untouched). Rows are never padded.

The *start token* is the tokenizer's BOS; a tokenizer without BOS uses its EOS instead (the usual convention for
GPT-style models, whose EOS also marks a document start); the choice is logged and recorded in the provenance. The
start token opens every prompt but is not part of the returned rows.

Generated pools (before filtering and selection, with their per-sample perplexities) are cached under ``cache_dir``
(default ``$CALIBPRUNE_CACHE/pools``), keyed by model identity (:func:`calibprune.fingerprint.model_identity`),
generator settings and seed; see :mod:`calibprune.calibration.pool_cache`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from .._progress import progress_bar
from ..fingerprint import model_identity
from ..models import model_device
from .pool_cache import load_pool, pool_key, pool_path

__all__ = ["POOL_FORMAT", "SamplingSettings", "ScheduledTemperature", "generate_fixed_length", "start_token_id"]

log = logging.getLogger(__name__)

# Part of every pool cache key: bump it when a change to the sampling code changes what a pool holds.
POOL_FORMAT = 2


class ScheduledTemperature:
    """Temperature that moves linearly from ``t_init`` to ``t_final`` over the first ``schedule_tokens`` new tokens.

    At generation step s (tokens generated so far, s = 0 for the first new token)
    t(s) = t_init + (t_final − t_init) · min(s / schedule_tokens, 1), and t(s) = t_final when schedule_tokens = 0.
    Scores ``[b, vocab]`` are divided by t(s). In ``generate`` custom processors run after the repetition penalty
    and before top-k / top-p, the same place as Hugging Face's own ``TemperatureLogitsWarper``.

    Args:
        prompt_len: length of the prompt in ``input_ids`` (the step is ``input_ids.shape[1] − prompt_len``).
    """

    def __init__(self, t_init: float, t_final: float, schedule_tokens: int, prompt_len: int) -> None:
        if t_init <= 0 or t_final <= 0:
            raise ValueError(f"temperatures must be > 0, got t_init={t_init}, t_final={t_final}")
        if schedule_tokens < 0:
            raise ValueError(f"schedule_tokens must be >= 0, got {schedule_tokens}")
        self.t_init, self.t_final = float(t_init), float(t_final)
        self.schedule_tokens, self.prompt_len = int(schedule_tokens), int(prompt_len)

    def temperature(self, step: int) -> float:
        """t(step) for a step ≥ 0."""
        if self.schedule_tokens == 0:
            return self.t_final
        frac = min(max(step, 0) / self.schedule_tokens, 1.0)
        return self.t_init + (self.t_final - self.t_init) * frac

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature(input_ids.shape[1] - self.prompt_len)


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that shapes one sampled token: temperature schedule, top-k (0 = off), top-p (1 = off), penalty."""

    t_init: float = 1.0
    t_final: float = 1.0
    schedule_tokens: int = 0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.t_init <= 0 or self.t_final <= 0:
            raise ValueError(f"temperatures must be > 0, got t_init={self.t_init}, t_final={self.t_final}")
        if self.schedule_tokens < 0:
            raise ValueError(f"schedule_tokens must be >= 0, got {self.schedule_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def start_token_id(tokenizer: Any) -> tuple[int, bool]:
    """``(id, is_eos)``: the tokenizer's BOS id, or its EOS id when it has no BOS (``is_eos`` True then)."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id, needed to end and separate generations")
    if bos is None:
        log.info("tokenizer has no BOS token; generations start from EOS (id %d) instead", eos)
        return int(eos), True
    return int(bos), False


def derived_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed for one batch: independent streams per (seed, tags), stable across runs and platforms."""
    digest = hashlib.sha256(repr((int(seed),) + tags).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: torch.Tensor, *, sampling: SamplingSettings, max_new_tokens: int,
            min_new_tokens: int, eos: int, seed: int,
            attention_mask: torch.Tensor | None = None) -> list[tuple[torch.Tensor, bool]]:
    """Sample continuations of ``prompts: [b, p] int64``.

    ``attention_mask: [b, p]`` (0 on left padding) lets prompts of different lengths share a batch; without it
    every prompt token is real.

    Returns:
        One ``(tokens [k] int64 CPU, ended_by_eos)`` per row: the new tokens up to, not including, the first EOS.
    """
    from transformers import GenerationConfig
    from transformers.generation import LogitsProcessorList

    device = model_device(model)
    prompt_len = prompts.shape[1]
    processors = LogitsProcessorList()
    if not sampling.t_init == sampling.t_final == 1.0:
        processors.append(ScheduledTemperature(sampling.t_init, sampling.t_final, sampling.schedule_tokens,
                                               prompt_len))
    # Every knob explicit: generate() fills unset (None) fields from the checkpoint's generation_config.
    config = GenerationConfig(
        do_sample=True, use_cache=True, num_beams=1, num_return_sequences=1,
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        temperature=1.0, top_k=sampling.top_k, top_p=sampling.top_p, typical_p=1.0,
        repetition_penalty=sampling.repetition_penalty, no_repeat_ngram_size=0,
        eos_token_id=eos, pad_token_id=eos,
    )
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            mask = torch.ones_like(prompts) if attention_mask is None else attention_mask
            out = model.generate(input_ids=prompts.to(device), attention_mask=mask.to(device),
                                 generation_config=config, logits_processor=processors)
    finally:
        model.train(was_training)
    new = out[:, prompt_len:].cpu()
    result = []
    for row in new:
        hits = torch.nonzero(row == eos).flatten()
        if hits.numel():
            result.append((row[: int(hits[0])].clone(), True))
        else:
            result.append((row.clone(), False))
    return result


def check_common(n: int, seqlen: int, batch_size: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)


def environment() -> dict:
    from calibprune.provenance import provenance

    return provenance()


def cached_pool(kind: str, model: torch.nn.Module, settings: dict, cache: bool,
                cache_dir: str | os.PathLike | None) -> tuple[dict | None, Any, dict]:
    """``(pool or None, path or None, model identity)`` for these settings."""
    identity = model_identity(model)
    if not cache:
        return None, None, identity
    path = pool_path(cache_dir, kind, pool_key(identity, {"kind": kind, "pool_format": POOL_FORMAT, **settings}))
    pool = load_pool(path)
    if pool is not None:
        log.info("%s: loaded cached pool %s (%d samples); not generating", kind, path, pool["ids"].shape[0])
    return pool, path, identity


def per_sample_perplexity(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    from calibprune.metrics import calibration_perplexity

    return calibration_perplexity(model, ids, batch_size=batch_size, per_sample=True)


def generate_fixed_length(model: torch.nn.Module, prompts: list[torch.Tensor], length: int, *,
                           sampling: SamplingSettings, eos: int, seed: int, batch_size: int, desc: str,
                           progress: bool) -> torch.Tensor:
    """Continue each prompt ``[start] + body`` (``[p] int64``) until ``body`` + new tokens hold ``length`` tokens.

    EOS is suppressed until then (``min_new_tokens``), so no sample is short. Prompts are sorted by length (then
    index) and cut into batches of ``batch_size``; shorter prompts in a batch are left-padded (masked out), which
    is deterministic for a fixed ``batch_size``. A batch runs for the tokens its shortest prompt needs; longer
    prompts keep only the tokens they need.

    Returns:
        ``[len(prompts), length] int64``.
    """
    out = torch.empty(len(prompts), length, dtype=torch.int64)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    longest = max(len(p) for p in prompts)
    if longest - 1 >= length:
        raise ValueError(f"a prompt of {longest - 1} tokens leaves no room in a sample of {length}")
    with progress_bar(total=len(prompts) * length, desc=desc, unit="tok", show=progress) as bar:
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            width = max(len(prompts[i]) for i in batch)
            p = torch.full((len(batch), width), eos, dtype=torch.int64)
            mask = torch.zeros(len(batch), width, dtype=torch.int64)
            for r, i in enumerate(batch):
                p[r, width - len(prompts[i]):] = prompts[i]
                mask[r, width - len(prompts[i]):] = 1
            new = length - (min(len(prompts[i]) for i in batch) - 1)
            gens = sample(model, p, sampling=sampling, max_new_tokens=new, min_new_tokens=new, eos=eos,
                           seed=derived_seed(seed, desc, b // batch_size), attention_mask=mask)
            for i, (tokens, _) in zip(batch, gens):
                need = length - (len(prompts[i]) - 1)
                if tokens.numel() < need:  # only a model that emits EOS despite min_new_tokens gets here
                    raise RuntimeError(f"{desc}: generation returned {tokens.numel()} of {need} tokens")
                out[i] = torch.cat([prompts[i][1:], tokens[:need]])
            bar.update(len(batch) * length)
    return out
