"""Streaming trend detectors against batch computations written plainly in this file."""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from agent.dsp.trend import ChangeMonitor, ChangePoint, Cusum, EwmaBaseline, PageHinkley
from agent.dsp.trend_slope import Forecast, TheilSenSlope

HOUR = 3600.0
DAY = 86400.0


# ---------------------------------------------------------------------------------------
# Batch references
# ---------------------------------------------------------------------------------------


def learning_flags(times, duration, samples):
    """True for the values of the learning period that starts at times[0]."""
    return [i < samples or times[i] - times[0] < duration for i in range(len(times))]


def ewma_reference(times, values, tau):
    """Mean and unbiased std of the baseline after each value, from explicit weights.

    The weight of value i after value k is alpha_i * prod over i < j <= k of (1 - alpha_j),
    with alpha_0 = 1 and alpha_i = max(1 - exp(-dt_i / tau), 1 / (i + 1)).
    """
    n = len(values)
    alphas = np.ones(n)
    alphas[1:] = np.maximum(-np.expm1(-np.diff(times) / tau), 1.0 / np.arange(2, n + 1))
    means = []
    stds = []
    for k in range(n):
        weights = np.empty(k + 1)
        for i in range(k + 1):
            weights[i] = alphas[i] * np.prod(1.0 - alphas[i + 1:k + 1])
        mean = float(np.sum(weights * values[:k + 1]))
        sum_sq = float(np.sum(weights**2))
        spread = float(np.sum(weights * (values[:k + 1] - mean) ** 2))
        means.append(mean)
        stds.append(math.sqrt(spread / (1.0 - sum_sq)) if 1.0 - sum_sq > 1e-9 else None)
    return means, stds


def zscores_reference(times, values, tau, min_std):
    """z of each value against the baseline after the previous value (None where undefined)."""
    means, stds = ewma_reference(times, values, tau)
    z = [None]
    for k in range(1, len(values)):
        std = stds[k - 1]
        z.append(None if std is None else (values[k] - means[k - 1]) / max(std, min_std))
    return z


def cusum_reference(times, z, scored, drift, threshold):
    """Change points from S_n = C_n - min(0, min over j <= n of C_j), with C the cumulative sum.

    A new pair of sums starts after each change point.
    """
    changes = []
    start = scored.index(True)
    while start < len(z):
        segment = np.array(z[start:], dtype=float)
        up_sum = np.cumsum(segment - drift)
        up = up_sum - np.minimum(0.0, np.minimum.accumulate(up_sum))
        down_sum = np.cumsum(-segment - drift)
        down = down_sum - np.minimum(0.0, np.minimum.accumulate(down_sum))
        hits = np.flatnonzero((up > threshold) | (down > threshold))
        if hits.size == 0:
            break
        i = int(hits[0])
        if up[i] > threshold:
            changes.append((times[start + i], "up", float(up[i])))
        else:
            changes.append((times[start + i], "down", float(down[i])))
        start += i + 1
    return changes


def page_hinkley_reference(times, values, delta, threshold, learning_time, learning_samples, min_std):
    """Change points of the Page-Hinkley test from cumulative sums over each segment."""
    learning = learning_flags(times, learning_time, learning_samples)
    first_scored = learning.index(False)
    scale = max(float(np.std(values[:first_scored])), min_std)
    changes = []
    segment_start = 0
    while first_scored < len(values):
        segment = values[segment_start:]
        running_mean = np.cumsum(segment) / np.arange(1, segment.size + 1)
        r = ((segment - running_mean) / scale)[first_scored - segment_start:]
        up_sum = np.cumsum(r - delta)
        up = up_sum - np.minimum(0.0, np.minimum.accumulate(up_sum))
        down_sum = np.cumsum(r + delta)
        down = np.maximum(0.0, np.maximum.accumulate(down_sum)) - down_sum
        hits = np.flatnonzero((up > threshold) | (down > threshold))
        if hits.size == 0:
            break
        index = first_scored + int(hits[0])
        if up[hits[0]] > threshold:
            changes.append((times[index], "up", float(up[hits[0]])))
        else:
            changes.append((times[index], "down", float(down[hits[0]])))
        segment_start = index + 1
        first_scored = index + 1
    return changes


def window_reference(times, values, k, max_points, max_span):
    """Indices of the Theil-Sen window that ends at value k."""
    indices = [i for i in range(k + 1) if times[k] - times[i] <= max_span]
    return indices[-max_points:]


