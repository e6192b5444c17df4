"""Streaming change detectors: EWMA baseline, two-sided CUSUM and Page-Hinkley.

Each detector takes one value at a time with `update(t, x)`, where `t` is in seconds
(monotonic or epoch) and strictly increasing. Spacing may be irregular. The state is
explicit: `state()` returns a dict of plain types (JSON and msgpack can encode it), and
`from_state(dict)` rebuilds a detector that continues exactly where the first one stopped.
`reset()` clears what was learned, as after maintenance, and starts a new learning period.

The CUSUM and Page-Hinkley statistics add one term per value, so their drift and
threshold parameters count values, not seconds. A series sampled twice as often reaches
the threshold in about half the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .trend_common import (
    STATE_VERSION,
    LearningPeriod,
    check_count,
    check_non_negative,
    check_optional_positive,
    check_positive,
    check_state,
    check_time,
    check_value,
    reading_state,
    state_number,
    state_optional_number,
)

UP = "up"
DOWN = "down"

# The baseline has no spread while 1 - sum(w**2) of its normalised weights is below this,
# that is while one value carries practically all the weight.
_SINGLE_VALUE_TOLERANCE = 1e-9


@dataclass(frozen=True, slots=True)
class BaselineStep:
    """Comparison of one value with the baseline learned before it.

    `mean` and `std` describe the baseline before the value was added. `mean` is None for
    the first value after a start, a reset or a gap restart. `std` is also None while one
    value carries practically all the weight: after the first value, and after a gap of
    more than about 21 time constants. `z` is (x - mean) / max(std, min_std), None when
    `std` is. `learning` is True for values inside the learning period, whose z-scores
    detectors ignore.
    """

    t: float
    x: float
    mean: float | None
    std: float | None
    z: float | None
    learning: bool


@dataclass(frozen=True, slots=True)
class ChangePoint:
    """Change detected at time `t`.

    `direction` is "up" or "down". `detector` is "cusum" or "page_hinkley". `statistic` is
    the detector's cumulative sum when it crossed its threshold, in standard deviations.
    """

    t: float
    direction: str
    detector: str
    statistic: float


class EwmaBaseline:
    """Exponentially weighted mean and variance with a time constant, giving z-scores.

    Each value gets the weight alpha = 1 - exp(-dt / time_constant), where dt is the time
    since the previous value, so irregular spacing weighs each value by the time it
    covers. Alpha is never below 1 / n, where n counts the values since the start. That
    bound matters only for the first values, and makes the baseline begin as the sample
    mean and variance of what it has seen.

    The variance is the weighted variance with the same weights, divided by 1 - sum(w**2)
    of the normalised weights w (the unbiased estimate for reliability weights). Without
    that correction a gap of several time constants, which gives the next value almost
    all the weight, would shrink the variance to nearly zero. With it, the variance just
    after such a gap is about the mean of the old variance and the new squared deviation.

    NOTE: for about one time constant after such a gap the variance rests on the few
    values since the gap, so z-scores are noisier than usual. Set `max_gap` to restart
    the learning period after long gaps instead.

    Parameters
    ----------
    time_constant : float
        Seconds over which the weight of a past value falls by a factor e.
    learning_time : float or None
        Seconds of the learning period after a start, a reset or a gap restart. None means
        one time constant.
    learning_samples : int
        Minimum number of values in the learning period.
    min_std : float
        Floor of the standard deviation used for z-scores, in units of x. Set it to about
        the sensor's resolution, so that a constant signal does not give infinite z-scores.
    max_gap : float or None
        A gap of more than this many seconds between two values restarts the baseline and
        the learning period, for signals whose baseline is stale after an outage. None
        means gaps never restart it.
    """

    kind = "EwmaBaseline"

    def __init__(self, time_constant: float, *, learning_time: float | None = None,
                 learning_samples: int = 30, min_std: float = 1e-9, max_gap: float | None = None) -> None:
        self.time_constant = check_positive("time_constant", time_constant)
        if learning_time is None:
            learning_time = self.time_constant
        self.min_std = check_positive("min_std", min_std)
        self.max_gap = check_optional_positive("max_gap", max_gap)
        self._learning = LearningPeriod(learning_time, learning_samples)
        self._last_t: float | None = None
        self._restart()

    def _restart(self) -> None:
        self._learning.restart()
        self._count = 0
        self._mean = 0.0
        # Weighted mean of squared deviations, and the sum of the squared normalised weights.
        self._var = 0.0
        self._sum_sq_weights = 1.0

    @property
    def learning_time(self) -> float:
        return self._learning.duration

    @property
    def learning_samples(self) -> int:
        return self._learning.samples

    @property
    def mean(self) -> float | None:
        """Current baseline mean, or None before the first value."""
        return self._mean if self._count else None

    @property
    def std(self) -> float | None:
        """Current baseline standard deviation without the `min_std` floor.

        None until the weights rest on more than one value, because one value has no spread.
        """
        return self._unbiased_std()

    def _unbiased_std(self) -> float | None:
        if self._count == 0 or 1.0 - self._sum_sq_weights < _SINGLE_VALUE_TOLERANCE:
            return None
        return math.sqrt(self._var / (1.0 - self._sum_sq_weights))

    @property
    def count(self) -> int:
        """Values seen since the last start, reset or gap restart."""
        return self._count

    @property
    def last_t(self) -> float | None:
        """Time of the latest value, or None after a start or a reset."""
        return self._last_t

    def reset(self) -> None:
        """Clear the baseline and start a new learning period, keeping the parameters."""
        self._restart()
        self._last_t = None

    def update(self, t: float, x: float) -> BaselineStep:
        """Compare `x` at time `t` (seconds) with the baseline, then add it to the baseline.

        Raises ValueError, leaving the state unchanged, when `t` or `x` is not a finite
        number or `t` is not after the previous time.
        """
        t = check_time(t, self._last_t)
        x = check_value(x)
        if self.max_gap is not None and self._last_t is not None and t - self._last_t > self.max_gap:
            self._restart()
        learning = self._learning.observe(t)

        if self._count == 0:
            self._mean = x
            self._var = 0.0
            self._sum_sq_weights = 1.0
            self._count = 1
            self._last_t = t
            return BaselineStep(t, x, None, None, None, learning)

        mean_before = self._mean
        std_before = self._unbiased_std()
        diff = x - mean_before
        z = None if std_before is None else diff / max(std_before, self.min_std)

        alpha = max(-math.expm1(-(t - self._last_t) / self.time_constant), 1.0 / (self._count + 1))
        increment = alpha * diff
        self._mean = mean_before + increment
        # With the weights normalised so that the newest one is alpha, this recursion gives
        # the weighted mean of squared deviations from the new mean.
        self._var = (1.0 - alpha) * (self._var + diff * increment)
        self._sum_sq_weights = (1.0 - alpha) ** 2 * self._sum_sq_weights + alpha**2
        self._count += 1
        self._last_t = t
        return BaselineStep(t, x, mean_before, std_before, z, learning)

    def state(self) -> dict[str, Any]:
        """Return the parameters and state as a dict of plain types."""
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "params": {
                "time_constant": self.time_constant,
                "learning_time": self.learning_time,
                "learning_samples": self.learning_samples,
                "min_std": self.min_std,
                "max_gap": self.max_gap,
            },
            "learning": self._learning.state(),
            "count": self._count,
            "mean": self._mean,
            "var": self._var,
            "sum_sq_weights": self._sum_sq_weights,
            "last_t": self._last_t,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EwmaBaseline:
        """Rebuild a baseline from `state()` output."""
        state = check_state(state, cls.kind)
        with reading_state(cls.kind):
            baseline = cls(**state["params"])
            baseline._learning.load(state["learning"])
            baseline._count = int(state["count"])
            baseline._mean = state_number(state, "mean")
            baseline._var = state_number(state, "var")
            baseline._sum_sq_weights = state_number(state, "sum_sq_weights")
            baseline._last_t = state_optional_number(state, "last_t")
            return baseline


class Cusum:
    """Two-sided CUSUM on the z-scores of an EWMA baseline.

    After the learning period each z-score updates two sums:
    upper = max(0, upper + z - drift) and lower = max(0, lower - z - drift). When one
    exceeds `threshold`, the detector reports a change point in that direction and sets
    both sums to 0. The baseline keeps following the values, so a lasting level shift
    raises again until the baseline has caught up. A refractory period in `ChangeMonitor`
    turns that into one alarm.

    Parameters
    ----------
    time_constant, learning_time, learning_samples, min_std, max_gap
        Parameters of the `EwmaBaseline`.
    drift : float
        Allowance k in standard deviations per value. The test suits a shift of about 2k
        best, and shifts smaller than k barely accumulate.
    threshold : float
        Decision interval h in standard deviations. A single value with z above
        h + drift raises at once.
    """

    kind = "Cusum"

    def __init__(self, time_constant: float, *, drift: float = 0.5, threshold: float = 5.0,
                 learning_time: float | None = None, learning_samples: int = 30, min_std: float = 1e-9,
                 max_gap: float | None = None) -> None:
        self.drift = check_non_negative("drift", drift)
        self.threshold = check_positive("threshold", threshold)
        self.baseline = EwmaBaseline(time_constant, learning_time=learning_time, learning_samples=learning_samples,
                                     min_std=min_std, max_gap=max_gap)
        self.upper = 0.0
        self.lower = 0.0

    @property
    def last_t(self) -> float | None:
        """Time of the latest value, or None after a start or a reset."""
        return self.baseline.last_t

    def reset(self) -> None:
        """Clear the baseline and the sums and start a new learning period."""
        self.baseline.reset()
        self.upper = 0.0
        self.lower = 0.0

    def update(self, t: float, x: float) -> ChangePoint | None:
        """Add `x` at time `t` (seconds) and return the change point it completes, if any.

        Raises ValueError, leaving the state unchanged, when `t` or `x` is not a finite
        number or `t` is not after the previous time.
        """
        step = self.baseline.update(t, x)
        if step.learning or step.z is None:
            self.upper = 0.0
            self.lower = 0.0
            return None
        self.upper = max(0.0, self.upper + step.z - self.drift)
        self.lower = max(0.0, self.lower - step.z - self.drift)
        if self.upper > self.threshold:
            change = ChangePoint(step.t, UP, "cusum", self.upper)
        elif self.lower > self.threshold:
            change = ChangePoint(step.t, DOWN, "cusum", self.lower)
        else:
            return None
        self.upper = 0.0
        self.lower = 0.0
        return change

    def state(self) -> dict[str, Any]:
        """Return the parameters and state as a dict of plain types."""
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "params": {"drift": self.drift, "threshold": self.threshold},
            "baseline": self.baseline.state(),
            "upper": self.upper,
            "lower": self.lower,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Cusum:
        """Rebuild a detector from `state()` output."""
        state = check_state(state, cls.kind)
        with reading_state(cls.kind):
            baseline = EwmaBaseline.from_state(state["baseline"])
            detector = cls(baseline.time_constant, **state["params"], learning_time=baseline.learning_time,
                           learning_samples=baseline.learning_samples, min_std=baseline.min_std,
                           max_gap=baseline.max_gap)
            detector.baseline = baseline
            detector.upper = state_number(state, "upper")
            detector.lower = state_number(state, "lower")
            return detector


class PageHinkley:
    """Two-sided Page-Hinkley test against the running mean since the last change.

    The scale s is the standard deviation of the values in the learning period (at least
    `min_std`). After the learning period each value x adds r = (x - m) / s to two sums,
    where m is the mean of all values since the start or the last change, x included:
    up += r - delta and down += r + delta. A change up is reported when `up` rises more
    than `threshold` above its minimum, a change down when `down` falls more than
    `threshold` below its maximum. After a change the running mean, the sums and their
    extremes start again, and the scale is kept.

    Because m covers the whole time since the last change, the test finds slow drifts
    that an EWMA baseline follows too closely for CUSUM to see.

    Parameters
    ----------
    delta : float
        Allowance per value, in units of s.
    threshold : float
        Decision threshold lambda, in units of s.
    learning_time : float
        Seconds of the learning period after a start, a reset or a gap restart.
    learning_samples : int
        Minimum number of values in the learning period (at least 2, to estimate s).
    min_std : float
        Floor of the scale s, in units of x.
    max_gap : float or None
        A gap of more than this many seconds restarts the test and its learning period.
    """

    kind = "PageHinkley"

    def __init__(self, *, delta: float = 0.5, threshold: float = 50.0, learning_time: float = 0.0,
                 learning_samples: int = 30, min_std: float = 1e-9, max_gap: float | None = None) -> None:
        self.delta = check_non_negative("delta", delta)
        self.threshold = check_positive("threshold", threshold)
        self.min_std = check_positive("min_std", min_std)
        self.max_gap = check_optional_positive("max_gap", max_gap)
        self._learning = LearningPeriod(learning_time, check_count("learning_samples", learning_samples, 2))
        self._last_t: float | None = None
        self._restart()

    def _restart(self) -> None:
        self._learning.restart()
        # Mean and sum of squared deviations of the learning values (Welford's method).
        self._learn_count = 0
        self._learn_mean = 0.0
        self._learn_m2 = 0.0
        self._scale: float | None = None
        self._new_segment()

    def _new_segment(self) -> None:
        self._segment_count = 0
        self._segment_mean = 0.0
        self.up = 0.0
        self.up_min = 0.0
        self.down = 0.0
        self.down_max = 0.0

    @property
    def scale(self) -> float | None:
        """Scale s in units of x, or None during the learning period."""
        return self._scale

    @property
    def learning_time(self) -> float:
        return self._learning.duration

    @property
    def learning_samples(self) -> int:
        return self._learning.samples

    @property
    def last_t(self) -> float | None:
        """Time of the latest value, or None after a start or a reset."""
        return self._last_t

    def reset(self) -> None:
        """Clear the scale, the mean and the sums and start a new learning period."""
        self._restart()
        self._last_t = None

    def update(self, t: float, x: float) -> ChangePoint | None:
        """Add `x` at time `t` (seconds) and return the change point it completes, if any.

        Raises ValueError, leaving the state unchanged, when `t` or `x` is not a finite
        number or `t` is not after the previous time.
        """
        t = check_time(t, self._last_t)
        x = check_value(x)
        if self.max_gap is not None and self._last_t is not None and t - self._last_t > self.max_gap:
            self._restart()
        self._last_t = t

        self._segment_count += 1
        self._segment_mean += (x - self._segment_mean) / self._segment_count
        if self._learning.observe(t):
            self._learn_count += 1
            diff = x - self._learn_mean
            self._learn_mean += diff / self._learn_count
            self._learn_m2 += diff * (x - self._learn_mean)
            return None
        if self._scale is None:
            self._scale = max(math.sqrt(self._learn_m2 / self._learn_count), self.min_std)

        r = (x - self._segment_mean) / self._scale
        self.up += r - self.delta
        self.up_min = min(self.up_min, self.up)
        self.down += r + self.delta
        self.down_max = max(self.down_max, self.down)
        if self.up - self.up_min > self.threshold:
            change = ChangePoint(t, UP, "page_hinkley", self.up - self.up_min)
        elif self.down_max - self.down > self.threshold:
            change = ChangePoint(t, DOWN, "page_hinkley", self.down_max - self.down)
        else:
            return None
        self._new_segment()
        return change

    def state(self) -> dict[str, Any]:
        """Return the parameters and state as a dict of plain types."""
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "params": {
                "delta": self.delta,
                "threshold": self.threshold,
                "learning_time": self.learning_time,
                "learning_samples": self.learning_samples,
                "min_std": self.min_std,
                "max_gap": self.max_gap,
            },
            "learning": self._learning.state(),
            "learn_count": self._learn_count,
            "learn_mean": self._learn_mean,
            "learn_m2": self._learn_m2,
            "scale": self._scale,
            "segment_count": self._segment_count,
            "segment_mean": self._segment_mean,
            "up": self.up,
            "up_min": self.up_min,
            "down": self.down,
            "down_max": self.down_max,
            "last_t": self._last_t,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PageHinkley:
        """Rebuild a detector from `state()` output."""
        state = check_state(state, cls.kind)
        with reading_state(cls.kind):
            detector = cls(**state["params"])
            detector._learning.load(state["learning"])
            detector._learn_count = int(state["learn_count"])
            detector._learn_mean = state_number(state, "learn_mean")
            detector._learn_m2 = state_number(state, "learn_m2")
            detector._scale = state_optional_number(state, "scale")
            detector._segment_count = int(state["segment_count"])
            detector._segment_mean = state_number(state, "segment_mean")
            detector.up = state_number(state, "up")
            detector.up_min = state_number(state, "up_min")
            detector.down = state_number(state, "down")
            detector.down_max = state_number(state, "down_max")
            detector._last_t = state_optional_number(state, "last_t")
            return detector


class ChangeMonitor:
    """One alarm per event from a CUSUM and a Page-Hinkley test run side by side.

    Every value goes to both detectors. A change point from either becomes an alarm
    unless an alarm was raised less than `refractory` seconds before, so one event that
    makes both detectors fire, or one detector fire several times, gives one alarm. When
    both fire on the same value, the CUSUM change point is returned.
    """

    kind = "ChangeMonitor"

    def __init__(self, cusum: Cusum | None, page_hinkley: PageHinkley | None, *, refractory: float) -> None:
        if cusum is None and page_hinkley is None:
            raise ValueError("ChangeMonitor got no detector; pass a Cusum, a PageHinkley or both")
        self.cusum = cusum
        self.page_hinkley = page_hinkley
        self.refractory = check_non_negative("refractory", refractory)
        self.last_alarm_t: float | None = None

    def reset(self) -> None:
        """Reset both detectors and clear the time of the last alarm."""
        for detector in (self.cusum, self.page_hinkley):
            if detector is not None:
                detector.reset()
        self.last_alarm_t = None

    def update(self, t: float, x: float) -> ChangePoint | None:
        """Add `x` at time `t` (seconds) to both detectors and return the alarm it raises, if any."""
        # Check here, because a value that the second detector rejected would already be in
        # the first one.
        detectors = [d for d in (self.cusum, self.page_hinkley) if d is not None]
        for detector in detectors:
            check_time(t, detector.last_t)
        x = check_value(x)
        changes = []
        for detector in detectors:
            change = detector.update(t, x)
            if change is not None:
                changes.append(change)
        if not changes:
            return None
        if self.last_alarm_t is not None and t - self.last_alarm_t < self.refractory:
            return None
        self.last_alarm_t = t
        return changes[0]

    def state(self) -> dict[str, Any]:
        """Return the parameters and state as a dict of plain types."""
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "params": {"refractory": self.refractory},
            "cusum": None if self.cusum is None else self.cusum.state(),
            "page_hinkley": None if self.page_hinkley is None else self.page_hinkley.state(),
            "last_alarm_t": self.last_alarm_t,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ChangeMonitor:
        """Rebuild a monitor from `state()` output."""
        state = check_state(state, cls.kind)
        with reading_state(cls.kind):
            cusum = None if state["cusum"] is None else Cusum.from_state(state["cusum"])
            page_hinkley = None if state["page_hinkley"] is None else PageHinkley.from_state(state["page_hinkley"])
            monitor = cls(cusum, page_hinkley, **state["params"])
            monitor.last_alarm_t = state_optional_number(state, "last_alarm_t")
            return monitor
