"""Shared settings for the property-based (hypothesis) fuzz tests.

CI runs a bounded number of examples per property (a few minutes in all on a shared 2-core CPU); set
``CALIBPRUNE_FUZZ_EXAMPLES`` to run more (e.g. ``CALIBPRUNE_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_*.py``).
Every property counts the inputs it tried and prints the count (``pytest -s`` shows it), so a run can report
how many inputs were fuzzed.
"""
from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings

TRIED: Counter[str] = Counter()


def fuzz_settings(default: int) -> settings:
    """``default`` examples (or ``$CALIBPRUNE_FUZZ_EXAMPLES``), no deadline, no example database on disk."""
    n = int(os.environ.get("CALIBPRUNE_FUZZ_EXAMPLES", default))
    return settings(max_examples=n, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def report(name: str) -> None:
    print(f"\n[fuzz] {name}: {TRIED[name]} inputs tried")
