"""Models larger than memory, and prunes saved layer by layer: :func:`prune_and_save`.

Given a checkpoint folder instead of a model, the model is built from its config on the meta device (no weight
memory), the weights outside the decoder layers (embeddings, final norm, lm_head) are loaded, and each decoder
layer is loaded from the safetensors shards only for its turn (:class:`SafetensorsLayerLoader`): loaded onto the
compute device, pruned, propagated, written to the work folder (:class:`~calibprune.pruning.checkpoint.LayerCheckpoint`)
and returned to the meta device before the next one loads. Host memory therefore holds about

    one decoder layer's weights (+ its Hessians) + the calibration activations + the weights outside the layers

instead of the whole model (see the README's "Scale out" for the formula with numbers). The activations can wait
on the device, on CPU or on disk (``PruneConfig.activations``).

At the end the checkpoint is assembled in a staging folder beside the output — the finished layer shards (hard
links, no copy), one shard for the weights outside the layers, ``model.safetensors.index.json``, the config, the
tokenizer and ``calibprune.json`` — and renamed into place (:func:`calibprune.save.save_staged`). It is a normal
sharded Hugging Face checkpoint: ``AutoModelForCausalLM.from_pretrained`` loads it, and its tensors are bitwise those
of the same prune run in memory. The same path serves a model already in memory (it is saved layer by layer, so
the run can resume after a kill) and the CLI.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .._version import __version__
from ..calibration import CalibrationSet, as_token_ids
from ..models import check_finite_weights, model_config, source_fingerprint
from .anatomy import LAYER_LOADER, find_decoder_layers
from .api import prune
from .checkpoint import LayerCheckpoint, partial_dir, saved_names, saved_state, write_safetensors
from .config import PruneConfig
from .device import resolve_device
from .distributed import current_context, sync_phase
from .report import PruneReport

log = logging.getLogger(__name__)

__all__ = ["prune_and_save", "load_streamed", "CheckpointReader", "SafetensorsLayerLoader", "INDEX_FILE",
           "weight_bytes"]

INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# Config fields that change where or how a run keeps things, not what it computes: a resume may change them.
_RUNTIME_FIELDS = ("resume", "activations", "offload_activations", "workers")


class CheckpointReader:
    """Reads named tensors from a Hugging Face safetensors checkpoint (one file or shards with an index)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / _SINGLE_FILE).is_file():
            with safe_open(str(self.folder / _SINGLE_FILE), framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), _SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.folder} has no {INDEX_FILE} or {_SINGLE_FILE}: streaming reads "
                                    "safetensors checkpoints (load the model once and save_pretrained it)")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The tensors ``names``, read straight onto ``device`` (one open per shard file)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, members in by_file.items():
            with safe_open(str(self.folder / file), framework="pt", device=str(device)) as f:
                for name in members:
                    out[name] = f.get_tensor(name)
        return out


def _state_slots(module: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """``(relative name, owner module, attribute, is_parameter)`` for every parameter and persistent buffer."""
    slots = []
    for mod_name, mod in module.named_modules():
        dot = f"{mod_name}." if mod_name else ""
        for pname, p in mod._parameters.items():
            if p is not None:
                slots.append((f"{dot}{pname}", mod, pname, True))
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                slots.append((f"{dot}{bname}", mod, bname, False))
    return slots


def _assign(mod: nn.Module, attr: str, is_param: bool, tensor: torch.Tensor) -> None:
    if is_param:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        mod._buffers[attr] = tensor


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


class SafetensorsLayerLoader:
    """Loads decoder layer ``i`` from the checkpoint for its turn and returns it to the meta device afterwards.

    The pipeline finds it on the model (attribute ``calibprune_layer_loader``) and calls :meth:`load` before a
    layer's turn and :meth:`release` after it.
    """

    def __init__(self, reader: CheckpointReader, model: nn.Module, prefix: str, dtype: torch.dtype | None):
        self.reader, self.model, self.prefix, self.dtype = reader, model, prefix, dtype

    def load(self, index: int, layer: nn.Module, device: torch.device) -> None:
        slots = _state_slots(layer)
        on_disk = saved_names(self.model, {f"{self.prefix}.{index}.{rel}": getattr(mod, "_parameters" if p else
                                                                                  "_buffers")[attr]
                                           for rel, mod, attr, p in slots})
        names = list(on_disk.values())
        missing = [n for n in names if n not in self.reader]
        if missing:
            raise KeyError(f"{self.reader.folder} has no tensor(s) {missing[:3]} for decoder layer {index}")
        tensors = self.reader.read(names, device)
        check_finite_weights(tensors.items(), str(self.reader.folder))
        for name, (_, mod, attr, is_param) in zip(names, slots):
            _assign(mod, attr, is_param, _cast(tensors[name], self.dtype))
        for mod in layer.modules():  # non-persistent buffers were built on CPU by the meta init
            for bname in mod._non_persistent_buffers_set:
                if mod._buffers.get(bname) is not None:
                    mod._buffers[bname] = mod._buffers[bname].to(device)

    def release(self, index: int, layer: nn.Module) -> None:
        for _, mod, attr, is_param in _state_slots(layer):
            current = mod._parameters[attr] if is_param else mod._buffers[attr]
            _assign(mod, attr, is_param, torch.empty_like(current, device="meta"))
        _return_freed_memory()


@functools.cache
def _glibc() -> Any:
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        return lib
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps what a layer used, so RSS would creep up layer by layer;
    measured with benchmarks/bench_memory.py). A no-op where glibc's malloc_trim is absent."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


