"""Pruning across processes with ``torch.distributed``: data-parallel statistics, weight-parallel solves.

Inside an initialised process group (``torchrun``, or ``torch.distributed.init_process_group`` before calling
:func:`calibprune.prune`) the layer-wise pipeline runs on every rank as follows:

* **Shards.** The calibration batches are split into contiguous shards in sample order (rank 0 holds the first
  batches), so the one-process order is the concatenation of the shards. Each rank captures its shard's layer-0
  inputs, runs it through every layer, and propagates it to the next layer; activations never cross ranks.
* **Statistics.** Each rank folds its shard into the method's running means exactly as one process would, with
  its local count ``n_r``. ``finalize_statistics`` combines them once per layer through a
  :class:`StatisticsReducer`. A running mean over ``n_r`` sequences is ``T_r = (1/n_r)·Σ_{i∈r} t_i`` (SparseGPT's
  H = (2/n)·Σ XᵢᵀXᵢ, Wanda's ‖X_j‖², DSnoT's means), so the mean over all ``N = Σ n_r`` sequences is
  ``T = Σ_r (n_r/N)·T_r``. With ``numerics="reference"`` the terms are summed in rank order, on fp32 copies
  gathered from every rank (:func:`ordered_weighted_sum`), so the result does not depend on the collective's
  algorithm or the machine: the same H bits on every run. With ``numerics="fast"`` each rank scales its own
  term and a plain ``all_reduce``/``reduce`` sums them.
* **Solves.** The target modules of a layer are grouped by shared input (q/k/v, gate/up share one Hessian and
  one inverse factor) and the groups are dealt to ranks by cost (:func:`assign_owners`: cols³ for the factor plus
  rows·cols² per module, largest first to the least-loaded rank). A group's statistics are reduced to its owner
  only; the owner prunes, then broadcasts the pruned weights; the module records are gathered for the report.
* **Failures.** After each local phase of a layer (capture, statistics, prune, propagate, save) the ranks
  exchange an error flag (:func:`sync_phase`); a failure on any rank raises the same
  ``RuntimeError("rank R failed in layer L <phase>: ...")`` on every rank, instead of leaving the others waiting
  in the next collective. A rank that dies outright is caught by the process group's timeout
  (:func:`init_from_env` sets a finite one) or, under ``torchrun``, by the launcher stopping the others.

Backends: gloo (CPU tensors) and NCCL (one rank per GPU, ``cuda:LOCAL_RANK``); tensors are moved to the backend's
device for each collective when they live elsewhere.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["DistContext", "current_context", "init_from_env", "shard_range", "assign_owners", "module_cost",
           "sync_phase", "check_same", "StatisticsReducer", "ordered_weighted_sum", "broadcast_tensors",
           "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV"]

#: Seconds a collective may wait for a peer before the process group gives up (``init_from_env``).
DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "CALIBPRUNE_DIST_TIMEOUT"
# Elements per collective when gathering statistics for an ordered sum: bounds the extra memory to world × 64 MB.
_CHUNK = 16 * 1024 * 1024


@dataclass
class DistContext:
    """The process group a prune runs in, and what its collectives cost.

    ``comm_device``: where tensors must be for the backend (the current CUDA device for NCCL, else CPU).
    ``seconds`` / ``bytes``: wall time and payload of the collectives, by kind, for the report and benchmarks.
    """

    rank: int
    world: int
    backend: str
    comm_device: torch.device
    group: Any = None
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def account(self, kind: str, seconds: float, nbytes: int = 0) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def summary(self) -> dict:
        """JSON-ready: world size, backend, and seconds / MB / calls per kind of collective on this rank."""
        return {"world_size": self.world, "backend": self.backend,
                "collectives": {k: {"seconds": self.seconds[k], "mb": self.bytes[k] / 2**20, "calls": self.calls[k]}
                                for k in sorted(self.seconds)}}


def current_context() -> DistContext | None:
    """The initialised default process group as a :class:`DistContext`, or None (no group, or a group of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world == 1:
        return None
    backend = str(dist.get_backend())
    comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world=world, backend=backend, comm_device=comm)


