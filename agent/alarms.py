"""Alarm rules: limits, baselines, rates of change and forecasts, graded by response.

Hospitals grade faults by the response they need: general (respond within 30 minutes),
severe (an engineer on site within one hour), critical (the emergency plan at once). Each
rule watches one metric of one source, evaluated once per summary, and keeps this state:

    inactive --condition holds--> pending --for min_duration_s--> active (event "raised")
    active --condition clear beyond the hysteresis--> inactive (event "cleared")

An active alarm is listed in every summary of its source, so the central side always
has the current list, but its event is written once: repeats are not events. The detectors
behind baseline, rate and forecast rules keep their state in a plain dict that the
service stores beside the buffer, so a restart resumes where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config_errors import ConfigError, Section
from .dsp import Cusum, EwmaBaseline, PageHinkley, ChangeMonitor, TheilSenSlope

GRADES = ("general", "severe", "critical")
# Response targets in seconds for each grade, the defaults of the grading above.
DEFAULT_RESPONSE_S = {"general": 1800.0, "severe": 3600.0, "critical": 0.0}
RULE_TYPES = ("above", "below", "baseline", "change", "rate", "forecast")


@dataclass(frozen=True)
class RuleConfig:
    """One alarm rule from a `[[alarm]]` table.

    above/below: the value is over/under `limit`; baseline: |z| against an EWMA baseline
    (time constant `time_constant_s`) reaches `limit`; change: CUSUM or Page-Hinkley finds
    a level change; rate: the Theil-Sen slope over `window_s` exceeds `limit` per hour
    (negative limits watch falling values); forecast: the trend reaches `limit` within
    `horizon_s` (`direction` "upper" or "lower").
    """

    name: str
    source: str
    metric: str
    type: str
    grade: str
    limit: float
    hysteresis: float
    min_duration_s: float
    time_constant_s: float
    window_s: float
    horizon_s: float
    direction: str
    learning_s: float
    learning_samples: int


def parse_rule(s: Section) -> RuleConfig:
    """Read one `[[alarm]]` table."""
    rule_type = s.string("type", choices=RULE_TYPES)
    name = s.string("name")
    if rule_type == "change":
        s.raw("limit", None)  # accepted and ignored: a change rule has no limit
        limit = 0.0
    else:
        limit = s.number("limit")
    cfg = RuleConfig(
        name=name,
        source=s.string("source"),
        metric=s.string("metric"),
        type=rule_type,
        grade=s.string("grade", "general", choices=GRADES),
        limit=limit,
        hysteresis=s.number("hysteresis", 0.0, lo=0.0),
        min_duration_s=s.number("min_duration_s", 0.0, lo=0.0),
        time_constant_s=s.number("time_constant_s", 3600.0, lo=1e-3),
        window_s=s.number("window_s", 86400.0, lo=1e-3),
        horizon_s=s.number("horizon_s", 7 * 86400.0, lo=1e-3),
        direction=s.string("direction", "upper", choices=("upper", "lower")),
        learning_s=s.number("learning_s", 0.0, lo=0.0),
        learning_samples=s.integer("learning_samples", 30, lo=3),
    )
    if rule_type == "baseline" and cfg.limit <= 0:
        raise ConfigError(s.file, s.key("limit"), cfg.limit, "a positive number of standard deviations")
    s.finish()
    return cfg


def parse_grades(s: Section) -> dict[str, float]:
    """Read `[alarm_grades]`: response target in seconds per grade."""
    targets = {grade: s.number(f"{grade}_response_s", default, lo=0.0) for grade, default in DEFAULT_RESPONSE_S.items()}
    s.finish()
    return targets


class AlarmRule:
    """Runtime state of one rule."""

    def __init__(self, cfg: RuleConfig, response_s: dict[str, float]) -> None:
        self.cfg = cfg
        self.response_s = response_s[cfg.grade]
        self.active = False
        self.pending_since: float | None = None
        self.raised_at: float | None = None
        self.last_value: float | None = None
        self.detail: dict[str, Any] = {}
        self._detector: Any = self._make_detector()

    def _make_detector(self) -> Any:
        c = self.cfg
        learning = {"learning_time": c.learning_s, "learning_samples": c.learning_samples}
        if c.type == "baseline":
            return EwmaBaseline(c.time_constant_s, **learning)
        if c.type == "change":
            return ChangeMonitor(Cusum(c.time_constant_s, **learning),
                                 PageHinkley(learning_time=c.learning_s, learning_samples=c.learning_samples),
                                 refractory=c.time_constant_s)
        if c.type in ("rate", "forecast"):
            return TheilSenSlope(c.window_s, min_points=min(10, c.learning_samples), **learning)
        return None

    def reset(self) -> None:
        """Forget the learned baseline (after maintenance) and clear the alarm."""
        if self._detector is not None:
            self._detector.reset()
        self.active = False
        self.pending_since = None
        self.raised_at = None

    def state(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "pending_since": self.pending_since,
            "raised_at": self.raised_at,
            "detector": self._detector.state() if self._detector is not None else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.active = bool(state.get("active", False))
        self.pending_since = state.get("pending_since")
        self.raised_at = state.get("raised_at")
        if self._detector is not None and state.get("detector") is not None:
            self._detector = type(self._detector).from_state(state["detector"])

    def evaluate(self, t: float, value: float) -> tuple[bool, bool]:
        """Feed the window's value at time t; return (condition now, clear condition now)."""
        c = self.cfg
        self.last_value = value
        self.detail = {}
        if c.type == "above":
            return value > c.limit, value <= c.limit - c.hysteresis
        if c.type == "below":
            return value < c.limit, value >= c.limit + c.hysteresis
        if c.type == "baseline":
            step = self._detector.update(t, value)
            z = step.z if step is not None else None
            if z is None or step.learning:
                return False, True
            self.detail = {"z": z, "baseline": step.mean}
            return abs(z) >= c.limit, abs(z) <= max(0.0, c.limit - c.hysteresis)
        if c.type == "change":
            point = self._detector.update(t, value)
            if point is not None:
                self.detail = {"direction": point.direction, "detector": point.detector}
                return True, False
            # A change alarm clears once the detector has been quiet for its refractory time.
            quiet = self.raised_at is not None and t - self.raised_at > c.time_constant_s
            return False, quiet
        self._detector.update(t, value)
        estimate = self._detector.estimate()
        if c.type == "rate":
            if estimate is None or not estimate.significant:
                return False, True
            per_h = estimate.slope * 3600.0
            self.detail = {"slope_per_h": per_h}
            if c.limit >= 0:
                return per_h > c.limit, per_h <= c.limit - c.hysteresis
            return per_h < c.limit, per_h >= c.limit + c.hysteresis
        forecast = self._detector.forecast(c.limit, c.direction)
        if forecast is None:
            return False, True
        self.detail = {"time_to_crossing_s": forecast.time_to_crossing, "earliest_s": forecast.earliest,
                       "latest_s": forecast.latest, "slope_per_h": forecast.slope * 3600.0}
        return forecast.time_to_crossing <= c.horizon_s, forecast.time_to_crossing > c.horizon_s * 1.1

    def step(self, t: float, value: float) -> str | None:
        """Evaluate and advance the state machine; return "raised", "cleared" or None."""
        condition, clear = self.evaluate(t, value)
        if not self.active:
            if not condition:
                self.pending_since = None
                return None
            if self.pending_since is None:
                self.pending_since = t
            if t - self.pending_since >= self.cfg.min_duration_s:
                self.active = True
                self.raised_at = t
                return "raised"
            return None
        if clear:
            self.active = False
            self.pending_since = None
            return "cleared"
        return None

    def alarm_record(self, event: str | None = None) -> dict[str, Any]:
        """Return the summary-schema alarm entry for this rule."""
        c = self.cfg
        value = float(self.last_value) if self.last_value is not None else 0.0
        limit = float(c.limit)
        if c.type == "forecast" and "time_to_crossing_s" in self.detail:
            lead = _duration(self.detail["time_to_crossing_s"])
            low, high = _duration(self.detail["earliest_s"]), _duration(self.detail["latest_s"])
            spread = f" (between {low} and {high})" if low != high else ""
            message = (f"{c.metric} reaches {c.limit:g} ({c.direction} limit) in {lead}{spread}, "
                       f"trend {_number(self.detail['slope_per_h'])} per hour")
            value = float(self.detail["time_to_crossing_s"])
            limit = float(c.horizon_s)
        elif c.type == "rate" and "slope_per_h" in self.detail:
            message = f"{c.metric} changes by {_number(self.detail['slope_per_h'])} per hour (limit {c.limit:+g})"
            value = float(self.detail["slope_per_h"])
        elif c.type == "baseline" and "z" in self.detail:
            message = f"{c.metric} = {value:.4g} is {self.detail['z']:+.1f} sd from its baseline {self.detail['baseline']:.4g}"
        elif c.type == "change":
            message = f"{c.metric} changed level ({self.detail.get('direction', '?')}, {self.detail.get('detector', '?')})"
        elif event == "cleared":
            relation = "back below" if c.type == "above" else "back above"
            message = f"{c.metric} = {value:.4g} is {relation} the limit {c.limit:g}"
        else:
            relation = "above" if c.type == "above" else "below"
            message = f"{c.metric} = {value:.4g} is {relation} the limit {c.limit:g}"
        if event == "cleared":
            message = f"cleared: {message}"
        if not math.isfinite(value):
            value = 0.0
        return {"name": c.name, "grade": c.grade, "value": value, "limit": limit,
                "message": f"{message}; respond within {self.response_s / 60:.0f} min" if self.response_s
                else f"{message}; respond at once"}


