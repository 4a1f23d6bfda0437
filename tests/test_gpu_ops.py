"""GPU ops against the torch reference on the same GPU (never a CPU reference: cuSOLVER and LAPACK factor
differently). Skipped without a CUDA device; ``benchmarks/gpu_check.sh`` runs these on a lent GPU.

The contract (``calibprune.ops.contract``): ``backend="torch"`` is bitwise the reference on any device; the fused
kernels (``cuda``, ``triton``) and ``numerics="fast"`` give mask agreement >= 99.9% and a reconstruction error within
0.5% of the reference's, at Llama-3-8B shapes too (marked slow).
"""
from __future__ import annotations

import pytest
import torch

from calibprune.ops import (
    available_backends,
    check_contract,
    hessian_finalize,
    hessian_update,
    hessian_update_reference,
    obs_prune,
    obs_prune_reference,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = ["cuda", "triton"]
# (rows, cols, blocksize, n, m): odd shapes, ragged tails.
SMALL = [(45, 99, 32, 0, 0), (77, 200, 128, 0, 0), (33, 96, 32, 2, 4), (130, 256, 128, 4, 8)]
# Llama-3-8B projections: q/o (4096×4096), gate/up (14336×4096), down (4096×14336).
LLAMA = [(4096, 4096, 128, 0, 0), (14336, 4096, 128, 0, 0), (4096, 14336, 128, 0, 0), (4096, 4096, 128, 2, 4)]


def _id(c) -> str:
    return f"R{c[0]}-C{c[1]}-B{c[2]}-" + (f"{c[3]}:{c[4]}" if c[3] else "unstructured")


@pytest.fixture(autouse=True)
def _no_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _need(backend: str) -> None:
    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available on this GPU machine")


def realistic_hessian(cols: int, *, tokens: int | None = None, seed: int = 0) -> torch.Tensor:
    """2/n·XᵀX of correlated inputs, built on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens = tokens or max(2 * cols, 512)
    mix = torch.randn(cols, cols, generator=gen, device="cuda") / cols**0.5
    mix.diagonal().add_(1.0)
    X = torch.randn(tokens, cols, generator=gen, device="cuda") @ mix
    return 2 * X.t() @ X / tokens


def _case(case, seed=0):
    rows, cols = case[:2]
    gen = torch.Generator(device="cuda").manual_seed(seed + rows + cols)
    return torch.randn(rows, cols, generator=gen, device="cuda"), realistic_hessian(cols, seed=seed + cols)


def _judge(case, backend: str, numerics: str = "reference"):
    _, _, bs, n, m = case
    W0, H = _case(case)
    W_ref = W0.clone()
    mask_ref, _ = obs_prune_reference(W_ref, H.clone(), 0.6, prune_n=n, prune_m=m, blocksize=bs)
    W = W0.clone()
    mask = obs_prune(W, H.clone(), 0.6, prune_n=n, prune_m=m, blocksize=bs, backend=backend, numerics=numerics)
    return check_contract(W0, H, W_ref, mask_ref, W, mask), (W, mask, W_ref, mask_ref)


@pytest.mark.parametrize("case", SMALL, ids=_id)
def test_torch_backend_is_bitwise_reference_on_gpu(case):
    result, (W, mask, W_ref, mask_ref) = _judge(case, "torch")
    assert torch.equal(mask, mask_ref), result.describe()
    assert torch.equal(W, W_ref), f"max |diff| {(W - W_ref).abs().max().item():.3g}"


@pytest.mark.parametrize("numerics", ["reference", "fast"])
@pytest.mark.parametrize("case", SMALL, ids=_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kernels_meet_the_contract(backend, case, numerics):
    _need(backend)
    result, _ = _judge(case, backend, numerics)
    assert result.ok, f"{backend} {_id(case)} {numerics}: {result.describe()}"


@pytest.mark.slow
@pytest.mark.parametrize("case", LLAMA, ids=_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS + ["torch"])
def test_llama_shapes_meet_the_contract(backend, case):
    if backend != "torch":
        _need(backend)
    result, (W, mask, W_ref, mask_ref) = _judge(case, backend)
    assert result.ok, f"{backend} {_id(case)}: {result.describe()}"
    if backend == "torch":
        assert torch.equal(mask, mask_ref) and torch.equal(W, W_ref)


@pytest.mark.slow
@pytest.mark.parametrize("case", LLAMA[:3], ids=_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS + ["torch"])
def test_llama_shapes_fast_numerics_meet_the_contract(backend, case):
    if backend != "torch":
        _need(backend)
    result, _ = _judge(case, backend, "fast")
    assert result.ok, f"{backend} {_id(case)} fast: {result.describe()}"


@pytest.mark.parametrize("m", [4, 8, 16, 64, 128])
def test_cuda_topk_ties_lowest_index_first(m):
    """The rule the CUDA and Triton kernels implement (and the CPU tests emulate for Triton) is CUDA topk's."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randint(0, 3, (4096, m), generator=gen, device="cuda").float()
    for k in sorted({1, 2, m // 2, m - 1}):
        got = torch.topk(x, k, dim=1, largest=False).indices.sort(dim=1).values
        low_first = torch.sort(x, dim=1, stable=True).indices[:, :k].sort(dim=1).values
        assert torch.equal(got, low_first), f"m={m}, k={k}: CUDA topk does not take tied scores lowest index first"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("numerics", ["reference", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 45), (2, 33, 99), (2, 300, 1100)], ids=lambda s: f"B{s[0]}-T{s[1]}-D{s[2]}")
def test_hessian_kernels_against_gpu_torch(backend, numerics, dtype, shape):
    _need(backend)
    b, t, d = shape
    gen = torch.Generator(device="cuda").manual_seed(d)
    X = torch.randn(b, t, d, generator=gen, device="cuda").to(dtype)
    H0 = realistic_hessian(d, seed=1)
    expected = H0.clone()
    hessian_update_reference(expected, X, 5)
    H = H0.clone()
    hessian_update(H, X, 5, backend=backend, numerics=numerics)
    hessian_finalize(H, numerics=numerics)
    assert torch.equal(H, H.t())
    rel = ((H - expected).norm() / expected.norm()).item()
    limit = 3e-3 if (numerics == "fast" and dtype == torch.float32) else 1e-5  # TF32 inputs in fast mode
    assert rel < limit, f"{backend} {numerics} {dtype}: relative error {rel:.3g} >= {limit}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_hessian_past_int32_offsets(backend):
    """X with more than 2^31 elements (129×2048 tokens of width 8192 in bf16, 4.3 GiB): the last sequence's
    elements sit past offset 2^31 − 1, so 32-bit offsets wrap (wrong H or an illegal access); 64-bit ones do not.
    (128×2048 tokens would be exactly 2^31 elements: the largest offset, 2^31 − 1, still fits in int32.)"""
    _need(backend)
    d, tokens = 8192, 129 * 2048
    assert (tokens - 2048) * d >= 2**31  # the last sequence starts at offset 2^31: every element of it is past int32
    gen = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(tokens, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    H = torch.zeros(d, d, device="cuda")
    hessian_update(H, X, 0, backend=backend)
    torch.cuda.synchronize()
    # Truth on two row slabs (first and last tile rows: the last one is reached only through 64-bit offsets).
    for rows in (slice(0, 64), slice(d - 64, d)):
        truth = torch.zeros(64, d, dtype=torch.float64, device="cuda")
        for t0 in range(0, tokens, 32768):
            chunk = X[t0:t0 + 32768].double()
            truth += chunk[:, rows].t() @ chunk
        truth *= 2.0 / 1  # one sequence counted (2-D X), so alpha = 2
        rel = ((H[rows].double() - truth).norm() / truth.norm()).item()
        assert rel < 1e-4, f"{backend}: rows {rows}: relative error {rel:.3g}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_second_gpu_while_first_is_current(backend):
    _need(backend)
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    W0 = torch.randn(40, 64, device=dev)
    H = realistic_hessian(64).to(dev)
    W_ref = W0.clone()
    mask_ref, _ = obs_prune_reference(W_ref, H.clone(), 0.5, blocksize=32)
    W = W0.clone()
    mask = obs_prune(W, H.clone(), 0.5, blocksize=32, backend=backend)
    torch.cuda.synchronize(dev)
    assert check_contract(W0, H, W_ref, mask_ref, W, mask).ok
    Hh = torch.zeros(64, 64, device=dev)
    hessian_update(Hh, torch.randn(2, 9, 64, device=dev), 0, backend=backend)
    torch.cuda.synchronize(dev)
