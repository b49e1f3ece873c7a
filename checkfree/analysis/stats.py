"""
Statistics for the benchmarks
=============================

Per-seed comparisons with confidence intervals, and the rule the docs follow: a difference is claimed only
when its interval excludes "no difference" (1 for a ratio, 0 for a difference); otherwise it is "not
resolved".

Intervals over a handful of seeds are where the errors hide. A percentile bootstrap over 5 seeds is about
0.63 of a t interval's width (issue 22's audit), so ratio verdicts here use a t interval on log ratios
(paired by seed where both arms ran the same seed) and, as a check that does not assume normal logs, a BCa
bootstrap (``scipy.stats.bootstrap``). A sweep's comparisons are one family: their p-values get Holm's
step-down correction. ``judge`` calls a comparison *resolved* only when both intervals exclude the null and
it survives Holm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
MIN_SEEDS = 3  # no interval (and so no verdict) from fewer values: BCa's acceleration needs a spread
# a resolved verdict from fewer seeds is reported, but not as a headline claim (README, docs' "What survives")
HEADLINE_SEEDS = 10


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the data
    low: float  # the interval's ends (low = high = estimate: no interval)
    high: float
    n: int  # values (seeds, or pairs) it is computed from
    level: float = LEVEL
    method: str = "percentile bootstrap"

    def excludes(self, value: float) -> bool:
        return self.n > 1 and not self.low <= value <= self.high

    def fmt(self, digits: int = 2) -> str:
        return fmt_interval(self, digits)

    def as_dict(self) -> dict:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "level": self.level,
            "method": self.method,
        }


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


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def t_interval(values: Sequence[float | None], level: float = LEVEL) -> Interval:
    """Student's t interval of the mean of ``values`` (None and non-finite values dropped). Fewer than two
    values give no interval (low = high = the estimate)."""
    x = _finite(values)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level, "t")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 1, level, "t")
    half = float(sps.t.ppf((1 + level) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size), level, "t")


def t_pvalue(values: Sequence[float | None], null: float = 0.0) -> float:
    """Two-sided p-value of a one-sample t test that the mean of ``values`` is ``null`` (1.0: fewer than
    two values, or no spread around a mean equal to the null)."""
    x = _finite(values)
    if x.size < 2:
        return 1.0
    sd = float(x.std(ddof=1))
    if sd == 0.0:
        return 1.0 if float(x.mean()) == null else 0.0
    t = (float(x.mean()) - null) / (sd / math.sqrt(x.size))
    return float(2 * sps.t.sf(abs(t), x.size - 1))


def bca(
    values: Sequence[float | None],
    statistic: Callable[[np.ndarray], float] = np.mean,
    level: float = LEVEL,
    resamples: int = 9999,
    seed: int = 0,
) -> Interval:
    """BCa bootstrap interval of ``statistic`` over ``values`` (``scipy.stats.bootstrap``, seeded). Fewer
    than ``MIN_SEEDS`` values, or values that are all equal, give no interval (low = high = the estimate)."""
    x = _finite(values)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level, "BCa")
    est = float(statistic(x))
    if x.size < MIN_SEEDS or np.all(x == x[0]):
        return Interval(est, est, est, int(x.size), level, "BCa")
    res = sps.bootstrap(
        (x,), statistic, method="BCa", confidence_level=level, n_resamples=resamples, rng=np.random.default_rng(seed)
    )
    return Interval(
        est, float(res.confidence_interval.low), float(res.confidence_interval.high), int(x.size), level, "BCa"
    )


def log_ratios(ours: Sequence[float | None], theirs: Sequence[float | None]) -> list[float]:
    """log(ours[i] / theirs[i]) over the pairs (seeds) where both are known and positive."""
    return [
        math.log(a / b)
        for a, b in zip(ours, theirs, strict=True)
        if a is not None and b is not None and a > 0 and b > 0
    ]


def _exp(iv: Interval) -> Interval:
    return Interval(math.exp(iv.estimate), math.exp(iv.low), math.exp(iv.high), iv.n, iv.level, iv.method)


def ratio_t(ours: Sequence[float | None], theirs: Sequence[float | None], level: float = LEVEL) -> Interval:
    """Geometric mean of the paired ratios ours/theirs with a t interval on their logs."""
    iv = t_interval(log_ratios(ours, theirs), level)
    return _exp(iv) if iv.n else iv


def ratio_bca(ours: Sequence[float | None], theirs: Sequence[float | None], level: float = LEVEL) -> Interval:
    """Geometric mean of the paired ratios ours/theirs with a BCa interval on the mean of their logs."""
    iv = bca(log_ratios(ours, theirs), level=level)
    return _exp(iv) if iv.n else iv


def paired_ratio(ours: Sequence[float | None], theirs: Sequence[float | None], level: float = LEVEL) -> Interval:
    """Geometric mean of per-seed ratios ours/theirs over the seeds where both are known, with its interval
    (t on the log ratios)."""
    return ratio_t(ours, theirs, level)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of m p-values is multiplied
    by (m - i), kept monotone, capped at 1. A comparison survives at level alpha when its adjusted p < alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class Comparison:
    """One claim of a sweep: per-seed values of two arms, as a ratio (``kind="ratio"``, null 1) or a
    difference (``kind="difference"``, null 0), paired by seed when ``paired`` (same seed, same failures).
    Unpaired arms get Welch's t on the logs (ratio) or values (difference) and a BCa of the same statistic
    with the arms resampled apart."""

    name: str
    ours: list[float | None]
    theirs: list[float | None]
    kind: str = "ratio"
    paired: bool = True
    words: tuple[str, str] = ("lower", "higher")  # the verdict when ours is below / above the other arm
    old_verdict: str = ""  # what the docs said before, if known
    old_interval: dict | None = None  # the interval the docs gave with it (``Interval.as_dict()``)
    note: str = ""  # what a reader needs beside the numbers (seeds that missed a target, a duplicate)
    t: Interval | None = field(default=None, init=False)
    bca: Interval | None = field(default=None, init=False)
    p: float = field(default=1.0, init=False)
    p_holm: float = field(default=1.0, init=False)
    verdict: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.kind not in ("ratio", "difference"):
            raise ValueError(f"Comparison {self.name!r}: kind {self.kind!r} is neither 'ratio' nor 'difference'")

    @property
    def null(self) -> float:
        return 1.0 if self.kind == "ratio" else 0.0

    def compute(self, level: float = LEVEL) -> None:
        """Fill ``t``, ``bca`` and ``p`` (the p-value before correction)."""
        if self.paired:
            x = log_ratios(self.ours, self.theirs) if self.kind == "ratio" else _paired_diffs(self.ours, self.theirs)
            t, b, self.p = t_interval(x, level), bca(x, level=level), t_pvalue(x)
        else:
            t, b, self.p = _welch(self.ours, self.theirs, self.kind == "ratio", level)
        self.t, self.bca = (_exp(t), _exp(b)) if self.kind == "ratio" and t.n else (t, b)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "paired": self.paired,
            "n": self.t.n if self.t else 0,
            "t": self.t.as_dict() if self.t else None,
            "bca": self.bca.as_dict() if self.bca else None,
            "p": self.p,
            "p_holm": self.p_holm,
            "old_verdict": self.old_verdict,
            "old_interval": self.old_interval,
            "verdict": self.verdict,
            "note": self.note,
        }


def _paired_diffs(ours: Sequence[float | None], theirs: Sequence[float | None]) -> list[float]:
    return [a - b for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None]


def _welch(ours, theirs, log: bool, level: float) -> tuple[Interval, Interval, float]:
    """Difference of means of two independent samples (of logs when ``log``): Welch's t interval and p,
    and a BCa bootstrap resampling each arm apart."""
    a, b = _finite(ours), _finite(theirs)
    if log:
        a, b = np.log(a[a > 0]), np.log(b[b > 0])
    n = int(min(a.size, b.size))
    if n < 2:
        est = float(a.mean() - b.mean()) if a.size and b.size else math.nan
        none = Interval(est, est, est, n, level, "Welch t")
        return none, Interval(est, est, est, n, level, "BCa"), 1.0
    est = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        p = 1.0 if est == 0 else 0.0
        return Interval(est, est, est, n, level, "Welch t"), Interval(est, est, est, n, level, "BCa"), p
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(sps.t.ppf((1 + level) / 2, df)) * se
    p = float(2 * sps.t.sf(abs(est) / se, df))
    res = sps.bootstrap(
        (a, b),
        lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis),
        method="BCa",
        confidence_level=level,
        n_resamples=9999,
        rng=np.random.default_rng(0),
    )
    b_iv = Interval(est, float(res.confidence_interval.low), float(res.confidence_interval.high), n, level, "BCa")
    return Interval(est, est - half, est + half, n, level, "Welch t"), b_iv, p


def judge(family: Sequence[Comparison], alpha: float = 1 - LEVEL) -> None:
    """Compute every comparison of one family (a sweep), Holm-correct their p-values together, and set each
    verdict: its ``words[0]``/``words[1]`` (ours below/above the other arm) only when the t interval and the
    BCa interval both exclude the null and the Holm-adjusted p is below ``alpha``; else "not resolved" with
    the reason."""
    for c in family:
        c.compute(1 - alpha)
    for c, p in zip(family, holm([c.p for c in family])):
        c.p_holm = p
        c.verdict = _rule(c, alpha)


def _rule(c: Comparison, alpha: float) -> str:
    assert c.t is not None and c.bca is not None
    if c.t.n < MIN_SEEDS:
        return f"not resolved ({c.t.n} seeds, fewer than {MIN_SEEDS})"
    if not c.t.excludes(c.null):
        return "not resolved (t interval includes no difference)"
    if not c.bca.excludes(c.null):
        return "not resolved (BCa interval includes no difference)"
    if c.p_holm >= alpha:
        return f"not resolved (Holm: adjusted p {c.p_holm:.3f})"
    return c.words[0] if c.t.high < c.null else c.words[1]


def as_summary(iv: Interval) -> dict:
    """``iv.as_dict()`` with low and high None where there is no interval (fewer than two values), the shape
    the benchmarks' JSON files use."""
    d = iv.as_dict()
    return d if iv.n >= 2 else {**d, "low": None, "high": None}


def fmt_interval(iv: Interval | dict | None, digits: int = 2) -> str:
    """'estimate [low, high]', or 'estimate (n=N)' without an interval, or '-' for none: the one formatter
    of the benchmarks' tables (an ``Interval`` or its ``as_dict()``)."""
    if iv is None:
        return "-"
    d = iv.as_dict() if isinstance(iv, Interval) else iv
    if not d.get("n"):
        return "-"
    if d["n"] == 1 or d.get("low") is None:
        return f"{d['estimate']:.{digits}f} (n={d['n']})"
    return f"{d['estimate']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def verdict(interval: Interval, null: float, better_below: bool = True, what: str = "") -> str:
    """'faster' / 'slower' (or the given words) only where the interval excludes ``null``; else 'not resolved'."""
    if interval.n < 2:
        return "not resolved (fewer than 2 seeds)"
    if not interval.excludes(null):
        return "not resolved"
    below = interval.high < null
    good = below if better_below else not below
    return what or ("better" if good else "worse")