def init_from_env(device: str | None = None) -> tuple[DistContext | None, str | None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), initialise the default process group.

    One rank per GPU: with CUDA available and ``device`` not a CPU, the backend is NCCL and the rank computes on
    ``cuda:LOCAL_RANK``; otherwise gloo on CPU. The group's timeout is ``$CALIBPRUNE_DIST_TIMEOUT`` seconds
    (default :data:`DEFAULT_TIMEOUT_S`), so a rank that vanishes cannot hang the others forever.

    Returns ``(context, device)``: the context (None outside torchrun) and the compute device this rank must use
    (``device`` unchanged outside torchrun). A ``device`` naming a CUDA index under torchrun is an error: each rank
    takes its own GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, device
    if device is not None and torch.device(device).type == "cuda" and torch.device(device).index is not None:
        raise ValueError(f"under torchrun every rank uses cuda:LOCAL_RANK; drop --device {device} (or give "
                         "--device cuda)")
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
                               "start at most one rank per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device is None:
        device = "cpu"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return current_context(), device


def shard_range(count: int, world: int, rank: int) -> range:
    """The contiguous share of ``count`` items (batches) that ``rank`` holds; the first ``count % world`` ranks
    hold one more. Concatenated in rank order the shards are ``range(count)``."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def module_cost(rows: int, cols: int) -> float:
    """Relative cost of one OBS solve: the lazy-batch updates, rows·cols² (the factor is counted per group)."""
    return float(rows) * cols * cols


def assign_owners(costs: Mapping[str, float], world: int) -> dict[str, int]:
    """Deal work units (name → cost) to ``world`` ranks, largest first to the least-loaded rank (LPT).

    Deterministic: ties in cost go by name, ties in load to the lower rank, so every rank computes the same
    assignment without communicating.
    """
    load = [0.0] * world
    owners: dict[str, int] = {}
    for name, cost in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += cost
    return owners


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def sync_phase(ctx: DistContext | None, where: str, error: BaseException | None, payload: Any = None) -> list[Any]:
    """Collectively exchange each rank's outcome of a local phase; returns every rank's ``payload``.

    When any rank failed, every rank raises ``RuntimeError("rank R failed in <where>: <error>")`` naming each
    failed rank (the failing rank chains its own exception). ``where`` reads like ``"layer 3 prune"``. In one
    process (``ctx`` None) an error is re-raised unchanged.
    """
    if ctx is None:
        if error is not None:
            raise error
        return [payload]
    t0 = time.perf_counter()
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, (_describe(error) if error is not None else None, payload), group=ctx.group)
    ctx.account("sync", time.perf_counter() - t0)
    failed = [(r, err) for r, (err, _) in enumerate(gathered) if err is not None]
    if failed:
        message = "; ".join(f"rank {r} failed in {where}: {err}" for r, err in failed)
        raise RuntimeError(message) from error
    return [p for _, p in gathered]


def check_same(ctx: DistContext | None, what: str, value: Any) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold the same ``value`` (compared by its repr hash)."""
    if ctx is None:
        return
    digest = hashlib.sha256(repr(value).encode()).hexdigest()
    gathered = sync_phase(ctx, f"checking {what}", None, digest)
    if len(set(gathered)) > 1:
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(gathered):
            groups.setdefault(d, []).append(r)
        ranks = " vs ".join(f"ranks {g}" for g in groups.values())
        raise ValueError(f"the ranks disagree on {what} ({ranks}); every rank must be given the same model, "
                         "calibration tokens and config")


