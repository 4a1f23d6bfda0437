"""``CalibrationSet`` and ``build_calibration``: seeded, deterministic windows of exactly ``seqlen`` tokens."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write
from .sources import SOURCES, check_available, file_sha256, load_texts, offline_files, resolve_data_dir

log = logging.getLogger(__name__)

__all__ = ["CalibrationSet", "CalibrationFileError", "as_token_ids", "build_calibration", "allocate_counts",
           "calibration_paths", "check_vocab", "ids_sha256"]


class CalibrationFileError(ValueError):
    """A saved calibration set that cannot be used; the message names the file and what is wrong."""


def calibration_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(ids .pt, provenance .json)`` of a saved set: ``foo`` and ``foo.pt`` both mean ``foo.pt`` + ``foo.json``;
    any other suffix is kept (``set.v2`` -> ``set.v2.pt``)."""
    raw = os.fspath(path)
    path = Path(path)
    if not path.name or path.name in (".", "..") or raw.endswith(("/", os.sep)):
        raise ValueError(f"{raw!r} is not a file name for a calibration set (e.g. calib/c4-128.pt)")
    if path.suffix != ".pt":
        path = path.with_name(path.name + ".pt")
    return path, path.with_suffix(".json")


def ids_sha256(ids: torch.Tensor) -> str:
    """Hex sha256 of ``[n, seqlen]`` token ids as little-endian int64 in row-major order (shape included)."""
    arr = np.ascontiguousarray(ids.detach().to("cpu", torch.int64).numpy()).astype("<i8", copy=False)
    digest = hashlib.sha256(f"{tuple(arr.shape)}".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()


def check_vocab(ids: torch.Tensor, vocab_size: int, where: str) -> None:
    """Every id must be in ``[0, vocab_size)``; raises :class:`CalibrationFileError` naming ``where`` otherwise."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = int(((ids < 0) | (ids >= vocab_size)).sum())
        raise CalibrationFileError(f"{where}: {bad} of {ids.numel()} token ids lie outside the tokenizer's "
                                   f"vocabulary [0, {vocab_size}) (ids span [{low}, {high}]); was it built with "
                                   "another tokenizer?")


@dataclass
class CalibrationSet:
    """Token ids ``[n, seqlen]`` int64 plus where they came from.

    ``provenance`` holds the sources, their weights and per-source counts, seed, seqlen, tokenizer and the
    data mode, enough to rebuild the set. ``row_sources[i]`` names the source of row ``i``.
    """

    ids: torch.Tensor
    provenance: dict = field(default_factory=dict)
    row_sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.dtype != torch.int64:
            raise ValueError(f"calibration ids must be [n, seqlen] int64, got {tuple(self.ids.shape)} {self.ids.dtype}")
        if self.row_sources and len(self.row_sources) != self.ids.shape[0]:
            raise ValueError(f"row_sources has {len(self.row_sources)} entries for {self.ids.shape[0]} rows")

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return self.n

    def save(self, path: str | os.PathLike) -> Path:
        """Write ids (``.pt``) and provenance (``.json`` beside it) atomically; returns the ``.pt`` path.

        The ``.json`` is written first, so a ``.pt`` on disk always has its provenance beside it, and two
        processes saving the same set at once both succeed (see :func:`calibration_paths` for the names).
        """
        pt, meta = calibration_paths(path)
        text = json.dumps(self.provenance, indent=2, sort_keys=True, default=str)
        blob = {"ids": self.ids.detach().cpu().contiguous(), "row_sources": list(self.row_sources),
                "ids_sha256": ids_sha256(self.ids)}
        atomic_write(meta, lambda fh: fh.write(text.encode("utf-8")))
        atomic_write(pt, lambda fh: torch.save(blob, fh))
        return pt

    @classmethod
    def load(cls, path: str | os.PathLike, *, vocab_size: int | None = None) -> CalibrationSet:
        """Read a set written by :meth:`save`, checking it thoroughly: a readable file holding ``[n, seqlen]``
        integer ids (n >= 1, seqlen >= 2), no negative ids, ids below ``vocab_size`` when given, the checksum
        written with it, and a parseable ``.json``. Any problem raises :class:`CalibrationFileError` naming the file.
        """
        pt, meta = calibration_paths(path)
        if not pt.is_file():
            raise FileNotFoundError(f"no calibration set at {pt}")
        try:
            blob = torch.load(pt, weights_only=True, map_location="cpu")
        except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError,
                AttributeError, IndexError, KeyError, TypeError, io.UnsupportedOperation) as exc:
            detail = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
            raise CalibrationFileError(f"{pt} is not a readable calibration set (truncated, or not written by "
                                       f"CalibrationSet.save / calibprune calib): {detail[:160]}") from None
        if isinstance(blob, torch.Tensor):
            raise CalibrationFileError(f"{pt} holds a plain tensor {tuple(blob.shape)}, not a calibration set; "
                                       "wrap it: CalibrationSet(ids=tensor.long()).save(path)")
        if not isinstance(blob, dict) or not isinstance(blob.get("ids"), torch.Tensor):
            raise CalibrationFileError(f"{pt} is not a calibration set: expected a dict with an 'ids' tensor, got "
                                       f"{type(blob).__name__}")
        ids = blob["ids"]
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise CalibrationFileError(f"{pt}: ids must be integer token ids [n, seqlen], got {tuple(ids.shape)} "
                                       f"{ids.dtype}")
        if ids.shape[0] < 1 or ids.shape[1] < 2:
            raise CalibrationFileError(f"{pt}: the set is empty or too short: shape {tuple(ids.shape)} (need n >= 1, "
                                       "seqlen >= 2)")
        ids = ids.to(torch.int64)
        if int(ids.min()) < 0:
            raise CalibrationFileError(f"{pt}: {int((ids < 0).sum())} of {ids.numel()} token ids are negative "
                                       f"(min {int(ids.min())})")
        if vocab_size is not None:
            check_vocab(ids, vocab_size, str(pt))
        expected = blob.get("ids_sha256")
        if expected is not None and expected != ids_sha256(ids):
            raise CalibrationFileError(f"{pt}: the ids do not match the checksum saved with them; the file is damaged")
        rows = blob.get("row_sources", [])
        if not isinstance(rows, (list, tuple)) or (rows and len(rows) != ids.shape[0]) \
                or not all(isinstance(r, str) for r in rows):
            raise CalibrationFileError(f"{pt}: row_sources must be a list of {ids.shape[0]} source names")
        provenance = {}
        if meta.exists():
            try:
                provenance = json.loads(meta.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CalibrationFileError(f"{meta} (the provenance of {pt.name}) is not valid JSON: {exc}") from None
            if not isinstance(provenance, dict):
                raise CalibrationFileError(f"{meta}: expected a JSON object, got {type(provenance).__name__}")
        return cls(ids=ids, provenance=provenance, row_sources=list(rows))


def as_token_ids(calib: CalibrationSet | torch.Tensor) -> torch.Tensor:
    """The ``[n, seqlen]`` int64 ids of a ``CalibrationSet`` or a plain tensor, validated."""
    ids = calib.ids if isinstance(calib, CalibrationSet) else calib
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("calibration must be a CalibrationSet or a LongTensor [n, seqlen]")
    if ids.dtype != torch.int64:
        raise ValueError(f"calibration ids must be int64, got {ids.dtype}")
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"calibration is empty or too short: shape {tuple(ids.shape)} (need n >= 1, seqlen >= 2)")
    return ids


def _normalise_sources(sources: str | Sequence[str] | Mapping[str, float],
                       weights: Sequence[float] | Mapping[str, float] | None) -> dict[str, float]:
    if isinstance(sources, str):
        names, w = [sources], [1.0]
    elif isinstance(sources, Mapping):
        if weights is not None:
            raise ValueError("give weights either as a dict of sources or through weights=, not both")
        names, w = list(sources), [float(v) for v in sources.values()]
    else:
        names = list(sources)
        if weights is None:
            w = [1.0] * len(names)
        elif isinstance(weights, Mapping):
            w = [float(weights[name]) for name in names]
        else:
            w = [float(v) for v in weights]
    if not names:
        raise ValueError("no calibration source given")
    if len(w) != len(names):
        raise ValueError(f"{len(names)} sources but {len(w)} weights")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate calibration sources: {names}")
    if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise ValueError(f"source weights must be finite, >= 0 and not all zero, got {w}")
    total = sum(w)
    return {name: x / total for name, x in zip(names, w) if x > 0}


def allocate_counts(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """Split ``n`` samples by weight with the largest-remainder rule (ties go to the earlier source)."""
    raw = {name: w * n for name, w in weights.items()}
    counts = {name: int(math.floor(v)) for name, v in raw.items()}
    left = n - sum(counts.values())
    for name in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), list(raw).index(k)))[:left]:
        counts[name] += 1
    return counts


def _rng(seed: int, name: str) -> np.random.Generator:
    # Per-source stream: a source's windows do not depend on which other sources share the mix.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _tokenize(tokenizer, texts: list[str]) -> list[np.ndarray]:
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int64) for x in enc]


def _packed_windows(docs: list[np.ndarray], count: int, seqlen: int, eos: int, rng: np.random.Generator,
                    name: str) -> np.ndarray:
    """Shuffle documents, join them with EOS and cut consecutive windows; reshuffle and repeat if too short."""
    need = count * seqlen
    total = sum(len(d) + 1 for d in docs)
    if total < seqlen:
        raise ValueError(f"source {name!r} has only {total} tokens, fewer than one window of {seqlen}")
    passes = math.ceil(need / total)
    if passes > 1:
        log.warning("source %r has %d tokens; %d windows of %d need %d, so documents repeat (%d passes)",
                    name, total, count, seqlen, need, passes)
    stream: list[np.ndarray] = []
    for _ in range(passes):
        for k in rng.permutation(len(docs)):
            stream.append(docs[k])
            stream.append(np.array([eos], dtype=np.int64))
    flat = np.concatenate(stream)[:need]
    return flat.reshape(count, seqlen)


def _use_random_windows(docs: list[np.ndarray], count: int, seqlen: int) -> bool:
    """Whether GPTQ-style random windows suit these documents, or packing must be used instead.

    Random windows need documents of at least ``seqlen`` tokens: at least ``count // 4`` of them, holding at
    least twice the ``count · seqlen`` tokens drawn, so that windows rarely overlap. Otherwise (e.g. a sample of
    short abstracts with a few long ones) the windows would repeat the same few documents, and packing all
    documents with EOS gives distinct text instead.
    """
    long_docs = [d for d in docs if len(d) >= seqlen]
    return len(long_docs) >= max(1, count // 4) and sum(len(d) for d in long_docs) >= 2 * count * seqlen


def _random_windows(docs: list[np.ndarray], count: int, seqlen: int, rng: np.random.Generator) -> np.ndarray:
    """GPTQ-style: pick a random document at least ``seqlen`` long, then a random window inside it."""
    long_docs = [d for d in docs if len(d) >= seqlen]
    out = np.empty((count, seqlen), dtype=np.int64)
    for row in range(count):
        doc = long_docs[rng.integers(len(long_docs))]
        start = rng.integers(len(doc) - seqlen + 1)
        out[row] = doc[start : start + seqlen]
    return out


def _data_file_hashes(names: list[str], data_dir: str | os.PathLike | None) -> dict[str, str]:
    """``{path relative to the data dir: sha256}`` of the offline files the sources were read from."""
    root = resolve_data_dir(data_dir)
    out = {}
    for name in names:
        for path in offline_files(name, data_dir):
            key = str(path.relative_to(root)) if root is not None else str(path)
            out[key] = file_sha256(path)
    return out


def build_calibration(
    tokenizer,
    sources: str | Sequence[str] | Mapping[str, float],
    *,
    n: int = 128,
    seqlen: int = 2048,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    data_source: str = "auto",
) -> CalibrationSet:
    """Build ``n`` windows of exactly ``seqlen`` tokens from one source, a uniform mix or a weighted mix.

    Long-document sources give random windows inside random documents (as GPTQ/SparseGPT sample C4) when their
    long documents hold enough text for distinct windows (see ``_use_random_windows``; ``provenance["sampling"]``
    says which way each source went); sources of short documents (Q/A, instructions), and long-document sources
    without enough long text, are shuffled and packed with EOS separators, never padded. Sample
    counts per source follow the weights by the largest-remainder rule; rows are shuffled so mixes interleave.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        sources: a source name, a list (uniform mix) or a dict ``{name: weight}``.
        weights: weights for a list of sources (list or dict), normalised to sum to 1.
        data_source: ``"auto" | "offline" | "hub"``, passed to :func:`load_texts`.

    Returns:
        ``CalibrationSet`` with ids ``[n, seqlen]`` int64.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    mix = _normalise_sources(sources, weights)
    # every source must be loadable before any is read
    modes = {name: check_available(name, data_dir=data_dir, source=data_source) for name in mix}
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id, needed to pack documents")
    counts = allocate_counts(mix, n)
    blocks, labels = [], []
    sampling: dict[str, str] = {}
    for name, count in counts.items():
        if count == 0:
            continue
        texts = load_texts(name, data_dir=data_dir, source=data_source)
        if not texts:
            raise ValueError(f"source {name!r} returned no documents")
        docs = [d for d in _tokenize(tokenizer, texts) if len(d)]
        if not SOURCES[name].short_docs and _use_random_windows(docs, count, seqlen):
            sampling[name] = "random windows"
            blocks.append(_random_windows(docs, count, seqlen, _rng(seed, name)))
        else:
            if not SOURCES[name].short_docs:
                n_long = sum(len(d) >= seqlen for d in docs)
                log.info("source %r: its %d documents of >= %d tokens are too few for %d distinct windows; "
                         "packing all %d documents with EOS instead", name, n_long, seqlen, count, len(docs))
            sampling[name] = "packed"
            blocks.append(_packed_windows(docs, count, seqlen, eos, _rng(seed, name), name))
        labels += [name] * count
        log.info("calibration: %d x %d tokens from %r (%d documents, %s)", count, seqlen, name, len(docs),
                 sampling[name])
    ids = np.concatenate(blocks)
    order = np.random.default_rng(seed).permutation(n)
    provenance = {
        "kind": "sources",
        "sources": list(mix),
        "weights": mix,
        "counts": counts,
        "sampling": sampling,
        "n": n,
        "seqlen": seqlen,
        "seed": seed,
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "data_source": data_source,
        "data_modes": modes,
        "data_dir": str(resolved.resolve()) if (resolved := resolve_data_dir(data_dir)) is not None else None,
        "data_files": _data_file_hashes([name for name, mode in modes.items() if mode == "offline"], data_dir),
        "ids_sha256": ids_sha256(torch.from_numpy(ids[order])),
    }
    return CalibrationSet(ids=torch.from_numpy(ids[order]).contiguous(), provenance=provenance,
                          row_sources=[labels[k] for k in order])
