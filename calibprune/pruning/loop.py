"""The layer loop every method shares: :func:`prune_layerwise`.

1. Capture the inputs of the first decoder layer, with every keyword it receives (attention mask, position ids,
   rotary ``position_embeddings``, …), by a forward pre-hook that stops the model there. No torch.fx.
2. For each decoder layer, one at a time on the compute device: run the calibration batches through it with hooks
   that feed each target Linear's input to the method's (and the refiner's) statistics; finalize the statistics;
   prune every target (then refine its mask); run the batches again through the pruned layer to get the next
   layer's inputs.

It drives the method protocol (:mod:`calibprune.pruning.method`) and never looks a method up: the registry and the
request checks are above it (:mod:`calibprune.pruning.api`). Works for any Hugging Face decoder whose blocks are an
``nn.ModuleList``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._progress import progress_bar
from .activations import ActivationStore
from .anatomy import LAYER_LOADER, find_decoder_layers, select_targets
from .config import PruneConfig
from .device import exact_fp32, fast_forwards, resolve_device
from .distributed import (
    StatisticsReducer,
    assign_owners,
    broadcast_tensors,
    current_context,
    module_cost,
    shard_range,
    sync_phase,
)
from .method import LayerStatistics, MaskRefiner, PruningMethod
from .report import ModuleRecord, PruneReport
from .workers import ThreadLocalSink, WorkerPool, available_memory, batches_in_flight, resolve_workers

if TYPE_CHECKING:
    from .checkpoint import LayerCheckpoint

log = logging.getLogger(__name__)

__all__ = ["prune_layerwise", "capture_layer_inputs", "mean_token_error"]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early once everything needed was seen."""


def mean_token_error(W_old: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor, seqlen: int, *,
                     low_precision: bool | None = None) -> tuple[float, float | None]:
    """The report's reconstruction error: mean per-token ‖(W − Ŵ)x‖² (summed over output rows) and its ratio to
    the same quantity for W.

    ``H: [cols, cols]`` fp32 is the running-average Hessian (2/n)·Σ x xᵀ over n sequences of ``seqlen`` tokens, so
    tr(ΔW·H·ΔWᵀ)/(2·seqlen) is the mean over calibration tokens. ``W_old, W_new: [rows, cols]`` fp32. Both terms
    come from one GEMM of the stacked ``[ΔW; W]`` with H. (The kernels' quality contract uses the fp64 trace
    itself: :func:`calibprune.ops.reconstruction_error`.)

    ``low_precision`` (default: on a GPU) runs that GEMM in bf16 with fp32 accumulation: it is a diagnostic, never
    part of the masks or weights, and in fp32 it costs ≈ 6 TFLOP per Llama-3-8B layer on CUDA cores. The bf16
    figure is within about 1% of the fp32 one (tested).
    """
    stacked = torch.cat((W_old - W_new, W_old))
    if low_precision is None:
        low_precision = stacked.is_cuda
    product = (stacked.bfloat16() @ H.bfloat16()).float() if low_precision else stacked @ H
    per_row = product.mul_(stacked).sum(1)
    rows = W_old.shape[0]
    err, base = float(per_row[:rows].sum()) / (2 * seqlen), float(per_row[rows:].sum()) / (2 * seqlen)
    return err, (err / base if base > 0 else None)


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> list[tuple]:
    """Move the parameters and buffers of every module outside ``layers`` to ``device``; return how to undo it."""
    inside = {id(m) for m in layers.modules()}
    moved: list[tuple] = []
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m._parameters.values():
            if p is not None and p.device != device:
                moved.append((None, p, p.device))
                p.data = p.data.to(device)
        for key, buf in m._buffers.items():
            if buf is not None and buf.device != device:
                moved.append((m._buffers, key, buf.device))
                m._buffers[key] = buf.to(device)
    return moved


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int,
                         device: torch.device, store: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the model up to its first decoder layer for each batch of ``ids: [n, seqlen] int64``.

    Everything but the decoder layers is moved to ``device`` for this (embeddings, rotary tables); the layers
    stay where they are (they may be on the meta device), since the pre-hook stops the forward before layer 0 runs.

    Returns:
        hidden states per batch (``[b, seqlen, hidden]`` in the model dtype, on ``store``) and the keyword
        arguments layer 0 received for that batch (tensors on ``device``).
    """
    inputs: list[torch.Tensor] = []
    kwargs = _capture(model, layers, ids, batch_size, device, lambda x: inputs.append(x.to(store)))
    return inputs, kwargs


def _capture(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int, device: torch.device,
             put: Callable[[torch.Tensor], None]) -> list[dict]:
    """:func:`capture_layer_inputs` handing each batch's hidden states to ``put`` as soon as it is computed."""
    kwargs_per_batch: list[dict] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        put(hidden)
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kwargs["use_cache"] = False
        kwargs.pop("past_key_value", None)
        kwargs.pop("past_key_values", None)
        kwargs_per_batch.append(kwargs)
        raise _StopForward

    moved = _move_outside_layers(model, layers, device)
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the first decoder layer was never called; cannot capture its inputs")
    finally:
        handle.remove()
        for table, key, dev in moved:
            if table is None:
                key.data = key.data.to(dev)
            else:
                table[key] = table[key].to(dev)
    return kwargs_per_batch