def _to_comm(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    return t if t.device == ctx.comm_device else t.to(ctx.comm_device)


def ordered_weighted_sum(ctx: DistContext, term: torch.Tensor, weights: Sequence[float],
                         dst: int | None = None) -> torch.Tensor | None:
    """``Σ_r weights[r]·term_r`` over the ranks' ``term`` tensors, summed in rank order (fp32 or fp64).

    Every rank computes ``fl(w_0·T_0)``, then adds ``fl(w_r·T_r)`` for r = 1, 2, … in that order, so the bits do not
    depend on the collective's algorithm. ``dst=None``: the sum on every rank (``all_gather``); else only on rank
    ``dst`` (``gather``; the others return None). Works in chunks of 16M elements, so the extra memory is
    ``world × 64 MB`` at most. ``term`` is not modified.
    """
    flat = term.reshape(-1)
    out = torch.empty_like(flat) if dst is None or ctx.rank == dst else None
    t0 = time.perf_counter()
    nbytes = 0
    for start in range(0, flat.numel(), _CHUNK):
        chunk = _to_comm(ctx, flat[start : start + _CHUNK].contiguous())
        parts = [torch.empty_like(chunk) for _ in range(ctx.world)] if out is not None else None
        if dst is None:
            dist.all_gather(parts, chunk, group=ctx.group)
        else:
            dist.gather(chunk, parts, dst=dst, group=ctx.group)
        nbytes += chunk.numel() * chunk.element_size() * ctx.world
        if out is not None:
            acc = parts[0] * weights[0]
            for r in range(1, ctx.world):
                acc += parts[r] * weights[r]
            out[start : start + chunk.numel()] = acc.to(out.device)
    ctx.account("statistics (ordered gather)", time.perf_counter() - t0, nbytes)
    return out.reshape(term.shape) if out is not None else None


def _weighted_reduce(ctx: DistContext, term: torch.Tensor, weight: float, dst: int | None) -> torch.Tensor | None:
    """``Σ_r w_r·term_r`` by one ``all_reduce``/``reduce`` (the backend's summation order)."""
    t0 = time.perf_counter()
    buf = _to_comm(ctx, term * weight)
    if dst is None:
        dist.all_reduce(buf, group=ctx.group)
    else:
        dist.reduce(buf, dst=dst, group=ctx.group)
    ctx.account("statistics (reduce)", time.perf_counter() - t0, buf.numel() * buf.element_size())
    if dst is not None and ctx.rank != dst:
        return None
    return buf.to(term.device)


class StatisticsReducer:
    """Combines the ranks' per-group running means in ``finalize_statistics`` (see the module docstring).

    ``owners``: the rank that prunes each group; a group's statistics are reduced to its owner only (its other
    ranks drop them) unless ``everywhere`` is asked for (a measuring pass every rank evaluates).
    """

    def __init__(self, ctx: DistContext, owners: Mapping[str, int], numerics: str):
        self.ctx, self.owners, self.numerics = ctx, dict(owners), numerics

    def owns(self, group: str) -> bool:
        """Whether this rank prunes ``group``."""
        return self.owners.get(group, 0) == self.ctx.rank

    def totals(self, counts: Mapping[str, int], groups: Iterable[str]) -> dict[str, list[int]]:
        """Every rank's count per group (one small all-gather): ``{group: [n_0, …, n_{R-1}]}``."""
        names = sorted(groups)
        local = torch.tensor([int(counts.get(g, 0)) for g in names], dtype=torch.int64)
        parts = [torch.empty_like(local) for _ in range(self.ctx.world)]
        t0 = time.perf_counter()
        if self.ctx.backend == "nccl":
            gathered = [p.to(self.ctx.comm_device) for p in parts]
            dist.all_gather(gathered, local.to(self.ctx.comm_device), group=self.ctx.group)
            parts = [p.cpu() for p in gathered]
        else:
            dist.all_gather(parts, local, group=self.ctx.group)
        self.ctx.account("statistics (counts)", time.perf_counter() - t0)
        return {g: [int(p[i]) for p in parts] for i, g in enumerate(names)}

    def running_means(self, stats: Mapping[str, torch.Tensor], counts: Mapping[str, int], *,
                      everywhere: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Combine each group's running mean ``stats[g]`` over ``counts[g]`` local samples into the mean over all
        ranks' samples, ``Σ_r (n_r/N)·T_r``; returns ``(means, totals)`` holding the groups this rank owns (all of
        them with ``everywhere``). Every rank must hold every group (the pipeline checks the group names agree)."""
        groups = sorted(stats)
        per_rank = self.totals(counts, groups)
        means: dict[str, torch.Tensor] = {}
        totals: dict[str, int] = {}
        for g in groups:
            n = per_rank[g]
            total = sum(n)
            weights = [c / total if total else 0.0 for c in n]
            dst = None if everywhere else self.owners.get(g, 0)
            if self.numerics == "reference":
                combined = ordered_weighted_sum(self.ctx, stats[g], weights, dst)
            else:
                combined = _weighted_reduce(self.ctx, stats[g], weights[self.ctx.rank], dst)
            if combined is not None:
                means[g], totals[g] = combined, total
        return means, totals


def broadcast_tensors(ctx: DistContext, tensors: Sequence[tuple[torch.Tensor, int]], kind: str) -> None:
    """Broadcast each tensor in place from its source rank (``[(tensor, src), …]``, the same list on every rank)."""
    t0 = time.perf_counter()
    nbytes = 0
    for tensor, src in tensors:
        buf = _to_comm(ctx, tensor.detach())
        buf = buf if buf.is_contiguous() else buf.contiguous()
        dist.broadcast(buf, src=src, group=ctx.group)
        if ctx.rank != src and (buf.data_ptr() != tensor.data_ptr()):
            tensor.data.copy_(buf)
        nbytes += buf.numel() * buf.element_size()
    ctx.account(kind, time.perf_counter() - t0, nbytes)
