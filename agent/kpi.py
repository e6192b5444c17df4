"""Edge KPIs: device state time and fault episodes, energy, scans and energy per scan.

The central side computes availability, MTTR and MTBF from the state times and the fault
episodes. The gateway computes what needs the full-rate data: energy from the meter's
counter, and scans from the power signature between polls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config_errors import ConfigError, Section

KPI_TYPES = ("energy", "scans", "hours")
STATES = ("normal", "degraded", "fault")


@dataclass(frozen=True)
class KpiConfig:
    """One `[[kpi]]` table: what to derive from which point of which source.

    energy: `point` is an energy counter in kWh (import energy); scans: `point` is active
    power in W, a scan is a stretch above `threshold` lasting at least `min_duration_s`;
    hours: `point` is an operating-hours counter in h.
    """

    source: str
    type: str
    point: str
    threshold: float
    min_duration_s: float


def parse_kpi(s: Section) -> KpiConfig:
    kpi_type = s.string("type", choices=KPI_TYPES)
    cfg = KpiConfig(
        source=s.string("source"),
        type=kpi_type,
        point=s.string("point"),
        threshold=s.number("threshold", lo=0.0) if kpi_type == "scans" else s.number("threshold", 0.0),
        min_duration_s=s.number("min_duration_s", 30.0, lo=0.0),
    )
    s.finish()
    return cfg


def device_state(alarms: list[dict[str, Any]]) -> str:
    """Return "fault" with a severe or critical alarm active, "degraded" with a general one, else "normal"."""
    grades = {a.get("grade") for a in alarms}
    if grades & {"severe", "critical"}:
        return "fault"
    if "general" in grades:
        return "degraded"
    return "normal"


class ScanCounter:
    """Count scans in a power signal: stretches above a threshold, with energy per scan.

    Power is integrated with the trapezoid rule between polls (t in seconds, W), so the
    energy of a scan is its time above the threshold times its mean power. A stretch
    shorter than `min_duration_s` (a pump starting, a spike) is not a scan.
    """

    def __init__(self, threshold_w: float, min_duration_s: float) -> None:
        self.threshold_w = threshold_w
        self.min_duration_s = min_duration_s
        self._last: tuple[float, float] | None = None
        self._start: float | None = None
        self._energy_j = 0.0
        self.completed: list[tuple[float, float, float]] = []  # (start, end, kWh)

    def add(self, t: float, power_w: float) -> None:
        if not math.isfinite(power_w):
            return
        if self._last is not None and t > self._last[0]:
            t0, p0 = self._last
            if self._start is not None:
                self._energy_j += 0.5 * (p0 + power_w) * (t - t0)
        above = power_w >= self.threshold_w
        if above and self._start is None:
            self._start = t
            self._energy_j = 0.0
        elif not above and self._start is not None:
            if t - self._start >= self.min_duration_s:
                self.completed.append((self._start, t, self._energy_j / 3.6e6))
            self._start = None
        self._last = (t, power_w)

    def take(self) -> tuple[int, float]:
        """Return (scans completed since the last call, their energy in kWh)."""
        scans, self.completed = self.completed, []
        return len(scans), sum(e for _, _, e in scans)


class KpiTracker:
    """KPIs of one source across summary windows."""

    def __init__(self, source: str, configs: list[KpiConfig]) -> None:
        self.source = source
        self.configs = configs
        self.scans = {c.point: ScanCounter(c.threshold, c.min_duration_s) for c in configs if c.type == "scans"}
        self._energy_last: dict[str, float] = {}
        self.state = "normal"
        self.fault_since: float | None = None

    def add_reading(self, point: str, t: float, value: float) -> None:
        counter = self.scans.get(point)
        if counter is not None:
            counter.add(t, value)

    def summarise(self, features: dict[str, Any], alarms: list[dict], t_start: float, t_end: float,
                  duration_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Return (KPI features, episode records) for one window."""
        out: dict[str, Any] = {}
        episodes: list[dict[str, Any]] = []
        state = device_state(alarms)
        for name in STATES:
            out[f"time_{name}_s"] = duration_s if name == state else 0.0
        out["device_state"] = state
        if state == "fault" and self.fault_since is None:
            self.fault_since = t_end
        elif state != "fault" and self.fault_since is not None:
            episodes.append({"start": self.fault_since, "end": t_end, "duration_s": t_end - self.fault_since})
            self.fault_since = None
        if self.fault_since is not None:
            out["fault_since"] = self.fault_since
        self.state = state

        for cfg in self.configs:
            point = features.get(cfg.point)
            if cfg.type == "energy" and isinstance(point, dict) and isinstance(point.get("last"), (int, float)):
                now = float(point["last"])
                previous = self._energy_last.get(cfg.point)
                self._energy_last[cfg.point] = now
                if previous is not None and now >= previous:
                    out["energy_kwh"] = now - previous
                    if duration_s > 0:
                        out["energy_kwh_per_h"] = (now - previous) * 3600.0 / duration_s
            elif cfg.type == "hours" and isinstance(point, dict) and isinstance(point.get("last"), (int, float)):
                out["operating_hours"] = float(point["last"])
            elif cfg.type == "scans":
                scans, energy = self.scans[cfg.point].take()
                out["scans"] = scans
                out["scan_energy_kwh"] = energy
                if scans:
                    out["energy_per_scan_kwh"] = energy / scans
        return out, episodes

    def state_dict(self) -> dict[str, Any]:
        return {"energy_last": dict(self._energy_last), "fault_since": self.fault_since}

    def restore(self, state: dict[str, Any]) -> None:
        energy = state.get("energy_last", {})
        if isinstance(energy, dict):
            self._energy_last = {k: float(v) for k, v in energy.items() if isinstance(v, (int, float))}
        since = state.get("fault_since")
        self.fault_since = float(since) if isinstance(since, (int, float)) else None


def check_sources(file: str, kind: str, items: list[Any], sources: set[str]) -> None:
    """Raise ConfigError if an alarm or KPI table names a source that is not configured."""
    for i, item in enumerate(items):
        if item.source not in sources:
            raise ConfigError(file, f"{kind}[{i}].source", item.source,
                              "the id of a configured source: " + ", ".join(sorted(sources)))