class AlarmEngine:
    """All rules of one agent, grouped by source."""

    def __init__(self, rules: list[RuleConfig], response_s: dict[str, float]) -> None:
        self.rules = [AlarmRule(r, response_s) for r in rules]
        self.by_source: dict[str, list[AlarmRule]] = {}
        for rule in self.rules:
            self.by_source.setdefault(rule.cfg.source, []).append(rule)

    def evaluate(self, source: str, t: float, features: dict[str, Any]) -> tuple[list[dict], list[tuple[str, dict]]]:
        """Evaluate the rules of `source` on one summary's features.

        Returns (alarms active now, events) where events are ("raised" or "cleared", alarm).
        A metric is a feature name; for polled points it is the point name, whose window
        mean is used (its last value for strings and counters without a mean).
        """
        active: list[dict] = []
        events: list[tuple[str, dict]] = []
        for rule in self.by_source.get(source, []):
            value = metric_value(features, rule.cfg.metric)
            if value is None:
                if rule.active:
                    active.append(rule.alarm_record())
                continue
            event = rule.step(t, value)
            if event is not None:
                events.append((event, rule.alarm_record(event)))
            if rule.active:
                active.append(rule.alarm_record())
        return active, events

    def reset_source(self, source: str) -> int:
        """Reset every rule of `source`; return how many were reset."""
        rules = self.by_source.get(source, [])
        for rule in rules:
            rule.reset()
        return len(rules)

    def state(self) -> dict[str, Any]:
        return {f"{r.cfg.source}/{r.cfg.name}": r.state() for r in self.rules}

    def restore(self, states: dict[str, Any]) -> int:
        """Restore rule states by source/name; unknown or invalid entries are skipped."""
        restored = 0
        for rule in self.rules:
            state = states.get(f"{rule.cfg.source}/{rule.cfg.name}")
            if state is None:
                continue
            try:
                rule.restore(state)
            except (ValueError, KeyError, TypeError):
                continue
            restored += 1
        return restored


def _number(value: float) -> str:
    """Format a signed value without scientific notation for everyday magnitudes."""
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:+.3g}"
    return f"{value:+,.4g}" if abs(value) >= 1000 else f"{value:+.4g}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def metric_value(features: dict[str, Any], metric: str) -> float | None:
    """Return a numeric metric from summary features, or None when it is absent."""
    value = features.get(metric)
    if isinstance(value, dict):
        value = value.get("mean", value.get("last"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
