"""Progress bars: every long loop's tqdm bar, and the one switch the CLI turns.

A library call shows its bars as asked (``progress=True`` by default, in a terminal or a notebook alike). The CLI
decides once for the whole command (:func:`cli_progress`): bars on a terminal, none when stderr is redirected
(a log file would get one endless line of ``\\r`` updates), ``--progress`` / ``--no-progress`` to force either.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm.auto import tqdm

_forced: bool | None = None  # None: as each call asks; True/False: the CLI's decision for every bar


def progress_bar(iterable=None, *, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar, shown when ``show`` and the CLI's decision (if any) allow."""
    enabled = show if _forced is None else (show and _forced)
    return tqdm(iterable, disable=not enabled, **kwargs)


@contextlib.contextmanager
def cli_progress(enabled: bool) -> Iterator[None]:
    """Within the block every bar is shown (``enabled``, still subject to each call's own ``show``) or hidden."""
    global _forced
    before, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = before