def irregular_times(rng, n, mean_step, gaps=()):
    """Increasing times with jittered spacing; `gaps` maps an index to an extra delay in seconds."""
    steps = rng.uniform(0.3, 1.7, n) * mean_step
    for index, extra in dict(gaps).items():
        steps[index] += extra
    return 1.4e9 + np.cumsum(steps)


def roundtrip(state):
    """Pass a state through JSON and msgpack, as storage would."""
    encoded = json.dumps(state, allow_nan=False)
    return msgpack.unpackb(msgpack.packb(json.loads(encoded)), raw=False)


# ---------------------------------------------------------------------------------------
# EWMA baseline
# ---------------------------------------------------------------------------------------


def test_ewma_matches_batch_weights():
    rng = np.random.default_rng(1)
    times = irregular_times(rng, 150, 60.0, gaps={40: 600.0, 90: 3000.0})
    values = 20.0 + rng.standard_normal(150)
    tau = 900.0
    means, stds = ewma_reference(times, values, tau)
    z = zscores_reference(times, values, tau, 1e-9)
    baseline = EwmaBaseline(tau, learning_samples=5)
    for k, (t, x) in enumerate(zip(times, values)):
        step = baseline.update(t, x)
        assert baseline.mean == pytest.approx(means[k], rel=1e-12), k
        if stds[k] is None:
            assert baseline.std is None, k
        else:
            assert baseline.std == pytest.approx(stds[k], rel=1e-9), k
        if z[k] is None:
            assert step.z is None, k
        else:
            assert step.z == pytest.approx(z[k], rel=1e-9, abs=1e-12), k


def test_ewma_starts_as_plain_mean():
    # With a time constant far longer than the data, alpha = 1/n throughout.
    values = np.array([3.0, 5.0, 4.0, 8.0, 1.0, 2.0])
    baseline = EwmaBaseline(1e12)
    for k, x in enumerate(values):
        baseline.update(float(k), x)
        assert baseline.mean == pytest.approx(values[:k + 1].mean(), rel=1e-12)
        if k >= 1:
            assert baseline.std == pytest.approx(values[:k + 1].std(ddof=1), rel=1e-9)


def test_ewma_step_reports_baseline_before_value():
    baseline = EwmaBaseline(100.0, learning_samples=1, learning_time=0.0)
    first = baseline.update(0.0, 10.0)
    assert first.mean is None
    assert first.z is None
    second = baseline.update(1.0, 12.0)
    assert second.mean == 10.0
    assert second.std is None
    assert second.z is None
    third = baseline.update(2.0, 14.0)
    assert third.mean == pytest.approx(11.0)
    assert third.std == pytest.approx(math.sqrt(2.0))
    assert third.z == pytest.approx(3.0 / math.sqrt(2.0))


def test_ewma_gap_keeps_variance():
    rng = np.random.default_rng(2)
    baseline = EwmaBaseline(60.0)
    for k in range(300):
        baseline.update(float(k), rng.standard_normal())
    before = baseline.std
    # A gap of 5 time constants gives the next value 99.3 % of the weight.
    baseline.update(299.0 + 300.0, baseline.mean)
    assert baseline.std > 0.5 * before


def test_ewma_long_gap_leaves_no_spread():
    baseline = EwmaBaseline(60.0)
    for k in range(50):
        baseline.update(float(k), float(k % 3))
    baseline.update(49.0 + 1e5, 1.0)
    assert baseline.std is None
    step = baseline.update(49.0 + 1e5 + 1.0, 2.0)
    assert step.z is None


def test_ewma_max_gap_restarts_learning():
    baseline = EwmaBaseline(60.0, learning_time=120.0, learning_samples=3, max_gap=600.0)
    for k in range(20):
        baseline.update(float(k * 10), float(k % 2))
    assert baseline.update(200.0, 0.0).learning is False
    step = baseline.update(900.0, 50.0)
    assert step.learning is True
    assert step.mean is None
    assert baseline.count == 1
    assert baseline.mean == 50.0


def test_ewma_min_std_floors_z():
    baseline = EwmaBaseline(100.0, min_std=0.5, learning_samples=1, learning_time=0.0)
    for k in range(10):
        baseline.update(float(k), 7.0)
    step = baseline.update(10.0, 8.0)
    assert step.std == 0.0
    assert step.z == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------
# Input and parameter checks
# ---------------------------------------------------------------------------------------


