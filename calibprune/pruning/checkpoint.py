"""A prune saved layer by layer: resume after a kill, and the shards of a streamed save.

The work folder ``<out>.calibprune-partial/`` (beside the output) holds:

* ``state.json`` — what the run is (a key: the config, the calibration tokens' sha256, the model's fingerprint,
  the number of ranks, the torch and calibprune versions), the sparsity profile once computed (OWL), and for each
  finished decoder layer its shard file, byte size, report records and seconds;
* ``layer-00007.safetensors`` — the finished layer's tensors under their checkpoint names
  (``model.layers.7.mlp.up_proj.weight``); these become the output's shards unchanged.

Every file is written to a temporary name, fsynced and renamed, and a layer counts as finished only once
``state.json`` lists it, so a run killed at any moment (SIGKILL included) leaves a consistent folder. A resumed run
checks the key (a mismatch is refused with the fields that differ), restores the finished layers, recomputes the
next layer's inputs by running the calibration through them (deterministic; no activations on disk), and
continues. The folder holds no ``config.json`` and no index, so it cannot be loaded as a model; the output folder
itself appears only when the whole checkpoint is assembled and renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .._io import atomic_write_text
from .anatomy import find_decoder_layers
from .distributed import DistContext, broadcast_tensors, sync_phase
from .report import ModuleRecord

log = logging.getLogger(__name__)

__all__ = ["LayerCheckpoint", "partial_dir", "PARTIAL_SUFFIX", "STATE_FILE", "layer_tensors", "saved_state",
           "saved_names", "write_safetensors"]

PARTIAL_SUFFIX = ".calibprune-partial"
STATE_FILE = "state.json"
_FORMAT = 1


def partial_dir(out: str | os.PathLike) -> Path:
    """The work folder of output ``out``: ``<parent>/<name>.calibprune-partial``."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    return out.with_name(out.name + PARTIAL_SUFFIX)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                       torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` as a safetensors file, each tensor's bytes straight from its memory (``save_file`` builds a
    copy of every tensor first, which would double a shard's footprint); fsynced. Returns the file size.

    Layout as the format specifies: an 8-byte little-endian header length, the JSON header (padded with spaces to
    a multiple of 8), then the tensors back to back, larger elements first so that every tensor stays aligned.
    """
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in items:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for _, tensor in items:
            if tensor.numel():
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                fh.write(memoryview(data.numpy()))
        fh.flush()
        os.fsync(fh.fileno())
    return 8 + len(blob) + offset


def saved_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (model names → tensors) as ``save_pretrained`` writes it: transformers' reverse weight conversion
    applied (GPT-NeoX saves ``lm_head`` as ``embed_out``); identity for most models."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: no conversions
        return state
    return dict(revert_weight_conversion(model, state))


def saved_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Model name → checkpoint name for each entry of ``state`` (renamings only: a weight that is split or merged
    on save cannot be read one by one, and is a ``ValueError``)."""
    out = {}
    for name, tensor in state.items():
        renamed = saved_state(model, {name: tensor})
        if len(renamed) != 1:
            raise ValueError(f"{type(model).__name__} converts {name} into {sorted(renamed)} when saving; "
                             "reading it tensor by tensor is not supported (prune this model in memory)")
        out[name] = next(iter(renamed))
    return out


