"""Whether the Hugging Face hub can be used right now, asked once per process and without downloading anything.

Hub-bound work (a model id, a dataset without an offline copy) is refused before it starts when the hub is off
(``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) or its host does not answer a TCP connection within a few seconds,
so that an offline machine gets one clear sentence instead of a ``ConnectionError`` traceback after minutes.
"""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

__all__ = ["hub_unavailable_reason", "HUB_PROBE_TIMEOUT_S"]

HUB_PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


def hub_unavailable_reason(*, datasets: bool = False) -> str | None:
    """``None`` when the hub is usable; otherwise why not, as a short phrase for an error message.

    ``datasets=True`` also honours ``HF_DATASETS_OFFLINE``. The network probe is cached per endpoint.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets else ()):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=8)
def _probe(endpoint: str) -> str | None:
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        detail = exc.strerror or type(exc).__name__
        return f"the hub ({host}:{port}) is not reachable: {detail}"
    return None
