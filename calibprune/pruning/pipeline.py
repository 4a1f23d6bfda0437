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

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationSet, as_token_ids
from .config import PruneConfig
from .method import LayerStatistics, MaskRefiner, PruningMethod, reconstruction_error
from .report import ModuleRecord, PruneReport

log = logging.getLogger(__name__)

__all__ = ["prune", "check_request", "find_decoder_layers", "capture_layer_inputs", "select_targets", "prune_layerwise",
           "exact_fp32", "resolve_device", "fast_forwards"]


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


def resolve_device(config: PruneConfig) -> torch.device:
    """The compute device, checked: asking for CUDA on a machine without it is an error, not a late crash."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {config.device!r} was asked for but torch sees no CUDA device "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise RuntimeError(f"unsupported compute device {device}")
    return device


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
    stay where they are, since the pre-hook stops the forward before layer 0 runs.

    Returns:
        hidden states per batch (``[b, seqlen, hidden]`` in the model dtype, on ``store``) and the keyword
        arguments layer 0 received for that batch (tensors on ``device``).
    """
    inputs: list[torch.Tensor] = []
    kwargs_per_batch: list[dict] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.to(store))
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
    return inputs, kwargs_per_batch


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


@torch.no_grad()
def prune_layerwise(model: nn.Module, ids: torch.Tensor | None, config: PruneConfig, method: PruningMethod,
                    report: PruneReport, *, layer_sparsities: Sequence[float] | None = None,
                    refiner: MaskRefiner | None = None, progress: bool = True) -> PruneReport:
    """Prune every target Linear of every decoder layer of ``model`` in place with ``method``.

    Args:
        ids: calibration tokens ``[n, seqlen]`` int64, or None for a data-free method (no forwards run).
        layer_sparsities: the target sparsity of each decoder layer (default: ``config.layer_sparsity(i)``).
        refiner: a mask refiner (e.g. DSnoT) applied to each matrix after the method pruned it.
    """
    device = resolve_device(config)
    store = torch.device("cpu") if config.offload_activations else device
    prefix, layers = find_decoder_layers(model)
    autocast = fast_forwards(config, device)
    consumers: list[LayerStatistics] = [method] + ([refiner] if refiner else [])
    t_start = time.perf_counter()
    phases = dict.fromkeys(("capture", "statistics", "prune", "propagate"), 0.0)
    with exact_fp32():
        inputs: list[torch.Tensor] = []
        kwargs: list[dict] = []
        if ids is not None:
            inputs, kwargs = capture_layer_inputs(model, layers, ids, config.batch_size, device, store)
        phases["capture"] = time.perf_counter() - t_start
        seqlen = ids.shape[1] if ids is not None else 0
        for index, layer in enumerate(tqdm(layers, desc=f"{report.method} layers", unit="layer",
                                           disable=not progress)):
            t_layer = time.perf_counter()
            home = next(layer.parameters()).device
            layer.to(device)
            modules = select_targets(layer, config.targets, config.ignore, prefix=f"{prefix}.{index}")
            sparsity = layer_sparsities[index] if layer_sparsities is not None else config.layer_sparsity(index)
            if not modules:
                log.info("%s.%d has no target Linear modules; left dense", prefix, index)
            else:
                t_phase = time.perf_counter()
                for consumer in consumers:
                    consumer.start_layer(index, modules, device)
                leader_of = {name: name for name in modules}
                if ids is not None:
                    router = _InputRouter(modules, consumers, method.share_inputs, method.stop_early)
                    try:
                        for x, kw in zip(inputs, kwargs):
                            try:
                                _layer_forward(layer, x.to(device), kw, autocast)
                            except _StopForward:
                                pass
                            router.end_forward()
                    finally:
                        router.remove()
                    leader_of = router.leader_of
                for consumer in consumers:
                    consumer.finalize_statistics(index)
                t_prune = time.perf_counter()
                phases["statistics"] += t_prune - t_phase
                for name, module in modules.items():
                    t_mod = time.perf_counter()
                    group = leader_of.get(name)
                    if group is None:
                        log.warning("%s.%d.%s never ran on the calibration data; left dense", prefix, index, name)
                        continue
                    W_dense = module.weight.data.float().clone()
                    result = method.prune_module(index, name, module, group, sparsity)
                    extra = dict(result.extra)
                    if refiner is not None:
                        extra |= refiner.refine(index, name, module, group, W_dense, sparsity)
                    weight = module.weight.data
                    error = rel = None
                    if config.report_errors and result.hessian is not None:
                        with method.timed("errors"):
                            error, rel = reconstruction_error(W_dense, weight.float(), result.hessian, seqlen)
                    report.modules.append(ModuleRecord(
                        layer=index, name=name, shape=(weight.shape[0], weight.shape[1]),
                        target_sparsity=sparsity, sparsity=float((weight == 0).float().mean()),
                        seconds=time.perf_counter() - t_mod, recon_error=error, rel_error=rel,
                        obs_loss=result.obs_loss, damping=result.damping, extra=extra or None))
                for consumer in consumers:
                    consumer.end_layer(index)
                phases["prune"] += time.perf_counter() - t_prune
            t_phase = time.perf_counter()
            if ids is not None and (index + 1 < len(layers) or not method.stop_early):
                for b, kw in enumerate(kwargs):
                    inputs[b] = _layer_forward(layer, inputs[b].to(device), kw, autocast).to(store)
            layer.to(home)
            phases["propagate"] += time.perf_counter() - t_phase
            report.layer_seconds.append(time.perf_counter() - t_layer)
    report.seconds = time.perf_counter() - t_start
    report.phase_seconds = phases
    for consumer in consumers:
        report.timings |= {k: report.timings.get(k, 0.0) + v for k, v in consumer.timings.items()}
        report.resolved_backends |= consumer.resolved_backends
    if autocast is not None:
        report.resolved_backends["forwards"] = str(autocast).removeprefix("torch.")
    return report


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


