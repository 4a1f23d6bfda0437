"""Calibration data: sources, the ``CalibrationSet`` container, ``build_calibration`` and the self-generated
sets ``self_cal``, ``sgs`` and ``igsp``."""
from __future__ import annotations

from .calibration_set import CalibrationSet, as_token_ids, build_calibration
from .igsp import igsp
from .self_cal import self_cal
from .sgs import sgs
from .sources import SOURCES, Source, check_available, list_sources, load_texts, resolve_data_dir

#: calibration sets the dense model generates itself, by the name the CLI and the study use
GENERATORS = {"self-cal": self_cal, "sgs": sgs, "igsp": igsp}

__all__ = ["CalibrationSet", "as_token_ids", "build_calibration", "SOURCES", "Source", "list_sources",
           "load_texts", "resolve_data_dir", "check_available", "self_cal", "sgs", "igsp", "GENERATORS"]
