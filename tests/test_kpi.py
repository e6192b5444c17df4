"""Edge KPIs: scan counting from a power signature, energy, device state and fault episodes."""

from __future__ import annotations

import pytest

from agent.kpi import KpiConfig, KpiTracker, ScanCounter, device_state


def test_scan_counter_counts_long_stretches():
    counter = ScanCounter(threshold_w=30000.0, min_duration_s=5.0)
    # Idle 10 kW; a 20 s scan at 60 kW; a 2 s spike (not a scan); another 10 s scan at 50 kW.
    profile = [(t, 10000.0) for t in range(0, 10)] + [(t, 60000.0) for t in range(10, 30)] + \
        [(t, 10000.0) for t in range(30, 40)] + [(t, 80000.0) for t in range(40, 42)] + \
        [(t, 10000.0) for t in range(42, 50)] + [(t, 50000.0) for t in range(50, 60)] + [(60, 10000.0)]
    for t, p in profile:
        counter.add(float(t), p)
    scans, energy = counter.take()
    assert scans == 2
    # First scan: 19 s at 60 kW plus the ramp down to 10 kW over the last second.
    first = (19 * 60000.0 + 0.5 * (60000.0 + 10000.0)) / 3.6e6
    second = (9 * 50000.0 + 0.5 * (50000.0 + 10000.0)) / 3.6e6
    assert energy == pytest.approx(first + second)
    assert counter.take() == (0, 0.0)


def test_scan_counter_ignores_nan():
    counter = ScanCounter(30000.0, 1.0)
    counter.add(0.0, float("nan"))
    counter.add(1.0, 40000.0)
    counter.add(3.0, 1000.0)
    assert counter.take()[0] == 1


@pytest.mark.parametrize("grades, state", [([], "normal"), (["general"], "degraded"),
                                           (["general", "severe"], "fault"), (["critical"], "fault")])
def test_device_state_from_alarms(grades, state):
    assert device_state([{"grade": g} for g in grades]) == state


def test_tracker_energy_and_episode():
    tracker = KpiTracker("power", [KpiConfig("power", "energy", "import_energy", 0.0, 0.0),
                                   KpiConfig("power", "hours", "hours", 0.0, 0.0)])
    first, _ = tracker.summarise({"import_energy": {"last": 100.0}, "hours": {"last": 5.0}}, [], 0.0, 10.0, 10.0)
    assert "energy_kwh" not in first
    assert first["operating_hours"] == 5.0
    second, _ = tracker.summarise({"import_energy": {"last": 100.5}}, [{"grade": "severe"}], 10.0, 20.0, 10.0)
    assert second["energy_kwh"] == pytest.approx(0.5)
    assert second["energy_kwh_per_h"] == pytest.approx(180.0)
    assert second["time_fault_s"] == 10.0
    assert second["device_state"] == "fault"
    third, episodes = tracker.summarise({"import_energy": {"last": 100.6}}, [], 20.0, 30.0, 10.0)
    assert third["time_normal_s"] == 10.0
    assert episodes == [{"start": 20.0, "end": 30.0, "duration_s": 10.0}]


def test_tracker_state_round_trip():
    tracker = KpiTracker("power", [KpiConfig("power", "energy", "import_energy", 0.0, 0.0)])
    tracker.summarise({"import_energy": {"last": 7.0}}, [{"grade": "critical"}], 0.0, 10.0, 10.0)
    restored = KpiTracker("power", tracker.configs)
    restored.restore(tracker.state_dict())
    out, _ = restored.summarise({"import_energy": {"last": 8.0}}, [], 10.0, 20.0, 10.0)
    assert out["energy_kwh"] == pytest.approx(1.0)
