"""Per-item log-likelihood scoring: every request of every item in one packed forward, logits only where scored.

A *request* is ``(context ids, continuation ids)``; its result is the summed log-likelihood of the continuation
tokens given the context, the number of scored tokens, and whether every continuation token was the greedy
(argmax) prediction. Multiple-choice items, LAMBADA, the Code / Math likelihood proxies and WikiText-2 windows
are all lists of requests (``study_suite.py`` builds them), so one scorer serves every benchmark and returns
per-item numbers that the study's paired bootstrap resamples.

Tokenisation follows lm-evaluation-harness (``_encode_pair``): trailing spaces of the context move to the
continuation, ``whole = enc(context + continuation)``, ``continuation ids = whole[len(enc(context)):]``, no special
tokens. The reference for every number here is :func:`score_requests_naive`: one plain forward per request over
``context + continuation`` with full logits, exactly what lm-eval computes per request.

Packing (the fast path, :func:`score_requests`). The requests of an item that share a context are laid out in one
row as ``[context][cont_1][cont_2]...``; a boolean 4-D attention mask lets each continuation see its context and
its own earlier tokens only, and position ids restart after the context, so every continuation token sees exactly
what it would see in its own row (``ctx + cont_j``). A four-choice item then costs ``|ctx| + Σ|cont_j|`` tokens
instead of ``4·|ctx| + Σ|cont_j|``. Rows are sorted by length and batched under a token budget. The LM head runs
only on the positions that predict a scored token (for SmolLM2-135M the 49k-entry head is a quarter of the
forward). Both shortcuts are checked against the naive path in the tests, on several architectures.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress_bar
from ..models import model_device

log = logging.getLogger(__name__)

__all__ = ["Request", "RequestScore", "encode_request", "score_requests", "score_requests_naive"]


@dataclass(frozen=True)
class Request:
    """``context``: token ids (>= 1), ``continuation``: token ids (>= 1) whose log-likelihood is scored."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.context or not self.continuation:
            raise ValueError(f"a request needs >= 1 context and >= 1 continuation token, got "
                             f"{len(self.context)} and {len(self.continuation)}")


@dataclass(frozen=True)
class RequestScore:
    """``loglik``: Σ log p(continuation token | prefix) in nats (fp32 log-softmax, summed in fp64);
    ``n_tokens``: continuation length; ``greedy``: every continuation token was the argmax prediction."""

    loglik: float
    n_tokens: int
    greedy: bool


def encode_request(tokenizer, context: str, continuation: str, *, max_length: int | None = None) -> Request:
    """lm-eval's split of ``context + continuation`` into token ids (see the module docstring).

    ``max_length`` (optional) drops context tokens from the left so that the request fits; the continuation is
    kept whole (a continuation alone longer than ``max_length - 1`` keeps its first ``max_length - 1`` tokens).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not cont:  # the continuation merged into the context's last token: score that token instead
        ctx, cont = whole[:-1], whole[-1:]
    if not ctx:
        raise ValueError(f"empty context for continuation {continuation[:40]!r}")
    if max_length is not None:
        cont = cont[: max_length - 1]
        ctx = ctx[max(0, len(ctx) - (max_length - len(cont))):]
    return Request(tuple(ctx), tuple(cont))


def _log_probs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits: [N, V]`` any float dtype, ``targets: [N]`` -> (log p(target) ``[N] fp32``, is-argmax ``[N] bool``)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(1, targets[:, None])[:, 0], logits.argmax(-1) == targets


@torch.no_grad()
def score_requests_naive(model: nn.Module, requests: Sequence[Request]) -> list[RequestScore]:
    """Reference: one forward per request over ``context + continuation``, full logits."""
    device = model_device(model)
    out = []
    for req in requests:
        ids = torch.tensor([req.context + req.continuation], dtype=torch.int64, device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0]  # [T, V]
        c = len(req.context)
        lp, hit = _log_probs(logits[c - 1:-1], ids[0, c:])
        out.append(RequestScore(float(lp.double().sum()), len(req.continuation), bool(hit.all())))
    return out


def _head_only_supported(model: nn.Module) -> bool:
    """True when ``logits = output_embeddings(base_model(...).last_hidden_state)`` (no softcap or scaling)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return False
    return model.get_output_embeddings() is not None and getattr(model, "base_model", model) is not model


@dataclass
class _Row:
    """One packed row: token ids, position ids, per token the index of its attention block, and what is scored."""

    ids: list[int]
    pos: list[int]
    block: list[int]  # attention block id: a context block, or a continuation block tied to its context
    parent: list[int]  # for a continuation token the context block it sees; -1 for context tokens
    scored: list[tuple[int, int, int]]  # (predicting position, target token, request index)