DETECTOR_FACTORIES = {
    "ewma": lambda: EwmaBaseline(100.0, learning_samples=2),
    "cusum": lambda: Cusum(100.0, learning_samples=2),
    "page_hinkley": lambda: PageHinkley(learning_samples=2),
    "theil_sen": lambda: TheilSenSlope(1000.0, min_points=3),
    "monitor": lambda: ChangeMonitor(Cusum(100.0, learning_samples=2), PageHinkley(learning_samples=2),
                                     refractory=10.0),
}


@pytest.mark.parametrize("name", DETECTOR_FACTORIES)
@pytest.mark.parametrize("t, x, words", [
    (10.0, math.nan, "x=nan is not finite"),
    (10.0, math.inf, "x=inf is not finite"),
    (10.0, -math.inf, "x=-inf is not finite"),
    (10.0, "3.5", "x='3.5' is a str"),
    (10.0, None, "x=None is a NoneType"),
    (10.0, True, "x=True is a bool"),
    (math.nan, 1.0, "t=nan is not finite"),
    (math.inf, 1.0, "t=inf is not finite"),
    ("10", 1.0, "t='10' is a str"),
    (2.0, 1.0, "t=2.0 is not after the previous time 2.0"),
    (1.0, 1.0, "t=1.0 is not after the previous time 2.0"),
])
def test_bad_input_raises_and_keeps_state(name, t, x, words):
    detector = DETECTOR_FACTORIES[name]()
    detector.update(1.0, 1.0)
    detector.update(2.0, 2.0)
    before = detector.state()
    with pytest.raises(ValueError) as error:
        detector.update(t, x)
    assert words in str(error.value)
    assert detector.state() == before


def test_numpy_scalars_accepted():
    baseline = EwmaBaseline(100.0)
    baseline.update(np.float64(1.0), np.float32(2.5))
    baseline.update(np.int64(2), np.int16(3))
    assert baseline.mean == pytest.approx(2.75)
    assert isinstance(baseline.state()["mean"], float)


@pytest.mark.parametrize("make, words", [
    (lambda: EwmaBaseline(0.0), "time_constant=0.0 is invalid"),
    (lambda: EwmaBaseline(math.nan), "time_constant=nan is not finite"),
    (lambda: EwmaBaseline(10.0, min_std=0.0), "min_std=0.0 is invalid"),
    (lambda: EwmaBaseline(10.0, learning_samples=0), "learning_samples=0 is too small"),
    (lambda: EwmaBaseline(10.0, learning_samples=2.5), "learning_samples=2.5 is a float"),
    (lambda: EwmaBaseline(10.0, learning_time=-1.0), "learning_time=-1.0 is invalid"),
    (lambda: EwmaBaseline(10.0, max_gap=0.0), "max_gap=0.0 is invalid"),
    (lambda: Cusum(10.0, drift=-0.1), "drift=-0.1 is invalid"),
    (lambda: Cusum(10.0, threshold=0.0), "threshold=0.0 is invalid"),
    (lambda: PageHinkley(threshold=math.inf), "threshold=inf is not finite"),
    (lambda: PageHinkley(learning_samples=1), "learning_samples=1 is too small"),
    (lambda: TheilSenSlope(0.0), "max_span=0.0 is invalid"),
    (lambda: TheilSenSlope(10.0, max_points=2), "max_points=2 is too small"),
    (lambda: TheilSenSlope(10.0, max_points=5, min_points=6), "min_points=6 is more than max_points=5"),
    (lambda: TheilSenSlope(10.0, confidence=1.0), "confidence=1.0 is invalid"),
    (lambda: ChangeMonitor(None, None, refractory=1.0), "got no detector"),
    (lambda: ChangeMonitor(Cusum(10.0), None, refractory=-1.0), "refractory=-1.0 is invalid"),
])
def test_bad_parameters_raise(make, words):
    with pytest.raises(ValueError, match=words):
        make()


@pytest.mark.parametrize("cls", [EwmaBaseline, Cusum, PageHinkley, TheilSenSlope, ChangeMonitor])
def test_from_state_rejects_other_kind(cls):
    with pytest.raises(ValueError, match="state kind 'Other' is invalid"):
        cls.from_state({"kind": "Other", "version": 1})
    with pytest.raises(ValueError, match="state version 99 is not supported"):
        cls.from_state({"kind": cls.kind, "version": 99})
    with pytest.raises(ValueError, match="state is a list"):
        cls.from_state([])


