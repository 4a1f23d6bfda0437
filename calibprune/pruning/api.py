"""The public door of :mod:`calibprune.pruning`: :func:`prune`, :func:`check_request`, :func:`make_config` and the
``prune_*`` wrappers.

It looks the method, profile and refiner up in the registry, checks the whole request against the model before any
weight changes (targets, N:M widths, per-layer sparsities, device, backends, token ids), resolves each decoder
layer's sparsity (uniform, a per-layer list, or a registered profile such as OWL), and hands the pass to the layer
loop (:func:`~calibprune.pruning.loop.prune_layerwise`). Everything here imports downward.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..calibration import CalibrationSet, as_token_ids
from ..calibration.calibration_set import ids_sha256
from .anatomy import find_decoder_layers, select_targets
from .config import PruneConfig
from .device import resolve_device
from .distributed import check_same, current_context, sync_phase
from .loop import prune_layerwise
from .method import MaskRefiner, PruningMethod
from .methods.magnitude import MagnitudeConfig
from .methods.sparsegpt import SparseGPTConfig, SparseGPTReferenceConfig
from .methods.wanda import WandaConfig
from .registry import METHODS, PROFILES, REFINERS, check_options, resolve_options
from .report import PruneReport

if TYPE_CHECKING:
    from .checkpoint import LayerCheckpoint

log = logging.getLogger(__name__)

__all__ = ["prune", "check_request", "make_config", "prune_sparsegpt_fused", "prune_sparsegpt_reference",
           "prune_wanda", "prune_magnitude"]


def make_config(method: str, **options: Any) -> PruneConfig:
    """The typed config of ``method`` built from keyword options, e.g. ``make_config("wanda", sparsity=0.5)``,
    with its profile and refiner options resolved (:func:`~calibprune.pruning.registry.resolve_options`).

    An option the method does not take is a ``ValueError`` that names it and lists what the method takes.
    """
    return resolve_options(check_options(method, options)(**options))


def _check_against_model(model: nn.Module, ids: torch.Tensor | None, config: PruneConfig,
                         method: PruningMethod, device: torch.device) -> tuple[str, nn.ModuleList]:
    """Everything about the request that the model decides, checked before any work."""
    prefix, layers = find_decoder_layers(model)
    per_layer = [select_targets(layer, config.targets, config.ignore, prefix=f"{prefix}.{i}")
                 for i, layer in enumerate(layers)]
    if not any(per_layer):
        names = sorted({n for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"targets {list(config.targets)} / ignore {list(config.ignore)} match no Linear module in "
                         f"the {len(layers)} decoder layers ({prefix}.N); layer 0 has: {', '.join(names)}")
    if config.prune_m:
        for i, mods in enumerate(per_layer):
            for name, mod in mods.items():
                if mod.in_features % config.prune_m:
                    raise ValueError(f"N:M pattern {config.pattern} needs M to divide the input width of every "
                                     f"target, but {prefix}.{i}.{name} has in_features = {mod.in_features}; "
                                     "leave it out with ignore or choose another M")
    if isinstance(config.sparsity, tuple) and len(config.sparsity) != len(layers):
        raise ValueError(f"{len(config.sparsity)} per-layer sparsities given but the model has {len(layers)} "
                         "decoder layers")
    if ids is not None:
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(embed, "num_embeddings", None)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise ValueError(f"calibration token ids span [{low}, {high}] but the model's vocabulary is "
                             f"[0, {vocab}): the set was built with another tokenizer")
    method.resolve(device)
    return prefix, layers


def check_request(model: nn.Module, calib: CalibrationSet | torch.Tensor | None,
                  config: PruneConfig) -> tuple[PruningMethod, torch.Tensor | None, MaskRefiner | None]:
    """Check a prune request against ``model`` without changing anything (but turning ``config``'s profile and
    refiner options into their typed dataclasses, :func:`~calibprune.pruning.registry.resolve_options`); returns
    the method, the token ids and the refiner that :func:`prune` will run. Raises ``TypeError`` / ``ValueError`` /
    ``RuntimeError``."""
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a registered method's config ({', '.join(METHODS)}), got "
                        f"{type(config).__name__}")
    resolve_options(config)
    method = METHODS[config.method](config)
    if calib is None and (method.needs_calibration or config.refine or config.sparsity_profile != "uniform"):
        what = [w for w, on in ((config.method, method.needs_calibration), (f"refine={config.refine!r}", config.refine),
                                (f"sparsity_profile={config.sparsity_profile!r}",
                                 config.sparsity_profile != "uniform")) if on]
        raise ValueError(f"{' and '.join(what)} needs calibration data; pass a CalibrationSet or token ids")
    ids = as_token_ids(calib) if calib is not None else None
    device = resolve_device(config)
    _check_against_model(model, ids, config, method, device)
    refiner = REFINERS[config.refine](config.refine_options, config) if config.refine else None
    if refiner is not None:
        refiner.resolve(device)
    return method, ids, refiner


def _model_signature(model: nn.Module) -> list:
    """Names, shapes and dtypes of the parameters: what every rank must agree on (cheap; no weights read)."""
    return [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]


def prune(model: nn.Module, calib: CalibrationSet | torch.Tensor | None, config: PruneConfig, *,
          progress: bool = True, checkpoint: LayerCheckpoint | None = None) -> PruneReport:
    """Prune ``model`` in place with the method ``config`` names; the one generic entry.

    Args:
        calib: a ``CalibrationSet`` or token ids ``[n, seqlen]`` int64 (None only for a data-free method).
        config: a method's typed config, e.g. ``SparseGPTConfig(sparsity=0.7, sparsity_profile="owl")``.
        checkpoint: saves each finished layer and restores those of a killed run (used by
            :func:`calibprune.pruning.streaming.prune_and_save`; ``config.resume`` needs one).

    Everything that can be checked (:func:`check_request`: targets, N:M widths, device, backends, token ids) is
    checked before any weight changes. Inside an initialised process group (``torchrun``) every rank calls this
    with the same model, calibration and config (checked), and the pass is data- and weight-parallel
    (:mod:`calibprune.pruning.distributed`); every rank gets the pruned model and the full report.
    Returns the :class:`PruneReport`.
    """
    ctx = current_context()
    error, checked = None, None
    try:
        if config.resume and checkpoint is None:
            raise ValueError("resume=True continues a prune saved layer by layer to an output folder: use "
                             "prune_and_save(model, calib, config, out) or calibprune prune --out DIR --resume")
        checked = check_request(model, calib, config)
    except Exception as exc:  # noqa: BLE001 - in a process group every rank must learn of it
        error = exc
    sync_phase(ctx, "checking the request", error)
    method, ids, refiner = checked
    if ctx is not None:
        check_same(ctx, "the calibration tokens", ids_sha256(ids) if ids is not None else None)
        check_same(ctx, "the prune config", config.to_dict())
        check_same(ctx, "the model's parameter names and shapes", _model_signature(model))
    provenance = calib.provenance if isinstance(calib, CalibrationSet) else {"kind": "tensor" if ids is not None
                                                                              else "none"}
    report = PruneReport(method=config.method, config=config.to_dict(),
                         calibration=provenance | ({"n": ids.shape[0], "seqlen": ids.shape[1]} if ids is not None
                                                   else {}))
    layer_sparsities = None
    if config.sparsity_profile != "uniform":
        saved = checkpoint.profile if checkpoint is not None else None
        if saved is not None:
            layer_sparsities, report.profile = saved
            log.info("%s layer sparsities restored from %s", config.sparsity_profile, checkpoint.folder)
        else:
            profile = PROFILES[config.sparsity_profile](config.profile_options)
            t0 = time.perf_counter()
            layer_sparsities, info = profile.layer_sparsities(model, ids, config, progress=progress)
            report.profile = {"name": config.sparsity_profile, "seconds": time.perf_counter() - t0} | info
            if checkpoint is not None:
                checkpoint.save_profile(layer_sparsities, report.profile)
        log.info("%s layer sparsities: %s", config.sparsity_profile,
                 ", ".join(f"{s:.3f}" for s in layer_sparsities))
    _, layers = find_decoder_layers(model)
    report.layer_targets = [float(layer_sparsities[i] if layer_sparsities is not None else config.layer_sparsity(i))
                            for i in range(len(layers))]
    # A data-free method needs forwards only for the reconstruction errors it reports.
    run_ids = ids if method.needs_calibration or refiner is not None or config.report_errors else None
    return prune_layerwise(model, run_ids, config, method, report, layer_sparsities=layer_sparsities,
                           refiner=refiner, progress=progress, checkpoint=checkpoint)


def prune_sparsegpt_fused(model: nn.Module, calib: CalibrationSet | torch.Tensor, *,
                          sparsity: float | Sequence[float] | None = None, pattern: str = "unstructured",
                          blocksize: int = 128, percdamp: float = 0.01, backend: str = "auto",
                          **options) -> PruneReport:
    """Prune ``model`` in place with SparseGPT, fast: bitwise the reference under the same batch order.

    Args:
        calib: a ``CalibrationSet`` or token ids ``[n, seqlen]`` int64.
        sparsity: fraction pruned per matrix (default 0.6), or one value per decoder layer; implied by N:M.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        backend: ops backend, ``"auto"`` picks the fastest available.
        options: any other :class:`SparseGPTConfig` field (``numerics``, ``sparsity_profile``, ``refine``,
            ``batch_size``, ``device``, ``targets``, ``ignore``…).
    """
    return prune(model, calib, SparseGPTConfig(sparsity=sparsity, pattern=pattern, blocksize=blocksize,
                                               percdamp=percdamp, backend=backend, **options))


def prune_sparsegpt_reference(model: nn.Module, calib: CalibrationSet | torch.Tensor, *,
                              sparsity: float | Sequence[float] | None = None, pattern: str = "unstructured",
                              blocksize: int = 128, percdamp: float = 0.01, backend: str = "torch",
                              **options) -> PruneReport:
    """Prune ``model`` in place with the faithful, slow SparseGPT reference (IST-DASLab numerics and order).

    Same signature as :func:`prune_sparsegpt_fused`; ``backend`` must be ``"torch"`` (or ``"auto"``).
    """
    return prune(model, calib, SparseGPTReferenceConfig(sparsity=sparsity, pattern=pattern, blocksize=blocksize,
                                                        percdamp=percdamp, backend=backend, **options))


def prune_wanda(model: nn.Module, calib: CalibrationSet | torch.Tensor, *,
                sparsity: float | Sequence[float] | None = None, pattern: str = "unstructured",
                backend: str = "auto", **options) -> PruneReport:
    """Prune ``model`` in place with Wanda (|W|·‖X‖ per output row; N:M per row); options as :class:`WandaConfig`."""
    return prune(model, calib, WandaConfig(sparsity=sparsity, pattern=pattern, backend=backend, **options))


def prune_magnitude(model: nn.Module, calib: CalibrationSet | torch.Tensor | None = None, *,
                    sparsity: float | Sequence[float] | None = None, pattern: str = "unstructured",
                    **options) -> PruneReport:
    """Prune ``model`` in place by weight magnitude. With ``calib`` the report also holds reconstruction errors."""
    return prune(model, calib, MagnitudeConfig(sparsity=sparsity, pattern=pattern, **options))
