"""The ``study`` suite: per-item scores on fixed, disjoint TEST and DEV items, built for low noise at small scale.

Why a separate suite. The calibration study compares entries whose retentions differ by a few points, so the
item-sampling error of every dimension's retention must be small (target: standard error <= 3 points) and every
comparison must be *paired* (the same items for both entries, resampled jointly by the bootstrap in
:mod:`calibprune.study.statistics`). lm-eval returns only aggregates; this suite keeps one record per item.

Items. For each benchmark the evaluation pool (the documents :func:`~calibprune.evaluation.benchmarks.load_docs`
returns, i.e. the evaluation split only) is shuffled once with a fixed seed derived from the benchmark name; the
first ``test`` items are the TEST split, the next ``dev`` the DEV split. They never overlap, and a larger ``test``
only adds items. Study results are reported on TEST; IGSP's design choices are made on DEV.

Scoring (all through :func:`~calibprune.evaluation.scoring.score_requests`, lm-eval's tokenisation):

- ``choice`` (multiple choice): each choice's log-likelihood given the question (``" " + choice``), or per
  character of the choice when ``normalise="chars"`` (lm-eval's ``acc_norm``). Per item: ``correct`` (argmax is
  the gold choice, first index on ties), ``k`` (number of choices) and ``margin`` = gold score − mean score of the
  other choices (0 in expectation for a model that cannot tell them apart);
- ``target`` (LAMBADA): ``correct`` = every target token is the greedy prediction; ``nll`` of the target;
- ``nll`` (Code / Math likelihood proxies, WikiText-2 windows): ``nll`` (summed, nats) and ``ntok``.

Scores. Every score is a ratio of sums over items, ``S = Σ num_i / Σ den_i`` (:func:`score_terms`), which is what
lets the bootstrap resample items with one matrix product:

==========  =====================================  ===============================================================
score       num_i / den_i                          meaning
==========  =====================================  ===============================================================
``acc``     correct_i / 1                          accuracy
``acc_cn``  (correct_i − 1/k_i) / (1 − 1/k_i)      chance-normalised accuracy: 0 at chance, 1 when always right
``margin``  margin_i / 1                           mean gold log-likelihood margin (nats, or nats per character)
``nll``     nll_i / ntok_i                         NLL per token (perplexity = exp)
==========  =====================================  ===============================================================

Retention of a score (:func:`score_retention`): ``pruned / dense`` for ``acc``, ``acc_cn`` and ``margin``;
``exp(nll_dense − nll_pruned)`` (= dense ppl / pruned ppl) for ``nll``. Each benchmark has one *primary* score
whose retention enters its dimension; the others are reported beside it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_text
from ..calibration.sources import DATA_DIR_ENV, resolve_data_dir
from ..fingerprint import model_fingerprint
from .benchmarks import BENCHMARKS, data_revision, load_docs
from .perplexity import load_wikitext2_test
from .scoring import Request, encode_request, score_requests

log = logging.getLogger(__name__)

__all__ = ["STUDY_SUITE", "SCORES", "SuiteBenchmark", "evaluate_items", "item_split", "near_chance",
           "resolve_suite", "score_retention", "score_terms", "score_value", "summarise_items"]

SCORES: tuple[str, ...] = ("acc", "acc_cn", "margin", "nll")
SPLITS: tuple[str, ...] = ("test", "dev")
_CACHE_FORMAT = 1
_SPLIT_SEED = "calibprune-study-suite-v1"


@dataclass(frozen=True)
class SuiteBenchmark:
    """One benchmark of the study suite.

    ``name`` is a key of :data:`~calibprune.evaluation.benchmarks.BENCHMARKS` (documents, dimension);
    ``kind`` ``"choice" | "target" | "nll"``; ``test`` / ``dev`` item counts; ``normalise`` ``"none" | "chars"``
    (how a choice's log-likelihood is compared); ``primary`` the score whose retention enters the dimension;
    ``scores`` every score reported; ``max_length`` bounds a request (context cut from the left);
    ``window`` is the WikiText-2 window length (an item is one window).
    """

    name: str
    kind: str
    test: int
    dev: int
    primary: str
    scores: tuple[str, ...]
    normalise: str = "none"
    max_length: int = 512
    window: int = 0

    def __post_init__(self) -> None:
        if self.name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.name!r}")
        if self.kind not in ("choice", "target", "nll"):
            raise ValueError(f"{self.name}: kind must be choice, target or nll, got {self.kind!r}")
        if self.normalise not in ("none", "chars"):
            raise ValueError(f"{self.name}: normalise must be 'none' or 'chars', got {self.normalise!r}")
        allowed = {"choice": {"acc", "acc_cn", "margin"}, "target": {"acc", "nll"}, "nll": {"nll"}}[self.kind]
        if self.primary not in self.scores or not set(self.scores) <= allowed:
            raise ValueError(f"{self.name}: scores {self.scores} (primary {self.primary!r}) must be among "
                             f"{sorted(allowed)}")
        if self.test < 1 or self.dev < 0:
            raise ValueError(f"{self.name}: need test >= 1 and dev >= 0 items, got {self.test}, {self.dev}")

    @property
    def dimension(self) -> str:
        return BENCHMARKS[self.name].dimension


def _mc(name: str, test: int, dev: int, primary: str = "acc", normalise: str = "none") -> SuiteBenchmark:
    return SuiteBenchmark(name, "choice", test, dev, primary, ("acc", "acc_cn", "margin"), normalise)


#: the study suite (sizes and primary scores are justified in the README, "The study suite"). MMLU and WinoGrande
#: are not in it: SmolLM2-135M scores within one standard error of chance on them (MMLU in letter and cloze form).
STUDY_SUITE: dict[str, SuiteBenchmark] = {
    b.name: b for b in (
        # General
        SuiteBenchmark("lambada", "target", 500, 200, "acc", ("acc", "nll")),
        SuiteBenchmark("wikitext2", "nll", 32, 16, "nll", ("nll",), window=512),
        # Commonsense
        _mc("hellaswag", 400, 200, normalise="chars"),
        _mc("piqa", 600, 200, normalise="chars"),
        _mc("arc_easy", 600, 200, normalise="chars"),
        _mc("openbookqa", 220, 80, normalise="chars"),
        # Code
        SuiteBenchmark("humaneval_nll", "nll", 84, 40, "nll", ("nll",)),
        SuiteBenchmark("mbpp_nll", "nll", 140, 100, "nll", ("nll",)),
        # Math
        SuiteBenchmark("gsm8k_nll", "nll", 120, 100, "nll", ("nll",)),
        SuiteBenchmark("math_nll", "nll", 80, 100, "nll", ("nll",), max_length=384),
    )
}


# ---------------------------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------------------------


def _wikitext_windows(tokenizer, data_dir: Path | None, window: int) -> list[list[int]]:
    text = load_wikitext2_test(data_dir=data_dir, source="offline")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]


def item_split(pool_size: int, bench: SuiteBenchmark, split: str) -> list[int]:
    """Indices into the benchmark's evaluation pool for ``split`` (``"test"`` / ``"dev"``); disjoint by design."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if bench.test + bench.dev > pool_size:
        raise ValueError(f"{bench.name}: {bench.test} test + {bench.dev} dev items, but the pool holds only "
                         f"{pool_size}")
    order = list(range(pool_size))
    random.Random(f"{_SPLIT_SEED}:{bench.name}").shuffle(order)
    return order[:bench.test] if split == "test" else order[bench.test:bench.test + bench.dev]


def _requests(bench: SuiteBenchmark, docs: Sequence[Any], tokenizer) -> tuple[list[Request], list[list[int]],
                                                                            list[list[int]]]:
    """Requests, per item the request indices, and per item the character lengths of its choices."""
    reqs: list[Request] = []
    groups: list[list[int]] = []
    chars: list[list[int]] = []
    for doc in docs:
        if bench.name == "wikitext2":
            pairs = None
            new = [Request((doc[0],), tuple(doc[1:]))]
            lengths = []
        elif bench.kind == "choice":
            if "options" in doc:  # WinoGrande, partial scoring: the option-filled prefixes are the contexts
                pairs = [(opt, " " + doc["continuation"]) for opt in doc["options"]]
                lengths = [len(doc["continuation"])] * len(pairs)
            else:
                pairs = [(doc["query"], " " + c) for c in doc["choices"]]
                lengths = [len(c) for c in doc["choices"]]
        elif bench.kind == "target":
            pairs, lengths = [(doc["context"], doc["target"])], []
        else:
            pairs, lengths = [(doc["prompt"], doc["solution"])], []
        if pairs is not None:
            new = [encode_request(tokenizer, c, t, max_length=bench.max_length) for c, t in pairs]
        groups.append(list(range(len(reqs), len(reqs) + len(new))))
        reqs += new
        chars.append(lengths)
    return reqs, groups, chars


def _pool(bench: SuiteBenchmark, tokenizer, data_dir: Path | None) -> list[Any]:
    if bench.name == "wikitext2":
        return _wikitext_windows(tokenizer, data_dir, bench.window)
    return load_docs(bench.name, data_dir)


def _records(bench: SuiteBenchmark, scores, groups: list[list[int]], chars: list[list[int]],
             golds: list[int]) -> dict[str, Any]:
    """Per-item arrays of one benchmark (see the module docstring)."""
    out: dict[str, Any] = {}
    if bench.kind == "choice":
        correct, margin, k = [], [], []
        for group, lengths, gold in zip(groups, chars, golds):
            ll = np.array([scores[r].loglik for r in group], dtype=np.float64)
            if bench.normalise == "chars":
                ll = ll / np.maximum(np.array(lengths, dtype=np.float64), 1.0)
            correct.append(int(int(np.argmax(ll)) == gold))
            margin.append(float(ll[gold] - np.delete(ll, gold).mean()))
            k.append(len(group))
        out.update(correct=correct, margin=margin, k=k)
    elif bench.kind == "target":
        out.update(correct=[int(scores[g[0]].greedy) for g in groups], nll=[-scores[g[0]].loglik for g in groups],
                   ntok=[scores[g[0]].n_tokens for g in groups])
    else:
        out.update(nll=[-scores[g[0]].loglik for g in groups], ntok=[scores[g[0]].n_tokens for g in groups])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Scores and retention
# ---------------------------------------------------------------------------------------------------------------


def _correct(record: Mapping[str, Any]) -> np.ndarray:
    """The 0/1 ``correct`` array; a string of ``0``/``1`` characters (the compact form in ``runs/``) is read too."""
    c = record["correct"]
    return np.frombuffer(c.encode(), dtype=np.uint8) - ord("0") if isinstance(c, str) else np.asarray(c)


def score_terms(record: Mapping[str, Any], score: str) -> tuple[np.ndarray, np.ndarray]:
    """``(num [n], den [n])`` fp64 with score = Σ num / Σ den over the items of ``record`` (see the table above)."""
    if score == "acc":
        num = _correct(record).astype(np.float64)
        return num, np.ones_like(num)
    if score == "acc_cn":
        chance = 1.0 / np.asarray(record["k"], dtype=np.float64)
        return _correct(record).astype(np.float64) - chance, 1.0 - chance
    if score == "margin":
        num = np.asarray(record["margin"], dtype=np.float64)
        return num, np.ones_like(num)
    if score == "nll":
        return np.asarray(record["nll"], dtype=np.float64), np.asarray(record["ntok"], dtype=np.float64)
    raise ValueError(f"unknown score {score!r}; known: {SCORES}")


def score_value(record: Mapping[str, Any], score: str) -> float:
    """The score over all items of ``record``."""
    num, den = score_terms(record, score)
    return float(num.sum() / den.sum())


def score_retention(score: str, dense: np.ndarray | float, pruned: np.ndarray | float) -> np.ndarray | float:
    """Retention of ``score``: pruned / dense, or exp(dense − pruned) for ``nll``; works elementwise on arrays."""
    if score == "nll":
        return np.exp(np.asarray(dense) - np.asarray(pruned)) if isinstance(dense, np.ndarray) \
            else math.exp(dense - pruned)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(pruned) / np.asarray(dense) if isinstance(dense, np.ndarray) else (
            pruned / dense if dense != 0 else math.nan)


def near_chance(record: Mapping[str, Any], kind: str, z: float = 2.0) -> bool:
    """True when a choice benchmark's accuracy is less than ``z`` standard errors (binomial, √(p(1−p)/n)) above
    chance; such a benchmark measures no capability of the model and is left out of its dimension."""
    if kind != "choice":
        return False
    acc = score_value(record, "acc")
    chance = float(np.mean(1.0 / np.asarray(record["k"], dtype=np.float64)))
    return bool(acc - chance < z * math.sqrt(max(acc * (1 - acc), 1e-12) / len(record["k"])))


def summarise_items(record: Mapping[str, Any], bench: SuiteBenchmark) -> dict[str, float]:
    """``{score: value}`` for every score of ``bench``, plus ``chance`` for the accuracy of a choice benchmark."""
    out = {s: score_value(record, s) for s in bench.scores}
    if bench.kind == "choice":
        out["chance"] = float(np.mean(1.0 / np.asarray(record["k"], dtype=np.float64)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Evaluation with a per-(model, benchmark, items) cache
# ---------------------------------------------------------------------------------------------------------------


def _data_revision(bench: SuiteBenchmark, data_dir: Path | None) -> str:
    return data_revision([bench.name], data_dir) or "none"


def _cache_path(cache_dir: Path, fingerprint: str, bench: SuiteBenchmark, split: str, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / fingerprint / f"{bench.name}-{split}-{digest}.json"


def resolve_suite(benchmarks: Iterable[str] | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None
                  ) -> dict[str, SuiteBenchmark]:
    """The study suite, optionally restricted to ``benchmarks`` and with fields replaced per benchmark
    (e.g. ``{"mmlu": {"test": 200}}``). Raises ``ValueError`` on an unknown benchmark or field."""
    names = list(STUDY_SUITE) if benchmarks is None else list(benchmarks)
    for name in names:
        if name not in STUDY_SUITE:
            raise ValueError(f"benchmark {name!r} is not in the study suite; known: {', '.join(STUDY_SUITE)}")
    suite = {n: STUDY_SUITE[n] for n in names}
    fields = set(SuiteBenchmark.__dataclass_fields__) - {"name", "kind"}
    for name, opts in (overrides or {}).items():
        if name not in suite:
            raise ValueError(f"overrides for {name!r}, which is not among the selected benchmarks {names}")
        bad = set(opts) - fields
        if bad:
            raise ValueError(f"unknown field(s) {sorted(bad)} for {name!r}; allowed: {sorted(fields)}")
        suite[name] = SuiteBenchmark(**{**asdict(suite[name]), **opts})
    return suite


@torch.no_grad()
def evaluate_items(model: nn.Module, tokenizer, *, split: str = "test", benchmarks: Iterable[str] | None = None,
                   overrides: Mapping[str, Mapping[str, Any]] | None = None,
                   data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   token_budget: int = 4096, progress: bool = True) -> dict[str, Any]:
    """Per-item scores of ``model`` on the study suite's ``split`` items.

    Args:
        split: ``"test"`` (what the study reports) or ``"dev"`` (design choices, e.g. IGSP's knobs).
        benchmarks, overrides: see :func:`resolve_suite`.
        cache_dir: when set, each benchmark's records are stored as JSON under
            ``<cache_dir>/<model fingerprint>/<benchmark>-<split>-<hash of items and settings>.json`` and reused.
        token_budget: padded tokens per forward (memory / speed trade; results do not depend on it beyond
            floating-point summation order).

    Returns:
        ``{"benchmarks": {name: {"dimension", "kind", "primary", "items": [pool indices], "n", "scores": {score:
        value}, "seconds", <per-item arrays>}}, "split", "fingerprint", "dtype"}``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    suite = resolve_suite(benchmarks, overrides)
    resolved = resolve_data_dir(data_dir)
    if resolved is None:
        raise FileNotFoundError(f"the study suite reads offline data: set {DATA_DIR_ENV} or pass data_dir=")
    for bench in suite.values():
        for rel in BENCHMARKS[bench.name].files:
            if not (resolved / rel).exists():
                raise FileNotFoundError(f"benchmark {bench.name!r}: offline file not found: {resolved / rel}")
    fingerprint = model_fingerprint(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    out: dict[str, Any] = {"benchmarks": {}, "split": split, "fingerprint": fingerprint, "dtype": dtype}
    for name, bench in suite.items():
        pool = _pool(bench, tokenizer, resolved)
        items = item_split(len(pool), bench, split)
        key = {"format": _CACHE_FORMAT, "bench": asdict(bench), "split": split, "items": items,
               "data": _data_revision(bench, resolved), "tokenizer": str(getattr(tokenizer, "name_or_path", ""))}
        path = _cache_path(Path(cache_dir), fingerprint, bench, split, key) if cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                out["benchmarks"][name] = json.loads(path.read_text(encoding="utf-8"))
                log.info("%s/%s: cached (%s)", name, split, path)
                continue
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("ignoring unreadable cache %s (%s)", path, exc)
        docs = [pool[i] for i in items]
        t0 = time.perf_counter()
        reqs, groups, chars = _requests(bench, docs, tokenizer)
        scores = score_requests(model, reqs, groups, token_budget=token_budget, progress=progress,
                                desc=f"{name}/{split}")
        golds = [int(d["gold"]) for d in docs] if bench.kind == "choice" else []
        rec = _records(bench, scores, groups, chars, golds)
        record = {"dimension": bench.dimension, "kind": bench.kind, "primary": bench.primary, "items": items,
                  "n": len(items), "tokens": sum(len(r.context) + len(r.continuation) for r in reqs),
                  "seconds": time.perf_counter() - t0, **rec}
        record["scores"] = summarise_items(record, bench)
        log.info("%s/%s: %s over %d items (%.0f s)", name, split,
                 ", ".join(f"{k} {v:.4f}" for k, v in record["scores"].items()), len(items), record["seconds"])
        if path is not None:
            atomic_write_text(path, json.dumps(record, separators=(",", ":")))
        out["benchmarks"][name] = record
    return out