@pytest.mark.parametrize("name, field", [
    ("ewma", "mean"),
    ("cusum", "upper"),
    ("page_hinkley", "up"),
    ("theil_sen", "times"),
    ("monitor", "last_alarm_t"),
])
def test_from_state_rejects_missing_field(name, field):
    detector = DETECTOR_FACTORIES[name]()
    state = detector.state()
    del state[field]
    with pytest.raises(ValueError, match=f"state has no field '{field}'"):
        type(detector).from_state(state)


def test_from_state_rejects_nan_field():
    state = EwmaBaseline(10.0).state()
    state["mean"] = math.nan
    with pytest.raises(ValueError, match="state field mean=nan is not finite"):
        EwmaBaseline.from_state(state)
    state = EwmaBaseline(10.0).state()
    state["params"]["bogus"] = 1
    with pytest.raises(ValueError, match="EwmaBaseline state is invalid"):
        EwmaBaseline.from_state(state)


def test_from_state_rejects_unordered_window():
    detector = TheilSenSlope(100.0)
    for t in (1.0, 2.0, 3.0):
        detector.update(t, t)
    state = detector.state()
    state["times"] = [1.0, 3.0, 2.0]
    with pytest.raises(ValueError, match="t=2.0 is not after the previous time 3.0"):
        TheilSenSlope.from_state(state)


# ---------------------------------------------------------------------------------------
# CUSUM
# ---------------------------------------------------------------------------------------


def shifted_series(rng, n, shifts):
    """Gaussian noise with level shifts: `shifts` maps a start index to the new level."""
    values = rng.standard_normal(n)
    level = np.zeros(n)
    for start, new_level in sorted(shifts.items()):
        level[start:] = new_level
    return values + level


@pytest.mark.parametrize("drift, threshold", [(0.5, 5.0), (0.25, 8.0), (1.0, 3.0)])
def test_cusum_matches_batch_sums(drift, threshold):
    rng = np.random.default_rng(3)
    n = 600
    times = irregular_times(rng, n, 30.0, gaps={250: 900.0})
    values = shifted_series(rng, n, {200: 2.0, 400: -1.0})
    tau, learning_time, learning_samples = 1800.0, 1200.0, 20
    z = zscores_reference(times, values, tau, 1e-9)
    learning = learning_flags(times, learning_time, learning_samples)
    scored = [not learning[k] and z[k] is not None for k in range(n)]
    expected = cusum_reference(times, [0.0 if v is None else v for v in z], scored, drift, threshold)

    detector = Cusum(tau, drift=drift, threshold=threshold, learning_time=learning_time,
                     learning_samples=learning_samples)
    found = []
    for t, x in zip(times, values):
        change = detector.update(t, x)
        if change is not None:
            found.append((change.t, change.direction, change.statistic))
    assert len(expected) >= 3
    assert [(t, d) for t, d, _ in found] == [(t, d) for t, d, _ in expected]
    for (_, _, got), (_, _, want) in zip(found, expected):
        assert got == pytest.approx(want, rel=1e-9)


def test_cusum_sums_follow_recursion():
    rng = np.random.default_rng(4)
    times = np.arange(300.0)
    values = shifted_series(rng, 300, {150: 1.5})
    z = zscores_reference(times, values, 50.0, 1e-9)
    detector = Cusum(50.0, drift=0.5, threshold=1e9, learning_time=0.0, learning_samples=10)
    upper = lower = 0.0
    for k, (t, x) in enumerate(zip(times, values)):
        detector.update(t, x)
        if k >= 10:
            upper = max(0.0, upper + z[k] - 0.5)
            lower = max(0.0, lower - z[k] - 0.5)
        assert detector.upper == pytest.approx(upper, rel=1e-9, abs=1e-12), k
        assert detector.lower == pytest.approx(lower, rel=1e-9, abs=1e-12), k


def test_cusum_detects_step_quickly():
    rng = np.random.default_rng(5)
    values = shifted_series(rng, 400, {300: -3.0})
    detector = Cusum(100.0, drift=0.5, threshold=5.0, learning_time=0.0, learning_samples=50)
    changes = [c for k, x in enumerate(values) if (c := detector.update(float(k), x)) is not None]
    after = [c for c in changes if c.t >= 300]
    assert after, changes
    assert after[0].direction == "down"
    assert after[0].t <= 305
    assert after[0].detector == "cusum"


