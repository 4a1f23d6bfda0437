"""The layer-wise pipeline every method shares, and the generic entry :func:`prune`.

1. Check the whole request against the model before any work (targets, N:M widths, per-layer sparsities, device,
   backends, token ids).
2. Resolve each decoder layer's sparsity (uniform, a per-layer list, or a registered profile such as OWL).
3. Capture the inputs of the first decoder layer, with every keyword it receives (attention mask, position ids,
   rotary ``position_embeddings``, …), by a forward pre-hook that stops the model there. No torch.fx.
4. For each decoder layer, one at a time on the compute device: run the calibration batches through it with hooks
   that feed each target Linear's input to the method's (and the refiner's) statistics; finalize the statistics;
   prune every target (then refine its mask); run the batches again through the pruned layer to get the next
   layer's inputs.

Works for any Hugging Face decoder whose blocks are an ``nn.ModuleList``.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationSet, as_token_ids
from .activations import ActivationStore
from .config import PruneConfig
from .distributed import (
    StatisticsReducer,
    assign_owners,
    broadcast_tensors,
    check_same,
    current_context,
    module_cost,
    shard_range,
    sync_phase,
)
from .method import LayerStatistics, MaskRefiner, PruningMethod, reconstruction_error
from .report import ModuleRecord, PruneReport

if TYPE_CHECKING:
    from .checkpoint import LayerCheckpoint

log = logging.getLogger(__name__)

__all__ = ["prune", "check_request", "find_decoder_layers", "capture_layer_inputs", "select_targets", "prune_layerwise",
           "exact_fp32", "check_device", "resolve_device", "fast_forwards", "LAYER_LOADER"]

#: Attribute of a model whose decoder layers live elsewhere (on disk) and are loaded one at a time: an object with
#: ``load(index, layer, device)`` and ``release(index, layer)`` (see :mod:`calibprune.pruning.streaming`).
LAYER_LOADER = "calibprune_layer_loader"


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early once everything needed was seen."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ``nn.ModuleList`` of identical blocks holding the most parameters.

    Returns ``(dotted name, ModuleList)``; raises ``ValueError`` when the model has none.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(block) for block in mod}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers: no nn.ModuleList of blocks containing "
                         "nn.Linear modules was found")
    return best[1], best[2]


def _matches(pattern: str, rel_name: str, full_name: str, module: nn.Module) -> bool:
    """One target/ignore pattern: ``re:<regex>`` (re.match on the full name or any dotted prefix of it, as
    llm-compressor matches), a class name (``Linear``), or fnmatch on the layer-relative or full name."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        parts = full_name.split(".")
        return any(regex.match(".".join(parts[:k])) for k in range(len(parts), 0, -1))
    if pattern in {cls.__name__ for cls in type(module).__mro__}:
        return True
    return fnmatch.fnmatchcase(rel_name, pattern) or fnmatch.fnmatchcase(full_name, pattern)


def select_targets(layer: nn.Module, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = (),
                   prefix: str = "") -> dict[str, nn.Linear]:
    """Linear modules of one decoder layer to prune, by name relative to the layer (see ``PruneConfig.targets``).

    ``prefix`` is the layer's full dotted name (``model.layers.3``), for patterns written on full names.
    """
    found = {}
    for name, mod in layer.named_modules():
        if not isinstance(mod, nn.Linear) or "lm_head" in name:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if targets and not any(_matches(p, name, full, mod) for p in targets):
            continue
        if any(_matches(p, name, full, mod) for p in ignore):
            continue
        found[name] = mod
    return found


def check_device(name: str | None) -> torch.device:
    """The compute device named ``name`` (``None``: cuda when torch sees a GPU, else cpu), checked: asking for
    CUDA on a machine without it is an error, not a late crash."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for but torch sees no CUDA device "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise RuntimeError(f"unsupported compute device {device}")
    return device


def resolve_device(config: PruneConfig) -> torch.device:
    """The config's compute device, checked (:func:`check_device`)."""
    return check_device(config.device)


