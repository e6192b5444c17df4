"""Bundled profiles and sample configurations, each read from its simulator.

Every profile is polled from the simulator of its device over Modbus TCP and over RTU on a
pseudo-terminal, and every [[modbus]] table of every sample configuration is parsed and
then polled with only its endpoint pointed at a simulator.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent.config_errors import Section
from agent.drivers.modbus import list_profiles, load_profile, parse_modbus_device, samples_dir
from tests.test_modbus_fixtures import (
    PROFILE_KINDS,
    assert_matches_truth,
    by_name,
    device_config,
    driver_for,
    drivers_for,
    rtu_bus,
    run,
    simulator,
)

pytestmark = pytest.mark.timeout(60)


def sample_configs() -> list[Path]:
    paths = []
    for path in sorted(samples_dir().glob("*.toml")):
        if "modbus" in tomllib.loads(path.read_text(encoding="utf-8")):
            paths.append(path)
    return paths


def test_profiles_listed():
    assert sorted(list_profiles()) == sorted(PROFILE_KINDS)


def test_every_profile_has_sample():
    covered = set()
    for path in sample_configs():
        covered |= {table["profile"] for table in tomllib.loads(path.read_text())["modbus"]}
    assert covered == set(PROFILE_KINDS)


@pytest.mark.parametrize("path", sample_configs(), ids=lambda path: path.name)
def test_sample_config_parses(path):
    tables = tomllib.loads(path.read_text(encoding="utf-8"))["modbus"]
    configs = [parse_modbus_device(Section(str(path), f"modbus[{i}]", table)) for i, table in enumerate(tables)]
    assert len({config.id for config in configs}) == len(configs)
    for config in configs:
        assert config.points, config.id


def test_qm30vt2_profile_block():
    profile = load_profile("banner_qm30vt2")
    addresses = [point.address for point in profile.points]
    assert addresses == list(range(5200, 5222))
    assert {point.function for point in profile.points} == {"holding"}
    assert profile.serial is not None
    assert profile.serial.describe() == "19200 8N1"
    assert profile.rtu_unit_id == 1


def test_cpa_profile_rtu_defaults():
    config = device_config(profile="cryomech_cpa", transport="rtu", port="/dev/null", id="cpa")
    assert config.unit_id == 16
    assert config.serial is not None
    assert config.serial.baudrate == 115200


def test_cpa_profile_tcp_unit():
    assert device_config(profile="cryomech_cpa", id="cpa").unit_id == 1


# --- each profile against its simulator ----------------------------------------------------

@pytest.mark.parametrize("profile", sorted(PROFILE_KINDS))
def test_profile_over_tcp(profile):
    kind = PROFILE_KINDS[profile]

    async def scenario():
        async with simulator(kind, seed=31) as device:
            device.freeze()
            config = device_config(profile=profile, port=device.port)
            async with driver_for(config) as driver:
                readings = await driver.poll()
                return config, driver, readings, device.values()

    config, driver, readings, truth = run(scenario())
    assert driver.last_errors == []
    assert_matches_truth(config, readings, truth)


def test_profiles_share_rtu_bus():
    specs = [{"kind": kind, "name": kind, "unit_id": 10 + index}
             for index, kind in enumerate(PROFILE_KINDS.values())]

    async def scenario():
        async with rtu_bus(specs, seed=32) as bus:
            for device in bus.devices.values():
                device.freeze()
            configs = [device_config(id=kind, profile=profile, transport="rtu", port=bus.port, baudrate=9600,
                                     parity="N", stopbits=1, bytesize=8, unit_id=bus.devices[kind].unit_id)
                       for profile, kind in PROFILE_KINDS.items()]
            async with drivers_for(*configs) as drivers:
                results = [await driver.poll() for driver in drivers]
                truths = {name: device.values() for name, device in bus.devices.items()}
                return configs, drivers, results, truths

    configs, drivers, results, truths = run(scenario())
    for config, driver, readings in zip(configs, drivers, results):
        assert driver.last_errors == [], config.id
        assert_matches_truth(config, readings, truths[config.id])


def test_room_name_string():
    async def scenario():
        async with simulator("room", seed=33, sensor_name="MRI-2 ROOM") as device:
            async with driver_for(device_config(profile="generic_room", port=device.port)) as driver:
                return by_name(await driver.poll())

    assert run(scenario())["sensor_name"] == "MRI-2 ROOM"


def test_chiller_alarm_names():
    async def scenario():
        async with simulator("chiller", seed=34) as device:
            device.override("alarm", float(0b10010))
            async with driver_for(device_config(profile="generic_chiller", port=device.port)) as driver:
                return by_name(await driver.poll())

    values = run(scenario())
    assert values["alarm"] == 0b10010
    assert values["alarm.active"] == "flow_low,pump_fault"


# --- sample configurations against the simulators ------------------------------------------

@pytest.mark.parametrize("path", sample_configs(), ids=lambda path: path.name)
def test_sample_config_polls(path):
    tables = tomllib.loads(path.read_text(encoding="utf-8"))["modbus"]

    async def poll_tables():
        results = []
        serial_tables = [table for table in tables if table["transport"] == "rtu"]
        gateway_tables = [table for table in tables if table["transport"] == "rtu-over-tcp"]
        for table in tables:
            if table["transport"] == "tcp":
                async with simulator(PROFILE_KINDS[table["profile"]], seed=35) as device:
                    config = device_config(**{**table, "host": "127.0.0.1", "port": device.port})
                    async with driver_for(config) as driver:
                        results.append((config, driver, await driver.poll()))
        for transport, group in (("rtu", serial_tables), ("rtu-over-tcp", gateway_tables)):
            if not group:
                continue
            specs = [{"kind": PROFILE_KINDS[table["profile"]], "name": table["id"], "unit_id": table["unit_id"]}
                     for table in group]
            async with rtu_bus(specs, transport=transport, seed=36) as bus:
                endpoint = {"port": bus.port} if transport == "rtu" else {"host": "127.0.0.1", "port": bus.port}
                configs = [device_config(**{**table, **endpoint}) for table in group]
                async with drivers_for(*configs) as drivers:
                    for config, driver in zip(configs, drivers):
                        results.append((config, driver, await driver.poll()))
        return results

    results = run(poll_tables())
    assert len(results) == len(tables)
    for config, driver, readings in results:
        assert driver.last_errors == [], config.id
        names = {reading.point for reading in readings}
        assert {point.name for point in config.points} <= names, config.id
