"""Perplexity of a causal LM on non-overlapping windows of a token stream (the GPTQ/SparseGPT protocol)."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from .._progress import progress_bar
from ..calibration.sources import DATA_DIR_ENV, resolve_data_dir

log = logging.getLogger(__name__)

__all__ = ["perplexity", "load_wikitext2_test", "wikitext2_perplexity", "WIKITEXT2_TEST_FILE"]

WIKITEXT2_TEST_FILE = Path("wikitext-2") / "wiki.test.raw"


def load_wikitext2_test(*, data_dir: str | os.PathLike | None = None, source: str = "auto") -> str:
    """The WikiText-2 raw test split as one string.

    Offline: ``<data dir>/wikitext-2/wiki.test.raw`` (CRLF normalised to LF; the shared copy lacks the last six
    articles, so numbers differ slightly from published ones). Hub: ``wikitext-2-raw-v1`` test joined with
    ``"\\n\\n"`` as GPTQ does.
    """
    resolved = resolve_data_dir(data_dir)
    path = resolved / WIKITEXT2_TEST_FILE if resolved is not None else None
    if source != "hub" and path is not None and path.is_file():
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    if source == "offline":
        raise FileNotFoundError(f"WikiText-2 test file not found at {path}; set {DATA_DIR_ENV} to the offline data "
                                "folder (the one holding wikitext-2/wiki.test.raw)")
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"no offline WikiText-2 test file (looked at {path}) and `datasets` is not installed for "
                          "the hub fallback: set CALIBPRUNE_DATA_DIR or pip install datasets") from exc
    rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
    return "\n\n".join(rows["text"])


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, *, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 4, device: torch.device | str | None = None) -> float:
    """exp(mean token NLL) over non-overlapping ``seqlen`` windows of ``ids: [tokens]`` int64.

    The loss is computed in fp32 from the logits; the tail shorter than a window is dropped.
    """
    if ids.dim() != 1:
        ids = ids.reshape(-1)
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"text of {ids.numel()} tokens is shorter than one window of {seqlen}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = ids[: n_windows * seqlen].reshape(n_windows, seqlen)
    nll, count = 0.0, 0
    for start in progress_bar(range(0, n_windows, batch_size), desc="perplexity", unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                           reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def wikitext2_perplexity(model: nn.Module, tokenizer, *, seqlen: int = 512, max_windows: int | None = 16,
                         batch_size: int = 4, data_dir: str | os.PathLike | None = None) -> float:
    """WikiText-2 raw test perplexity on the first ``max_windows`` windows of ``seqlen`` tokens."""
    text = load_wikitext2_test(data_dir=data_dir)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    return perplexity(model, ids, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size)
