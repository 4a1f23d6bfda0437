"""Backward-compatible home of the self-generated calibration sets; the code lives in one module per concern:
:mod:`.sampling` (shared sampling machinery), :mod:`.self_cal`, :mod:`.sgs` and :mod:`.igsp`."""
from __future__ import annotations

from .igsp import BOS_GROUP, IGSP_SEED_PROMPTS, greedy_min_aggregation, igsp
from .sampling import SamplingSettings, ScheduledTemperature, start_token_id
from .self_cal import self_cal
from .sgs import sgs

__all__ = ["BOS_GROUP", "IGSP_SEED_PROMPTS", "SamplingSettings", "ScheduledTemperature", "greedy_min_aggregation",
           "igsp", "self_cal", "sgs", "start_token_id"]
