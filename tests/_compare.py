"""Comparison helpers that say *where* and *by how much* two tensors differ."""
from __future__ import annotations

import torch

# Relative tolerances per dtype, judged against an fp32/fp64 reference.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float = 0.0,
                 name: str = "tensor") -> None:
    """Assert |actual − expected| <= atol + rtol·max|expected| elementwise, reporting the worst offender."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().item() or 1.0
    diff = (a - e).abs()
    bound = atol + rtol * scale
    bad = diff > bound
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{diff.numel()} elements off; worst at {idx}: actual {a[idx].item():.6g} "
            f"vs expected {e[idx].item():.6g} (|diff| {diff.max().item():.3g} > bound {bound:.3g} = "
            f"atol {atol:g} + rtol {rtol:g} x max|expected| {scale:.3g})")


def assert_masks_equal(actual: torch.Tensor, expected: torch.Tensor, *, name: str = "mask") -> None:
    """Assert two boolean masks are identical, reporting how many and where they differ."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = actual.cpu() != expected.cpu()
    if diff.any():
        where = [tuple(int(i) for i in row) for row in torch.nonzero(diff)[:5]]
        raise AssertionError(f"{name}: {int(diff.sum())}/{diff.numel()} entries differ, first at {where}")
