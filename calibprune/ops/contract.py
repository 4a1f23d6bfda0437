"""The quality contract between an OBS prune and the reference it is judged against.

SparseGPT's mask choice is chaotic (a 1e-7 change in H can flip near-tied entries, and flips cascade through later
blocks), so a fused kernel or ``numerics="fast"`` is not judged by bits but by what pruning is for:

* **mask agreement** — the fraction of mask entries equal to the reference's: at least :data:`MASK_AGREEMENT_MIN`;
* **reconstruction error** — tr(ΔW H ΔWᵀ) with ΔW = W_pruned − W_dense and H the (undamped) Hessian, which is
  ‖ΔW Xᵀ‖²·2/n: within :data:`RECON_REL_TOL` (relative) of the reference's.

The reference is the torch backend **on the same device** (``backend="torch"``, ``numerics="reference"``), which is
bitwise :func:`calibprune.ops.obs_prune_reference` on that device: cuSOLVER and LAPACK factor differently, so a GPU
result is never judged against a CPU one. Tests (``tests/ops``, ``tests/test_gpu_ops.py``) and the GPU benchmarks
(``benchmarks/gpu_bench.py``) use this one helper.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["MASK_AGREEMENT_MIN", "RECON_REL_TOL", "ContractResult", "mask_agreement", "reconstruction_error",
           "check_contract"]

MASK_AGREEMENT_MIN = 0.999
RECON_REL_TOL = 0.005


def mask_agreement(mask: torch.Tensor, mask_ref: torch.Tensor) -> float:
    """Fraction of equal entries of two ``[rows, cols]`` bool masks (1.0 for empty masks)."""
    if mask.shape != mask_ref.shape:
        raise ValueError(f"mask shapes differ: {tuple(mask.shape)} vs {tuple(mask_ref.shape)}")
    if mask.numel() == 0:
        return 1.0
    return float((mask == mask_ref.to(mask.device)).sum().item()) / mask.numel()


def reconstruction_error(W_dense: torch.Tensor, W_pruned: torch.Tensor, H: torch.Tensor, *,
                         chunk_rows: int = 4096) -> float:
    """tr(ΔW H ΔWᵀ) for ΔW = W_pruned − W_dense, accumulated in fp64.

    Args:
        W_dense: ``[rows, cols]`` the weights before pruning.
        W_pruned: ``[rows, cols]`` after.
        H: ``[cols, cols]`` the Hessian before damping (2/n·XᵀX), symmetric.
        chunk_rows: rows per fp64 product (bounds the temporary memory).
    """
    if W_dense.shape != W_pruned.shape or H.shape != (W_dense.shape[1], W_dense.shape[1]):
        raise ValueError(f"shapes do not fit: W {tuple(W_dense.shape)}, W_pruned {tuple(W_pruned.shape)}, "
                         f"H {tuple(H.shape)}")
    device = W_pruned.device
    H64 = H.to(device=device, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for r0 in range(0, W_dense.shape[0], chunk_rows):
        dW = (W_pruned[r0:r0 + chunk_rows].double() - W_dense[r0:r0 + chunk_rows].to(device).double())
        total += ((dW @ H64) * dW).sum()
    return float(total.item())


@dataclass
class ContractResult:
    """Outcome of :func:`check_contract`; ``ok`` when both criteria hold."""

    mask_agreement: float
    recon_error: float
    recon_error_ref: float
    recon_rel_diff: float
    ok: bool

    def as_row(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        verdict = "within" if self.ok else "OUTSIDE"
        return (f"{verdict} the contract: mask agreement {self.mask_agreement:.6f} (>= {MASK_AGREEMENT_MIN}), "
                f"reconstruction error {self.recon_error:.6g} vs reference {self.recon_error_ref:.6g} "
                f"(relative difference {self.recon_rel_diff:+.4%}, allowed ±{RECON_REL_TOL:.1%})")


def check_contract(W_dense: torch.Tensor, H: torch.Tensor, W_ref: torch.Tensor, mask_ref: torch.Tensor,
                   W: torch.Tensor, mask: torch.Tensor, *, min_agreement: float = MASK_AGREEMENT_MIN,
                   recon_tol: float = RECON_REL_TOL) -> ContractResult:
    """Judge a pruned ``(W, mask)`` against the reference ``(W_ref, mask_ref)`` from the same ``W_dense`` and ``H``.

    A reconstruction error *below* the reference's by more than the tolerance also fails: it means the candidate
    computed a different function, not a better one.
    """
    agreement = mask_agreement(mask, mask_ref)
    err = reconstruction_error(W_dense, W, H)
    err_ref = reconstruction_error(W_dense, W_ref, H)
    rel = (err - err_ref) / err_ref if err_ref > 0 else (0.0 if err == 0 else float("inf"))
    ok = agreement >= min_agreement and abs(rel) <= recon_tol
    return ContractResult(agreement, err, err_ref, rel, ok)
