"""Alarm rules: state machine, grades, hysteresis, forecasts and state persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.alarms import DEFAULT_RESPONSE_S, AlarmEngine, RuleConfig, parse_rule
from agent.config_errors import ConfigError, Section


def _rule(**overrides) -> RuleConfig:
    base = dict(name="r", source="cpa", metric="low_pressure", type="below", grade="severe", limit=70.0,
                hysteresis=2.0, min_duration_s=0.0, time_constant_s=3600.0, window_s=86400.0,
                horizon_s=86400.0, direction="lower", learning_s=0.0, learning_samples=10)
    base.update(overrides)
    return RuleConfig(**base)


def _feed(engine, values, t0=0.0, dt=60.0, metric="low_pressure"):
    events = []
    for i, v in enumerate(values):
        active, ev = engine.evaluate("cpa", t0 + i * dt, {metric: {"mean": v, "last": v}})
        events.extend((t0 + i * dt, kind, alarm) for kind, alarm in ev)
    return events, active


def test_below_limit_raises_once_and_clears_with_hysteresis():
    engine = AlarmEngine([_rule()], DEFAULT_RESPONSE_S)
    events, active = _feed(engine, [80, 69, 68, 69, 71, 71.5, 72.5])
    kinds = [(t, k) for t, k, _ in events]
    assert kinds == [(60.0, "raised"), (360.0, "cleared")]
    assert active == []


def test_min_duration_suppresses_blip():
    engine = AlarmEngine([_rule(min_duration_s=150.0)], DEFAULT_RESPONSE_S)
    events, _ = _feed(engine, [80, 69, 80, 69, 68, 67, 66])
    # Pending from 180 s (the blip at 60 s reset it): 150 s later, at 360 s, it is raised.
    assert [(t, k) for t, k, _ in events] == [(360.0, "raised")]


def test_active_alarm_listed_every_window():
    engine = AlarmEngine([_rule()], DEFAULT_RESPONSE_S)
    _feed(engine, [60])
    active, events = engine.evaluate("cpa", 120.0, {"low_pressure": {"mean": 59.0}})
    assert events == []
    assert [a["name"] for a in active] == ["r"]
    assert active[0]["grade"] == "severe"
    assert "respond within 60 min" in active[0]["message"]


def test_forecast_rule_gives_lead_time():
    # Pressure falls 1 psi per hour from 95 psi: the 70 psi limit is 25 h ahead.
    rule = _rule(type="forecast", limit=70.0, horizon_s=30 * 3600.0, name="helium_forecast", grade="general")
    engine = AlarmEngine([rule], DEFAULT_RESPONSE_S)
    rng = np.random.default_rng(1)
    values = 95.0 - np.arange(30) / 60.0 + rng.normal(0, 0.02, 30)
    events, active = _feed(engine, values, dt=60.0)
    raised = [a for _, k, a in events if k == "raised"]
    assert raised, "forecast rule did not raise"
    lead_h = raised[0]["value"] / 3600.0
    assert 20.0 < lead_h < 30.0
    assert "reaches 70" in raised[0]["message"]
    assert " h (between " in raised[0]["message"]


def test_forecast_ignores_rising_trend():
    rule = _rule(type="forecast", limit=70.0, horizon_s=30 * 3600.0)
    engine = AlarmEngine([rule], DEFAULT_RESPONSE_S)
    events, _ = _feed(engine, 95.0 + np.arange(30) / 60.0)
    assert events == []


def test_baseline_rule_after_learning():
    rule = _rule(type="baseline", metric="bpfi_envelope", limit=4.0, time_constant_s=3600.0,
                 learning_samples=20, learning_s=0.0, hysteresis=1.0)
    engine = AlarmEngine([rule], DEFAULT_RESPONSE_S)
    rng = np.random.default_rng(2)
    values = list(0.01 + 0.001 * rng.standard_normal(40)) + [0.03, 0.03]
    events, _ = _feed(engine, values, metric="bpfi_envelope")
    assert [k for _, k, _ in events] == ["raised"]
    assert events[0][0] == 40 * 60.0


def test_rule_state_round_trips_through_json():
    rule = _rule(type="forecast", limit=70.0, horizon_s=30 * 3600.0)
    first = AlarmEngine([rule], DEFAULT_RESPONSE_S)
    values = 95.0 - np.arange(20) / 60.0
    _feed(first, values)
    saved = json.loads(json.dumps(first.state()))
    second = AlarmEngine([rule], DEFAULT_RESPONSE_S)
    assert second.restore(saved) == 1
    tail = 95.0 - np.arange(20, 30) / 60.0
    a, _ = _feed(first, tail, t0=20 * 60.0)
    b, _ = _feed(second, tail, t0=20 * 60.0)
    assert [(t, k) for t, k, _ in a] == [(t, k) for t, k, _ in b]


def test_reset_forgets_baseline():
    engine = AlarmEngine([_rule()], DEFAULT_RESPONSE_S)
    _feed(engine, [60])
    assert engine.reset_source("cpa") == 1
    active, _ = engine.evaluate("cpa", 600.0, {"low_pressure": {"mean": 80.0}})
    assert active == []


def test_missing_metric_keeps_state():
    engine = AlarmEngine([_rule()], DEFAULT_RESPONSE_S)
    _feed(engine, [60])
    active, events = engine.evaluate("cpa", 120.0, {})
    assert events == []
    assert len(active) == 1


@pytest.mark.parametrize("table, key", [
    ({"name": "x", "source": "s", "metric": "m", "type": "sideways", "limit": 1}, "alarm[0].type"),
    ({"name": "x", "source": "s", "metric": "m", "type": "above"}, "alarm[0].limit"),
    ({"name": "x", "source": "s", "metric": "m", "type": "above", "limit": 1, "grade": "urgent"}, "alarm[0].grade"),
    ({"name": "x", "source": "s", "metric": "m", "type": "baseline", "limit": -1}, "alarm[0].limit"),
    ({"name": "x", "source": "s", "metric": "m", "type": "above", "limit": 1, "hysterisis": 1}, "alarm[0].hysterisis"),
])
def test_invalid_rule_named(table, key):
    with pytest.raises(ConfigError) as err:
        parse_rule(Section("agent.toml", "alarm[0]", table))
    assert err.value.key == key
