"""The GEMM floor of a SparseGPT prune: the matrix products the job must compute, and this machine's rate at
their shapes, measured in the same run.

A provider's floor is Σ flops ÷ rate over its products, each product at the rate measured for its own shape and
dtype, with the threading the provider runs (one thread; K concurrent one-thread workers; or torch's intra-op
threads). ``% of floor`` = floor ÷ measured seconds: the share of the run spent at the machine's GEMM rate, the
rest being everything else (elementwise work, the OBS column loop, copies, Python).

What is counted, per decoder layer and per calibration batch of ``b`` sequences × ``t`` tokens:

* **forward** — every target Linear ``[b·t, cols] @ [cols, rows]`` and the attention products (``QKᵀ`` and
  ``PV`` per head, causal: half of ``2·t²·head_dim`` each), in the statistics forward (without the last target
  of the layer when the provider stops there) and in the propagation forward (not after the last layer when the
  provider skips it);
* **hessian** — ``XᵀX`` ``[d, b·t] @ [b·t, d]`` per input group (shared Hessians) or per module; the upper
  triangle only (half) for a SYRK provider;
* **solve** — per inverse factor ``4/3·d³`` (Cholesky, inverse, Cholesky of the inverse), per module ``rows·cols²``
  (the OBS trailing updates), timed as ``[rows, 128] @ [128, cols]`` products.

The groups of modules that read one input are found by running layer 0 on one short sequence.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from calibprune.pruning import find_decoder_layers, select_targets
from calibprune.pruning.loop import capture_layer_inputs
from calibprune.pruning.workers import WorkerPool


@dataclass(frozen=True)
class Product:
    """``count`` products ``[m, k] @ [k, n]`` (``scale`` of the full flops each: ½ for a causal or SYRK one)."""

    kind: str
    m: int
    k: int
    n: int
    count: int = 1
    scale: float = 1.0

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count * self.scale


@dataclass(frozen=True)
class Anatomy:
    """What the floor needs of a model: per layer the target shapes (in call order) and the input groups."""

    shapes: list[dict[str, tuple[int, int]]]  # per layer: name -> (rows, cols), in call order
    groups: dict[str, str]  # module name -> the first module reading the same input
    heads: int
    head_dim: int


@torch.no_grad()
def anatomy(model: nn.Module) -> Anatomy:
    prefix, layers = find_decoder_layers(model)
    device = next(model.parameters()).device
    inputs, kwargs = capture_layer_inputs(model, layers, torch.zeros((1, 8), dtype=torch.long), 1, device, device)
    targets = select_targets(layers[0])
    seen: list[tuple[str, torch.Tensor]] = []
    groups: dict[str, str] = {}
    order: list[str] = []

    def hook(name):
        def fn(module, args):
            x = args[0]
            order.append(name)
            groups[name] = next((g for g, y in seen if y.data_ptr() == x.data_ptr() and y.shape == x.shape), name)
            seen.append((name, x))

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        layers[0](inputs[0], **kwargs[0])
    finally:
        for h in handles:
            h.remove()
    shapes = []
    for layer in layers:
        mods = select_targets(layer)
        shapes.append({n: tuple(mods[n].weight.shape) for n in order if n in mods})
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Anatomy(shapes, groups, heads, head_dim)


def job_products(a: Anatomy, n: int, seqlen: int, batch_size: int, *, shared: bool, stop_early: bool,
                 syrk: bool) -> list[Product]:
    """The products of one prune (see the module docstring), merged by shape."""
    batches = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    out: dict[tuple, int] = {}

    def add(kind, m, k, nn_, count=1, scale=1.0):
        key = (kind, m, k, nn_, scale)
        out[key] = out.get(key, 0) + count

    last_layer = len(a.shapes) - 1
    for index, shapes in enumerate(a.shapes):
        names = list(shapes)
        for b in batches:
            tokens = b * seqlen
            forwards = (0 if stop_early else 1) + (0 if stop_early and index == last_layer else 1)
            for i, name in enumerate(names):
                rows, cols = shapes[name]
                count = forwards + (1 if stop_early and i < len(names) - 1 else 0)
                if count:
                    add("forward", tokens, cols, rows, count)
            attn = forwards + (1 if stop_early else 0)  # the stopped statistics forward still runs attention
            add("forward", seqlen, a.head_dim, seqlen, 2 * a.heads * b * attn, 0.5)
            keyed = {a.groups.get(nm, nm) if shared else nm: shapes[nm][1] for nm in names}
            for d in keyed.values():
                add("hessian", d, tokens, d, 1, 0.5 if syrk else 1.0)
        factors = {a.groups.get(nm, nm) if shared else nm: shapes[nm][1] for nm in names}
        for d in factors.values():
            add("solve", d, d, d, 1, 2.0 / 3.0)
        for rows, cols in shapes.values():
            add("solve", rows, 128, cols, max(1, round(cols / 256)))  # 2·rows·128·cols each: rows·cols² in all
    return [Product(kind, m, k, nn_, count, scale) for (kind, m, k, nn_, scale), count in out.items()]


def _one(m: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    A = torch.randn(m, k).to(dtype)
    B = torch.randn(k, n).to(dtype)
    torch.mm(A, B)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(A, B)
    return (time.perf_counter() - t0) / reps


def measure_rate(m: int, k: int, n: int, dtype: torch.dtype, mode: str, workers: int,
                 min_seconds: float = 0.05) -> float:
    """FLOP/s of ``[m, k] @ [k, n]`` in ``dtype``: ``mode`` "one" (one thread), "workers" (``workers`` concurrent
    one-thread products, their total rate) or "threads" (one product on ``workers`` intra-op threads)."""
    flops = 2.0 * m * k * n
    reps = max(1, int(min_seconds * 5e10 / flops) + 1)
    threads = torch.get_num_threads()
    try:
        if mode == "threads":
            torch.set_num_threads(workers)
            return flops / _one(m, k, n, dtype, reps)
        if mode == "one" or workers == 1:
            with WorkerPool(1):
                return flops / _one(m, k, n, dtype, reps)
        with WorkerPool(workers) as pool:
            barrier = threading.Barrier(workers)

            def run(_):
                barrier.wait()
                return _one(m, k, n, dtype, reps)

            per_product = list(pool.ordered(run, range(workers)))
            return workers * flops / max(per_product)
    finally:
        torch.set_num_threads(threads)


class RateTable:
    """Rates measured once per (shape, dtype, mode, workers) in this run."""

    def __init__(self) -> None:
        self.rates: dict[tuple, float] = {}

    def rate(self, p: Product, dtype: torch.dtype, mode: str, workers: int) -> float:
        key = (p.m, p.k, p.n, dtype, mode, workers)
        if key not in self.rates:
            self.rates[key] = measure_rate(p.m, p.k, p.n, dtype, mode, workers)
        return self.rates[key]

    def floor(self, products: Sequence[Product], mode: str, workers: int,
              forward_dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Seconds at the measured rates, per kind and in all (``total``)."""
        out: dict[str, float] = {}
        for p in products:
            dtype = forward_dtype if p.kind == "forward" else torch.float32
            out[p.kind] = out.get(p.kind, 0.0) + p.flops / self.rate(p, dtype, mode, workers)
        out["total"] = sum(out.values())
        return out


def total_flops(products: Sequence[Product]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in products:
        out[p.kind] = out.get(p.kind, 0.0) + p.flops
    out["total"] = sum(out.values())
    return out
