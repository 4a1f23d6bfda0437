"""The inverse factor of SparseGPT's OBS prune: dead columns, relative damping, U with UᵀU = (H + λI)⁻¹.

One function, :func:`inverse_factor`, serves every backend (torch, Triton, C++, CUDA): it runs the reference's
sequence and, only when that fails, escalates the damping. Its result can be computed once and passed to
:func:`calibprune.ops.obs_prune` (``factor=``) for every weight matrix that reads the same inputs (q/k/v, gate/up);
sharing it changes no bit, since the factor is a function of H alone.

Damping escalation. A Hessian that is not positive definite after the requested damping (dead or duplicate inputs,
a rank-deficient or tiny calibration set, ``percdamp=0``) makes Cholesky fail. Instead of failing, the factor is
retried with the relative damping raised tenfold per step (``percdamp·10ᵏ``, or ``1e-5·10ᵏ`` when ``percdamp``
is 0), at most ``max_escalations`` times, each logged with ``logging.warning``; the damping that worked is
returned, so that a pruning report can record it. When the first attempt succeeds nothing changes: the numerics
are bitwise those of the reference.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["InverseFactor", "inverse_factor", "damping_schedule", "factor_with_escalation", "METHODS",
           "MAX_ESCALATIONS"]

log = logging.getLogger(__name__)

METHODS = ("chol_inverse", "reversed")
MAX_ESCALATIONS = 6
# Relative damping of the first retry when the caller asked for none (percdamp = 0).
_FLOOR = 1e-5


class InverseFactor(NamedTuple):
    """What the OBS prune needs from H, computed once per H.

    U: ``[cols, cols]`` fp32 (or fp64) upper-triangular, UᵀU = (H + damp·mean(diag H)·I)⁻¹ after the dead fix.
    dead: ``[cols]`` bool, columns whose Hessian diagonal was exactly 0 (their weights are zeroed).
    damp: the relative damping that was applied (a fraction of mean(diag H)); ``percdamp`` unless escalated.
    escalations: how many times the damping was raised (0 when the first Cholesky succeeded).
    """

    U: torch.Tensor
    dead: torch.Tensor
    damp: float
    escalations: int


def damping_schedule(percdamp: float, max_escalations: int = MAX_ESCALATIONS) -> list[float]:
    """Relative dampings tried in order: ``percdamp``, then ``base·10, base·100, …`` (``max_escalations`` more).

    ``base`` is ``percdamp``, or ``1e-5`` when ``percdamp`` is 0 (so the first retry is ``1e-4``).
    """
    base = percdamp if percdamp > 0 else _FLOOR
    return [percdamp] + [base * 10.0**k for k in range(1, max_escalations + 1)]


def _is_positive_definite_failure(exc: Exception) -> bool:
    return isinstance(exc, torch.linalg.LinAlgError) or "positive-definite" in str(exc)


def factor_with_escalation(H: torch.Tensor, percdamp: float, attempt: Callable[[torch.Tensor, float], torch.Tensor],
                           *, max_escalations: int = MAX_ESCALATIONS, what: str = "H") -> tuple[torch.Tensor,
                                                                                                float, int]:
    """Run ``attempt(H, percdamp)`` (which damps H in place and factors it); on failure restore the diagonal and
    retry with escalated damping. Returns ``(U, damp, escalations)``.

    ``attempt`` must raise ``torch.linalg.LinAlgError`` (or return a non-finite U) when H is not positive definite.
    The first attempt runs on H exactly as given, so a success there is bitwise the plain computation.
    """
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{what} has NaN or Inf entries; the calibration inputs (or the model's activations) are "
                         "not finite")
    diag0 = H.diagonal().clone()
    schedule = damping_schedule(percdamp, max_escalations)
    last: Exception | None = None
    for k, damp in enumerate(schedule):
        if k > 0:
            H.diagonal().copy_(diag0)
        try:
            U = attempt(H, damp)
        except RuntimeError as exc:  # LinAlgError is a RuntimeError
            if not _is_positive_definite_failure(exc):
                raise
            last = exc
        else:
            if bool(torch.isfinite(U).all()):
                if k > 0:
                    log.warning("%s was not positive definite with damping %.3g; factored with damping %.3g "
                                "(%d escalation%s)", what, percdamp, damp, k, "" if k == 1 else "s")
                return U, damp, k
            last = torch.linalg.LinAlgError(f"the factor of {what} has NaN/Inf entries")
        if k + 1 < len(schedule):
            log.warning("%s is not positive definite with relative damping %.3g (%s); retrying with %.3g",
                        what, damp, str(last).splitlines()[0][:120], schedule[k + 1])
    raise torch.linalg.LinAlgError(
        f"{what} is not positive definite even with relative damping {schedule[-1]:.3g} after {max_escalations} "
        f"escalations (last error: {last}); the calibration inputs are probably degenerate (NaN, Inf, or all "
        "tokens identical); use more or different calibration data") from last


def _chol_inverse(H: torch.Tensor) -> torch.Tensor:
    """The reference's chol → cholesky_inverse → chol(upper); raises LinAlgError when H is not PD."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"Cholesky of H failed at leading minor {int(info)}")
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"Cholesky of H⁻¹ failed at leading minor {int(info)}")
    return U


