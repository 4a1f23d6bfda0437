"""n-gram keys and statistics: every backend against the Python ``Counter`` reference, keys equal across backends."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from calibprune.ops import available_backends, ngram_hashes, ngram_stats
from calibprune.ops.ngram import ngram_counter_reference, ngram_hashes_reference, ngram_stats_reference

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]  # triton runs in a subprocess below
HAS_CUDA = torch.cuda.is_available()


def _ids(b: int, t: int, vocab: int, *, palette: int | None, seed: int) -> torch.Tensor:
    """Random ids < vocab (the largest id always present); with ``palette``, drawn from that many ids so n-grams
    repeat often."""
    g = torch.Generator().manual_seed(seed)
    if palette is None:
        ids = torch.randint(0, vocab, (b, t), generator=g)
    else:
        pal = torch.randint(0, vocab, (palette,), generator=g)
        pal[0] = vocab - 1
        ids = pal[torch.randint(0, palette, (b, t), generator=g)]
    ids.view(-1)[seed % ids.numel()] = vocab - 1
    return ids


def _padding(kind: str, b: int, t: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return {}
    if kind == "lengths":  # include an empty row and a row shorter than n
        lengths = torch.randint(0, t + 1, (b,), generator=g)
        lengths[0], lengths[-1] = 0, min(2, t)
        return {"lengths": lengths}
    mask = torch.rand(b, t, generator=g) > 0.15  # holes anywhere, left padding on row 0
    mask[0, : t // 3] = False
    return {"attention_mask": mask.to(torch.int64)}


def _real_max(ids: torch.Tensor, pad: dict) -> int:
    if "lengths" in pad:
        real = torch.arange(ids.shape[1]) < pad["lengths"].unsqueeze(1)
    else:
        real = pad.get("attention_mask", torch.ones_like(ids)).bool()
    return int(ids[real].max()) if real.any() else 0


# (b, t, vocab, palette): vocab 49152 packs exactly for n = 4; 70000 > 2^16 needs the hash for n = 4.
SHAPES = [
    (3, 37, 49152, None),
    (3, 37, 49152, 5),
    (3, 37, 70000, 5),
    (3, 37, 70000, None),
    (2, 3, 49152, 3),  # rows shorter than n = 4
    (1, 4, 100, None),  # exactly one window
    (4, 1, 100, None),
]
SHAPE_IDS = [f"B{b}-T{t}-V{v}" + (f"-P{p}" if p else "") for b, t, v, p in SHAPES]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", ["none", "lengths", "mask"])
@pytest.mark.parametrize("n", [1, 2, 4, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_stats_match_counter(shape, n, padding, backend):
    b, t, vocab, palette = shape
    ids = _ids(b, t, vocab, palette=palette, seed=b * 1000 + t + n)
    pad = _padding(padding, b, t, seed=n)
    expected = ngram_stats_reference(ids, n, top_k=(1, 3, 10, 1000), **pad)
    got = ngram_stats(ids, n, top_k=(1, 3, 10, 1000), backend=backend, **pad)
    assert got["backend"] == backend
    for key in ("total", "distinct", "aggregation", "top_k_mass"):
        assert got[key] == expected[key], f"{key}: {got[key]} != {expected[key]} (backend {backend})"
    assert got["exact"] == (_real_max(ids, pad) < 2 ** (64 // n))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", ["none", "lengths", "mask"])
@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_hashes_match_reference(shape, n, padding, backend):
    b, t, vocab, palette = shape
    ids = _ids(b, t, vocab, palette=palette, seed=7 * b + t + n)
    pad = _padding(padding, b, t, seed=n + 3)
    res = ngram_hashes(ids, n, backend=backend, **pad)
    hashes, valid = res
    ref_h, ref_v = ngram_hashes_reference(ids, n, exact=res.exact, **pad)
    assert hashes.dtype == torch.int64 and valid.dtype == torch.bool
    assert hashes.shape == (b, max(t - n + 1, 0)) == valid.shape
    assert torch.equal(valid, ref_v), f"valid differs at {torch.nonzero(valid != ref_v)[:5].tolist()}"
    assert torch.equal(hashes, ref_h), f"hashes differ at {torch.nonzero(hashes != ref_h)[:5].tolist()}"
    # Key multiplicities equal the Counter's: no collision, nothing dropped.
    _, key_counts = torch.unique(hashes[valid], return_counts=True)
    counter = ngram_counter_reference(ids, n, **pad)
    assert sorted(key_counts.tolist()) == sorted(counter.values())


def test_mode_choice_and_exact_packing():
    ids = torch.tensor([[65535, 0, 1, 65535, 7]])
    res = ngram_hashes(ids, 4, backend="torch")
    assert res.mode == "exact" and res.exact
    # Big-endian 16-bit fields: unpack the first window.
    key = res.hashes[0, 0].item() & (2**64 - 1)
    assert [(key >> s) & 0xFFFF for s in (48, 32, 16, 0)] == [65535, 0, 1, 65535]
    assert ngram_hashes(ids + 1, 4, backend="torch").mode == "hash"  # 65536 needs 17 bits
    assert ngram_hashes(ids + 1, 3, backend="torch").mode == "exact"  # 3 x 21 bits fit
    assert ngram_hashes(ids, 4, mode="hash", backend="torch").mode == "hash"
    assert ngram_stats(ids + 1, 4, backend="torch")["exact"] is False
    # Padding values do not count towards the vocabulary.
    padded = torch.tensor([[5, 6, 7, 8, 10**9]])
    assert ngram_hashes(padded, 4, lengths=torch.tensor([4]), backend="torch").mode == "exact"


def test_hand_counted():
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]])
    for backend in CPU_BACKENDS:
        s = ngram_stats(ids, 4, top_k=(1, 2, 10), backend=backend)
        assert (s["total"], s["distinct"]) == (5, 4)
        assert s["aggregation"] == 1 - 4 / 5
        assert s["top_k_mass"] == {1: 2 / 5, 2: 3 / 5, 10: 1.0}
        # [1 2 3 | pad | 2 3 4]: no 3-gram crosses the hole.
        s = ngram_stats(torch.tensor([[1, 2, 3, 9, 2, 3, 4]]), 3, attention_mask=torch.tensor([[1, 1, 1, 0, 1, 1, 1]]),
                        backend=backend)
        assert (s["total"], s["distinct"]) == (2, 2)
        empty = ngram_stats(torch.tensor([[1, 2, 3]]), 4, backend=backend)
        assert (empty["total"], empty["distinct"], empty["aggregation"]) == (0, 0, 0.0)
        assert empty["top_k_mass"] == {10: 0.0, 100: 0.0}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_inputs(backend, threads):
    # Over 2^19 windows the C++ backend partitions the keys (and goes parallel); below, one table. Both paths, with
    # repeats, holes and hashed keys.
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        b, t = 3, 180_001
        ids = _ids(b, t, 70000, palette=12, seed=11)
        mask = torch.rand(b, t, generator=torch.Generator().manual_seed(3)) > 0.02
        cases = ((4, {}), (4, {"attention_mask": mask}), (2, {"lengths": torch.tensor([t, 0, 17])}))
        for n, kw in cases:
            expected = ngram_stats_reference(ids, n, **kw)
            got = ngram_stats(ids, n, backend=backend, **kw)
            for key in ("total", "distinct", "aggregation", "top_k_mass"):
                assert got[key] == expected[key], f"n={n} {list(kw)} {key}: {got[key]} != {expected[key]}"
    finally:
        torch.set_num_threads(prev)


def test_backends_agree_on_hashes():
    ids = _ids(5, 301, 1 << 20, palette=None, seed=5)
    for n in (2, 4, 7):
        ref = ngram_hashes(ids, n, backend="torch")
        for backend in CPU_BACKENDS:
            got = ngram_hashes(ids, n, backend=backend)
            assert got.mode == ref.mode
            assert torch.equal(got.hashes, ref.hashes) and torch.equal(got.valid, ref.valid), backend


def test_input_errors():
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=">= 0"):
        ngram_stats(torch.tensor([[1, -2, 3, 4]]), 2)
    with pytest.raises(ValueError, match="not both"):
        ngram_stats(ids, 2, lengths=torch.tensor([4]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="do not pack"):
        ngram_hashes(ids * 70000, 4, mode="exact")
    with pytest.raises(ValueError, match="integer"):
        ngram_hashes(ids.float(), 2)
    with pytest.raises(ValueError, match="lengths"):
        ngram_hashes(ids, 2, lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match="n must"):
        ngram_hashes(ids, 0)


_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from calibprune.ops import ngram_hashes, ngram_stats
    from calibprune.ops.ngram import ngram_hashes_reference, ngram_stats_reference
    g = torch.Generator().manual_seed(0)
    for vocab in (49152, 70000):
        ids = torch.randint(0, vocab, (3, 37), generator=g)
        ids[1, 10:20] = ids[0, 3:13]
        ids[2, 0] = vocab - 1
        mask = torch.rand(3, 37, generator=g) > 0.2
        for n in (1, 2, 4, 5):
            for kw in ({}, {"lengths": torch.tensor([37, 2, 20])}, {"attention_mask": mask}):
                res = ngram_hashes(ids, n, backend="triton", **kw)
                ref_h, ref_v = ngram_hashes_reference(ids, n, exact=res.exact, **kw)
                assert torch.equal(res.valid, ref_v), (vocab, n, list(kw))
                assert torch.equal(res.hashes, ref_h), (vocab, n, list(kw))
                tor = ngram_hashes(ids, n, backend="torch", **kw)
                assert torch.equal(res.hashes, tor.hashes) and res.mode == tor.mode
                got = ngram_stats(ids, n, backend="triton", **kw)
                exp = ngram_stats_reference(ids, n, **kw)
                for key in ("total", "distinct", "aggregation", "top_k_mass"):
                    assert got[key] == exp[key], (key, got[key], exp[key])
    print("TRITON-NGRAM-OK")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_matches_reference():
    # TRITON_INTERPRET is read when @triton.jit runs (at import of calibprune.kernels.ngram), so the interpreted
    # kernel needs a fresh interpreter with the variable set before that import.
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "TRITON-NGRAM-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_cpu(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available on this GPU build")
    ids = _ids(8, 515, 70000, palette=9, seed=2)
    mask = torch.rand(8, 515, generator=torch.Generator().manual_seed(4)) > 0.1
    for n in (1, 4, 5):
        for kw in ({}, {"attention_mask": mask}):
            ref = ngram_hashes(ids, n, backend="torch", **kw)
            got = ngram_hashes(ids.cuda(), n, backend=backend, **{k: v.cuda() for k, v in kw.items()})
            assert torch.equal(got.hashes.cpu(), ref.hashes) and torch.equal(got.valid.cpu(), ref.valid)
            exp = ngram_stats_reference(ids, n, **kw)
            s = ngram_stats(ids.cuda(), n, backend=backend, **{k: v.cuda() for k, v in kw.items()})
            for key in ("total", "distinct", "aggregation", "top_k_mass"):
                assert s[key] == exp[key], (key, s[key], exp[key])