# ---------------------------------------------------------------------------------------
# Page-Hinkley
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta, threshold", [(0.5, 20.0), (0.1, 50.0), (1.0, 10.0)])
def test_page_hinkley_matches_batch_sums(delta, threshold):
    rng = np.random.default_rng(6)
    n = 800
    times = irregular_times(rng, n, 10.0)
    values = 5.0 + 0.5 * shifted_series(rng, n, {300: 1.5, 550: -2.0})
    learning_time, learning_samples, min_std = 500.0, 30, 1e-9
    expected = page_hinkley_reference(times, values, delta, threshold, learning_time, learning_samples, min_std)
    detector = PageHinkley(delta=delta, threshold=threshold, learning_time=learning_time,
                           learning_samples=learning_samples, min_std=min_std)
    found = []
    for t, x in zip(times, values):
        change = detector.update(t, x)
        if change is not None:
            found.append((change.t, change.direction, change.statistic))
    assert len(expected) >= 2
    assert [(t, d) for t, d, _ in found] == [(t, d) for t, d, _ in expected]
    for (_, _, got), (_, _, want) in zip(found, expected):
        assert got == pytest.approx(want, rel=1e-9)


def test_page_hinkley_scale_from_learning():
    values = [1.0, 3.0, 1.0, 3.0, 2.0]
    detector = PageHinkley(learning_samples=4, learning_time=0.0)
    for k, x in enumerate(values):
        detector.update(float(k), x)
    assert detector.scale == pytest.approx(np.std(values[:4]))


def test_page_hinkley_finds_drift_cusum_follows():
    # A drift of 0.02 standard deviations per value: the EWMA lags it by 0.02 * 24 = 0.5
    # standard deviations, below the CUSUM drift, but the running mean falls far behind.
    rng = np.random.default_rng(7)
    n = 24 * 30
    values = rng.standard_normal(n)
    values[24 * 10:] += 0.02 * np.arange(n - 24 * 10)
    times = np.arange(n) * HOUR
    cusum = Cusum(DAY, drift=1.5, threshold=10.0, learning_time=7 * DAY, learning_samples=100)
    page_hinkley = PageHinkley(delta=0.5, threshold=100.0, learning_time=7 * DAY, learning_samples=100)
    cusum_changes = [c for t, x in zip(times, values) if (c := cusum.update(t, x)) is not None]
    ph_changes = [c for t, x in zip(times, values) if (c := page_hinkley.update(t, x)) is not None]
    assert cusum_changes == []
    assert ph_changes
    assert ph_changes[0].direction == "up"
    assert ph_changes[0].t > 10 * DAY


# ---------------------------------------------------------------------------------------
# Learning period and reset
# ---------------------------------------------------------------------------------------


def test_learning_period_raises_nothing():
    values = np.concatenate([np.zeros(20), np.full(20, 100.0)])
    noise = np.random.default_rng(8).standard_normal(40) * 0.1
    cusum = Cusum(10.0, learning_time=0.0, learning_samples=40)
    page_hinkley = PageHinkley(learning_time=0.0, learning_samples=40, threshold=1.0)
    for k, x in enumerate(values + noise):
        assert cusum.update(float(k), x) is None
        assert page_hinkley.update(float(k), x) is None


def test_learning_needs_time_and_samples():
    baseline = EwmaBaseline(10.0, learning_time=100.0, learning_samples=5)
    flags = [baseline.update(float(t), 1.0).learning for t in (0, 1, 2, 3, 4, 5, 99, 100, 101)]
    assert flags == [True, True, True, True, True, True, True, False, False]
    baseline = EwmaBaseline(10.0, learning_time=2.0, learning_samples=5)
    flags = [baseline.update(float(t), 1.0).learning for t in range(7)]
    assert flags == [True, True, True, True, True, False, False]


def test_learning_time_defaults_to_time_constant():
    assert EwmaBaseline(300.0).learning_time == 300.0
    assert Cusum(300.0).baseline.learning_time == 300.0


@pytest.mark.parametrize("make", [
    lambda: Cusum(50.0, learning_time=100.0, learning_samples=30),
    lambda: PageHinkley(threshold=5.0, learning_time=100.0, learning_samples=30),
], ids=["cusum", "page_hinkley"])
def test_reset_starts_new_learning(make):
    rng = np.random.default_rng(9)
    detector = make()
    for k in range(200):
        detector.update(float(k), rng.standard_normal())
    detector.reset()
    # After maintenance the level is different; the new learning period absorbs it.
    for k in range(200, 300):
        assert detector.update(float(k), 50.0 + rng.standard_normal()) is None
    assert detector.update(300.0, 80.0) is not None