def _reversed(H: torch.Tensor) -> torch.Tensor:
    """One Cholesky of the index-reversed H and one triangular inverse (see :func:`inverse_factor`)."""
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"Cholesky of the reversed H failed at leading minor {int(info)}")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)


def inverse_factor(H: torch.Tensor, percdamp: float = 0.01, *, method: str = "chol_inverse",
                   max_escalations: int = MAX_ESCALATIONS, what: str = "H") -> InverseFactor:
    """Upper Cholesky factor U of the damped H⁻¹ (UᵀU = H⁻¹), after the reference's dead-column fix.

    ``method="chol_inverse"`` is the reference's chol → cholesky_inverse → chol(upper) (three O(d³) steps), bitwise
    the reference's U. ``method="reversed"`` (``numerics="fast"``) uses one Cholesky of the index-reversed matrix
    and one triangular inverse: with J the reversal permutation and JHJ = LLᵀ, H⁻¹ = (J L⁻¹ J)ᵀ(J L⁻¹ J) and
    J L⁻¹ J is upper-triangular with a positive diagonal, so by uniqueness of the Cholesky factor it *is* U, up to
    float rounding.

    Args:
        H: ``[d, d]`` fp32 (or fp64) Hessian, modified in place (dead diagonal set to 1, damping added).
        percdamp: damping as a fraction of mean(diag H) (>= 0).
        method: ``"chol_inverse"`` or ``"reversed"``.
        max_escalations: how many tenfold damping raises to try when H is not positive definite (0: fail at once).
        what: a name for H in log and error messages (e.g. the module path).

    Returns:
        :class:`InverseFactor` ``(U, dead, damp, escalations)``; the caller zeroes ``W[:, dead]``.

    Raises:
        ValueError: H is not square floating point, or has NaN/Inf entries.
        torch.linalg.LinAlgError: still not positive definite after every escalation.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1] or not H.is_floating_point():
        raise ValueError(f"H must be a square floating-point matrix, got {tuple(H.shape)} {H.dtype}")
    if method not in METHODS:
        raise ValueError(f"unknown inverse_factor method {method!r}; choose one of {METHODS}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    mean_diag = torch.mean(torch.diag(H))
    solve = _chol_inverse if method == "chol_inverse" else _reversed

    def attempt(Hd: torch.Tensor, rel: float) -> torch.Tensor:
        # As the reference: damp = percdamp · mean(diag H), added to the diagonal in place.
        Hd.diagonal().add_(rel * mean_diag)
        return solve(Hd)

    U, damp, escalations = factor_with_escalation(H, percdamp, attempt, max_escalations=max_escalations, what=what)
    return InverseFactor(U, dead, damp, escalations)
