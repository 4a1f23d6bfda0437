"""Calibration data: sources, the ``CalibrationSet`` container, ``build_calibration`` and the self-generated
sets ``self_cal``, ``sgs`` and ``igsp``."""
from __future__ import annotations

from .calibration_set import CalibrationSet, as_token_ids, build_calibration
from .generate import igsp, self_cal, sgs
from .sources import SOURCES, Source, check_available, list_sources, load_texts, resolve_data_dir

__all__ = ["CalibrationSet", "as_token_ids", "build_calibration", "SOURCES", "Source", "list_sources",
           "load_texts", "resolve_data_dir", "check_available", "self_cal", "sgs", "igsp"]