def _default_dtype(config, device: torch.device) -> torch.dtype:
    """As :func:`calibprune.load_model`: fp32 on CPU, the checkpoint's dtype on an accelerator."""
    if device.type == "cpu":
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved.removeprefix("torch."), None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def load_streamed(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> nn.Module:
    """A causal LM whose decoder layers stay on disk until the pipeline loads them, one at a time.

    The model is built from ``path``'s config on the meta device; the weights outside the decoder layers are read
    onto CPU (``dtype``: default fp32 when ``device`` is a CPU, else the checkpoint's). ``path`` must be a local
    safetensors checkpoint whose tensor names are the model's own.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    path = Path(path)
    device = torch.device(device)
    reader = CheckpointReader(path)
    config = model_config(path)
    dtype = dtype or _default_dtype(config, device)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    prefix, layers = find_decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    wanted = []
    for mod_name, mod in model.named_modules():
        if id(mod) in inside:
            continue
        dot = f"{mod_name}." if mod_name else ""
        for rel, owner, attr, is_param in _state_slots(mod):
            if owner is mod:  # each slot once, at its own module
                wanted.append((f"{dot}{rel}", owner, attr, is_param))
    on_disk = saved_names(model, {name: getattr(owner, "_parameters" if p else "_buffers")[attr]
                                  for name, owner, attr, p in wanted})
    present = [w for w in wanted if on_disk[w[0]] in reader]
    tensors = reader.read([on_disk[w[0]] for w in present], "cpu")
    check_finite_weights(tensors.items(), str(path))
    for name, owner, attr, is_param in present:
        _assign(owner, attr, is_param, _cast(tensors[on_disk[name]], dtype))
    model.tie_weights()
    still_meta = [n for n, t in model.state_dict(keep_vars=True).items()
                  if not n.startswith(prefix + ".") and t.is_meta]
    if still_meta:
        raise KeyError(f"{path} lacks the tensor(s) {still_meta[:3]} outside the decoder layers")
    setattr(model, LAYER_LOADER, SafetensorsLayerLoader(reader, model, prefix, dtype))
    model.name_or_path = str(path)
    model.calibprune_source = {"reference": str(path), "kind": "local", "path": str(path)}
    log.info("streaming %s (%s, %d decoder layers, %.1fM parameters, %s): layers load one at a time", path,
             type(model).__name__, len(layers), sum(p.numel() for p in model.parameters()) / 1e6, dtype)
    return model


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (meta tensors counted at their would-be size)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _model_fingerprint(model: nn.Module) -> dict:
    """What a resumed run must be pruning: the source files' hashes when known, else a hash of the weights."""
    source = source_fingerprint(model)
    if source is not None:
        return {"files": source.get("files"), "revision": source.get("revision"), "reference": source["reference"]}
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if not tensor.is_meta:
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return {"weights_sha256": digest.hexdigest()}


def _resume_key(model: nn.Module, ids: torch.Tensor | None, config: PruneConfig, world: int) -> dict:
    from ..calibration.calibration_set import ids_sha256

    settings = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_FIELDS}
    return {"config": json.loads(json.dumps(settings, default=str)),
            "calibration_ids_sha256": ids_sha256(ids) if ids is not None else None,
            "model": _model_fingerprint(model), "dtype": str(next(model.parameters()).dtype),
            "device": resolve_device(config).type, "world_size": world,
            "versions": {"torch": torch.__version__, "calibprune": __version__}}


