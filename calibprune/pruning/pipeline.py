"""The layer-wise pipeline every method shares.

1. Capture the inputs of the first decoder layer, with every keyword it receives (attention mask, position ids,
   rotary ``position_embeddings``, …), by a forward pre-hook that stops the model there. No torch.fx.
2. For each decoder layer, one at a time on the compute device: run the calibration batches through it with
   hooks that feed each target Linear's input to the method's statistics; prune every target; run the batches
   again through the pruned layer to get the next layer's inputs.

Works for any Hugging Face decoder whose blocks are an ``nn.ModuleList``.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import PruneConfig
from .report import ModuleRecord, PruneReport

log = logging.getLogger(__name__)

__all__ = ["find_decoder_layers", "capture_layer_inputs", "select_targets", "LayerMethod", "prune_layerwise",
           "exact_fp32"]


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


def select_targets(layer: nn.Module, targets: tuple[str, ...] = (),
                   ignore: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """Linear modules of one decoder layer to prune, by fnmatch patterns on names relative to the layer."""
    found = {}
    for name, mod in layer.named_modules():
        if not isinstance(mod, nn.Linear) or "lm_head" in name:
            continue
        if targets and not any(fnmatch.fnmatchcase(name, p) for p in targets):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in ignore):
            continue
        found[name] = mod
    return found


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


class LayerMethod:
    """What a pruning method plugs into :func:`prune_layerwise`.

    ``share_inputs``: modules reading the very same input tensor (q/k/v, gate/up) share one statistic.
    ``stop_early``: end each statistics forward once every target module has seen its input.
    """

    share_inputs: bool = True
    stop_early: bool = True

    def start_layer(self, modules: dict[str, nn.Linear], device: torch.device) -> None:
        raise NotImplementedError

    def add_batch(self, leader: str, x: torch.Tensor) -> None:
        """Fold the input ``x: [b, t, in]`` of the group led by module ``leader`` into its statistic."""
        raise NotImplementedError

    def prune_module(self, name: str, module: nn.Linear, leader: str, config: PruneConfig) -> dict:
        """Prune one module in place; return extra record fields (``recon_error``, ``rel_error``, ``obs_loss``)."""
        raise NotImplementedError

    def end_layer(self) -> None:
        pass


class _InputRouter:
    """Forward pre-hooks that route each target module's input to its group's statistic.

    Groups are found on the first batch: a module whose input is the very tensor an earlier module received in
    the same forward joins that module's group (we hold references during the forward, so addresses cannot be
    reused by other tensors).
    """

    def __init__(self, modules: dict[str, nn.Linear], method: LayerMethod):
        self.modules, self.method = modules, method
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
                if self.method.share_inputs:
                    for seen, other in self._live:
                        if seen is x or (seen.data_ptr() == x.data_ptr() and seen.shape == x.shape
                                         and seen.stride() == x.stride()):
                            leader = other
                            break
                self.leader_of[name] = leader
            self._live.append((x, leader))
            if leader == name:
                self.method.add_batch(name, x.detach())
            self._seen += 1
            if self.method.stop_early and self._seen == len(self.modules):
                raise _StopForward

        return hook

    def end_forward(self) -> None:
        self._live.clear()
        self._seen = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_forward(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune_layerwise(model: nn.Module, ids: torch.Tensor, config: PruneConfig, method: LayerMethod,
                    report: PruneReport) -> PruneReport:
    """Prune every target Linear of every decoder layer of ``model`` in place with ``method``.

    Args:
        ids: calibration tokens ``[n, seqlen]`` int64.
    """
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store = torch.device("cpu") if config.offload_activations else device
    prefix, layers = find_decoder_layers(model)
    t_start = time.perf_counter()
    phases = dict.fromkeys(("capture", "statistics", "prune", "propagate"), 0.0)
    with exact_fp32():
        inputs, kwargs = capture_layer_inputs(model, layers, ids, config.batch_size, device, store)
        phases["capture"] = time.perf_counter() - t_start
        for index, layer in enumerate(tqdm(layers, desc=f"{report.method} layers", unit="layer")):
            t_layer = time.perf_counter()
            home = next(layer.parameters()).device
            layer.to(device)
            modules = select_targets(layer, config.targets, config.ignore)
            if not modules:
                log.warning("layer %d has no target Linear modules; left dense", index)
            else:
                t_phase = time.perf_counter()
                method.start_layer(modules, device)
                router = _InputRouter(modules, method)
                try:
                    for x, kw in zip(inputs, kwargs):
                        try:
                            _layer_forward(layer, x.to(device), kw)
                        except _StopForward:
                            pass
                        router.end_forward()
                finally:
                    router.remove()
                t_prune = time.perf_counter()
                phases["statistics"] += t_prune - t_phase
                for name, module in modules.items():
                    t_mod = time.perf_counter()
                    leader = router.leader_of.get(name)
                    if leader is None:
                        log.warning("%s.%d.%s never ran on the calibration data; left dense", prefix, index, name)
                        continue
                    extra = method.prune_module(name, module, leader, config)
                    weight = module.weight.data
                    report.modules.append(ModuleRecord(
                        layer=index, name=name, shape=(weight.shape[0], weight.shape[1]),
                        sparsity=float((weight == 0).float().mean()), seconds=time.perf_counter() - t_mod,
                        recon_error=extra.get("recon_error"), rel_error=extra.get("rel_error"),
                        obs_loss=extra.get("obs_loss")))
                method.end_layer()
                phases["prune"] += time.perf_counter() - t_prune
            t_phase = time.perf_counter()
            if index + 1 < len(layers) or not method.stop_early:
                for b, kw in enumerate(kwargs):
                    inputs[b] = _layer_forward(layer, inputs[b].to(device), kw).to(store)
            layer.to(home)
            phases["propagate"] += time.perf_counter() - t_phase
            report.layer_seconds.append(time.perf_counter() - t_layer)
    report.seconds = time.perf_counter() - t_start
    # Sub-phases a method times itself (e.g. SparseGPT's Hessian inside statistics, OBS inside prune).
    phases |= {f"{k} (in {'statistics' if k == 'hessian' else 'prune'})": v
               for k, v in getattr(method, "phase_seconds", {}).items()}
    report.phase_seconds = phases
    if getattr(method, "resolved_backends", None):
        report.config["resolved_backends"] = method.resolved_backends
    return report


def hessian_errors(W_old: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor, seqlen: int) -> dict:
    """Mean per-token ‖(W − Ŵ)x‖² from a running-average Hessian H = (2/N)·Σ x xᵀ, and its ratio to ‖Wx‖²."""
    delta = W_old - W_new
    err = float((delta @ H * delta).sum()) / (2 * seqlen)
    base = float((W_old @ H * W_old).sum()) / (2 * seqlen)
    return {"recon_error": err, "rel_error": err / base if base > 0 else None}
