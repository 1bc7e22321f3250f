"""Small statistics for benchmark figures: mean, sample standard deviation, percentiles."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ember.errors import InvalidRequestError

PERCENTILES = (50, 90, 99)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as llama-bench reports t/s.

    >>> mean_sd([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default); NaN for no values.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([5.0], 99)
    (2.5, 5.0)
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99 and the mean of durations in seconds; None where there were no values (JSON-friendly)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    result: dict[str, float | None] = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    result["mean"] = statistics.fmean(values)
    return result


def int_list(text: str, flag: str, *, zero_means_none: bool = False) -> list[int]:
    """A comma list of positive integers from a flag, or a clear error naming the flag.

    With zero_means_none, 0 is allowed and dropped (llama-bench's `-p 0`: no prompt processing test).

    >>> int_list("1,2, 4", "-t"), int_list("0", "-p", zero_means_none=True)
    ([1, 2, 4], [])
    """
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    lowest = 0 if zero_means_none else 1
    if not values or any(value < lowest for value in values):
        kind = "non-negative" if zero_means_none else "positive"
        raise InvalidRequestError(f"{flag} takes a comma-separated list of {kind} integers, got {text!r}")
    return [value for value in values if value > 0]


def float_list(text: str, flag: str) -> list[float]:
    """A comma list of positive numbers from a flag, or a clear error naming the flag."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not value > 0 or math.isinf(value) for value in values):
        raise InvalidRequestError(f"{flag} takes a comma-separated list of positive numbers, got {text!r}")
    return values