class _InputRouter:
    """Forward pre-hooks that route each target module's input to its group's statistics.

    Groups are found on the first batch: a module whose input is the very tensor an earlier module received in
    the same forward joins that module's group (we hold references during the forward, so addresses cannot be
    reused by other tensors). With ``share_inputs`` off every module is its own group.

    The per-forward state is per thread (:class:`~calibprune.pruning.workers.ThreadLocalSink`), so workers may run
    forwards of different batches at once: in a forward run by :meth:`collect` the hooks compute each statistic's
    term for that batch and keep its fold, which the caller runs in batch order.
    """

    def __init__(self, modules: dict[str, nn.Linear], consumers: Sequence[LayerStatistics], share_inputs: bool,
                 stop_early: bool):
        self.modules, self.consumers = modules, consumers
        self.share_inputs, self.stop_early = share_inputs, stop_early
        self.leader_of: dict[str, str] = {}
        self._state = ThreadLocalSink()
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            x, state = args[0], self._state
            leader = self.leader_of.get(name)
            if leader is None:
                leader = name
                if self.share_inputs:
                    for seen, other in state.live:
                        if seen is x or (seen.data_ptr() == x.data_ptr() and seen.shape == x.shape
                                         and seen.stride() == x.stride()):
                            leader = other
                            break
                self.leader_of[name] = leader
            state.live.append((x, leader))
            if leader == name:
                for consumer in self.consumers:
                    if state.commits is None:
                        consumer.add_batch(name, x.detach())
                    else:
                        state.commits.extend(consumer.add_batch_later(name, x.detach(), state.sequences_before))
            state.seen += 1
            if self.stop_early and state.seen == len(self.modules):
                raise _StopForward

        return hook

    def forward(self, run: Callable[[], object]) -> None:
        """Run one batch's forward (``run``), its statistics folded as the hooks see them."""
        try:
            run()
        except _StopForward:
            pass
        finally:
            self._state.live.clear()
            self._state.seen = 0

    def collect(self, run: Callable[[], object], sequences_before: int) -> list[Callable[[], None]]:
        """Run one batch's forward (``run``; ``sequences_before`` local sequences precede the batch) computing the
        statistics' terms; returns the folds, to be called in batch order."""
        state = self._state
        state.commits, state.sequences_before = [], sequences_before
        try:
            self.forward(run)
            return state.commits
        finally:
            state.commits = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_forward(layer: nn.Module, x: torch.Tensor, kwargs: dict, autocast: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
        out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _activation_kind(config: PruneConfig) -> str:
    if config.activations != "auto":
        return config.activations
    return "cpu" if config.offload_activations else "device"


def _group_costs(modules: dict[str, nn.Linear], leader_of: dict[str, str]) -> dict[str, float]:
    """Cost of pruning each input group: its inverse factor (cols³, computed once) plus rows·cols² per module."""
    costs: dict[str, float] = {}
    for name, module in modules.items():
        group = leader_of.get(name)
        if group is None:
            continue
        rows, cols = module.weight.shape
        costs[group] = costs.get(group, float(cols) ** 3) + module_cost(rows, cols)
    return costs


def _check_distributable(consumers: Sequence[LayerStatistics], ids: torch.Tensor | None) -> None:
    """A method that collects statistics must combine them across ranks (see ``combines_statistics``)."""
    if ids is None:
        return
    for consumer in consumers:
        if not consumer.combines_statistics:
            raise ValueError(f"{type(consumer).__name__} does not combine its statistics across ranks (it collects "
                             "in its own add_batch, and its finalize_statistics is the base one), so it cannot run in "
                             "a process group; run it in one process")


class _Layerwise:
    """One pass of :func:`prune_layerwise`: the state shared by its per-layer phases."""

    def __init__(self, model: nn.Module, ids: torch.Tensor | None, config: PruneConfig, method: PruningMethod,
                 report: PruneReport, layer_sparsities: Sequence[float] | None, refiner: MaskRefiner | None,
                 checkpoint: LayerCheckpoint | None):
        self.model, self.ids, self.config, self.method, self.report = model, ids, config, method, report
        self.layer_sparsities, self.refiner, self.checkpoint = layer_sparsities, refiner, checkpoint
        self.ctx = current_context()
        self.device = resolve_device(config)
        self.prefix, self.layers = find_decoder_layers(model)
        self.loader = getattr(model, LAYER_LOADER, None)
        self.autocast = fast_forwards(config, self.device)
        self.pool = WorkerPool(resolve_workers(config.workers, self.device), one_thread=self.device.type == "cpu")
        self.consumers: list[LayerStatistics] = [method] + ([refiner] if refiner else [])
        # A measuring pass that leaves the weights alone (OWL) runs every module on every rank.
        self.weight_parallel = self.ctx is not None and getattr(method, "distribute_modules", True)
        self.seqlen = ids.shape[1] if ids is not None else 0
        self.kwargs: list[dict] = []
        self.offset = 0  # global index of this rank's first calibration sequence
        self.phases = dict.fromkeys(("capture", "statistics", "prune", "propagate"), 0.0)
        if self.ctx is not None:
            _check_distributable(self.consumers, ids)

    # -- sharding and capture ---------------------------------------------------------------------------------
    def local_ids(self) -> torch.Tensor | None:
        """This rank's contiguous shard of the calibration batches (all of them in one process)."""
        ids = self.ids
        if ids is None or self.ctx is None:
            return ids
        bs = self.config.batch_size
        n_batches = -(-ids.shape[0] // bs)
        if n_batches < self.ctx.world:
            raise ValueError(f"{n_batches} calibration batch(es) cannot be shared by {self.ctx.world} ranks: give "
                             f"at least {self.ctx.world * bs} sequences (or fewer ranks / a smaller batch_size)")
        mine = shard_range(n_batches, self.ctx.world, self.ctx.rank)
        self.offset = mine.start * bs
        return ids[mine.start * bs : min(mine.stop * bs, ids.shape[0])]

    def capture(self, store: ActivationStore) -> None:
        error = None
        try:
            local = self.local_ids()
            if local is not None:
                self.kwargs = _capture(self.model, self.layers, local, self.config.batch_size, self.device,
                                       store.append)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it (sync_phase re-raises)
            error = exc
        sync_phase(self.ctx, "capture (the forward up to layer 0)", error)

    # -- one layer --------------------------------------------------------------------------------------------
    def statistics(self, index: int, layer: nn.Module, modules: dict[str, nn.Linear],
                   store: ActivationStore) -> dict[str, str]:
        """Run the local batches through ``layer`` feeding the statistics; returns the input groups."""
        if self.ctx is not None:  # one reducer per consumer: each keeps its own deferred batches
            for consumer in self.consumers:
                consumer.reducer = StatisticsReducer(self.ctx, self.config.numerics, self.offset)
        for consumer in self.consumers:
            consumer.start_layer(index, modules, self.device)
        leader_of = {name: name for name in modules}
        error = None
        if self.ids is not None:
            try:
                router = _InputRouter(modules, self.consumers, self.method.share_inputs, self.method.stop_early)
                try:
                    self._statistics_forwards(router, layer, store)
                finally:
                    router.remove()
                leader_of = router.leader_of
            except Exception as exc:  # noqa: BLE001
                error = exc
        groups = sync_phase(self.ctx, f"layer {index} statistics", error, sorted(leader_of.items()))
        if any(g != groups[0] for g in groups):
            raise RuntimeError(f"the ranks found different input groups in layer {index}: {groups}")
        return leader_of

    def _forward(self, layer: nn.Module, store: ActivationStore, b: int) -> Callable[[], torch.Tensor]:
        return lambda: _layer_forward(layer, store.get(b), self.kwargs[b], self.autocast)

    def _statistics_forwards(self, router: _InputRouter, layer: nn.Module, store: ActivationStore) -> None:
        """Every local batch through ``layer``, its inputs folded into the statistics in batch order.

        With workers the first batch runs here (it finds the input groups); the others run a batch per worker,
        which computes the batch's terms, and their folds are called here in batch order."""
        batches = range(len(self.kwargs))
        if self.pool.size == 1 or len(batches) < 2:
            for b in batches:
                router.forward(self._forward(layer, store, b))
            return
        router.forward(self._forward(layer, store, 0))
        state_bytes = sum(t.numel() * t.element_size() for consumer in self.consumers
                          for statistic in consumer.collected() for t in statistic.values.values())
        limit = batches_in_flight(self.pool.size, state_bytes, available_memory())
        if limit < self.pool.size:
            log.info("layer statistics: %d of %d workers' batches in flight (each holds %.1f GiB of terms)", limit,
                     self.pool.size, state_bytes / 2**30)
        bs = self.config.batch_size
        for commits in self.pool.ordered(lambda b: router.collect(self._forward(layer, store, b), b * bs),
                                         batches[1:], limit=limit):
            for commit in commits:
                commit()

    def _concurrent_solves(self) -> bool:
        return self.pool.size > 1 and all(type(c).solves_concurrently for c in self.consumers)

    def prune_modules(self, index: int, modules: dict[str, nn.Linear], leader_of: dict[str, str],
                      sparsity: float) -> list[ModuleRecord]:
        """Finalize the statistics, prune the modules this rank owns, share the weights and records."""
        ctx, method, refiner, config = self.ctx, self.method, self.refiner, self.config
        rank = ctx.rank if ctx is not None else 0
        owners: dict[str, int] = {}
        if ctx is not None:
            groups = _group_costs(modules, leader_of)
            owners = assign_owners(groups, ctx.world) if self.weight_parallel else dict.fromkeys(groups, rank)
            for consumer in self.consumers:
                consumer.reducer.owners = owners
        for consumer in self.consumers:
            consumer.finalize_statistics(index)
        records: dict[str, ModuleRecord] = {}

        def prune_one(name: str) -> None:
            module, group = modules[name], leader_of[name]
            t_mod = time.perf_counter()
            W_dense = module.weight.data.float().clone()
            result = method.prune_module(index, name, module, group, sparsity)
            extra = dict(result.extra)
            if refiner is not None:
                extra |= refiner.refine(index, name, module, group, W_dense, sparsity)
            weight = module.weight.data
            error_sq = rel = None
            H = method.hessian_for_report(group, result) if config.report_errors else None
            if H is not None:
                with method.timed("errors"):
                    error_sq, rel = mean_token_error(W_dense, weight.float(), H, self.seqlen)
            records[name] = ModuleRecord(
                layer=index, name=name, shape=(weight.shape[0], weight.shape[1]),
                target_sparsity=sparsity, sparsity=float((weight == 0).float().mean()),
                seconds=time.perf_counter() - t_mod, recon_error=error_sq, rel_error=rel,
                obs_loss=result.obs_loss, damping=result.damping, extra=extra or None)

        mine: list[str] = []
        for name in modules:
            group = leader_of.get(name)
            if group is None:
                log.warning("%s.%d.%s never ran on the calibration data; left dense", self.prefix, index, name)
            elif owners.get(group, rank) == rank:
                mine.append(name)
        error = None
        try:
            if self._concurrent_solves():
                # Each input group's modules run in order on one worker (they share its inverse factor).
                costs = _group_costs({n: modules[n] for n in mine}, leader_of)
                worker_of = assign_owners(costs, self.pool.size)
                shares = [[n for n in mine if worker_of[leader_of[n]] == w] for w in range(self.pool.size)]
                self.pool.each(prune_one, [share for share in shares if share])
            else:
                for name in mine:
                    prune_one(name)
        except Exception as exc:  # noqa: BLE001
            error = exc
        shared = sync_phase(ctx, f"layer {index} prune", error, records if self.weight_parallel else None)
        if self.weight_parallel:
            broadcast_tensors(ctx, [(modules[name].weight.data, owners[leader_of[name]]) for name in modules
                                    if name in leader_of], "weights (broadcast)")
            for part in shared:
                records |= part
        for consumer in self.consumers:
            consumer.end_layer(index)
            if ctx is not None:
                consumer.reducer = None
        return [records[name] for name in modules if name in records]

    def _restored_from(self, index: int) -> bool:
        """Layers ``index`` and after were all finished by an earlier run: their inputs are not needed."""
        return self.checkpoint is not None and all(self.checkpoint.is_done(j) for j in range(index, len(self.layers)))

    def propagate(self, index: int, layer: nn.Module, store: ActivationStore) -> None:
        error = None
        if (self.ids is not None and (index + 1 < len(self.layers) or not self.method.stop_early)
                and not self._restored_from(index)):
            try:
                for _ in self.pool.ordered(lambda b: store.set(b, self._forward(layer, store, b)()),
                                           range(len(self.kwargs))):
                    pass
            except Exception as exc:  # noqa: BLE001
                error = exc
        sync_phase(self.ctx, f"layer {index} propagate", error)

    def run_layer(self, index: int, layer: nn.Module, store: ActivationStore) -> None:
        t_layer = time.perf_counter()
        config, report, checkpoint = self.config, self.report, self.checkpoint
        home = None
        if self.loader is not None:
            self.loader.load(index, layer, self.device)
        else:
            home = next(layer.parameters()).device
            layer.to(self.device)
        records: list[ModuleRecord] = []
        done = checkpoint is not None and checkpoint.is_done(index)
        if done:
            records = checkpoint.restore(index, layer, self.ctx)
        else:
            modules = select_targets(layer, config.targets, config.ignore, prefix=f"{self.prefix}.{index}")
            sparsity = (self.layer_sparsities[index] if self.layer_sparsities is not None
                        else config.layer_sparsity(index))
            if not modules:
                log.info("%s.%d has no target Linear modules; left dense", self.prefix, index)
            else:
                t_phase = time.perf_counter()
                leader_of = self.statistics(index, layer, modules, store)
                t_prune = time.perf_counter()
                self.phases["statistics"] += t_prune - t_phase
                records = self.prune_modules(index, modules, leader_of, sparsity)
                self.phases["prune"] += time.perf_counter() - t_prune
        report.modules.extend(records)
        t_phase = time.perf_counter()
        self.propagate(index, layer, store)
        self.phases["propagate"] += time.perf_counter() - t_phase
        seconds = time.perf_counter() - t_layer
        if checkpoint is not None:
            if done:
                seconds = checkpoint.layer_seconds(index)
            else:
                error = None
                try:
                    checkpoint.commit(index, layer, records, seconds)
                except Exception as exc:  # noqa: BLE001
                    error = exc
                sync_phase(self.ctx, f"layer {index} save", error)
        if self.loader is not None:
            self.loader.release(index, layer)
        else:
            layer.to(home)
        report.layer_seconds.append(seconds)

    def run(self, progress: bool) -> PruneReport:
        report, ctx = self.report, self.ctx
        t_start = time.perf_counter()
        folder = self.checkpoint.folder if self.checkpoint is not None else None
        store = ActivationStore(_activation_kind(self.config), self.device, folder)
        try:
            with exact_fp32(), self.pool:
                if not self._restored_from(0):
                    self.capture(store)
                self.phases["capture"] = time.perf_counter() - t_start
                show = progress and (ctx is None or ctx.is_main)
                for index, layer in enumerate(progress_bar(self.layers, desc=f"{report.method} layers",
                                                           unit="layer", show=show)):
                    self.run_layer(index, layer, store)
        finally:
            store.close()
        report.seconds = time.perf_counter() - t_start
        report.phase_seconds = self.phases
        for consumer in self.consumers:
            report.timings |= {k: report.timings.get(k, 0.0) + v for k, v in consumer.timings.items()}
            report.resolved_backends |= consumer.resolved_backends
        report.workers = self.pool.size
        if self.autocast is not None:
            report.resolved_backends["forwards"] = str(self.autocast).removeprefix("torch.")
        if ctx is not None:
            per_rank = sync_phase(ctx, "the end of the pass", None, {"phase_seconds": self.phases,
                                                                      "collectives": ctx.summary()["collectives"]})
            report.distributed = {"world_size": ctx.world, "backend": ctx.backend,
                                  "weight_parallel": self.weight_parallel, "ranks": per_rank}
        return report


@torch.no_grad()
def prune_layerwise(model: nn.Module, ids: torch.Tensor | None, config: PruneConfig, method: PruningMethod,
                    report: PruneReport, *, layer_sparsities: Sequence[float] | None = None,
                    refiner: MaskRefiner | None = None, progress: bool = True,
                    checkpoint: LayerCheckpoint | None = None) -> PruneReport:
    """Prune every target Linear of every decoder layer of ``model`` in place with ``method``.

    Args:
        ids: calibration tokens ``[n, seqlen]`` int64, or None for a data-free method (no forwards run).
        layer_sparsities: the target sparsity of each decoder layer (default: ``config.layer_sparsity(i)``).
        refiner: a mask refiner (e.g. DSnoT) applied to each matrix after the method pruned it.
        checkpoint: a :class:`~calibprune.pruning.checkpoint.LayerCheckpoint` that saves each finished layer and
            restores the layers a killed run finished (their inputs are recomputed through them).

    Inside an initialised process group the pass is data-parallel over calibration batches and weight-parallel
    over input groups (:mod:`calibprune.pruning.distributed`). A model carrying a layer loader (attribute
    ``calibprune_layer_loader``, see :mod:`calibprune.pruning.streaming`) gets each decoder layer loaded before
    its turn and released after it.
    """
    run = _Layerwise(model, ids, config, method, report, layer_sparsities, refiner, checkpoint)
    return run.run(progress)


