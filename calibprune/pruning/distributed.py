"""Pruning across processes with ``torch.distributed``: data-parallel statistics, weight-parallel solves.

Inside an initialised process group (``torchrun``, or ``torch.distributed.init_process_group`` before calling
:func:`calibprune.prune`) the layer-wise pipeline runs on every rank as follows:

* **Shards.** The calibration batches are split into contiguous shards in sample order (rank 0 holds the first
  batches), so the one-process order is the concatenation of the shards. Each rank captures its shard's layer-0
  inputs, runs it through every layer, and propagates it to the next layer; activations never cross ranks.
* **Statistics.** Every statistic here is a running mean folded batch by batch in sample order (SparseGPT's
  ``H ← H·n/(n+b) + (2/(n+b))·XᵀX``, Wanda's ‖X_j‖², DSnoT's means and variances). A running mean over ``n_r``
  sequences is ``T_r = (1/n_r)·Σ_{i∈r} t_i``, so the mean over all ``N = Σ n_r`` sequences is
  ``T = Σ_r (n_r/N)·T_r``: that is how the running-average scaling is reproduced from partial sums, and what
  ``numerics="fast"`` does (each rank scales its own mean by ``n_r/N``, one ``reduce`` sums them). It rounds
  differently from one process, and SparseGPT's masks are chaotic in H (on SmolLM2-135M the partial-sum H gave
  90.6% mask agreement with one process and a 2.9% larger reconstruction error), so ``numerics="reference"``
  reproduces the one-process fold *exactly* instead: an order-fixed chain over the ranks in sample order, with
  the expensive per-batch products still computed in parallel (:class:`StatisticsReducer`). The masks and weights
  are then bitwise those of one process.
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
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["DistContext", "RankFailure", "current_context", "init_from_env", "shard_range", "assign_owners",
           "module_cost", "sync_phase", "check_same", "StatisticsReducer", "broadcast_tensors",
           "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "DEFER_MB_ENV"]

#: Seconds a collective may wait for a peer before the process group gives up (``init_from_env``).
DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "CALIBPRUNE_DIST_TIMEOUT"
#: MB of state-sized terms a later rank of the exact chain may hold for one layer before it keeps batches instead
#: (default: a quarter of the memory of the device the statistics live on).
DEFER_MB_ENV = "CALIBPRUNE_DIST_DEFER_MB"
# Elements per collective when gathering statistics for an ordered sum: bounds the extra memory to world × 64 MB.
_CHUNK = 16 * 1024 * 1024


class RankFailure(RuntimeError):
    """A rank failed in a phase of a distributed prune; raised on every rank (see :func:`sync_phase`)."""


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

    def clock(self) -> float:
        """Seconds, for timing collectives: NCCL's are asynchronous, so the communication device is synchronised
        first (without it a collective reads ~0 s and its time lands in whatever waits next)."""
        if self.comm_device.type == "cuda":
            torch.cuda.synchronize(self.comm_device)
        return time.perf_counter()

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
    comm = nccl_device(dist.get_rank()) if backend == "nccl" else torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world=world, backend=backend, comm_device=comm)


def nccl_device(rank: int) -> torch.device:
    """The GPU an NCCL rank communicates on: the device the group was bound to (``init_process_group(device_id=…)``),
    else ``cuda:$LOCAL_RANK``, else the current device when the user chose one, else ``cuda:rank % devices``.

    ``torch.cuda.current_device()`` alone is 0 on every rank of a group initialised without ``set_device``: every
    rank would then communicate on ``cuda:0``. The chosen device is made current, so kernels and collectives agree.
    """
    bound = getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", None)
    if bound is not None:
        device = torch.device(bound)
    elif "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    elif torch.cuda.current_device() != 0:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
    if torch.cuda.current_device() != device.index:
        log.info("rank %d communicates on %s (it was not the current device)", rank, device)
        torch.cuda.set_device(device)
    return device


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

    When any rank failed, every rank raises :class:`RankFailure` ("rank R failed in <where>: <error>", a
    ``RuntimeError``) naming each
    failed rank (the failing rank chains its own exception). ``where`` reads like ``"layer 3 prune"``. In one
    process (``ctx`` None) an error is re-raised unchanged.
    """
    if ctx is None:
        if error is not None:
            raise error
        return [payload]
    t0 = ctx.clock()
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, (_describe(error) if error is not None else None, payload), group=ctx.group)
    ctx.account("sync", ctx.clock() - t0)
    failed = [(r, err) for r, (err, _) in enumerate(gathered) if err is not None]
    if failed:
        message = "; ".join(f"rank {r} failed in {where}: {err}" for r, err in failed)
        raise RankFailure(message) from error
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