class _OutputLock:
    """An exclusive, non-blocking lock beside the output, so two prunes never write the same work folder."""

    def __init__(self, out: Path):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = out.with_name(f".{out.name}.calibprune-lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FileExistsError(f"another prune is writing {out} right now (lock {self.path})") from None

    def release(self) -> None:
        os.close(self.fd)  # the kernel drops the lock; the file stays (deleting it would race a waiting locker)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _without_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the tensors that share storage with an earlier one (tied lm_head), as save_pretrained does."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        remove_tied_weights_from_state_dict = None
    if remove_tied_weights_from_state_dict is not None:
        return remove_tied_weights_from_state_dict(dict(state), model)
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def _assemble(folder: Path, model: nn.Module, tokenizer, checkpoint: LayerCheckpoint, prefix: str, n_layers: int,
              report: PruneReport, extra: dict) -> None:
    """Write the finished checkpoint into the staging ``folder``: shards, index, config, tokenizer, sidecar."""
    from ..save import sidecar_for, write_sidecar

    total = n_layers + 1
    weight_map: dict[str, str] = {}
    total_size = 0
    outside = {n: t.detach() for n, t in model.state_dict().items() if not n.startswith(prefix + ".")}
    outside = saved_state(model, _without_tied(model, outside))
    first = f"model-{1:05d}-of-{total:05d}.safetensors"
    write_safetensors(folder / first, outside, {"format": "pt"})
    for name, tensor in outside.items():
        weight_map[name] = first
        total_size += tensor.numel() * tensor.element_size()
    for i in range(n_layers):
        shard = f"model-{i + 2:05d}-of-{total:05d}.safetensors"
        _link_or_copy(checkpoint.layer_file(i), folder / shard)
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in f.keys():
                weight_map[name] = shard
                sl = f.get_slice(name)
                total_size += int(torch.Size(sl.get_shape()).numel()) * _DTYPE_BYTES[sl.get_dtype()]
    index = {"metadata": {"total_parameters": sum(p.numel() for p in model.parameters()), "total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.dtype = str(next(model.parameters()).dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if getattr(model, "can_generate", lambda: False)() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_sidecar(folder, sidecar_for(model, report, extra))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def prune_and_save(model: nn.Module | str | os.PathLike, calib: CalibrationSet | torch.Tensor | None,
                   config: PruneConfig, out: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype | None = None,
                   overwrite: bool = False, extra: dict | None = None,
                   after_prune: Callable[[nn.Module, PruneReport], dict] | None = None,
                   progress: bool = True) -> PruneReport:
    """Prune and write a sharded checkpoint to ``out`` layer by layer; resumable, and streamed from disk when
    ``model`` is a checkpoint folder.

    Args:
        model: a model in memory (pruned in place), or a local safetensors checkpoint folder: then the model is
            built on the meta device and each decoder layer is loaded only for its turn (:func:`load_streamed`).
        calib, config: as for :func:`calibprune.prune`; ``config.resume`` continues a killed run of the same
            request from ``<out>.calibprune-partial`` (refused with the differing fields when it is not the same).
        out: the output folder, created only when the checkpoint is complete (rules of
            :func:`calibprune.save.check_output_dir`; ``overwrite`` replaces a previous calibprune output).
        tokenizer: saved with the checkpoint when given.
        dtype: for a streamed model, the compute dtype (default as :func:`calibprune.load_model`).
        extra: more fields for ``calibprune.json``.
        after_prune: called with the pruned model and the report before the checkpoint is assembled (on rank 0 in
            a process group); the fields it returns join ``calibprune.json`` (the CLI's pruned perplexity).

    In a process group every rank calls this with the same arguments; all of them prune, rank 0 alone writes.
    Returns the :class:`PruneReport` (every rank).
    """
    from ..save import check_output_dir, save_staged

    ctx = current_context()
    writer = ctx is None or ctx.is_main
    out = Path(out)
    error, lock = None, None
    try:
        if writer:
            check_output_dir(out, overwrite=overwrite)
            lock = _OutputLock(Path(os.path.abspath(out)))
        if isinstance(model, (str, os.PathLike)):
            model = load_streamed(model, dtype=dtype, device=resolve_device(config))
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it
        error = exc
    sync_phase(ctx, "preparing the output", error)
    try:
        prefix, layers = find_decoder_layers(model)
        ids = as_token_ids(calib) if calib is not None else None
        key = _resume_key(model, ids, config, ctx.world if ctx else 1) if writer else {}
        checkpoint = LayerCheckpoint(partial_dir(out), key, model, resume=config.resume, ctx=ctx)
        report = prune(model, calib, config, progress=progress, checkpoint=checkpoint)
        error = None
        if writer:
            try:
                fields: dict[str, Any] = dict(extra or {})
                if after_prune is not None:
                    fields |= after_prune(model, report)
                save_staged(out, lambda folder: _assemble(folder, model, tokenizer, checkpoint, prefix, len(layers),
                                                          report, fields), overwrite=overwrite)
                shutil.rmtree(checkpoint.folder, ignore_errors=True)
                log.info("saved the pruned checkpoint to %s", out)
            except Exception as exc:  # noqa: BLE001
                error = exc
        sync_phase(ctx, "writing the checkpoint", error)
    finally:
        if lock is not None:
            lock.release()
    return report