def layer_tensors(model: nn.Module, layer: nn.Module, prefix: str, index: int) -> dict[str, torch.Tensor]:
    """The layer's state (parameters and persistent buffers) under checkpoint names (still on its device)."""
    return saved_state(model, {f"{prefix}.{index}.{k}": v.detach() for k, v in layer.state_dict().items()})


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _diff(saved: Any, wanted: Any, path: str = "") -> list[str]:
    """Dotted names of the fields where two JSON values differ."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out = []
        for k in sorted(set(saved) | set(wanted), key=str):
            out += _diff(saved.get(k), wanted.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if saved == wanted else [path or "(value)"]


class LayerCheckpoint:
    """The work folder of one prune (see the module docstring).

    Args:
        folder: the work folder (created by rank 0).
        key: JSON-ready description of the run; a resumed run must present the same key.
        model: the model being pruned (its decoder layers and its save-time weight names).
        resume: continue the run saved in ``folder``. Without it an existing saved run is an error that says so.
        ctx: the process group; rank 0 reads and writes the folder, the others receive what they need from it.
    """

    def __init__(self, folder: str | os.PathLike, key: dict, model: nn.Module, *, resume: bool,
                 ctx: DistContext | None = None):

        self.folder = Path(folder)
        self.model = model
        self.prefix, layers = find_decoder_layers(model)
        self.key, self.n_layers, self.ctx = key, len(layers), ctx
        self.writer = ctx is None or ctx.is_main
        error, state = None, None
        if self.writer:
            try:
                state = self._open(resume)
            except Exception as exc:  # noqa: BLE001 - every rank must learn of it
                error = exc
        states = sync_phase(ctx, f"opening the work folder {self.folder}", error, state)
        self.state: dict = states[0]

    # -- the state file -----------------------------------------------------------------------------------------
    def _fresh_state(self) -> dict:
        return {"format": _FORMAT, "key": self.key, "n_layers": self.n_layers, "layers": {}, "profile": None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _open(self, resume: bool) -> dict:
        path = self.folder / STATE_FILE
        self._clean()
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); delete {self.folder} to start over") from None
            done = self._finished(state)
            if not resume:
                raise FileExistsError(f"{self.folder} holds an unfinished prune of this output ({len(done)} of "
                                      f"{state.get('n_layers')} layers done): pass --resume (resume=True) to continue "
                                      "it, or delete that folder to start over")
            differ = _diff(state.get("key"), self.key)
            if state.get("format") != _FORMAT or state.get("n_layers") != self.n_layers or differ:
                raise ValueError(f"cannot resume from {self.folder}: it was started with a different "
                                 f"{', '.join(differ) or 'format'} (resume needs the same model, calibration, "
                                 "settings, number of ranks and versions); delete the folder to start over")
            state["layers"] = {str(i): state["layers"][str(i)] for i in done}
            log.info("resuming from %s: layers 0..%d are done", self.folder, len(done) - 1)
            return state
        if resume:
            log.info("nothing to resume in %s; starting from the first layer", self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        state = self._fresh_state()
        self._write_state(state)
        return state

    def _clean(self) -> None:
        """Remove what a killed run left half-written: temporary shard files and on-disk activations."""
        if not self.folder.is_dir():
            return
        for entry in self.folder.iterdir():
            if entry.name.startswith(".layer-") and entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)
            elif entry.name.startswith("activations-") and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def _finished(self, state: dict) -> list[int]:
        """The longest run of finished layers from 0 whose shard files are present and complete."""
        done = []
        layers = state.get("layers") or {}
        for i in range(int(state.get("n_layers") or 0)):
            entry = layers.get(str(i))
            if entry is None:
                break
            file = self.folder / entry["file"]
            if not file.is_file() or file.stat().st_size != entry["bytes"]:
                log.warning("%s is missing or incomplete; layer %d will be pruned again", file, i)
                break
            done.append(i)
        return done

    def _write_state(self, state: dict) -> None:
        atomic_write_text(self.folder / STATE_FILE, json.dumps(state, indent=1, default=str))

    # -- what the pipeline asks ----------------------------------------------------------------------------------
    def layer_file(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.safetensors"

    def is_done(self, index: int) -> bool:
        return str(index) in self.state["layers"]

    def done_layers(self) -> list[int]:
        return sorted(int(i) for i in self.state["layers"])

    def layer_seconds(self, index: int) -> float:
        return float(self.state["layers"][str(index)]["seconds"])

    @property
    def profile(self) -> tuple[list[float], dict] | None:
        """The saved per-layer sparsities and profile details (OWL), or None."""
        saved = self.state.get("profile")
        return (saved["layer_sparsities"], saved["info"]) if saved else None

    def save_profile(self, layer_sparsities: list[float], info: dict) -> None:
        self.state["profile"] = {"layer_sparsities": [float(s) for s in layer_sparsities], "info": info}
        if self.writer:
            self._write_state(self.state)

    def restore(self, index: int, layer: nn.Module, ctx: DistContext | None) -> list[ModuleRecord]:
        """Put the saved tensors of finished layer ``index`` into ``layer`` (materialised, on its compute device);
        returns its report records. Rank 0 reads the shard and broadcasts it to the others."""
        error = None
        state = layer.state_dict()
        if self.writer:
            try:
                names = saved_names(self.model, {f"{self.prefix}.{index}.{k}": t for k, t in state.items()})
                with safe_open(str(self.layer_file(index)), framework="pt", device="cpu") as f:
                    present = set(f.keys())
                    for k, tensor in state.items():
                        name = names[f"{self.prefix}.{index}.{k}"]
                        if name not in present:
                            raise KeyError(f"{self.layer_file(index)} has no tensor {name}")
                        tensor.copy_(f.get_tensor(name))
            except Exception as exc:  # noqa: BLE001
                error = exc
        sync_phase(ctx, f"layer {index} restore", error)
        if ctx is not None:
            broadcast_tensors(ctx, [(t, 0) for t in state.values()], "resume (broadcast)")
        return [ModuleRecord(**{**r, "shape": tuple(r["shape"])}) for r in self.state["layers"][str(index)]["records"]]

    def commit(self, index: int, layer: nn.Module, records: list[ModuleRecord], seconds: float) -> None:
        """Save finished layer ``index`` (rank 0): its shard, then the state that lists it."""
        from dataclasses import asdict

        from ..save import check_finite

        if not self.writer:
            self.state["layers"][str(index)] = {"records": [asdict(r) for r in records], "seconds": seconds}
            return
        check_finite(layer)
        file = self.layer_file(index)
        tmp = file.with_name(f".{file.name}.tmp")
        write_safetensors(tmp, layer_tensors(self.model, layer, self.prefix, index), {"format": "pt"})
        os.replace(tmp, file)
        _fsync_dir(self.folder)
        self.state["layers"][str(index)] = {"file": file.name, "bytes": file.stat().st_size,
                                            "records": [asdict(r) for r in records], "seconds": seconds}
        self._write_state(self.state)