def defer_budget_bytes(device: torch.device | str) -> int:
    """The bound on the state-sized terms a later rank of the exact chain holds per layer: ``$CALIBPRUNE_DIST_DEFER_MB``
    MB, else a quarter of ``device``'s memory (the GPU's, or the machine's RAM)."""
    raw = os.environ.get(DEFER_MB_ENV)
    if raw is not None:
        try:
            mb = float(raw)
        except ValueError:
            mb = -1.0
        if not mb >= 0:
            raise ValueError(f"${DEFER_MB_ENV} must be a number of MB >= 0, got {raw!r}")
        return int(mb * 2**20)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _weighted_reduce(ctx: DistContext, term: torch.Tensor, weight: float, dst: int | None) -> torch.Tensor | None:
    """``Σ_r w_r·term_r`` by one ``all_reduce``/``reduce`` (the backend's summation order)."""
    t0 = ctx.clock()
    buf = _to_comm(ctx, term * weight)
    if dst is None:
        dist.all_reduce(buf, group=ctx.group)
    else:
        dist.reduce(buf, dst=dst, group=ctx.group)
    ctx.account("statistics (reduce)", ctx.clock() - t0, buf.numel() * buf.element_size())
    if dst is not None and ctx.rank != dst:
        return None
    return buf.to(term.device)


