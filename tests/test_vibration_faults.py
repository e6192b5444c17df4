"""Scenario faults on the accelerometer stream, read by the agent's serial reader over a pty."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent.drivers.vibration_serial import SerialFrameReader
from firmware_sim.frame_stream import PtyVibrationSensor
from firmware_sim.scenario import Step, load_scenario, parse_scenario, ScenarioRunner
from firmware_sim.vibration import SyntheticBearing


class Collector:
    def __init__(self) -> None:
        self.frames = []
        self.lock = threading.Lock()

    def __call__(self, frame) -> None:
        with self.lock:
            self.frames.append(frame)

    def count(self) -> int:
        with self.lock:
            return len(self.frames)


def _wait(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def stream(tmp_path):
    link = str(tmp_path / "by-id-accelerometer")
    source = SyntheticBearing(sample_rate=25600, seed=3)
    sensor = PtyVibrationSensor(source, samples_per_frame=256, speed=4.0, link=link, seed=1)
    frames = Collector()
    reader = SerialFrameReader("motor", link, frames, read_timeout_s=0.05, reopen_backoff=(0.05, 0.2))
    reader.start()
    sensor.start()
    try:
        yield sensor, reader, frames
    finally:
        reader.stop()
        sensor.stop()


def test_port_removed_and_restored(stream):
    sensor, reader, frames = stream
    assert _wait(lambda: frames.count() > 20)
    sensor.apply_step(Step(0.0, "vibration", "fault", {"kind": "port_removed", "duration_s": 1.0}))
    assert _wait(lambda: sensor.port_removals == 1)
    before = frames.count()
    assert _wait(lambda: frames.count() > before + 20), f"no frames after restore: {reader.counters}"
    assert reader.counters["reopens"] >= 1
    assert reader.counters["missing_frames"] > 0


def test_dropped_frames_counted(stream):
    sensor, reader, frames = stream
    assert _wait(lambda: frames.count() > 10)
    sensor.apply_step(Step(0.0, "vibration", "fault", {"kind": "drop", "duration_s": 0.1}))
    assert _wait(lambda: sensor.frames_withheld > 0 and reader.counters["missing_frames"] >= sensor.frames_withheld)
    assert reader.counters["missing_frames"] == sensor.frames_withheld


def test_corrupt_fault_counted(stream):
    sensor, reader, frames = stream
    assert _wait(lambda: frames.count() > 10)
    sensor.apply_step(Step(0.0, "vibration", "fault", {"kind": "corrupt", "duration_s": 0.05}))
    assert _wait(lambda: reader.counters["bad_crc"] >= 1)
    count = frames.count()
    assert _wait(lambda: frames.count() > count + 10)


def test_unknown_fault_rejected(stream):
    sensor, _, _ = stream
    with pytest.raises(ValueError, match="no fault 'melt'"):
        sensor.apply_step(Step(0.0, "vibration", "fault", {"kind": "melt", "duration_s": 1.0}))


def test_defect_growth_raises_amplitude():
    source = SyntheticBearing(sample_rate=25600, fault="outer", defect_g=0.1, noise_g=0.01, seed=5)
    source.apply_step(Step(0.0, "vibration", "ramp", {"quantity": "defect_g", "rate_per_h": 3600.0}))
    early = np.abs(source.read(25600)).max()
    source.read(25600 * 3)
    late = np.abs(source.read(25600)).max()
    assert late > 2.0 * early


def test_builtin_scenario_drives_sensor():
    scenario = load_scenario("bearing_defect_growth")
    assert scenario.steps
    source = SyntheticBearing(sample_rate=25600, fault="inner", seed=1)
    sensor = PtyVibrationSensor(source, samples_per_frame=256, speed=1.0)
    try:
        runner = ScenarioRunner(scenario, {"vibration": sensor}, speed=1e6)
        runner.start()
        assert runner.join(timeout_s=5.0)
        assert not runner.errors
        assert len(runner.fired) == len(scenario.steps)
    finally:
        sensor.stop()


def test_scenario_missing_device_named():
    scenario = parse_scenario({"name": "x", "step": [{"at_s": 0, "device": "f70", "action": "event", "name": "trip"}]})
    with pytest.raises(ValueError, match="--f70"):
        ScenarioRunner(scenario, {})
