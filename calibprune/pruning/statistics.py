"""Running statistics of a decoder layer's inputs, one tensor per input group: the one home of their bookkeeping.

A method (or a refiner) declares the statistics it needs (``LayerStatistics.statistics``); the base class runs
their lifecycle: reset per layer, fold every calibration batch of every group, combine across ranks in a process
group, and free. Each statistic owns its tensors, its counts, its update (the authors' exact expression) and how
the distributed reducer may split it (:class:`~calibprune.pruning.distributed.StatisticsReducer`).

* :class:`HessianStatistic` — SparseGPT's running-average ``H = (2/n)·Σ XᵀX`` (IST-DASLab ``add_batch``).
* :class:`GramStatistic` — the plain sum ``Σ XᵀX`` ALPS keeps (mazumder-lab/ALPS ``ALPS_prune.add_batch``).
* :class:`ColumnNormStatistic` — Wanda's running mean of ‖X_j‖² (locuslab/wanda ``WrappedGPT.scaler_row``).
* :class:`InputMeanStatistic`, :class:`TokenVarianceStatistic` — the per-feature mean (over sequences) and the
  token-weighted variance DSnoT regrows by.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from ..ops import hessian_finalize, hessian_update, hessian_update_reference, resolve_op_backend

__all__ = ["RunningStatistic", "HessianStatistic", "GramStatistic", "ColumnNormStatistic", "InputMeanStatistic",
           "TokenVarianceStatistic", "wanda_scaler_update"]


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 3 else x.unsqueeze(0)


def _features_by_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x: [b, t, d]`` or ``[t, d]`` -> ``[d, b·t]`` fp32, the authors' ``inp.reshape(-1, d).t().float()``."""
    x3 = _as_3d(x)
    return x3.reshape(-1, x3.shape[-1]).t().type(torch.float32)