def fast_forwards(config: PruneConfig, device: torch.device) -> torch.dtype | None:
    """The reduced precision for calibration forwards in ``numerics="fast"``, or None (run in the model dtype).

    bf16 where the device computes it natively: CUDA with bf16 support, or a CPU with AVX512-BF16 / AMX.
    """
    if config.numerics != "fast":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native or amx else None
    return None


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


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """SparseGPT's reference numerics: fp32 matmuls without TF32."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev[:2]
        torch.set_float32_matmul_precision(prev[2])


class _InputRouter:
    """Forward pre-hooks that route each target module's input to its group's statistics.

    Groups are found on the first batch: a module whose input is the very tensor an earlier module received in
    the same forward joins that module's group (we hold references during the forward, so addresses cannot be
    reused by other tensors). With ``share_inputs`` off every module is its own group.
    """

    def __init__(self, modules: dict[str, nn.Linear], consumers: Sequence[LayerStatistics], share_inputs: bool,
                 stop_early: bool):
        self.modules, self.consumers = modules, consumers
        self.share_inputs, self.stop_early = share_inputs, stop_early
        self.leader_of: dict[str, str] = {}
        self._live: list[tuple[torch.Tensor, str]] = []
        self._seen = 0
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            x = args[0]
            leader = self.leader_of.get(name)
            if leader is None:
                leader = name
                if self.share_inputs:
                    for seen, other in self._live:
                        if seen is x or (seen.data_ptr() == x.data_ptr() and seen.shape == x.shape
                                         and seen.stride() == x.stride()):
                            leader = other
                            break
                self.leader_of[name] = leader
            self._live.append((x, leader))
            if leader == name:
                for consumer in self.consumers:
                    consumer.add_batch(name, x.detach())
            self._seen += 1
            if self.stop_early and self._seen == len(self.modules):
                raise _StopForward

        return hook

    def end_forward(self) -> None:
        self._live.clear()
        self._seen = 0

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
    """A method that collects statistics must combine them across ranks in ``finalize_statistics``."""
    if ids is None:
        return
    for consumer in consumers:
        if type(consumer).finalize_statistics is LayerStatistics.finalize_statistics:
            raise ValueError(f"{type(consumer).__name__} does not combine its statistics across ranks (its "
                             "finalize_statistics is the base no-op), so it cannot run in a process group; run it "
                             "in one process")


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
                    for b, kw in enumerate(self.kwargs):
                        try:
                            _layer_forward(layer, store.get(b), kw, self.autocast)
                        except _StopForward:
                            pass
                        router.end_forward()
                finally:
                    router.remove()
                leader_of = router.leader_of
            except Exception as exc:  # noqa: BLE001
                error = exc
        groups = sync_phase(self.ctx, f"layer {index} statistics", error, sorted(leader_of.items()))
        if any(g != groups[0] for g in groups):
            raise RuntimeError(f"the ranks found different input groups in layer {index}: {groups}")
        return leader_of

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
        error = None
        try:
            for name, module in modules.items():
                group = leader_of.get(name)
                if group is None:
                    log.warning("%s.%d.%s never ran on the calibration data; left dense", self.prefix, index, name)
                    continue
                if owners.get(group, rank) != rank:
                    continue
                t_mod = time.perf_counter()
                W_dense = module.weight.data.float().clone()
                result = method.prune_module(index, name, module, group, sparsity)
                extra = dict(result.extra)
                if refiner is not None:
                    extra |= refiner.refine(index, name, module, group, W_dense, sparsity)
                weight = module.weight.data
                error_sq = rel = None
                if config.report_errors and result.hessian is not None:
                    with method.timed("errors"):
                        error_sq, rel = reconstruction_error(W_dense, weight.float(), result.hessian, self.seqlen)
                records[name] = ModuleRecord(
                    layer=index, name=name, shape=(weight.shape[0], weight.shape[1]),
                    target_sparsity=sparsity, sparsity=float((weight == 0).float().mean()),
                    seconds=time.perf_counter() - t_mod, recon_error=error_sq, rel_error=rel,
                    obs_loss=result.obs_loss, damping=result.damping, extra=extra or None)
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
                for b, kw in enumerate(self.kwargs):
                    store.set(b, _layer_forward(layer, store.get(b), kw, self.autocast))
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
            with exact_fp32():
                if not self._restored_from(0):
                    self.capture(store)
                self.phases["capture"] = time.perf_counter() - t_start
                show = progress and (ctx is None or ctx.is_main)
                for index, layer in enumerate(tqdm(self.layers, desc=f"{report.method} layers", unit="layer",
                                                   disable=not show)):
                    self.run_layer(index, layer, store)
        finally:
            store.close()
        report.seconds = time.perf_counter() - t_start
        report.phase_seconds = self.phases
        for consumer in self.consumers:
            report.timings |= {k: report.timings.get(k, 0.0) + v for k, v in consumer.timings.items()}
            report.resolved_backends |= consumer.resolved_backends
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


def _check_against_model(model: nn.Module, ids: torch.Tensor | None, config: PruneConfig,
                         method: PruningMethod, device: torch.device) -> tuple[str, nn.ModuleList]:
    """Everything about the request that the model decides, checked before any work."""
    prefix, layers = find_decoder_layers(model)
    per_layer = [select_targets(layer, config.targets, config.ignore, prefix=f"{prefix}.{i}")
                 for i, layer in enumerate(layers)]
    if not any(per_layer):
        names = sorted({n for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"targets {list(config.targets)} / ignore {list(config.ignore)} match no Linear module in "
                         f"the {len(layers)} decoder layers ({prefix}.N); layer 0 has: {', '.join(names)}")
    if config.prune_m:
        for i, mods in enumerate(per_layer):
            for name, mod in mods.items():
                if mod.in_features % config.prune_m:
                    raise ValueError(f"N:M pattern {config.pattern} needs M to divide the input width of every "
                                     f"target, but {prefix}.{i}.{name} has in_features = {mod.in_features}; "
                                     "leave it out with ignore or choose another M")
    if isinstance(config.sparsity, tuple) and len(config.sparsity) != len(layers):
        raise ValueError(f"{len(config.sparsity)} per-layer sparsities given but the model has {len(layers)} "
                         "decoder layers")
    if ids is not None:
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(embed, "num_embeddings", None)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise ValueError(f"calibration token ids span [{low}, {high}] but the model's vocabulary is "
                             f"[0, {vocab}): the set was built with another tokenizer")
    method.resolve(device)
    return prefix, layers


def check_request(model: nn.Module, calib: CalibrationSet | torch.Tensor | None,
                  config: PruneConfig) -> tuple[PruningMethod, torch.Tensor | None, MaskRefiner | None]:
    """Check a prune request against ``model`` without changing anything; returns the method, the token ids and
    the refiner that :func:`prune` will run. Raises ``TypeError`` / ``ValueError`` / ``RuntimeError``."""
    from .registry import METHODS, REFINERS

    if not isinstance(config, PruneConfig) or config.method not in METHODS:
        raise TypeError(f"config must be a registered method's config ({', '.join(METHODS)}), got "
                        f"{type(config).__name__}")
    method = METHODS[config.method](config)
    if calib is None and (method.needs_calibration or config.refine or config.sparsity_profile != "uniform"):
        what = [w for w, on in ((config.method, method.needs_calibration), (f"refine={config.refine!r}", config.refine),
                                (f"sparsity_profile={config.sparsity_profile!r}",
                                 config.sparsity_profile != "uniform")) if on]
        raise ValueError(f"{' and '.join(what)} needs calibration data; pass a CalibrationSet or token ids")
    ids = as_token_ids(calib) if calib is not None else None
    device = resolve_device(config)
    _check_against_model(model, ids, config, method, device)
    refiner = REFINERS[config.refine](config.refine_options, config) if config.refine else None
    if refiner is not None:
        refiner.resolve(device)
    return method, ids, refiner


def _model_signature(model: nn.Module) -> list:
    """Names, shapes and dtypes of the parameters: what every rank must agree on (cheap; no weights read)."""
    return [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]


def prune(model: nn.Module, calib: CalibrationSet | torch.Tensor | None, config: PruneConfig, *,
          progress: bool = True, checkpoint: LayerCheckpoint | None = None) -> PruneReport:
    """Prune ``model`` in place with the method ``config`` names; the one generic entry.

    Args:
        calib: a ``CalibrationSet`` or token ids ``[n, seqlen]`` int64 (None only for a data-free method).
        config: a method's typed config, e.g. ``SparseGPTConfig(sparsity=0.7, sparsity_profile="owl")``.
        checkpoint: saves each finished layer and restores those of a killed run (used by
            :func:`calibprune.pruning.streaming.prune_and_save`; ``config.resume`` needs one).

    Everything that can be checked (:func:`check_request`: targets, N:M widths, device, backends, token ids) is
    checked before any weight changes. Inside an initialised process group (``torchrun``) every rank calls this
    with the same model, calibration and config (checked), and the pass is data- and weight-parallel
    (:mod:`calibprune.pruning.distributed`); every rank gets the pruned model and the full report.
    Returns the :class:`PruneReport`.
    """
    from ..calibration.calibration_set import ids_sha256
    from .registry import PROFILES

    ctx = current_context()
    error, checked = None, None
    try:
        if config.resume and checkpoint is None:
            raise ValueError("resume=True continues a prune saved layer by layer to an output folder: use "
                             "prune_and_save(model, calib, config, out) or calibprune prune --out DIR --resume")
        checked = check_request(model, calib, config)
    except Exception as exc:  # noqa: BLE001 - in a process group every rank must learn of it
        error = exc
    sync_phase(ctx, "checking the request", error)
    method, ids, refiner = checked
    if ctx is not None:
        check_same(ctx, "the calibration tokens", ids_sha256(ids) if ids is not None else None)
        check_same(ctx, "the prune config", config.to_dict())
        check_same(ctx, "the model's parameter names and shapes", _model_signature(model))
    provenance = calib.provenance if isinstance(calib, CalibrationSet) else {"kind": "tensor" if ids is not None
                                                                              else "none"}
    report = PruneReport(method=config.method, config=config.to_dict(),
                         calibration=provenance | ({"n": ids.shape[0], "seqlen": ids.shape[1]} if ids is not None
                                                   else {}))
    layer_sparsities = None
    if config.sparsity_profile != "uniform":
        saved = checkpoint.profile if checkpoint is not None else None
        if saved is not None:
            layer_sparsities, report.profile = saved
            log.info("%s layer sparsities restored from %s", config.sparsity_profile, checkpoint.folder)
        else:
            profile = PROFILES[config.sparsity_profile](config.profile_options)
            t0 = time.perf_counter()
            layer_sparsities, info = profile.layer_sparsities(model, ids, config, progress=progress)
            report.profile = {"name": config.sparsity_profile, "seconds": time.perf_counter() - t0} | info
            if checkpoint is not None:
                checkpoint.save_profile(layer_sparsities, report.profile)
        log.info("%s layer sparsities: %s", config.sparsity_profile,
                 ", ".join(f"{s:.3f}" for s in layer_sparsities))
    _, layers = find_decoder_layers(model)
    report.layer_targets = [float(layer_sparsities[i] if layer_sparsities is not None else config.layer_sparsity(i))
                            for i in range(len(layers))]
    # A data-free method needs forwards only for the reconstruction errors it reports.
    run_ids = ids if method.needs_calibration or refiner is not None or config.report_errors else None
    return prune_layerwise(model, run_ids, config, method, report, layer_sparsities=layer_sparsities,
                           refiner=refiner, progress=progress, checkpoint=checkpoint)