def prune(model: nn.Module, calib: CalibrationSet | torch.Tensor | None, config: PruneConfig, *,
          progress: bool = True) -> PruneReport:
    """Prune ``model`` in place with the method ``config`` names; the one generic entry.

    Args:
        calib: a ``CalibrationSet`` or token ids ``[n, seqlen]`` int64 (None only for a data-free method).
        config: a method's typed config, e.g. ``SparseGPTConfig(sparsity=0.7, sparsity_profile="owl")``.

    Everything that can be checked (:func:`check_request`: targets, N:M widths, device, backends, token ids) is
    checked before any weight changes. Returns the :class:`PruneReport`.
    """
    from .registry import PROFILES

    method, ids, refiner = check_request(model, calib, config)
    provenance = calib.provenance if isinstance(calib, CalibrationSet) else {"kind": "tensor" if ids is not None
                                                                              else "none"}
    report = PruneReport(method=config.method, config=config.to_dict(),
                         calibration=provenance | ({"n": ids.shape[0], "seqlen": ids.shape[1]} if ids is not None
                                                   else {}))
    layer_sparsities = None
    if config.sparsity_profile != "uniform":
        profile = PROFILES[config.sparsity_profile](config.profile_options)
        t0 = time.perf_counter()
        layer_sparsities, info = profile.layer_sparsities(model, ids, config, progress=progress)
        report.profile = {"name": config.sparsity_profile, "seconds": time.perf_counter() - t0} | info
        log.info("%s layer sparsities: %s", config.sparsity_profile,
                 ", ".join(f"{s:.3f}" for s in layer_sparsities))
    _, layers = find_decoder_layers(model)
    report.layer_targets = [float(layer_sparsities[i] if layer_sparsities is not None else config.layer_sparsity(i))
                            for i in range(len(layers))]
    # A data-free method needs forwards only for the reconstruction errors it reports.
    run_ids = ids if method.needs_calibration or refiner is not None or config.report_errors else None
    return prune_layerwise(model, run_ids, config, method, report, layer_sparsities=layer_sparsities,
                           refiner=refiner, progress=progress)
