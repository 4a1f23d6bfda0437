"""Where the calibration activations wait between decoder layers: on the compute device, on CPU, or on disk.

The pipeline keeps one hidden-state tensor per calibration batch (``[b, seqlen, hidden]`` in the model dtype): the
inputs of the layer being pruned, replaced batch by batch by that layer's outputs. ``"device"`` keeps them where
the layer computes (fastest), ``"cpu"`` in host memory (GPU memory holds one layer and one batch), ``"disk"`` in
one safetensors file per batch (host memory holds one batch; for calibration sets larger than RAM).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["ActivationStore", "STORES"]

STORES = ("device", "cpu", "disk")


class ActivationStore:
    """One hidden-state tensor per local calibration batch, kept on ``kind``'s medium.

    Args:
        kind: ``"device"``, ``"cpu"`` or ``"disk"``.
        device: the compute device (tensors come back there from :meth:`get`).
        folder: for ``"disk"``, where the files go (a fresh sub-folder is made and removed by :meth:`close`);
            default the system temp dir.
    """

    def __init__(self, kind: str, device: torch.device, folder: str | os.PathLike | None = None):
        if kind not in STORES:
            raise ValueError(f"activation store must be one of {STORES}, got {kind!r}")
        self.kind, self.device = kind, device
        self._items: list[torch.Tensor | None] = []
        self._dir: Path | None = None
        if kind == "disk":
            parent = Path(folder) if folder is not None else None
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="activations-", dir=parent))

    def __len__(self) -> int:
        return len(self._items)

    def _path(self, b: int) -> Path:
        assert self._dir is not None
        return self._dir / f"batch-{b:06d}.safetensors"

    def _put(self, b: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.kind == "device":
            return x.to(self.device)
        if self.kind == "cpu":
            return x.to("cpu")
        path = self._path(b)
        tmp = path.with_suffix(".tmp")
        save_file({"x": x.detach().to("cpu").contiguous()}, str(tmp))
        os.replace(tmp, path)
        return None

    def append(self, x: torch.Tensor) -> None:
        """Keep ``x`` as the next batch."""
        self._items.append(self._put(len(self._items), x))

    def get(self, b: int) -> torch.Tensor:
        """Batch ``b`` on the compute device."""
        if self.kind == "disk":
            return load_file(str(self._path(b)), device=str(self.device))["x"]
        x = self._items[b]
        assert x is not None
        return x.to(self.device, non_blocking=True)

    def set(self, b: int, x: torch.Tensor) -> None:
        """Replace batch ``b`` (after it went through a layer)."""
        self._items[b] = self._put(b, x)

    def nbytes(self) -> int:
        """Bytes held in memory (device or CPU); 0 for disk."""
        return sum(x.numel() * x.element_size() for x in self._items if x is not None)

    def close(self) -> None:
        """Drop the tensors and remove the files."""
        self._items = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