class RunningStatistic:
    """One running statistic per input group of a decoder layer: ``values[group]`` and ``counts[group]``.

    Subclasses give :meth:`zeros` (the initial tensor for a batch ``x``) and :meth:`update` (fold ``x`` into a
    state as one process would after ``n`` units; returns ``n`` plus the batch's units). ``name`` keys the
    statistic in the distributed reducer; ``timing`` is the report's sub-phase its updates are timed under.
    ``split``: the update is ``S ← S·n/(n+c) + T`` with ``T`` independent of ``S`` (the reducer may then compute
    a later rank's terms in parallel); otherwise it replays whole batches. ``everywhere``: the combined values go to
    every rank (a measuring pass that every rank evaluates), not only to the group's owner.
    """

    name: ClassVar[str]
    #: a running mean over the counted units (False: a running sum, which the fast distributed reduction adds)
    mean: ClassVar[bool] = True

    def __init__(self, *, timing: str | None = None, everywhere: bool = False) -> None:
        self.timing = timing or self.name
        self.everywhere = everywhere
        self.values: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    # -- what a statistic is --------------------------------------------------------------------------------------
    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, state: torch.Tensor, x: torch.Tensor, n: int) -> int:
        raise NotImplementedError

    @property
    def split(self) -> bool:
        return True

    def units(self, x: torch.Tensor) -> int:
        """Units the batch ``x`` adds to the count: sequences."""
        return 1 if x.dim() == 2 else x.shape[0]

    def units_per_sequence(self, x: torch.Tensor) -> int:
        return 1

    def custom_split(self, x: torch.Tensor) -> tuple[Callable[[int], torch.Tensor], Callable] | None:
        """``(term(n), combine(S, T, n, c))`` for an update that is not ``S·n/(n+c) + T``; None otherwise."""
        return None

    # -- the lifecycle the base method runs -----------------------------------------------------------------------
    def reset(self) -> None:
        self.values, self.counts = {}, {}

    def step(self, x: torch.Tensor, n_before: int, reducer: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batch ``x``'s fold as one process would take it after ``n_before`` units, its expensive part done
        now: ``S ↦ S·n/(n+c) + T`` with the term ``T`` computed here (``split``), a custom ``combine`` with its
        term, or (an update that does not split) the whole update replayed on ``S``. The step updates ``S`` in
        place and returns it; applied in order, the steps give bitwise the values of :meth:`update`.

        A split term as large as the state (a d×d Hessian) is kept only while ``reducer`` lets it
        (:meth:`~calibprune.pruning.distributed.StatisticsReducer.keeps_batch`); past its memory bound the step
        keeps the smaller batch and replays the update, which is the same arithmetic, so the same bits."""
        count = self.units(x)
        custom = self.custom_split(x)
        if custom is not None:
            term, combine = custom[0](n_before), custom[1]
            return lambda S: combine(S, term, n_before, count)

        def replay(S: torch.Tensor) -> torch.Tensor:
            self.update(S, x, n_before)
            return S

        if self.split and not (reducer is not None and reducer.keeps_batch(x, self.state_bytes(x))):
            term = self.zeros(x)
            self.update(term, x, n_before)
            return lambda S: _beta_combine(S, term, n_before, count)
        return replay

    def state_bytes(self, x: torch.Tensor) -> int:
        """Bytes of the state (and so of a split term) for a batch like ``x``, allocating nothing."""
        state = self.zeros(torch.empty(x.shape, dtype=x.dtype, device="meta"))
        return state.numel() * state.element_size()

    def add(self, group: str, x: torch.Tensor, reducer: Any = None) -> None:
        """Fold the batch ``x: [b, t, d]`` (or ``[t, d]``) into ``group``'s statistic (through ``reducer`` in a
        process group)."""
        if group not in self.values:
            self.values[group] = self.zeros(x)
            self.counts[group] = 0
        state, n = self.values[group], self.counts[group]
        if reducer is None:
            self.counts[group] = self.update(state, x, n)
            return
        self.counts[group] = reducer.fold(self.name, group, state, n, self.units(x),
                                          lambda S, m: self.update(S, x, m), lambda m: self.step(x, m, reducer),
                                          unit=self.units_per_sequence(x))

    def add_later(self, group: str, x: torch.Tensor, sequences_before: int,
                  reducer: Any = None) -> Callable[[], None]:
        """:meth:`add` in two halves, for a sample-parallel worker (:mod:`calibprune.pruning.workers`): the term
        of batch ``x`` is computed now, for the running count the batch will be folded at when every earlier batch
        reached this group (``sequences_before`` local sequences precede it); the returned commit folds it, and
        must be called in batch order. A group that missed earlier batches (an expert that saw no tokens of
        them) has another count at the commit, which then folds ``x`` as :meth:`add` does."""
        unit = self.units_per_sequence(x)
        local = sequences_before * unit
        step = self.step(x, reducer.count_before(local, unit) if reducer is not None else local, reducer)

        def commit() -> None:
            if self.counts.get(group, 0) != local:
                self.add(group, x, reducer)
                return
            if group not in self.values:
                self.values[group] = self.zeros(x)
            if reducer is None or not reducer.defer(self.name, group, step):
                self.values[group] = step(self.values[group])
            self.counts[group] = local + self.units(x)

        return commit

    def finalize(self, reducer: Any = None) -> None:
        """After the layer's last batch: in a process group, the statistic over every rank's samples on the rank
        that prunes each group (every rank with ``everywhere``)."""
        if reducer is not None:
            self.values, self.counts = reducer.running_means(self.name, self.values, self.counts,
                                                             everywhere=self.everywhere, summed=not self.mean)

    def __getitem__(self, group: str) -> torch.Tensor:
        return self.values[group]

    def get(self, group: str) -> torch.Tensor | None:
        return self.values.get(group)

    def items(self) -> Mapping[str, torch.Tensor]:
        return self.values


class HessianStatistic(RunningStatistic):
    """``H ← H·n/(n+b) + (2/(n+b))·XᵀX`` per group, ``[d, d]`` fp32 (:func:`calibprune.ops.hessian_update`).

    ``reference=True``: the authors' expression line for line (:func:`hessian_update_reference`). Otherwise the
    fused op on ``backend`` (set by :meth:`resolve`) with ``numerics``; after the last batch the fast numerics'
    upper triangle is mirrored (:func:`hessian_finalize`, a no-op for reference numerics).
    """

    name = "H"

    def __init__(self, *, numerics: str = "reference", reference: bool = False, timing: str = "hessian") -> None:
        super().__init__(timing=timing)
        self.numerics, self.reference = numerics, reference
        self.backend = "torch"

    def resolve(self, backend: str, device: torch.device) -> str:
        """Choose (and return) the backend this Hessian runs for a requested ``backend`` on ``device``."""
        self.backend = "torch" if self.reference else resolve_op_backend("hessian_update", backend, device,
                                                                         numerics=self.numerics)
        return self.backend

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return torch.zeros((d, d), dtype=torch.float32, device=x.device)

    def update(self, state: torch.Tensor, x: torch.Tensor, n: int) -> int:
        if self.reference:
            return hessian_update_reference(state, x, n)
        return hessian_update(state, x, n, backend=self.backend, numerics=self.numerics)

    @property
    def split(self) -> bool:
        # The torch update is (β·H) + XᵀX·α exactly; a fused kernel's rounding of that sum differs, so a later
        # rank replays its batches through the kernel instead.
        return self.reference or self.backend == "torch"

    def finalize(self, reducer: Any = None) -> None:
        super().finalize(reducer)
        if not self.reference:
            for H in self.values.values():
                hessian_finalize(H, numerics=self.numerics)


def _add_term(state: torch.Tensor, term: torch.Tensor, n: int, count: int) -> torch.Tensor:
    state += term
    return state


def _beta_combine(state: torch.Tensor, term: torch.Tensor, n_before: int, count: int) -> torch.Tensor:
    """``S ← S·n/(n+c); S += T``: the running-mean step of every split statistic (``H *= β; H += XᵀX·α``)."""
    state *= n_before / (n_before + count)
    state += term
    return state


class GramStatistic(RunningStatistic):
    """The sum ``Σ XᵀX`` over every calibration token, ``[d, d]`` fp32 per group (no running-average scaling)."""

    name = "XtX"
    mean = False

    def __init__(self, *, timing: str = "gram") -> None:
        super().__init__(timing=timing)

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return torch.zeros((d, d), dtype=torch.float32, device=x.device)

    @staticmethod
    def _term(x: torch.Tensor) -> torch.Tensor:
        inp = _features_by_tokens(x)
        return inp.matmul(inp.t())

    def update(self, state: torch.Tensor, x: torch.Tensor, n: int) -> int:
        state += self._term(x)
        return n + self.units(x)

    def custom_split(self, x: torch.Tensor) -> tuple[Callable[[int], torch.Tensor], Callable]:
        term = self._term(x)
        return (lambda n: term), _add_term


def wanda_scaler_update(scaler: torch.Tensor, x: torch.Tensor, nsamples: int) -> int:
    """Fold the batch ``x: [b, t, d]`` (or ``[t, d]``, one sequence) into Wanda's running mean of ‖X_j‖².

    ``scaler: [d]`` fp32, updated in place with the authors' expression
    (``scaler *= n/(n+b); n += b; scaler += ‖Xᵀ_j‖₂² / n``). Returns ``nsamples + b``.
    """
    batch = _as_3d(x).shape[0]
    inp = _features_by_tokens(x)
    scaler *= nsamples / (nsamples + batch)
    nsamples += batch
    scaler += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
    return nsamples


class ColumnNormStatistic(RunningStatistic):
    """Wanda's running mean of the squared input column norms ‖X_j‖², ``[d]`` fp32 per group."""

    name = "scaler"

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)

    def update(self, state: torch.Tensor, x: torch.Tensor, n: int) -> int:
        return wanda_scaler_update(state, x, n)