class StatisticsReducer:
    """Combines the ranks' statistics of one decoder layer (see the module docstring).

    Methods fold each batch through :meth:`fold` and combine in ``finalize_statistics`` with
    :meth:`running_means`. Two numerics:

    * ``"reference"`` — exactly the one-process fold, bitwise. Rank 0's batches come first in sample order, so it
      folds them as they come. A later rank cannot fold (it does not have the state after the earlier samples
      yet): for each batch it keeps the batch's *term*, the statistic's update applied to a zero state with the
      global running count (for ``H ← β·H + (√α·X)ᵀ(√α·X)`` that is the product, so the expensive matmuls still
      run in parallel), or, for an update that does not split that way (a fused GPU Hessian kernel), the batch
      itself. ``running_means`` then chains the ranks: rank r receives the state after every earlier sample from
      rank r − 1, replays its batches in order (``S *= n/(n+b); S += T``) and passes it on; the last rank's state
      goes to the group's owner. Costs: each later rank holds its terms until the layer's statistics are
      combined (d² fp32 per batch and Hessian), and the replay is serial (elementwise for split terms). The terms
      are bounded (:meth:`keeps_batch`): past ``$CALIBPRUNE_DIST_DEFER_MB`` (default a quarter of the device's
      memory) a batch smaller than its term is kept instead and its product runs in the replay, the same
      arithmetic and bits, serially. At Llama-3-8B shapes (down_proj 14336 wide, 2048 tokens a sequence) a term
      is 822 MB and a batch 117 MB: 64 sequences on a later rank held 52.6 GB of down_proj terms before the bound.
    * ``"fast"`` — each rank keeps its own running mean ``T_r`` over ``n_r`` samples and one ``reduce`` sums
      ``(n_r/N)·T_r`` on the owner (``T = Σ_r (n_r/N)·T_r``). Different rounding from one process; judged by the
      quality contract.

    Args:
        offset: how many calibration sequences the earlier ranks hold (this rank's first global sample index).
    """

    def __init__(self, ctx: DistContext, numerics: str, offset: int):
        self.ctx, self.numerics, self.offset = ctx, numerics, offset
        self.exact = numerics == "reference"
        #: group -> the rank that prunes it (set by the pipeline once the groups are known)
        self.owners: dict[str, int] = {}
        self._deferred: dict[tuple[str, str], list[Callable[[torch.Tensor], torch.Tensor]]] = {}
        #: bytes the deferred steps of this layer hold (terms and kept batches), and the bound on the terms
        self.held_bytes = 0
        self._budget: int | None = None
        self._lock = threading.Lock()  # sample-parallel workers compute steps concurrently

    def owns(self, group: str) -> bool:
        """Whether this rank prunes ``group``."""
        return self.owners.get(group, 0) == self.ctx.rank

    def fold(self, name: str, group: str, state: torch.Tensor, n_local: int, count: int,
             update: Callable[[torch.Tensor, int], Any], step: Callable[[int], Callable[[torch.Tensor], torch.Tensor]],
             *, unit: int = 1) -> int:
        """Fold one batch into this rank's statistic ``name`` of ``group``; returns ``n_local + count``.

        Args:
            state: the statistic, updated in place when this rank may fold now.
            n_local: units (sequences, or tokens) this rank folded so far; ``count``: the batch's units.
            update: ``update(target, n_before)`` folds the batch into ``target`` as one process would after
                ``n_before`` units.
            step: ``step(n_before)`` the batch's deferred fold (its term computed now; see
                :meth:`calibprune.pruning.statistics.RunningStatistic.step`), for a later rank of the exact chain.
            unit: units per sequence (1 for per-sequence counts, seqlen for per-token counts).
        """
        n_before = self.count_before(n_local, unit)
        if not self.defer(name, group, step(n_before) if self._defers else None):
            update(state, n_local)
        return n_local + count

    @property
    def _defers(self) -> bool:
        return self.exact and self.ctx.rank > 0

    def keeps_batch(self, x: torch.Tensor, term_bytes: int) -> bool:
        """Whether a deferred step keeps the batch ``x`` itself (True) rather than its term of ``term_bytes``: only
        on a later rank of the exact chain, only when the batch is smaller, and only once the terms held for this
        layer would pass the bound. Either way the step's bytes are counted in :attr:`held_bytes`."""
        if not self._defers:
            return False
        batch_bytes = x.numel() * x.element_size()
        with self._lock:
            if self._budget is None:
                self._budget = defer_budget_bytes(x.device)
            keep = batch_bytes < term_bytes and self.held_bytes + term_bytes > self._budget
            self.held_bytes += batch_bytes if keep else term_bytes
        return keep

    def count_before(self, n_local: int, unit: int = 1) -> int:
        """The running count a batch is folded at, given the ``n_local`` units this rank folded before it: the
        global count in the exact chain (the earlier ranks' samples come first), the local one otherwise."""
        return self.offset * unit + n_local if self.exact else n_local

    def defer(self, name: str, group: str, step: Callable[[torch.Tensor], torch.Tensor] | None) -> bool:
        """Keep ``step`` for the ordered chain when this rank cannot fold yet (a later rank, exact numerics);
        returns whether it was kept (False: fold it now)."""
        if not self._defers:
            return False
        assert step is not None
        self._deferred.setdefault((name, group), []).append(step)
        return True

    def _counts(self, counts: Mapping[str, int], groups: list[str]) -> dict[str, list[int]]:
        """Every rank's count per group (one small all-gather): ``{group: [n_0, …, n_{R-1}]}``."""
        local = torch.tensor([int(counts.get(g, 0)) for g in groups], dtype=torch.int64, device=self.ctx.comm_device)
        parts = [torch.empty_like(local) for _ in range(self.ctx.world)]
        t0 = self.ctx.clock()
        dist.all_gather(parts, local, group=self.ctx.group)
        self.ctx.account("statistics (counts)", self.ctx.clock() - t0)
        return {g: [int(p[i]) for p in parts] for i, g in enumerate(groups)}

    def running_means(self, name: str, stats: Mapping[str, torch.Tensor], counts: Mapping[str, int], *,
                      everywhere: bool = False, summed: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Combine statistic ``name`` of every group over all ranks' samples; returns ``(values, totals)`` for
        the groups this rank owns (all of them with ``everywhere``: a measuring pass every rank evaluates).
        ``counts`` are this rank's units per group, as :meth:`fold` returned them. ``summed``: the statistic is a
        running sum, not a mean (the fast numerics then add the ranks' values unweighted)."""
        groups = sorted(stats)
        if not groups:  # no statistics this layer (the same on every rank: the groups were checked to agree)
            return {}, {}
        per_rank = self._counts(counts, groups)
        values: dict[str, torch.Tensor] = {}
        totals: dict[str, int] = {}
        for g in groups:
            n = per_rank[g]
            dst = None if everywhere else self.owners.get(g, 0)
            if self.exact:
                combined = self._chain(name, g, stats[g], dst)
            else:
                total = sum(n)
                weight = 1.0 if summed else (n[self.ctx.rank] / total if total else 0.0)
                combined = _weighted_reduce(self.ctx, stats[g], weight, dst)
            if combined is not None:
                values[g], totals[g] = combined, sum(n)
        if not self._deferred:
            self.held_bytes = 0
        return values, totals

    def _chain(self, name: str, group: str, state: torch.Tensor, dst: int | None) -> torch.Tensor | None:
        """The ordered fold: rank r gets the state from r − 1, replays its batches, passes it on (see above)."""
        ctx, rank, last = self.ctx, self.ctx.rank, self.ctx.world - 1
        t0 = ctx.clock()
        nbytes = state.numel() * state.element_size()
        S = state
        for r in range(1, ctx.world):
            if rank == r - 1:
                dist.send(_to_comm(ctx, S.contiguous()), dst=r, group=ctx.group)
            elif rank == r:
                buf = torch.empty(state.shape, dtype=state.dtype, device=ctx.comm_device)
                dist.recv(buf, src=r - 1, group=ctx.group)
                S = buf.to(state.device)
                for step in self._deferred.pop((name, group), []):
                    S = step(S)
        if dst is None:
            buf = _to_comm(ctx, S.contiguous()) if rank == last else torch.empty(state.shape, dtype=state.dtype,
                                                                                 device=ctx.comm_device)
            dist.broadcast(buf, src=last, group=ctx.group)
            ctx.account("statistics (ordered fold)", ctx.clock() - t0, nbytes * ctx.world)
            return buf.to(state.device)
        if dst != last:
            if rank == last:
                dist.send(_to_comm(ctx, S.contiguous()), dst=dst, group=ctx.group)
            elif rank == dst:
                buf = torch.empty(state.shape, dtype=state.dtype, device=ctx.comm_device)
                dist.recv(buf, src=last, group=ctx.group)
                S = buf.to(state.device)
        ctx.account("statistics (ordered fold)", ctx.clock() - t0, nbytes * ctx.world)
        return S if rank == dst else None


def broadcast_tensors(ctx: DistContext, tensors: Sequence[tuple[torch.Tensor, int]], kind: str) -> None:
    """Broadcast each tensor in place from its source rank (``[(tensor, src), …]``, the same list on every rank)."""
    t0 = ctx.clock()
    nbytes = 0
    for tensor, src in tensors:
        buf = _to_comm(ctx, tensor.detach())
        buf = buf if buf.is_contiguous() else buf.contiguous()
        dist.broadcast(buf, src=src, group=ctx.group)
        if ctx.rank != src and (buf.data_ptr() != tensor.data_ptr()):
            tensor.data.copy_(buf)
        nbytes += buf.numel() * buf.element_size()
    ctx.account(kind, ctx.clock() - t0, nbytes)
