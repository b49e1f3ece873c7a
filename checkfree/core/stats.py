"""
Statistics for the benchmarks
=============================

Paired per-seed comparisons with bootstrap confidence intervals, and the rule the docs follow: a
difference is claimed only when its interval excludes "no difference" (1 for a ratio, 0 for a
difference); otherwise it is "not resolved".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the data
    low: float  # bootstrap percentile interval
    high: float
    n: int  # values (seeds) it is computed from
    level: float = 0.95

    def excludes(self, value: float) -> bool:
        return self.n > 1 and not self.low <= value <= self.high

    def fmt(self, digits: int = 2) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.estimate:.{digits}f} (n=1)"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n, "level": self.level}


def bootstrap(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (seeded: the same data give the same
    interval). Fewer than two values give no interval (low = high = the estimate)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    est = float(statistic(x))
    if x.size == 1:
        return Interval(est, est, est, 1, level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    stats = np.array([statistic(x[i]) for i in idx]) if statistic is not np.mean else x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return Interval(est, float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)), int(x.size), level)


def geometric_mean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def paired_ratio(ours: Sequence[float | None], theirs: Sequence[float | None], **kw) -> Interval:
    """Geometric mean of per-seed ratios ours/theirs over the seeds where both are known, with its interval."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None and b > 0]
    return bootstrap(ratios, geometric_mean, **kw)


def verdict(interval: Interval, null: float, better_below: bool = True, what: str = "") -> str:
    """'faster' / 'slower' (or the given words) only where the interval excludes ``null``; else 'not resolved'."""
    if interval.n < 2:
        return "not resolved (fewer than 2 seeds)"
    if not interval.excludes(null):
        return "not resolved"
    below = interval.high < null
    good = below if better_below else not below
    return what or ("better" if good else "worse")