def _pack(requests: Sequence[Request], indices: Sequence[int]) -> _Row:
    """Lay out the requests ``indices`` (one item) in a row, one context block per distinct context."""
    row = _Row([], [], [], [], [])
    ctx_block: dict[tuple[int, ...], tuple[int, int]] = {}  # context -> (block id, position of its last token)
    n_blocks = 0
    for r in indices:
        req = requests[r]
        if req.context not in ctx_block:
            start = len(row.ids)
            row.ids += req.context
            row.pos += range(len(req.context))
            row.block += [n_blocks] * len(req.context)
            row.parent += [-1] * len(req.context)
            ctx_block[req.context] = (n_blocks, start + len(req.context) - 1)
            n_blocks += 1
        cblock, last = ctx_block[req.context]
        start = len(row.ids)
        c = len(req.context)
        row.ids += req.continuation
        row.pos += range(c, c + len(req.continuation))
        row.block += [n_blocks] * len(req.continuation)
        row.parent += [cblock] * len(req.continuation)
        n_blocks += 1
        predicting = [last] + list(range(start, start + len(req.continuation) - 1))
        row.scored += [(p, t, r) for p, t in zip(predicting, req.continuation)]
    return row


def _attention_mask(rows: list[_Row], width: int) -> torch.Tensor:
    """``[B, 1, width, width] bool``: token i sees token j <= i of its own block or of its parent context block.

    Padding positions see only themselves (an all-False row would give NaN in the softmax).
    """
    mask = torch.zeros(len(rows), 1, width, width, dtype=torch.bool)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    for b, row in enumerate(rows):
        n = len(row.ids)
        block = torch.tensor(row.block)
        parent = torch.tensor(row.parent)
        same = block[:, None] == block[None, :]
        sees_ctx = parent[:, None] == block[None, :]
        mask[b, 0, :n, :n] = (same | sees_ctx) & causal[:n, :n]
        idx = torch.arange(n, width)
        mask[b, 0, idx, idx] = True
    return mask


@torch.no_grad()
def score_requests(model: nn.Module, requests: Sequence[Request], items: Sequence[Sequence[int]] | None = None, *,
                   token_budget: int = 4096, pack: bool = True, progress: bool = True,
                   desc: str = "scoring") -> list[RequestScore]:
    """Score ``requests`` (see :class:`RequestScore`), packing the requests of each item into one row.

    Args:
        requests: the requests, any order.
        items: groups of request indices that share a row (e.g. the choices of one question); default: each
            request alone. Every request must appear in exactly one group.
        token_budget: at most this many (padded) tokens per forward; a row longer than the budget runs alone.
        pack: ``False`` puts each request in its own row (no 4-D mask; for models that reject one).

    Returns:
        One :class:`RequestScore` per request, in the order of ``requests``.
    """
    if items is None:
        items = [[i] for i in range(len(requests))]
    if not pack:
        items = [[i] for group in items for i in group]
    seen = sorted(i for group in items for i in group)
    if seen != list(range(len(requests))):
        raise ValueError("items must cover every request index exactly once")
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    device = model_device(model)
    head_only = _head_only_supported(model)
    rows = sorted((_pack(requests, group) for group in items), key=lambda r: -len(r.ids))
    loglik = [0.0] * len(requests)
    greedy = [True] * len(requests)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=sum(len(r.ids) for r in rows), desc=desc, unit="tok", leave=False, show=progress)
    try:
        start = 0
        while start < len(rows):
            width = len(rows[start].ids)  # rows are sorted longest first
            count = max(1, token_budget // width)
            batch = rows[start:start + count]
            start += len(batch)
            ids = torch.zeros(len(batch), width, dtype=torch.int64)
            pos = torch.zeros(len(batch), width, dtype=torch.int64)
            for b, row in enumerate(batch):
                ids[b, :len(row.ids)] = torch.tensor(row.ids)
                pos[b, :len(row.ids)] = torch.tensor(row.pos)
            mask = _attention_mask(batch, width)
            sel_b = torch.tensor([b for b, row in enumerate(batch) for _ in row.scored])
            sel_p = torch.tensor([p for row in batch for p, _, _ in row.scored])
            targets = torch.tensor([t for row in batch for _, t, _ in row.scored], device=device)
            owner = [r for row in batch for _, _, r in row.scored]
            kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                          use_cache=False)
            if head_only:
                hidden = model.base_model(**kwargs).last_hidden_state  # [B, W, H]
                logits = model.get_output_embeddings()(hidden[sel_b.to(device), sel_p.to(device)])  # [N, V]
            else:
                logits = model(**kwargs).logits[sel_b.to(device), sel_p.to(device)]
            lp, hit = _log_probs(logits, targets)
            for r, v, h in zip(owner, lp.double().cpu().tolist(), hit.cpu().tolist()):
                loglik[r] += v
                greedy[r] = greedy[r] and h
            bar.update(sum(len(r.ids) for r in batch))
    finally:
        bar.close()
        model.train(was_training)
    return [RequestScore(loglik[i], len(req.continuation), greedy[i]) for i, req in enumerate(requests)]
