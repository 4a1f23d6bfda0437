"""N:M tie rule: on an exact tie of scores inside a group of m, every backend prunes what the reference prunes.

The reference's ``torch.topk(largest=False)`` decides ties differently per device (``calibprune.ops.obs``
docstring): on CPU it is libstdc++'s selection over (score, index) pairs — no fixed index order — and on CUDA the
tied scores are taken lowest index first. Inputs here are tie-heavy: integer-valued W and H = c·I (so U is diagonal,
no update moves a weight, and scores tie whenever |w| does), and integer W with a diagonal H of repeated values.
"""
from __future__ import annotations

import pytest
import torch
from _compare import assert_masks_equal

from calibprune.ops import obs_prune, obs_prune_reference

from ._backend_fixtures import backend_env  # noqa: F401 - pytest fixture

BACKENDS = ["torch", "cpp", "triton", "cuda"]
PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (5, 8), (8, 16), (1, 64), (2, 128)]


def _pid(p) -> str:
    return f"{p[0]}:{p[1]}"


def cuda_topk_rule(scores: torch.Tensor, k: int, dim: int = 1, largest: bool = False, **_) -> tuple:
    """``torch.topk(scores, k, dim=1, largest=False)`` as CUDA resolves ties: lowest index first among equal scores.

    Used to run the reference with the GPU rule on CPU, for the Triton kernel under the interpreter (Triton runs
    on GPUs only in production). ``tests/test_gpu_ops.py`` checks on a GPU that this is what CUDA topk does.
    """
    assert dim == 1 and not largest
    idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return torch.return_types.topk((scores.gather(1, idx), idx))


def _tie_heavy(rows: int, cols: int, seed: int, *, diag_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randint(-3, 4, (rows, cols), generator=gen).float()
    if diag_h:
        H = torch.diag(torch.randint(1, 3, (cols,), generator=gen).float())
    else:
        H = 2.0 * torch.eye(cols)
    return W, H


def _reference_mask(W, H, n, m, device, *, rule=None, blocksize=None):
    with pytest.MonkeyPatch.context() as mp:
        if rule is not None:
            mp.setattr(torch, "topk", rule)
        mask, _ = obs_prune_reference(W.clone().to(device), H.clone().to(device), 0.5, prune_n=n, prune_m=m,
                                      blocksize=blocksize or (m if m > 8 else 2 * m))
    return mask


def test_issue_example_reference_prunes_column_3():
    """The issue's one-row reproduction: the reference (CPU topk) prunes columns 2 and 3, not 0."""
    W = torch.tensor([[1.0, 2, 0.1, 1, 3, 0.2, 1.5, 2.5]])
    mask, _ = obs_prune_reference(W.clone(), torch.eye(8), 0.5, prune_n=2, prune_m=4, blocksize=8)
    assert mask[0].tolist() == [False, False, True, True, False, True, True, False]


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_issue_example_every_backend(backend_env):
    backend, device, interpreted = backend_env
    W = torch.tensor([[1.0, 2, 0.1, 1, 3, 0.2, 1.5, 2.5]])
    H = torch.eye(8)
    rule = cuda_topk_rule if interpreted else None
    expected = _reference_mask(W, H, 2, 4, device, rule=rule, blocksize=8)
    mask = obs_prune(W.clone().to(device), H.clone().to(device), prune_n=2, prune_m=4, blocksize=8, backend=backend)
    assert_masks_equal(mask, expected, name=f"mask ({backend})")


@pytest.mark.parametrize("diag_h", [False, True], ids=["H=2I", "H=diag(1|2)"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=_pid)
@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_ties_match_reference(backend_env, pattern, diag_h):
    backend, device, interpreted = backend_env
    n, m = pattern
    if interpreted and m > 16:
        pytest.skip("wide groups are too slow for the Triton interpreter")
    rule = cuda_topk_rule if interpreted else None
    trials = 4 if interpreted else 12
    for t in range(trials):
        rows, cols = 29 + t, m * (2 + t % 3)
        W, H = _tie_heavy(rows, cols, seed=1000 * m + 10 * n + t, diag_h=diag_h)
        expected = _reference_mask(W, H, n, m, device, rule=rule)
        bs = m if m > 8 else 2 * m
        mask = obs_prune(W.clone().to(device), H.clone().to(device), prune_n=n, prune_m=m, blocksize=bs,
                         backend=backend)
        assert_masks_equal(mask, expected, name=f"mask ({backend}, {n}:{m}, trial {t}, {rows}x{cols})")
        assert bool((mask.reshape(rows, -1, m).sum(-1) == n).all()), "mask is not N:M"


def test_cpu_topk_is_not_an_index_order_rule():
    """Why the C++ kernel must call the same selection as ATen: CPU topk's tie choice matches neither 'lowest index
    first' nor 'highest index first' on tie-heavy rows (if it did, a rank rule would do)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (2000, 8), generator=gen).float()
    chosen = torch.zeros_like(x, dtype=torch.bool).scatter_(1, torch.topk(x, 3, dim=1, largest=False)[1], True)
    low = torch.zeros_like(chosen).scatter_(1, cuda_topk_rule(x, 3)[1], True)
    flipped = x.flip(1)
    high = torch.zeros_like(chosen).scatter_(1, 7 - cuda_topk_rule(flipped, 3)[1], True)
    assert not torch.equal(chosen, low) and not torch.equal(chosen, high)
