"""ALPS (Meng et al., "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large Language Models",
NeurIPS 2024; mazumder-lab/ALPS).

Per matrix, with ``XᵀX`` summed over every calibration token: add a ridge term (1% of its mean diagonal), normalise
the columns (``X̃ = X / ‖X_j‖``), and solve ``min ‖X̃W̃ − X̃W̃₀‖² s.t. ‖W̃‖₀ ≤ k`` (or N:M) by ADMM on the splitting
``B = D``: a ridge solve for ``B`` through one eigendecomposition of ``X̃ᵀX̃`` (``(X̃ᵀX̃ + ρI)⁻¹`` rebuilt when ρ
changes), a hard-threshold projection for ``D``, and a penalty ρ raised as the support settles (×1.3 / ×1.2 / ×1.1
by how much of it changed, checked every ``update_iter`` iterations; stop once the support is stable after
``switch_iter``). The support found is then fixed and the kept weights re-fitted by a few iterations of conjugate
gradients on the masked normal equations. The authors' numerics are kept: fp32 except the fp64 eigendecomposition,
their support-change rules and their stopping tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import PruneConfig
from ..method import ModuleResult, PruningMethod
from ..statistics import GramStatistic

__all__ = ["ALPSConfig", "ALPSMethod", "alps_prune"]


@dataclass(kw_only=True)
class ALPSConfig(PruneConfig):
    """ALPS (the authors' settings: ``llama.py`` passes ρ = 0.1 to ``ALPS_admm``).

    Attributes:
        rho: the initial ADMM penalty ρ.
        max_iter: most ADMM iterations per matrix.
        update_iter: ADMM iterations between support checks (and ρ updates).
        switch_iter: the earliest iteration at which a stable support (< 0.03% change) ends the ADMM.
        cg_iters: conjugate-gradient iterations that re-fit the kept weights on the fixed support.
        cg_rtol: relative residual at which the conjugate gradients stop early.
        ridge: the ridge term added to diag(XᵀX), as a fraction of its mean.
    """

    method = "alps"

    rho: float = 0.1
    max_iter: int = 300
    update_iter: int = 3
    switch_iter: int = 30
    cg_iters: int = 10
    cg_rtol: float = 1e-4
    ridge: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        for name in ("max_iter", "update_iter", "cg_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.switch_iter, bool) or not isinstance(self.switch_iter, int) or self.switch_iter < 0:
            raise ValueError(f"switch_iter must be an integer >= 0, got {self.switch_iter!r}")
        if not self.cg_rtol > 0:
            raise ValueError(f"cg_rtol must be > 0, got {self.cg_rtol}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")


def _project(Z: torch.Tensor, keep: int, keep_n: int, m: int) -> torch.Tensor:
    """``Z: [cols, rows]`` (the transposed weights) with all but the ``keep`` largest magnitudes zeroed, or, for
    N:M (``m`` > 0), all but the ``keep_n`` largest of every ``m`` consecutive input columns of each row."""
    cols, rows = Z.shape
    if not m:
        Z = Z.clone().reshape(-1)
        _, drop = torch.topk(-Z ** 2, cols * rows - keep)
        Z[drop] = 0
        return Z.reshape(cols, rows)
    groups = Z.t().reshape((cols * rows // m, m))
    _, drop = torch.topk(-groups ** 2, m - keep_n, dim=1)
    groups = groups.scatter(src=torch.zeros((groups.shape[0], m - keep_n), device=Z.device), dim=1, index=drop)
    return groups.reshape(rows, cols).t()


def _masked_cg(A: torch.Tensor, rhs: torch.Tensor, support: torch.Tensor, X0: torch.Tensor, *, rtol: float,
               maxiter: int) -> torch.Tensor:
    """Conjugate gradients for ``A X = rhs`` (``A: [n, n]`` PD, ``rhs, X0, support: [n, k]``), each residual
    restricted to ``support``; stops when every row's residual norm is within ``rtol`` of the row's ``rhs`` norm."""
    X = X0
    R = (rhs - A @ X) * support
    P = torch.zeros_like(R)
    R_prev, Z_prev = R, R
    bound = torch.max(rtol * torch.norm(rhs, dim=1), torch.zeros_like(rhs[:, 0]))
    for k in range(1, maxiter + 1):
        Z = R
        if k == 1:
            P = Z
            R1, Z1, X1 = R, Z, X
        else:
            R2, Z2, P1 = R_prev, Z_prev, P
            R1, Z1, X1 = R, Z, X
            denominator = (R2 * Z2).sum(0)
            denominator[denominator == 0] = 1e-8
            P = Z1 + ((R1 * Z1).sum(0) / denominator).unsqueeze(0) * P1
        AP = A @ P
        denominator = (P * AP).sum(0)
        denominator[denominator == 0] = 1e-8
        alpha = (R1 * Z1).sum(0) / denominator
        X = X1 + alpha.unsqueeze(0) * P
        R = (R1 - alpha.unsqueeze(0) * AP) * support
        R_prev, Z_prev = R1, Z1
        if (torch.norm(A @ X - rhs, dim=1) <= bound).all():
            break
    return X


def alps_prune(W: torch.Tensor, XtX: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0, *,
               rho: float = 0.1, max_iter: int = 300, update_iter: int = 3, switch_iter: int = 30,
               cg_iters: int = 10, cg_rtol: float = 1e-4, ridge: float = 0.01) -> tuple[torch.Tensor, dict]:
    """ALPS on one matrix: ``W: [rows, cols]``, ``XtX: [cols, cols]`` fp32 (``Σ XᵀX``, left unchanged) ->
    ``(W_pruned [rows, cols] fp32, {"iterations", "rho", "error"})``; N:M prunes ``prune_n`` of every ``prune_m``.

    ``error`` is the authors' relative reconstruction error ``tr((B−B₀)ᵀ(X̃ᵀX̃B − X̃ᵀY))/tr(B₀ᵀX̃ᵀY)`` of the
    result, in the normalised coordinates (a diagnostic; it does not feed back into the weights).

    N:M here means calibprune's (and SparseGPT's) convention, ``prune_n`` pruned of every ``prune_m``; the authors'
    ``nm_n`` counts the kept weights, which is the same for 2:4.
    """
    W = W.float().clone()
    G = XtX.clone()
    d = G.shape[0]
    diag = torch.arange(d, device=G.device)
    G[diag, diag] += ridge * torch.mean(torch.diag(G)).item()
    X_norm = torch.diag(G).sqrt() + 1e-8
    G = G / X_norm
    G = (G.T / X_norm).T
    YtX = torch.matmul(W * X_norm, G)
    B = (W * X_norm).t().clone()
    B_orig = B.clone()
    V = torch.zeros_like(B)
    cols, rows = B.shape
    params = cols * rows
    keep_n = prune_m - prune_n if prune_m else 0
    keep = round((1 - sparsity) * params) if not prune_m else params * keep_n / prune_m
    L, Q = torch.linalg.eigh(G.double())
    inverse = (Q @ ((1 / (L + rho)) * Q).T).float()

    D = _project(B, int(keep), keep_n, prune_m)
    support_prev = (D.reshape(-1) == 0).to(torch.float) if not prune_m else (D.t().reshape(-1, prune_m) == 0).float()
    D_init = D.clone()
    raised = False
    iterations = 0
    for it in range(max_iter):
        iterations = it + 1
        B = inverse @ (YtX.T - V + rho * D)
        D = _project((V + rho * B) / rho, int(keep), keep_n, prune_m)
        V = V + rho * (B - D)
        if (it + 1) % update_iter:
            continue
        support = (D.reshape(-1) == 0).to(torch.float) if not prune_m else (D.t().reshape(-1, prune_m) == 0).float()
        change = torch.sum((support - support_prev) ** 2)
        if change / keep > 0.1:
            raised, rho = True, rho * 1.3
        elif change / keep > 0.005:
            raised, rho = True, rho * 1.2
        elif change > 0.5:
            if raised:
                rho *= 1.1
            else:
                rho /= 5
                B, D, V = B_orig.clone(), D_init.clone(), torch.zeros_like(B)
        elif raised:
            break
        else:
            rho /= 5
        support_prev = support.clone()
        rho = min(rho, 1e6)
        inverse = (Q @ ((1 / (L + rho)) * Q).T).float()
        if it >= switch_iter and change / keep < 0.0003:
            break
    B = _project(B, int(keep), keep_n, prune_m)
    B = _masked_cg(G, YtX.T, (B != 0).to(torch.float), B, rtol=cg_rtol, maxiter=cg_iters)
    # the diagonal of (B − B₀)ᵀ(GB − X̃ᵀY) without forming the [rows, rows] product
    error = float(((B - B_orig) * (torch.matmul(G, B) - YtX.T)).sum() / torch.sum(B_orig * YtX.T))
    return (B.t() / X_norm), {"iterations": iterations, "rho": rho, "error": error}


class ALPSMethod(PruningMethod):
    """Per input group: ``Σ XᵀX``; each matrix pruned by ADMM and re-fitted on its support (:func:`alps_prune`)."""

    solves_concurrently = True
    config_class = ALPSConfig
    needs_report_hessian = False  # the report's Hessian is (2/n)·ΣXᵀX, from the Gram the method keeps

    def __init__(self, config: ALPSConfig):
        super().__init__(config)
        self.gram = GramStatistic()
        self.statistics = (self.gram,)

    def prune_module(self, index: int, name: str, module: nn.Linear, group: str, sparsity: float) -> ModuleResult:
        c = self.config
        with self.timed("admm"):
            W, info = alps_prune(module.weight.data, self.gram[group], sparsity, c.prune_n, c.prune_m, rho=c.rho,
                                 max_iter=c.max_iter, update_iter=c.update_iter, switch_iter=c.switch_iter,
                                 cg_iters=c.cg_iters, cg_rtol=c.cg_rtol, ridge=c.ridge)
        module.weight.data.copy_(W.reshape(module.weight.shape).to(module.weight.dtype))
        n = self.gram.counts[group]
        return ModuleResult(hessian=self.gram[group] * (2 / n) if n else None, extra={"alps": info})