def test_reset_matches_new_detector():
    rng = np.random.default_rng(10)
    times = np.arange(100.0)
    values = rng.standard_normal(100)
    used = Cusum(20.0, learning_samples=10)
    for t, x in zip(times, values):
        used.update(t, x + 5.0)
    used.reset()
    fresh = Cusum(20.0, learning_samples=10)
    for t, x in zip(times, values):
        assert used.update(t, x) == fresh.update(t, x)
    assert used.state() == fresh.state()


# ---------------------------------------------------------------------------------------
# Theil-Sen slope and forecast
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_points, max_span, decimals", [(40, 1e9, 6), (500, 3000.0, 6), (30, 1500.0, 0)])
def test_theil_sen_matches_scipy(max_points, max_span, decimals):
    rng = np.random.default_rng(11)
    n = 200
    times = irregular_times(rng, n, 20.0, gaps={120: 2000.0})
    # Rounding to whole units makes tied values, which change the interval.
    values = np.round(0.01 * (times - times[0]) + 3.0 * rng.standard_normal(n), decimals)
    detector = TheilSenSlope(max_span, max_points=max_points, min_points=3, confidence=0.9)
    compared = 0
    for k, (t, x) in enumerate(zip(times, values)):
        detector.update(t, x)
        window = window_reference(times, values, k, max_points, max_span)
        estimate = detector.estimate()
        assert len(detector) == len(window), k
        if len(window) < 3:
            assert estimate is None
            continue
        want = stats.theilslopes(values[window], times[window] - times[k], 0.9, method="joint")
        assert estimate.slope == pytest.approx(want.slope, rel=1e-12, abs=1e-15), k
        assert estimate.level == pytest.approx(want.intercept, rel=1e-12, abs=1e-12), k
        assert estimate.low == pytest.approx(want.low_slope, rel=1e-12, abs=1e-15), k
        assert estimate.high == pytest.approx(want.high_slope, rel=1e-12, abs=1e-15), k
        assert estimate.points == len(window)
        assert estimate.span == pytest.approx(times[k] - times[window[0]])
        compared += 1
    assert compared > 150


def ramp_detector(slope, noise, n=100, step=60.0, seed=12, **options):
    rng = np.random.default_rng(seed)
    detector = TheilSenSlope(1e6, max_points=200, **options)
    for k in range(n):
        detector.update(k * step, 10.0 + slope * k * step + noise * rng.standard_normal())
    return detector


def test_forecast_upper_limit_crossing():
    detector = ramp_detector(0.001, 0.05)
    forecast = detector.forecast(20.0, "upper")
    # The true line reaches 20 at t = 10 000 s; the latest value is at 5 940 s.
    assert isinstance(forecast, Forecast)
    assert forecast.time_to_crossing == pytest.approx(10000.0 - 5940.0, rel=0.05)
    assert forecast.crossing_time == pytest.approx(forecast.t + forecast.time_to_crossing)
    assert forecast.earliest < forecast.time_to_crossing < forecast.latest
    assert forecast.earliest <= 4060.0 <= forecast.latest
    assert not forecast.crossed


def test_forecast_lower_limit_crossing():
    detector = ramp_detector(-0.001, 0.05)
    forecast = detector.forecast(5.0, "lower")
    # The true line reaches 5 at t = 5 000 s... already passed at 5 940 s, so use 2.
    assert forecast.crossed
    forecast = detector.forecast(2.0, "lower")
    assert forecast.time_to_crossing == pytest.approx(8000.0 - 5940.0, rel=0.05)
    assert forecast.earliest < forecast.time_to_crossing < forecast.latest


def test_forecast_interval_from_slope_bounds():
    detector = ramp_detector(0.002, 0.5)
    estimate = detector.estimate()
    forecast = detector.forecast(30.0, "upper")
    distance = 30.0 - estimate.level
    assert forecast.time_to_crossing == pytest.approx(distance / estimate.slope)
    assert forecast.earliest == pytest.approx(distance / estimate.high)
    assert forecast.latest == pytest.approx(distance / estimate.low)


def test_forecast_none_moving_away():
    detector = ramp_detector(-0.001, 0.05)
    assert detector.estimate().significant
    assert detector.forecast(20.0, "upper") is None


