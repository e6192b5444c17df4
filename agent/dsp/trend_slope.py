"""Theil-Sen slope over a sliding window, and the forecast of when the trend crosses a limit.

The slope is the median of the slopes between every pair of values in the window. Its
confidence interval is Sen's distribution-free interval. The ranks of the lower and upper
bounds among the sorted pairwise slopes come from the normal approximation to Kendall's S
statistic, with a correction for tied values. For a window without tied
values this gives the same numbers as scipy.stats.theilslopes (scipy 1.17) with
method="joint" on times measured from the latest value.

Each estimate sorts n (n - 1) / 2 pairwise slopes, so keep `max_points` to a few hundred
on a gateway: 200 points make 19 900 slopes per estimate.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from .trend_common import (
    STATE_VERSION,
    LearningPeriod,
    check_count,
    check_non_negative,
    check_number,
    check_positive,
    check_state,
    check_time,
    check_value,
    reading_state,
)

UPPER = "upper"
LOWER = "lower"


@dataclass(frozen=True, slots=True)
class SlopeEstimate:
    """Theil-Sen fit of the window that ends at time `t`.

    `slope`, `low` and `high` are in units of x per second: the median pairwise slope and
    the bounds of its confidence interval at level `confidence`. `level` is the fitted
    value at `t`, the median of x - slope * (time - t) over the window. `points` values
    span `span` seconds.
    """

    t: float
    slope: float
    low: float
    high: float
    level: float
    points: int
    span: float
    confidence: float

    @property
    def significant(self) -> bool:
        """True when the confidence interval of the slope excludes zero."""
        return self.low > 0.0 or self.high < 0.0


@dataclass(frozen=True, slots=True)
class Forecast:
    """When the trend reaches `limit`, in seconds from the latest value at time `t`.

    `time_to_crossing` uses the median slope, and `crossing_time` is t + time_to_crossing
    on the same clock as the input. `earliest` and `latest` use the steeper and the
    shallower bound of the slope's confidence interval. All three are 0 when `level`, the
    fitted value at `t`, is already at or beyond the limit. `kind` is "upper" for a limit
    that the value must stay below and "lower" for one it must stay above.
    """

    limit: float
    kind: str
    t: float
    level: float
    slope: float
    crossing_time: float
    time_to_crossing: float
    earliest: float
    latest: float

    @property
    def crossed(self) -> bool:
        """True when the fitted level is already at or beyond the limit."""
        return self.time_to_crossing == 0.0


def theil_sen(times: np.ndarray, values: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
    """Return (slope, low, high, level at times[-1]) of a Theil-Sen fit.

    `times` must be strictly increasing, and the arrays must hold at least 2 values.
    """
    n = times.size
    dt = times - times[-1]
    first, second = np.triu_indices(n, 1)
    slopes = (values[second] - values[first]) / (dt[second] - dt[first])
    slopes.sort()
    slope = float(np.median(slopes))
    level = float(np.median(values - slope * dt))

    # Variance of Kendall's S under no trend, less the share of each group of tied values.
    _, tie_sizes = np.unique(values, return_counts=True)
    ties = float(np.sum(tie_sizes * (tie_sizes - 1) * (2 * tie_sizes + 5)))
    variance = (n * (n - 1) * (2 * n + 5) - ties) / 18.0
    half_width = NormalDist().inv_cdf(0.5 + confidence / 2.0) * math.sqrt(max(variance, 0.0))
    count = slopes.size
    # 1-based ranks (count - half_width) / 2 and (count + half_width) / 2 + 1, rounded.
    low_index = max(round((count - half_width) / 2.0) - 1, 0)
    high_index = min(round((count + half_width) / 2.0), count - 1)
    return slope, float(slopes[low_index]), float(slopes[high_index]), level


class TheilSenSlope:
    """Robust slope of the latest values, with a forecast of when it crosses a limit.

    The window keeps at most `max_points` values, none older than `max_span` seconds
    before the latest one. Gaps only shorten the window, so they need no special care.

    Parameters
    ----------
    max_span : float
        Maximum age in seconds of a value in the window, counted from the latest value.
    max_points : int
        Maximum number of values in the window (at least 3).
    min_points : int
        Minimum number of values for an estimate (at least 3).
    confidence : float
        Level of the slope's confidence interval, between 0 and 1 exclusive.
    learning_time : float
        Seconds after a start or a reset during which `forecast` returns None.
    learning_samples : int
        Minimum number of values after a start or a reset before `forecast` returns one.
    """

    kind = "TheilSenSlope"

    def __init__(self, max_span: float, *, max_points: int = 200, min_points: int = 10, confidence: float = 0.95,
                 learning_time: float = 0.0, learning_samples: int = 1) -> None:
        self.max_span = check_positive("max_span", max_span)
        self.max_points = check_count("max_points", max_points, 3)
        self.min_points = check_count("min_points", min_points, 3)
        if self.min_points > self.max_points:
            raise ValueError(f"min_points={min_points} is more than max_points={max_points}; lower min_points")
        self.confidence = check_number("confidence", confidence)
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence={confidence!r} is invalid; pass a level between 0 and 1, such as 0.95")
        self._learning = LearningPeriod(check_non_negative("learning_time", learning_time), learning_samples)
        self._in_learning = True
        self._times: deque[float] = deque()
        self._values: deque[float] = deque()
        self._estimate: SlopeEstimate | None = None
        self._estimate_ready = False

    @property
    def learning(self) -> bool:
        """True while the learning period lasts."""
        return self._in_learning

    @property
    def last_t(self) -> float | None:
        """Time of the latest value, or None after a start or a reset."""
        return self._times[-1] if self._times else None

    def __len__(self) -> int:
        return len(self._times)

    def reset(self) -> None:
        """Empty the window and start a new learning period."""
        self._learning.restart()
        self._in_learning = True
        self._times.clear()
        self._values.clear()
        self._estimate = None
        self._estimate_ready = False

    def update(self, t: float, x: float) -> None:
        """Add `x` at time `t` (seconds) to the window and drop the values that fall out of it.

        Raises ValueError, leaving the state unchanged, when `t` or `x` is not a finite
        number or `t` is not after the previous time.
        """
        t = check_time(t, self.last_t)
        x = check_value(x)
        self._in_learning = self._learning.observe(t)
        self._times.append(t)
        self._values.append(x)
        while len(self._times) > self.max_points or t - self._times[0] > self.max_span:
            self._times.popleft()
            self._values.popleft()
        self._estimate_ready = False

    def estimate(self) -> SlopeEstimate | None:
        """Return the fit of the current window, or None while it has fewer than `min_points` values.

        The fit is computed on the first call after an update and reused until the next one.
        """
        if not self._estimate_ready:
            self._estimate = self._compute_estimate()
            self._estimate_ready = True
        return self._estimate

    def _compute_estimate(self) -> SlopeEstimate | None:
        if len(self._times) < self.min_points:
            return None
        times = np.fromiter(self._times, dtype=np.float64, count=len(self._times))
        values = np.fromiter(self._values, dtype=np.float64, count=len(self._values))
        slope, low, high, level = theil_sen(times, values, self.confidence)
        return SlopeEstimate(t=float(times[-1]), slope=slope, low=low, high=high, level=level,
                             points=int(times.size), span=float(times[-1] - times[0]),
                             confidence=self.confidence)

    def forecast(self, limit: float, kind: str) -> Forecast | None:
        """Forecast when the trend crosses `limit`, an "upper" or a "lower" limit.

        Returns None during the learning period, without an estimate, when the slope is
        not significant, and when the trend moves away from the limit. A level already at
        or beyond the limit gives a forecast with all times 0.
        """
        limit = check_number("limit", limit)
        if kind not in (UPPER, LOWER):
            raise ValueError(f"kind={kind!r} is invalid; pass 'upper' for a maximum or 'lower' for a minimum")
        estimate = self.estimate()
        if self._in_learning or estimate is None:
            return None

        distance = limit - estimate.level
        if (kind == UPPER and distance <= 0.0) or (kind == LOWER and distance >= 0.0):
            return Forecast(limit, kind, estimate.t, estimate.level, estimate.slope,
                            crossing_time=estimate.t, time_to_crossing=0.0, earliest=0.0, latest=0.0)
        # A significant slope toward the limit has both interval bounds on the same side of 0
        # as the distance, so every time below is positive and finite.
        toward = estimate.low > 0.0 if kind == UPPER else estimate.high < 0.0
        if not toward:
            return None
        time_to_crossing = distance / estimate.slope
        bound_times = (distance / estimate.low, distance / estimate.high)
        if not all(math.isfinite(seconds) for seconds in (time_to_crossing, *bound_times)):
            # A slope bound so close to 0 that the division overflows: no crossing in sight.
            return None
        # NOTE: the interval covers the uncertainty of the slope only, not of the level.
        return Forecast(limit, kind, estimate.t, estimate.level, estimate.slope,
                        crossing_time=estimate.t + time_to_crossing, time_to_crossing=time_to_crossing,
                        earliest=min(bound_times), latest=max(bound_times))

    def state(self) -> dict[str, Any]:
        """Return the parameters and state as a dict of plain types."""
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "params": {
                "max_span": self.max_span,
                "max_points": self.max_points,
                "min_points": self.min_points,
                "confidence": self.confidence,
                "learning_time": self._learning.duration,
                "learning_samples": self._learning.samples,
            },
            "learning": self._learning.state(),
            "in_learning": self._in_learning,
            "times": list(self._times),
            "values": list(self._values),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TheilSenSlope:
        """Rebuild a detector from `state()` output."""
        state = check_state(state, cls.kind)
        with reading_state(cls.kind):
            detector = cls(**state["params"])
            detector._learning.load(state["learning"])
            detector._in_learning = bool(state["in_learning"])
            times = state["times"]
            values = state["values"]
            if len(times) != len(values):
                raise ValueError(f"state has {len(times)} times but {len(values)} values; "
                                 "pass the dict that TheilSenSlope.state() returned")
            for t, x in zip(times, values):
                detector._times.append(check_time(t, detector.last_t))
                detector._values.append(check_value(x))
            return detector
