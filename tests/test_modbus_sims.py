"""Simulated Modbus devices: their physics, their sheet rules, and the built-in scenarios.

Scenarios run offline on the models, in simulated time, and once live: a scenario runner
drives a simulator while the agent polls it.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from firmware_sim.modbus_devices import (
    KINDS,
    MODEL_CLASSES,
    RunningDevice,
    make_model,
    start_modbus_rtu_bus,
)
from firmware_sim.scenario import ScenarioRunner, Step, load_scenario, parse_scenario
from tests.test_modbus_fixtures import by_name, device_config, driver_for, poll_until_good, reasons, run, simulator

pytestmark = pytest.mark.timeout(60)

MODBUS_SCENARIOS = ("helium_pressure_loss", "compressor_trip", "chiller_flow_drop", "mains_sag")
EDGE_SIM_NAMES = {"cpa", "sdm630", "chiller", "room", "qm30vt2"}


def offline_devices(kinds: list[str], seed: int) -> dict[str, RunningDevice]:
    return {kind: RunningDevice(make_model(kind, seed, {}), kind, 1.0, 1.0, seed) for kind in kinds}


def run_offline(name: str, sample_every_s: float = 60.0, step_s: float = 1.0):
    """Run a built-in scenario on fresh models; return [(t_s, {device: values})] samples."""
    scenario = load_scenario(name)
    devices = offline_devices(sorted({step.device for step in scenario.steps}), scenario.seed)
    steps = list(scenario.steps)
    samples = []
    t_s = 0.0
    while t_s < scenario.duration_s:
        while steps and steps[0].at_s <= t_s:
            step = steps.pop(0)
            devices[step.device].apply_step(step)
        for device in devices.values():
            device.step(step_s)
        t_s += step_s
        if t_s % sample_every_s < step_s:
            samples.append((t_s, {name: device.values() for name, device in devices.items()}))
    return samples


# --- scenarios -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODBUS_SCENARIOS)
def test_scenario_file_valid(name):
    scenario = load_scenario(name)
    assert scenario.name == name
    assert scenario.steps
    assert {step.device for step in scenario.steps} <= EDGE_SIM_NAMES
    devices = offline_devices(sorted({step.device for step in scenario.steps}), scenario.seed)
    for step in scenario.steps:
        devices[step.device].apply_step(step)


def test_helium_loss_trips_cpa():
    samples = run_offline("helium_pressure_loss")
    states = [values["cpa"]["operating_state"] for _, values in samples]
    warned = [t for t, values in samples if int(values["cpa"]["warning_bits"]) & 512]
    tripped = [t for t, values in samples if values["cpa"]["operating_state"] == 7]
    assert states[0] == 3
    assert warned
    assert tripped
    assert warned[0] < tripped[0]
    final = samples[-1][1]["cpa"]
    assert int(final["alarm_bits"]) & 512  # low pressure low
    assert final["running"] == 0


def test_compressor_trip_and_restart():
    samples = dict(run_offline("compressor_trip", sample_every_s=10.0))
    assert samples[290.0]["cpa"]["operating_state"] == 3
    assert samples[310.0]["cpa"]["operating_state"] == 7
    assert samples[310.0]["sdm630"]["total_power"] < samples[290.0]["sdm630"]["total_power"] - 5000
    assert samples[1600.0]["cpa"]["operating_state"] == 3
    assert samples[1600.0]["sdm630"]["total_power"] > 5000


def test_chiller_flow_drop_heats():
    samples = run_offline("chiller_flow_drop", sample_every_s=300.0)
    first, last = samples[0][1], samples[-1][1]
    assert last["chiller"]["flow"] < 10.0
    assert last["chiller"]["return_temperature"] > first["chiller"]["return_temperature"] + 8.0
    assert last["chiller"]["supply_temperature"] > first["chiller"]["supply_temperature"] + 3.0
    assert last["cpa"]["coolant_out_temperature"] > first["cpa"]["coolant_out_temperature"] + 10.0
    assert last["cpa"]["helium_temperature"] > first["cpa"]["helium_temperature"] + 10.0
    assert last["cpa"]["operating_state"] == 3


def test_mains_sag_dips_voltage():
    samples = dict(run_offline("mains_sag", sample_every_s=0.5, step_s=0.5))
    assert samples[301.0]["sdm630"]["voltage_l1"] < 0.85 * samples[299.0]["sdm630"]["voltage_l1"]
    assert samples[301.0]["sdm630"]["current_l1"] > samples[299.0]["sdm630"]["current_l1"]
    assert samples[304.0]["sdm630"]["voltage_l1"] > 220.0
    assert samples[900.5]["sdm630"]["voltage_l1"] < 130.0
    assert samples[1000.0]["cpa"]["operating_state"] == 9
    assert samples[1300.0]["cpa"]["operating_state"] == 3


@pytest.mark.parametrize(("params", "message"), [
    ({"action": "ramp", "quantity": "helium_psi", "rate_per_h": 1.0}, "helium_charge_psi"),
    ({"action": "event", "name": "explode"}, "trip"),
    ({"action": "fault", "kind": "fire"}, "drop"),
    ({"action": "fault", "kind": "port_loss"}, "pty RTU bus"),
])
def test_apply_step_rejects(params, message):
    device = offline_devices(["cpa"], 1)["cpa"]
    step_params = dict(params)
    action = step_params.pop("action")
    with pytest.raises(ValueError, match=message):
        device.apply_step(Step(0.0, "cpa", action, step_params))


def test_scenario_runner_live():
    scenario = parse_scenario({
        "name": "live", "seed": 5, "duration_s": 1.0,
        "step": [
            {"at_s": 0.0, "device": "sdm630", "action": "set", "quantity": "voltage_v", "value": -30.0},
            {"at_s": 0.1, "device": "sdm630", "action": "fault", "kind": "drop", "duration_s": 0.3},
        ],
    })

    async def scenario_run():
        async with simulator("sdm630", seed=scenario.seed) as meter:
            runner = ScenarioRunner(scenario, {"sdm630": meter}, speed=1.0)
            config = device_config(port=meter.port, register_base=30001, timeout_s=0.1, backoff_min_s=0.05,
                                   backoff_max_s=0.1, points=[{"name": "voltage_l1", "register": 30001,
                                                               "type": "float32"}])
            async with driver_for(config) as driver:
                runner.start()
                await asyncio.sleep(0.2)
                during = await driver.poll()
                during_reasons = reasons(driver)
                await asyncio.sleep(0.3)
                after = await poll_until_good(driver)
                runner.stop()
                return during, during_reasons, after, runner.errors, meter.faults.applied["drop"]

    during, during_reasons, after, errors, drops = run(scenario_run())
    assert errors == []
    assert during == []
    assert during_reasons == ["NO_RESPONSE"]
    assert drops >= 1
    assert 190.0 < after[0].value < 210.0  # 230 V less the 30 V offset


# --- models --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_model_reproducible(kind):
    first = make_model(kind, 7, {})
    second = make_model(kind, 7, {})
    for _ in range(20):
        first.advance(0.5)
        second.advance(0.5)
    assert first.values() == second.values()


@pytest.mark.parametrize("kind", KINDS)
def test_model_values_change(kind):
    model = make_model(kind, 8, {})
    before = model.values()
    for _ in range(60):
        model.advance(5.0)
    after = model.values()
    assert any(before[name] != after[name] for name in before)


def test_qm30vt2_consistent():
    model = make_model("qm30vt2", 9, {})
    model.advance(10.0)
    values = model.values()
    for axis in ("z", "x"):
        assert math.isclose(values[f"{axis}_rms_velocity_in_s"] * 25.4, values[f"{axis}_rms_velocity"], rel_tol=1e-9)
        assert math.isclose(values[f"{axis}_peak_acceleration"] / values[f"{axis}_rms_acceleration"],
                            values[f"{axis}_crest_factor"], rel_tol=1e-9)
    assert math.isclose(values["temperature_f"], values["temperature"] * 9 / 5 + 32, rel_tol=1e-9)


def test_qm30vt2_defect_event():
    device = offline_devices(["qm30vt2"], 10)["qm30vt2"]
    before = device.values()
    device.apply_step(Step(0.0, "qm30vt2", "event", {"name": "bearing_defect", "severity": 0.5}))
    after = device.values()
    assert after["z_kurtosis"] > before["z_kurtosis"] + 2.0
    assert after["z_hf_rms_acceleration"] > before["z_hf_rms_acceleration"]


def test_qm30vt2_rejects_outside_block():
    model = make_model("qm30vt2", 11, {})
    assert int(model.handle(3, 5199, 2, None)) == 2
    assert int(model.handle(3, 5220, 3, None)) == 2
    assert int(model.handle(4, 5200, 2, None)) == 1
    assert len(model.handle(3, 5200, 22, None)) == 22


def test_room_oxygen_alarm():
    device = offline_devices(["room"], 12)["room"]
    device.apply_step(Step(0.0, "room", "set", {"quantity": "oxygen_pct", "value": -3.0}))
    assert int(device.values()["status"]) & 0b1000
    device.apply_step(Step(0.0, "room", "event", {"name": "oxygen_sensor_fault"}))
    values = device.values()
    assert values["oxygen"] == 0.0
    assert int(values["status"]) & 0b0100


def test_chiller_setpoint_write():
    async def scenario():
        async with simulator("chiller", seed=13) as chiller:
            config = device_config(port=chiller.port, profile="generic_chiller")
            async with driver_for(config) as driver:
                await driver.write_registers(6, [180])
                values = by_name(await driver.poll())
                with pytest.raises(Exception, match="ILLEGAL_DATA_VALUE"):
                    await driver.write_registers(6, [500])
                return values

    assert run(scenario())["setpoint"] == pytest.approx(18.0)


def test_cpa_start_stop_by_driver():
    async def scenario():
        async with simulator("cpa", seed=14, transition_s=2.0) as compressor:
            compressor.freeze()
            config = device_config(port=compressor.port, register_base=30000, unit_id=16,
                                   points=[{"name": "state", "register": 30001, "type": "uint16"}])
            async with driver_for(config) as driver:
                states = []
                await driver.write_registers(1, [0x00FF])
                states.append(by_name(await driver.poll())["state"])
                compressor.step(2.5)
                states.append(by_name(await driver.poll())["state"])
                await driver.write_registers(1, [0x0001])
                states.append(by_name(await driver.poll())["state"])
                compressor.step(2.5)
                states.append(by_name(await driver.poll())["state"])
                return states

    assert run(scenario()) == [5, 0, 2, 3]


def test_cpa_stop_clears_trip():
    model = make_model("cpa", 15, {})
    model.trip(alarm="motor_stall")
    assert model.state == 7
    assert model.alarms == 1 << 19
    model.command(0xFFFF)
    assert model.state == 0
    assert model.alarms == 0


def test_sdm630_register_order_write():
    """After 2141.0 is written low word first, floats come low word first: the word-order trap."""
    points = [{"name": "voltage_l1", "register": 30001, "type": "float32"}]

    async def scenario():
        async with simulator("sdm630", seed=16) as meter:
            meter.override("voltage_l1", 230.0)
            default = device_config(port=meter.port, register_base=30001, points=points)
            swapped = device_config(port=meter.port, register_base=30001, points=points, word_order="CDAB", id="b")
            async with driver_for(default) as driver, driver_for(swapped) as swapped_driver:
                # 2141.0 is 0x4505D000; written as D000 4505 it selects low word first.
                await driver.write_registers(0x28, [0xD000, 0x4505], single=False)
                wrong = by_name(await driver.poll())["voltage_l1"]
                right = by_name(await swapped_driver.poll())["voltage_l1"]
                return wrong, right, meter.model.word_order

    wrong, right, order = run(scenario())
    assert order == "CDAB"
    assert right == 230.0
    assert not 100.0 < abs(wrong) < 400.0


def test_sdm630_write_rules():
    model = make_model("sdm630", 17, {})
    assert int(model.handle(16, 0x0002, 1, [0x4270])) == 3  # half a parameter
    assert int(model.handle(16, 0x0006, 2, [0x4270, 0])) == 2  # read-only system volts
    assert int(model.handle(16, 0x0002, 2, [0x4271, 0])) == 3  # 60.25 min is no demand period
    assert model.handle(16, 0x001E, 2, [0x3F80, 0]) == []  # energy in MWh
    assert model.energy_unit == "M"


def test_bus_rejects_duplicate_unit():
    with pytest.raises(ValueError, match="unit id 1"):
        run(start_modbus_rtu_bus([{"kind": "sdm630"}, {"kind": "qm30vt2"}]))


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="qm30vt2"):
        make_model("f70", 1, {})


def test_model_classes_cover_kinds():
    assert set(MODEL_CLASSES) == set(KINDS)
    for kind in KINDS:
        model = make_model(kind, 1, {})
        assert model.quantities == model.offsets.quantities
        assert isinstance(model.events, tuple)


def test_offsets_follow_model_time():
    device = offline_devices(["sdm630"], 18)["sdm630"]
    device.apply_step(Step(10.0, "sdm630", "ramp", {"quantity": "voltage_v", "rate_per_h": -3600.0}))
    device.step(10.0)
    start = device.values()["voltage_ln_average"]
    offset_at_start = device.model.offsets.at("voltage_v", device.model.t_s)
    device.step(60.0)
    end = device.values()["voltage_ln_average"]
    assert offset_at_start == 0.0
    assert device.model.offsets.at("voltage_v", device.model.t_s) == pytest.approx(-60.0)
    assert 50.0 < start - end < 70.0  # 60 V in 60 s, plus the voltage noise


def test_models_differ_by_seed():
    assert make_model("room", 3, {}).values() != make_model("room", 4, {}).values()