def test_forecast_none_when_not_significant():
    detector = ramp_detector(0.0, 1.0)
    estimate = detector.estimate()
    assert estimate.low < 0.0 < estimate.high
    assert not estimate.significant
    assert detector.forecast(20.0, "upper") is None
    assert detector.forecast(0.0, "lower") is None


def test_forecast_none_for_tiny_slope():
    detector = TheilSenSlope(1e9, min_points=3)
    for k in range(10):
        detector.update(float(k), 1e-300 * k)
    assert detector.estimate().significant
    assert detector.forecast(1e10, "upper") is None


def test_forecast_flat_series():
    detector = TheilSenSlope(1e9, min_points=3)
    for k in range(10):
        detector.update(float(k), 5.0)
    estimate = detector.estimate()
    assert estimate.slope == 0.0
    assert estimate.low == 0.0
    assert estimate.high == 0.0
    assert not estimate.significant
    assert detector.forecast(6.0, "upper") is None


def test_forecast_already_crossed():
    detector = ramp_detector(0.001, 0.05)
    forecast = detector.forecast(12.0, "upper")
    assert forecast.crossed
    assert forecast.time_to_crossing == 0.0
    assert forecast.earliest == 0.0
    assert forecast.latest == 0.0
    assert forecast.crossing_time == forecast.t


def test_forecast_none_during_learning():
    detector = ramp_detector(0.001, 0.05, n=100, learning_samples=100)
    assert detector.estimate() is not None
    assert detector.forecast(20.0, "upper") is None
    detector.update(100 * 60.0, 16.0)
    assert detector.forecast(20.0, "upper") is not None


def test_forecast_rejects_bad_arguments():
    detector = ramp_detector(0.001, 0.05)
    with pytest.raises(ValueError, match="kind='above' is invalid"):
        detector.forecast(20.0, "above")
    with pytest.raises(ValueError, match="limit=nan is not finite"):
        detector.forecast(math.nan, "upper")


def test_slope_reset_empties_window():
    detector = ramp_detector(0.001, 0.05, learning_samples=10)
    detector.reset()
    assert len(detector) == 0
    assert detector.estimate() is None
    assert detector.learning
    detector.update(0.0, 1.0)
    assert len(detector) == 1


def test_slope_window_drops_old_values():
    detector = TheilSenSlope(100.0, max_points=5, min_points=3)
    for t in (0.0, 10.0, 20.0, 200.0):
        detector.update(t, t)
    assert len(detector) == 1
    for t in (201.0, 202.0, 203.0, 204.0, 205.0):
        detector.update(t, t)
    assert len(detector) == 5
    assert detector.estimate().span == 4.0


# ---------------------------------------------------------------------------------------
# Change monitor
# ---------------------------------------------------------------------------------------


def test_monitor_applies_refractory_period():
    rng = np.random.default_rng(13)
    n = 1500
    times = irregular_times(rng, n, 1.0)
    values = shifted_series(rng, n, {400: 3.0, 430: 0.0, 460: 3.0, 900: -3.0})

    def make_detectors():
        return (Cusum(100.0, learning_samples=100, threshold=5.0),
                PageHinkley(learning_samples=100, threshold=30.0))

    # Batch: the change points of each detector run alone, merged, then thinned.
    cusum, page_hinkley = make_detectors()
    merged = []
    for t, x in zip(times, values):
        changes = [detector.update(t, x) for detector in (cusum, page_hinkley)]
        changes = [change for change in changes if change is not None]
        if changes:
            merged.append(changes[0])
    refractory = 200.0
    expected = []
    for change in merged:
        if not expected or change.t - expected[-1].t >= refractory:
            expected.append(change)

    monitor = ChangeMonitor(*make_detectors(), refractory=refractory)
    alarms = [a for t, x in zip(times, values) if (a := monitor.update(t, x)) is not None]
    assert len(merged) > len(alarms) >= 2
    assert alarms == expected


def test_monitor_prefers_cusum_on_same_value():
    monitor = ChangeMonitor(Cusum(10.0, learning_samples=20, learning_time=0.0, threshold=3.0),
                            PageHinkley(learning_samples=20, threshold=3.0), refractory=0.0)
    rng = np.random.default_rng(14)
    for k in range(20):
        monitor.update(float(k), rng.standard_normal())
    alarm = monitor.update(20.0, 100.0)
    assert isinstance(alarm, ChangePoint)
    assert alarm.detector == "cusum"
    assert alarm.direction == "up"


