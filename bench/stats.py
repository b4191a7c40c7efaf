"""Summaries of samples: medians over runs, percentiles over latencies."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile by nearest rank (p in 0..100): an observed value, never interpolated,
    so p100 is the maximum and a p99 of 1,000 samples is the 10th largest.

    Raises:
        ValueError: No values.
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    """The median (the mean of the middle two for an even count).

    Raises:
        statistics.StatisticsError: No values.
    """
    return statistics.median(values)
