"""Sample-parallel workers: every core on the layer loop without changing a bit.

SparseGPT's loop is sequential only where it sums. Each calibration batch's layer forward and the products its
statistics need (``XᵀX`` for a Hessian, ‖X_j‖² for Wanda) are independent of the other batches; only the running
update (``H *= n/(n+b); H += XᵀX·(2/(n+b))``) and the order of those updates matter. So with ``workers=K``:

* **statistics** — K workers each take a whole batch: its forward through the layer and every statistic's term
  (:meth:`~calibprune.pruning.statistics.RunningStatistic.step`), computed for the running count the batch will
  be folded at. The loop then folds the terms in batch order (an elementwise step), so the statistics are bitwise
  those of one worker. At most K batches are in flight, which bounds the extra memory to K batches' terms
  (``K · Σ_groups d²`` fp32 for Hessians: 1 GiB per batch for a Llama-3-8B layer), and fewer are in flight when
  that would take more than half the available memory (:func:`batches_in_flight`).
* **propagation** — the forwards through the pruned layer, a batch per worker (each writes only its own batch).
* **solves** — the layer's input groups (q/k/v, o, gate/up, down) are dealt to the workers by cost
  (:func:`~calibprune.pruning.distributed.assign_owners`); a group's modules run in order on its worker, since they
  share one inverse factor. The layer's largest group bounds this phase (a Llama down_proj is about 3/4 of a
  layer's solve flops): the faithful contract keeps each solve on one thread, since LAPACK's Cholesky rounds by
  thread count.

Each worker is a thread running its ops with one intra-op thread (torch releases the GIL inside every op), so a
worker's arithmetic is the one-thread arithmetic: the masks and weights are bitwise the one-thread run at every K,
and K = 1 *is* the one-thread run. ``workers`` is a runtime setting (a resume may change it).

On a GPU the same pool is the seam for CUDA streams: a worker there would own a stream (``torch.cuda.Stream``) and
run its batch's forward and terms on it, and the ordered fold stays on the default stream after an event wait;
today a GPU runs with one worker, since a single forward of a batch already fills the device.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

__all__ = ["WorkerPool", "resolve_workers", "ThreadLocalSink", "available_memory", "batches_in_flight"]

T = TypeVar("T")
log = logging.getLogger(__name__)


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """How many sample-parallel workers a prune uses: ``workers``, or (None) torch's intra-op thread count on a CPU
    (the cores, or ``OMP_NUM_THREADS``); one on any other device."""
    if device.type != "cpu":
        if workers not in (None, 1):
            log.info("workers=%s applies to a CPU run; on %s the pass runs one worker", workers, device.type)
        return 1
    return torch.get_num_threads() if workers is None else workers


class WorkerPool:
    """K worker threads, each computing with one intra-op thread while the pool is open (``with`` block).

    Opening the pool sets torch's intra-op threads to one for the whole process (the one-thread arithmetic every
    worker and the loop itself then share) and closing it restores them; ``one_thread=False`` leaves them alone
    (a GPU run, whose host threads only feed the device).
    """

    def __init__(self, workers: int, *, one_thread: bool = True):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        self.size, self.one_thread = workers, one_thread
        self._executor: ThreadPoolExecutor | None = None
        self._threads: int | None = None

    def __enter__(self) -> WorkerPool:
        if self.one_thread:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)
        if self.size > 1:
            self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="calibprune-worker")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None

    @staticmethod
    def _no_grad(fn: Callable[..., T]) -> Callable[..., T]:
        # Grad mode is per thread: a worker thread starts with it on.
        def run(*args: Any) -> T:
            with torch.no_grad():
                return fn(*args)

        return run

    def ordered(self, fn: Callable[[Any], T], items: Iterable[Any], *, limit: int | None = None) -> Iterator[T]:
        """``fn(item)`` for every item, run by the workers, yielded in the items' order, with at most K (or
        ``limit``) in flight: the next is submitted as the oldest is taken. Without workers (K = 1) it runs in the
        calling thread. An exception in ``fn`` is raised here, at its item, after the items in flight finished."""
        if self._executor is None:
            for item in items:
                yield fn(item)
            return
        in_flight = self.size if limit is None else max(1, min(limit, self.size))
        work = self._no_grad(fn)
        pending: list[Future] = []
        it = iter(items)
        try:
            for item in it:
                pending.append(self._executor.submit(work, item))
                if len(pending) == in_flight:
                    break
            while pending:
                result = pending.pop(0).result()
                for item in it:
                    pending.append(self._executor.submit(work, item))
                    break
                yield result
        finally:
            for future in pending:
                future.cancel()
            for future in pending:
                with contextlib.suppress(BaseException):
                    future.result()

    def each(self, fn: Callable[[Any], None], shares: list[list[Any]]) -> None:
        """Run ``fn(item)`` for each item of each share, one share per worker, the items of a share in order."""
        if self._executor is None or len(shares) < 2:
            for share in shares:
                for item in share:
                    fn(item)
            return
        work = self._no_grad(lambda share: [fn(item) for item in share])
        futures = [self._executor.submit(work, share) for share in shares]
        errors = []
        for future in futures:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - the first is raised once all shares ended
                errors.append(exc)
        if errors:
            raise errors[0]


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux ``MemAvailable``; None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def batches_in_flight(workers: int, bytes_per_batch: int, available: int | None, share: float = 0.5) -> int:
    """How many batches the statistics may have in flight: ``workers``, fewer when each batch's terms
    (``bytes_per_batch``, the size of the layer's statistics) would take more than ``share`` of the ``available``
    memory; at least one."""
    if available is None or bytes_per_batch <= 0:
        return workers
    return max(1, min(workers, int(available * share) // bytes_per_batch))


class ThreadLocalSink(threading.local):
    """Per-thread scratch of the loop's input router: the inputs seen in the forward this thread runs (to find
    modules that share one), and, in a worker's forward, the folds its statistics' terms await."""

    def __init__(self) -> None:
        self.live: list[tuple[torch.Tensor, str]] = []
        self.seen = 0
        self.commits: list[Callable[[], None]] | None = None
        self.sequences_before = 0