def test_monitor_reset_resets_detectors():
    monitor = ChangeMonitor(Cusum(10.0), PageHinkley(), refractory=5.0)
    for k in range(50):
        monitor.update(float(k), float(k % 4))
    monitor.reset()
    assert monitor.last_alarm_t is None
    assert monitor.cusum.last_t is None
    assert monitor.page_hinkley.last_t is None
    monitor.update(0.0, 1.0)


# ---------------------------------------------------------------------------------------
# State: save, restore, continue
# ---------------------------------------------------------------------------------------


def slope_output(detector):
    return (detector.estimate(), detector.forecast(40.0, "upper"), detector.forecast(-40.0, "lower"))


STATEFUL = [
    (lambda: EwmaBaseline(300.0, learning_samples=10, max_gap=5000.0), lambda d, step: step),
    (lambda: Cusum(300.0, drift=0.5, threshold=4.0, learning_samples=10), lambda d, step: (step, d.upper, d.lower)),
    (lambda: PageHinkley(delta=0.2, threshold=15.0, learning_samples=10), lambda d, step: (step, d.up, d.down)),
    (lambda: TheilSenSlope(3000.0, max_points=40, min_points=5, learning_samples=20), lambda d, step: slope_output(d)),
    (lambda: ChangeMonitor(Cusum(300.0, threshold=4.0, learning_samples=10),
                           PageHinkley(threshold=15.0, learning_samples=10), refractory=600.0),
     lambda d, step: step),
]


STATEFUL_IDS = ["ewma", "cusum", "page_hinkley", "theil_sen", "monitor"]


def state_test_series(seed=15, n=260):
    rng = np.random.default_rng(seed)
    times = irregular_times(rng, n, 30.0, gaps={n // 2: 8000.0})
    values = shifted_series(rng, n, {60: 2.0, 150: -2.0}) + 0.01 * np.arange(n)
    return times, values


@pytest.mark.parametrize("make, output", STATEFUL, ids=STATEFUL_IDS)
def test_restore_every_step_matches(make, output):
    times, values = state_test_series()
    reset_at = 200
    straight = make()
    restored = make()
    for k, (t, x) in enumerate(zip(times, values)):
        restored = type(restored).from_state(roundtrip(restored.state()))
        if k == reset_at:
            straight.reset()
            restored.reset()
        want = output(straight, straight.update(t, x))
        got = output(restored, restored.update(t, x))
        assert got == want, k
        assert restored.state() == straight.state(), k


@pytest.mark.parametrize("make, output", STATEFUL, ids=STATEFUL_IDS)
def test_restore_from_any_step_continues(make, output):
    times, values = state_test_series(seed=16, n=120)
    straight = make()
    outputs = [output(straight, straight.update(t, x)) for t, x in zip(times, values)]
    for stop in range(0, 120, 7):
        first = make()
        for t, x in zip(times[:stop], values[:stop]):
            first.update(t, x)
        second = type(first).from_state(roundtrip(first.state()))
        for k in range(stop, 120):
            assert output(second, second.update(times[k], values[k])) == outputs[k], (stop, k)


@pytest.mark.parametrize("make, output", STATEFUL, ids=STATEFUL_IDS)
def test_state_is_plain_types(make, output):
    detector = make()
    json.dumps(detector.state(), allow_nan=False)
    times, values = state_test_series(n=80)
    for t, x in zip(times, values):
        detector.update(t, x)
    state = detector.state()
    assert json.loads(json.dumps(state, allow_nan=False)) == state
    assert msgpack.unpackb(msgpack.packb(state), raw=False) == state


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(0.001, 5000.0), st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)),
        min_size=1, max_size=40),
    tau=st.floats(1.0, 1000.0),
)
def test_ewma_and_restore_random(steps, tau):
    times = 1000.0 + np.cumsum([dt for dt, _ in steps])
    values = np.array([x for _, x in steps])
    means, stds = ewma_reference(times, values, tau)
    straight = EwmaBaseline(tau, learning_samples=1)
    restored = EwmaBaseline(tau, learning_samples=1)
    for k, (t, x) in enumerate(zip(times, values)):
        restored = EwmaBaseline.from_state(roundtrip(restored.state()))
        want = straight.update(t, x)
        assert restored.update(t, x) == want
        assert straight.mean == pytest.approx(means[k], rel=1e-9, abs=1e-9)
        assert (straight.std is None) == (stds[k] is None)
        if stds[k] is not None:
            assert straight.std == pytest.approx(stds[k], rel=1e-6, abs=1e-6)
