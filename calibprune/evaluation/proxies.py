"""Likelihood proxies: mean NLL per token of reference solutions given their prompts.

For a pair (prompt, solution) the prompt and the solution are tokenised separately (no special tokens) and
concatenated, ``ids = [p_1..p_P, s_1..s_S]``; only the solution tokens are scored:

    NLL = - sum_{j=1..S} log p(s_j | p_1..p_P, s_1..s_{j-1})

and the proxy is ``sum NLL / sum S`` over all pairs (token-weighted mean, nats per token); ``exp`` of it is the
perplexity of the reference solutions. Sequences longer than ``max_length`` lose prompt tokens from the left
(the solution is kept whole unless it alone exceeds ``max_length``, then its tail is cut).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._progress import progress_bar

log = logging.getLogger(__name__)

__all__ = ["SolutionNLL", "encode_pairs", "solution_nll"]


@dataclass(frozen=True)
class SolutionNLL:
    """Result of :func:`solution_nll`: total NLL (nats), scored tokens, and ``nll_sum / n_tokens``."""

    nll_sum: float
    n_tokens: int
    n_items: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int) -> list[tuple[list[int], int]]:
    """Token ids of each ``prompt + solution`` and the number of solution tokens at its end (>= 1).

    Returns ``[(ids, n_solution)]`` with ``len(ids) <= max_length``; pairs whose solution has no token are dropped.
    """
    out: list[tuple[list[int], int]] = []
    for prompt, solution in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        s = tokenizer(solution, add_special_tokens=False)["input_ids"]
        if not s:
            continue
        s = s[: max_length - 1]  # at least one context token
        p = p[max(0, len(p) - (max_length - len(s))):]
        if not p:  # nothing to condition the first solution token on: it is not scored
            p, s = s[:1], s[1:]
            if not s:
                continue
        out.append((p + s, len(s)))
    return out


@torch.no_grad()
def solution_nll(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int = 1024,
                 batch_size: int = 4, device: torch.device | str | None = None, progress: bool = True
                 ) -> SolutionNLL:
    """Sum and mean NLL (fp32 log-softmax) of the solution tokens of ``pairs = [(prompt, solution)]``.

    Sequences are right-padded into batches ``input_ids: [B, T] int64`` with an attention mask; sorted by length
    so that batches hold similar lengths.
    """
    encoded = encode_pairs(tokenizer, pairs, max_length=max_length)
    if not encoded:
        raise ValueError("no (prompt, solution) pair with a non-empty solution to score")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll_sum, n_tokens = 0.0, 0
    batches = range(0, len(order), batch_size)
    for start in progress_bar(batches, desc="solution NLL", unit="batch", leave=False, show=progress):
        items = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.int64)
        attention = torch.zeros((len(items), width), dtype=torch.int64)
        scored = torch.zeros((len(items), width), dtype=torch.bool)  # positions whose *token* is scored
        for row, (ids, n_sol) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention[row, : len(ids)] = 1
            scored[row, len(ids) - n_sol : len(ids)] = True
        input_ids, attention, scored = input_ids.to(device), attention.to(device), scored.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits  # [B, T, V]
        mask = scored[:, 1:]  # logits at t predict token t+1
        picked = logits[:, :-1][mask].float()  # [N, V], only the scored positions (saves memory)
        targets = input_ids[:, 1:][mask]  # [N]
        nll_sum += float(nn.functional.cross_entropy(picked, targets, reduction="sum"))
        n_tokens += int(mask.sum())
    return SolutionNLL(nll_sum=nll_sum, n_tokens=n_tokens, n_items=len(encoded))
