"""Simulator scenarios raise the right graded alarm before their failure point.

Each test runs a scenario in the simulator process at high speed and the real agent in
another, and checks the forecast alarm arrives before the limit alarm that marks the
failure, with its lead time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from .test_end_to_end import _stop, _wait_for


def _run_agent(tmp_path: Path, config: dict, duration_s: float) -> list[dict]:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(tomli_w.dumps(config))
    result = subprocess.run([sys.executable, "-m", "agent.cli", "run", str(config_file), "--duration",
                             str(duration_s), "--echo", "jsonl"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "agent.err").write_text(result.stderr)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _first_alarm(summaries: list[dict], name: str) -> tuple[float, dict] | None:
    for s in summaries:
        for alarm in s["alarms"]:
            if alarm["name"] == name:
                return s["t_end"], alarm
    return None


def _base_config(tmp_path: Path) -> dict:
    return {
        "gateway_id": "scenario-test",
        "summary": {"period_s": 1.0},
        "buffer": {"path": str(tmp_path / "buffer.sqlite")},
        "api": {"enabled": False},
    }


def _start_sim(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    log = (tmp_path / "sim.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", "--manifest", str(tmp_path / "sim.json"),
                             *args], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_cold_head_drift_forecast_before_warning(tmp_path):
    # 4 simulated hours per second: the inlet warms 3 degC a day from 27 degC and crosses
    # the 35 degC warning about 2.7 days (16 s) in.
    speed = 14400.0
    link = tmp_path / "f70"
    sim = _start_sim(tmp_path, ["--vibration", "none", "--f70", "--f70-link", str(link),
                                "--scenario", "cold_head_drift", "--speed", str(speed)])
    try:
        json.loads(_wait_for(tmp_path / "sim.json", sim))
        config = _base_config(tmp_path)
        config["f70"] = [{"id": "mri-f70", "port": str(link), "poll_interval_s": 0.25, "reply_timeout_s": 0.5}]
        config["alarm"] = [
            {"name": "water_inlet_forecast", "source": "mri-f70", "metric": "water_inlet_temperature",
             "type": "forecast", "limit": 35.0, "direction": "upper", "horizon_s": 12.0, "window_s": 8.0,
             "grade": "general", "learning_samples": 6},
            {"name": "water_inlet_high", "source": "mri-f70", "metric": "water_inlet_temperature",
             "type": "above", "limit": 35.0, "grade": "severe"},
        ]
        summaries = _run_agent(tmp_path, config, 24.0)
    finally:
        _stop(sim)

    forecast = _first_alarm(summaries, "water_inlet_forecast")
    failure = _first_alarm(summaries, "water_inlet_high")
    assert forecast is not None, (tmp_path / "agent.err").read_text()[-2000:]
    assert failure is not None
    assert forecast[1]["grade"] == "general"
    assert failure[1]["grade"] == "severe"
    lead_s = failure[0] - forecast[0]
    assert lead_s > 2.0, f"forecast only {lead_s:.1f} s ({lead_s * speed / 3600:.1f} simulated h) ahead"


def test_bearing_growth_forecast_before_limit(tmp_path):
    # The defect grows from 0.1 g to about 1.7 g of impact amplitude in 40 simulated seconds.
    scenario = tmp_path / "growth.toml"
    scenario.write_text(tomli_w.dumps({
        "name": "fast_growth", "seed": 4, "duration_s": 60.0,
        "step": [
            {"at_s": 0.0, "device": "vibration", "action": "set", "quantity": "defect_g", "value": -0.7},
            {"at_s": 5.0, "device": "vibration", "action": "ramp", "quantity": "defect_g", "rate_per_h": 144.0},
        ],
    }))
    link = tmp_path / "accelerometer"
    sim = _start_sim(tmp_path, ["--vibration", "synthetic", "--fault", "inner", "--link", str(link),
                                "--scenario", str(scenario), "--speed", "1"])
    try:
        json.loads(_wait_for(tmp_path / "sim.json", sim))
        config = _base_config(tmp_path)
        config["vibration"] = [{"id": "motor", "port": str(link), "frame_length": 8192, "shaft_rpm": 1797,
                                "envelope_band_hz": [2000.0, 5000.0]}]
        config["alarm"] = [
            {"name": "bpfi_forecast", "source": "motor", "metric": "bpfi_envelope", "type": "forecast",
             "limit": 0.08, "direction": "upper", "horizon_s": 20.0, "window_s": 12.0, "grade": "general",
             "learning_samples": 5},
            {"name": "bpfi_high", "source": "motor", "metric": "bpfi_envelope", "type": "above",
             "limit": 0.08, "grade": "severe"},
        ]
        summaries = _run_agent(tmp_path, config, 40.0)
    finally:
        _stop(sim)

    forecast = _first_alarm(summaries, "bpfi_forecast")
    failure = _first_alarm(summaries, "bpfi_high")
    assert forecast is not None, [s["features"].get("bpfi_envelope") for s in summaries]
    assert failure is not None, [s["features"].get("bpfi_envelope") for s in summaries]
    assert failure[0] - forecast[0] > 2.0


def test_helium_loss_forecast_before_low_pressure(tmp_path):
    # At 240x the charge starts leaking 2.5 s in; the return pressure crosses the 60 psi
    # warning about 1.1 simulated hours (17 s) later.
    speed = 240.0
    sim = _start_sim(tmp_path, ["--vibration", "none", "--cpa", "--scenario", "helium_pressure_loss",
                                "--speed", str(speed)])
    try:
        manifest = json.loads(_wait_for(tmp_path / "sim.json", sim))
        cpa = next(d for d in manifest["devices"] if d["kind"] == "cpa")
        config = _base_config(tmp_path)
        config["modbus"] = [{"id": "compressor", "profile": "cryomech_cpa", "host": cpa["host"], "port": cpa["port"],
                             "poll_interval_s": 0.25, "timeout_s": 0.5}]
        config["alarm"] = [
            {"name": "helium_forecast", "source": "compressor", "metric": "low_pressure", "type": "forecast",
             "limit": 60.0, "direction": "lower", "horizon_s": 20.0, "window_s": 8.0, "learning_samples": 5,
             "grade": "general"},
            {"name": "helium_low", "source": "compressor", "metric": "low_pressure", "type": "below",
             "limit": 60.0, "grade": "severe"},
        ]
        summaries = _run_agent(tmp_path, config, 26.0)
    finally:
        _stop(sim)

    forecast = _first_alarm(summaries, "helium_forecast")
    failure = _first_alarm(summaries, "helium_low")
    assert forecast is not None, [s["features"].get("low_pressure") for s in summaries]
    assert failure is not None
    assert forecast[1]["grade"] == "general"
    assert failure[1]["grade"] == "severe"
    assert failure[0] - forecast[0] > 2.0
    events = [s for s in summaries if s["kind"] == "alarm" and s["features"]["event"] == "raised"]
    assert {e["alarms"][0]["name"] for e in events} >= {"helium_forecast", "helium_low"}


def test_ct_scans_counted_from_power(tmp_path):
    # 60x: about 30 scans of 5-60 s an hour become one every 2 s of agent time.
    sim = _start_sim(tmp_path, ["--vibration", "none", "--sdm630", "--sdm630-load", "ct-scanner",
                                "--speed", "60", "--seed", "3"])
    try:
        manifest = json.loads(_wait_for(tmp_path / "sim.json", sim))
        meter = next(d for d in manifest["devices"] if d["kind"] == "sdm630")
        config = _base_config(tmp_path)
        config["modbus"] = [{"id": "ct-power", "profile": "sdm630", "host": meter["host"], "port": meter["port"],
                             "poll_interval_s": 0.1, "timeout_s": 0.5}]
        config["kpi"] = [
            {"source": "ct-power", "type": "scans", "point": "total_power", "threshold": 25000.0,
             "min_duration_s": 0.05},
            {"source": "ct-power", "type": "energy", "point": "import_energy"},
        ]
        summaries = _run_agent(tmp_path, config, 20.0)
    finally:
        _stop(sim)

    power = [s for s in summaries if s["source"] == "ct-power" and s["kind"] == "points"]
    scans = sum(s["features"].get("scans", 0) for s in power)
    assert scans >= 3, [s["features"].get("total_power", {}).get("max") for s in power]
    per_scan = [s["features"]["energy_per_scan_kwh"] for s in power if s["features"].get("scans")]
    # Energy is integrated on the agent's clock, 60 times faster than the simulated one: a
    # scan of 5-60 simulated s at 30-90 kW lasts 0.08-1 s here, 0.0007-0.025 kWh.
    assert all(0.0 < e < 0.1 for e in per_scan)
    assert any("energy_kwh_per_h" in s["features"] for s in power)