class InputMeanStatistic(RunningStatistic):
    """The running mean over sequences of each input feature's per-sequence sum (DSnoT's μ), ``[d]`` fp32."""

    name = "mean"

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)

    def update(self, state: torch.Tensor, x: torch.Tensor, n: int) -> int:
        batch = _as_3d(x).shape[0]
        state *= n / (n + batch)
        state += torch.sum(_features_by_tokens(x), dim=1) / (n + batch)
        return n + batch


def _variance_combine(state: torch.Tensor, var: torch.Tensor, ntokens: int, tokens: int) -> torch.Tensor:
    """The token-weighted running variance step, in place: ``S ← var`` first, then ``(S·n + var·t)/(n + t)``."""
    return state.copy_(var if ntokens == 0 else (state * ntokens + var * tokens) / (ntokens + tokens))


class TokenVarianceStatistic(RunningStatistic):
    """Each input feature's variance, averaged over batches weighted by their token counts (DSnoT), ``[d]`` fp32.

    Counted in tokens, not sequences.
    """

    name = "var"

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)

    @staticmethod
    def _batch_variance(x: torch.Tensor) -> torch.Tensor:
        return torch.var(_features_by_tokens(x), dim=1, unbiased=False)

    def update(self, state: torch.Tensor, x: torch.Tensor, n: int) -> int:
        tokens = self.units(x)
        _variance_combine(state, self._batch_variance(x), n, tokens)
        return n + tokens

    def units(self, x: torch.Tensor) -> int:
        x3 = _as_3d(x)
        return x3.shape[0] * x3.shape[1]

    def units_per_sequence(self, x: torch.Tensor) -> int:
        return _as_3d(x).shape[1]

    def custom_split(self, x: torch.Tensor) -> tuple[Callable[[int], torch.Tensor], Callable]:
        var = self._batch_variance(x)
        return (lambda n: var), _variance_combine
