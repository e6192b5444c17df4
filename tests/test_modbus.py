"""Modbus decoding, configuration and planning; the TCP driver against the SDM630 and CPA simulators.

The simulators encode registers on their own and the driver decodes them on its own, so a
value that survives the trip checks both sides. Example register pairs come from the vendors'
documents and public client code.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import struct
import time
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

import agent.drivers
from agent.config_errors import ConfigError
from agent.drivers.modbus import (
    ModbusDeviceConfig,
    ModbusTcpDriver,
    decode_registers,
    list_profiles,
    load_profile,
    plan_requests,
)
from firmware_sim.modbus_devices import CryomechCpa, Sdm630, start_modbus_device
from tests.test_modbus_fixtures import device_config, float32, run, simulator

pytestmark = pytest.mark.timeout(30)


def float32_from_hex(big_endian: str) -> float:
    return struct.unpack(">f", bytes.fromhex(big_endian))[0]


# The SDM630 document's example 4366 3334 for 230.2 V is one unit in the last place above the
# nearest float32 (4366 3333), so tests use the exact value that the example encodes.
SDM630_EXAMPLE_VOLTS = float32_from_hex("43663334")


@contextlib.asynccontextmanager
async def driver_for(config: ModbusDeviceConfig):
    # The driver's first name stays in use here, so the service's old call keeps working.
    driver = ModbusTcpDriver(config)
    await driver.open()
    try:
        yield driver
    finally:
        await driver.close()


@contextlib.asynccontextmanager
async def raw_client(port: int):
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0, reconnect_delay=0)
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


# --- decoding -------------------------------------------------------------------------------

DECODE_CASES = [
    # registers, type, word order, expected value
    ([0x4366, 0x3334], "float32", "ABCD", SDM630_EXAMPLE_VOLTS),  # SDM630 doc example
    ([0x43BB, 0x8000], "float32", "ABCD", 375.0),
    ([0x0000, 0x41C8], "float32", "CDAB", 25.0),  # Cryomech examples
    ([0x0000, 0x42C8], "float32", "CDAB", 100.0),
    ([0x0000, 0xBF80], "float32", "CDAB", -1.0),
    ([0xE666, 0x4640], "float32", "CDAB", float32(12345.6)),
    ([0x6643, 0x3433], "float32", "BADC", SDM630_EXAMPLE_VOLTS),
    ([0x3433, 0x6643], "float32", "DCBA", SDM630_EXAMPLE_VOLTS),
    ([0xFFFF], "int16", "ABCD", -1),
    ([0x8000], "int16", "CDAB", -32768),
    ([0x3412], "uint16", "BADC", 0x1234),
    ([0x1234], "uint16", "ABCD", 0x1234),
    ([0x0001, 0xE240], "uint32", "ABCD", 123456),
    ([0xE240, 0x0001], "uint32", "CDAB", 123456),
    ([0xFFFF, 0xFFFE], "int32", "ABCD", -2),
    ([0x0100, 0x0000], "int32", "DCBA", 1),
]


@pytest.mark.parametrize(("registers", "type_name", "order", "expected"), DECODE_CASES)
def test_decode_registers_cases(registers, type_name, order, expected):
    assert decode_registers(registers, type_name, order) == expected


def test_sdm630_example_is_230_2_volts():
    assert math.isclose(SDM630_EXAMPLE_VOLTS, 230.2, abs_tol=1e-4)


@pytest.mark.parametrize(("registers", "type_name", "order", "message"), [
    ([1], "float32", "ABCD", "needs 2 register"),
    ([1, 2], "float33", "ABCD", "unknown register type"),
    ([1, 2], "float32", "ACBD", "unknown word order"),
    ([0x10000], "uint16", "ABCD", "not a 16-bit"),
    ([-1], "int16", "ABCD", "not a 16-bit"),
])
def test_decode_registers_rejects(registers, type_name, order, message):
    with pytest.raises(ValueError, match=message):
        decode_registers(registers, type_name, order)


# --- configuration ----------------------------------------------------------------------------

def test_config_unknown_key():
    with pytest.raises(ConfigError) as caught:
        device_config(profile="sdm630", pol_interval_s=1.0)
    assert caught.value.key == "modbus[0].pol_interval_s"


def test_config_unknown_point_key():
    with pytest.raises(ConfigError) as caught:
        device_config(points=[{"name": "a", "address": 0, "type": "uint16", "scael": 2.0}])
    assert caught.value.key == "modbus[0].points[0].scael"


def test_config_bad_type_name():
    with pytest.raises(ConfigError) as caught:
        device_config(points=[{"name": "a", "address": 0, "type": "float33"}])
    assert caught.value.key == "modbus[0].points[0].type"
    assert "float32" in caught.value.allowed


def test_config_bad_word_order():
    with pytest.raises(ConfigError) as caught:
        device_config(points=[{"name": "a", "address": 0, "type": "float32", "word_order": "ACBD"}])
    assert caught.value.key == "modbus[0].points[0].word_order"
    assert "CDAB" in caught.value.allowed


def test_config_bad_device_word_order():
    with pytest.raises(ConfigError) as caught:
        device_config(profile="cryomech_cpa", word_order="abcd")
    assert caught.value.key == "modbus[0].word_order"


def test_config_unknown_profile():
    with pytest.raises(ConfigError) as caught:
        device_config(profile="sdm999")
    assert caught.value.key == "modbus[0].profile"
    assert "sdm630" in caught.value.allowed


def test_config_register_needs_base():
    with pytest.raises(ConfigError) as caught:
        device_config(points=[{"name": "a", "register": 30001, "type": "float32"}])
    assert caught.value.key == "modbus[0].points[0].register_base"


def test_config_register_and_address():
    with pytest.raises(ConfigError) as caught:
        device_config(points=[{"name": "a", "register": 30001, "register_base": 30001,
                               "address": 0, "type": "float32"}])
    assert caught.value.key == "modbus[0].points[0].address"


def test_config_duplicate_point_name():
    with pytest.raises(ConfigError) as caught:
        device_config(points=[{"name": "a", "address": 0, "type": "uint16"},
                              {"name": "a", "address": 1, "type": "uint16"}])
    assert caught.value.key == "modbus[0].points[1].name"


def test_config_no_points():
    with pytest.raises(ConfigError) as caught:
        device_config()
    assert caught.value.key == "modbus[0].points"


def test_config_register_base_per_device():
    config = device_config(register_base=40001,
                           points=[{"name": "a", "register": 40003, "function": "holding", "type": "float32"}])
    assert config.points[0].address == 2
    assert config.points[0].function == "holding"


def test_config_points_replace_profile():
    config = device_config(profile="sdm630", points=[{"name": "only", "address": 0, "type": "float32"}])
    assert [point.name for point in config.points] == ["only"]
    assert config.even_alignment is True


def test_config_word_order_overrides_profile():
    config = device_config(profile="sdm630", word_order="CDAB")
    assert {point.word_order for point in config.points} == {"CDAB"}


def test_sample_profiles_parse():
    names = list_profiles()
    assert "sdm630" in names
    assert "cryomech_cpa" in names
    for name in names:
        profile = load_profile(name)
        config = device_config(profile=name)
        assert profile.points, name
        assert [point.name for point in config.points] == [point.name for point in profile.points], name
        assert None not in {point.word_order for point in config.points}, name


def test_samples_folder_profiles_listed():
    folder = Path(agent.drivers.__file__).parent / "samples"
    assert (folder / "sdm630.toml").is_file()
    assert (folder / "cryomech_cpa.toml").is_file()


# --- request planning -------------------------------------------------------------------------

def test_plan_sdm630_minimal():
    config = device_config(profile="sdm630")
    blocks = plan_requests(config.points, config.max_registers, config.even_alignment, config.max_gap_registers)
    # The points span addresses 0..73 (74 registers, one request under the 80-register limit)
    # and 342..343, which no 80-register request starting at 0..73 can reach.
    assert [(block.address, block.count) for block in blocks] == [(0, 74), (342, 2)]


def test_plan_even_alignment():
    points = device_config(points=[{"name": "a", "address": 3, "type": "float32"},
                                   {"name": "b", "address": 9, "type": "uint16"}]).points
    blocks = plan_requests(points, 80, even_alignment=True)
    assert [(block.address, block.count) for block in blocks] == [(2, 8)]


def test_plan_max_registers_split():
    points = device_config(points=[{"name": f"p{i}", "address": 2 * i, "type": "float32"}
                                   for i in range(50)]).points
    blocks = plan_requests(points, 80, even_alignment=True)
    assert [(block.address, block.count) for block in blocks] == [(0, 80), (80, 20)]


def test_plan_max_gap_split():
    points = device_config(points=[{"name": "a", "address": 0, "type": "uint16"},
                                   {"name": "b", "address": 5, "type": "uint16"}]).points
    assert len(plan_requests(points, 125, max_gap_registers=4)) == 1
    assert len(plan_requests(points, 125, max_gap_registers=3)) == 2


def test_plan_separates_functions():
    points = device_config(points=[{"name": "a", "address": 0, "type": "uint16"},
                                   {"name": "b", "address": 1, "type": "uint16", "function": "holding"}]).points
    blocks = plan_requests(points, 125)
    assert [block.function for block in blocks] == ["input", "holding"]


# --- simulator models (no server) --------------------------------------------------------------

def test_models_reproducible_with_seed():
    for model_class in (Sdm630, CryomechCpa):
        first = model_class(random.Random(7))
        second = model_class(random.Random(7))
        for _ in range(20):
            first.advance(0.5)
            second.advance(0.5)
        assert first.values() == second.values(), model_class.kind


def test_cpa_units_follow_scale():
    model = CryomechCpa(random.Random(1), pressure_unit="bar", temperature_unit="K")
    values = model.values()
    assert values["pressure_scale"] == 1.0
    assert values["temperature_scale"] == 2.0
    assert 18.0 < values["high_pressure"] < 22.0  # about 290 psi
    assert 330.0 < values["helium_temperature"] < 360.0  # about 65 degC


def test_sdm630_energy_integrates_power():
    model = Sdm630(random.Random(3), peaks_per_hour=0.0)
    before = model.values()["import_energy"]
    for _ in range(720):
        model.advance(5.0)  # one hour
    gained = model.values()["import_energy"] - before
    assert 6.0 < gained < 10.0  # kWh from a load of about 8 kW


def test_start_rejects_unknown_option():
    with pytest.raises(ValueError, match="bogus"):
        run(start_modbus_device("cpa", bogus=1))


# --- driver against the simulators -------------------------------------------------------------

def assert_readings_match(readings, truth, points):
    by_name = {reading.point: reading for reading in readings}
    assert sorted(by_name) == sorted(point.name for point in points)
    for point in points:
        reading = by_name[point.name]
        assert reading.quality == "good", point.name
        assert reading.unit == point.unit, point.name
        assert math.isclose(reading.value, truth[point.name], rel_tol=1e-6, abs_tol=1e-6), (
            f"{point.name}: decoded {reading.value}, simulator {truth[point.name]}")


def test_sdm630_profile_values_match():
    async def scenario():
        async with simulator("sdm630", seed=11) as meter:
            meter.freeze()
            config = device_config(profile="sdm630", port=meter.port)
            async with driver_for(config) as driver:
                readings = await driver.poll()
                assert driver.last_errors == []
                assert driver.counters["requests"] == 2
                assert_readings_match(readings, meter.values(), config.points)

    run(scenario())


def test_cpa_profile_values_match():
    async def scenario():
        async with simulator("cpa", seed=12) as compressor:
            compressor.model.set_faults(warnings=2**24 + 1024 + 1, alarms=64)
            compressor.freeze()
            config = device_config(profile="cryomech_cpa", port=compressor.port, unit_id=16)
            async with driver_for(config) as driver:
                readings = await driver.poll()
                return driver, readings, compressor.values(), config

    driver, readings, truth, config = run(scenario())
    values = {reading.point: reading.value for reading in readings}
    assert driver.last_errors == []
    assert driver.counters["requests"] == 1
    plain = [point for point in config.points if point.type != "bitfield"]
    assert_readings_match([r for r in readings if r.point in {p.name for p in plain}], truth, plain)
    # A float32 has 24 significant bits, so the panel's float loses weight 1 next to 2**24.
    assert values["warning"] == 2**24 + 1024
    assert values["warning.active"] == "high_pressure_high,high_pressure_sensor_fault"
    assert values["alarm"] == 64
    assert values["alarm.active"] == "helium_high"


def test_cpa_3x_scaled_copies():
    tenths = ["coolant_in_temperature", "coolant_out_temperature", "oil_temperature",
              "helium_temperature", "low_pressure", "low_pressure_average", "high_pressure",
              "high_pressure_average", "delta_pressure_average", "motor_current"]
    points = [{"name": name, "register": 30040 + i, "type": "int16", "scale": 0.1}
              for i, name in enumerate(tenths)]
    points += [
        {"name": "hours", "register": 30050, "type": "uint32", "scale": 0.1},
        {"name": "warning_bits", "register": 30052, "type": "uint32"},
        {"name": "alarm_bits", "register": 30054, "type": "uint32"},
    ]

    async def scenario():
        async with simulator("cpa", seed=13) as compressor:
            compressor.model.set_faults(warnings=2**28 + 3, alarms=2**20)
            compressor.freeze()
            config = device_config(port=compressor.port, register_base=30000, word_order="CDAB", points=points)
            async with driver_for(config) as driver:
                readings = {reading.point: reading.value for reading in await driver.poll()}
            truth = compressor.values()
        assert driver.last_errors == []
        for name in tenths + ["hours"]:
            assert math.isclose(readings[name], round(truth[name] * 10) / 10, abs_tol=1e-9), name
        assert readings["warning_bits"] == 2**28 + 3
        assert readings["alarm_bits"] == 2**20

    run(scenario())


def test_wire_example_pairs():
    async def scenario():
        async with simulator("cpa", seed=14) as compressor, simulator("sdm630", seed=15) as meter:
            compressor.override("motor_current", 25.0)
            compressor.override("hours", 12345.6)
            meter.override("voltage_l1", SDM630_EXAMPLE_VOLTS)
            async with raw_client(compressor.port) as client:
                motor = await client.read_input_registers(25, count=2, device_id=1)
                hours = await client.read_input_registers(27, count=2, device_id=1)
                state = await client.read_input_registers(1, count=1, device_id=1)
                address_zero = await client.read_input_registers(0, count=1, device_id=1)
            async with raw_client(meter.port) as client:
                voltage = await client.read_input_registers(0, count=2, device_id=1)
        assert motor.registers == [0x0000, 0x41C8]
        assert hours.registers == [0xE666, 0x4640]
        assert state.registers == [3]  # 30001 at address 1: running
        assert address_zero.isError()
        assert address_zero.exception_code == 2
        assert voltage.registers == [0x4366, 0x3334]

    run(scenario())


def test_cpa_answers_any_unit_id():
    async def scenario():
        async with simulator("cpa", seed=16) as compressor:
            async with raw_client(compressor.port) as client:
                replies = [await client.read_input_registers(1, count=2, device_id=unit) for unit in (0, 1, 16)]
        for reply in replies:
            assert not reply.isError()

    run(scenario())


def test_cpa_unmapped_reads_zeros():
    async def scenario():
        async with simulator("cpa", seed=17, unmapped_reads="zeros", layout="2.x") as compressor:
            async with raw_client(compressor.port) as client:
                low = await client.read_input_registers(0, count=2, device_id=1)
                high = await client.read_input_registers(33, count=4, device_id=1)
        assert low.registers[0] == 0
        assert low.registers[1] == 3  # operating state, running
        assert high.registers[1:] == [0, 0, 0]

    run(scenario())


def test_sdm630_rejects_bad_requests():
    async def scenario():
        async with simulator("sdm630", seed=18) as meter:
            async with raw_client(meter.port) as client:
                odd_start = await client.read_input_registers(1, count=2, device_id=1)
                odd_count = await client.read_input_registers(0, count=3, device_id=1)
                too_many = await client.read_input_registers(0, count=82, device_id=1)
                coils = await client.read_coils(0, count=8, device_id=1)
                other_unit = await client.read_input_registers(0, count=2, device_id=2)
                gap = await client.read_input_registers(0x002C, count=2, device_id=1)
                past_end = await client.read_input_registers(0x017E, count=2, device_id=1)
                holding = await client.read_holding_registers(0x0002, count=2, device_id=1)
        assert odd_start.exception_code == 2
        assert odd_count.exception_code == 2
        assert too_many.exception_code == 3
        assert coils.exception_code == 1
        assert other_unit.exception_code == 0x0B
        assert gap.registers == [0, 0]
        assert past_end.exception_code == 2
        assert holding.registers == [0x4270, 0x0000]  # demand period 60.0

    run(scenario())


def test_driver_names_exceptions():
    async def scenario():
        async with simulator("sdm630", seed=19) as meter:
            odd = device_config(port=meter.port, points=[{"name": "odd", "address": 1, "type": "float32"}])
            wide = device_config(port=meter.port, max_registers=82,
                                 points=[{"name": "a", "address": 0, "type": "float32"},
                                         {"name": "b", "address": 80, "type": "float32"}])
            async with driver_for(odd) as odd_driver, driver_for(wide) as wide_driver:
                odd_readings = await odd_driver.poll()
                wide_readings = await wide_driver.poll()
        assert odd_readings == []
        assert [error.reason for error in odd_driver.last_errors] == ["ILLEGAL_DATA_ADDRESS"]
        assert odd_driver.counters["exception_ILLEGAL_DATA_ADDRESS"] == 1
        assert wide_readings == []
        assert [error.reason for error in wide_driver.last_errors] == ["ILLEGAL_DATA_VALUE"]
        assert wide_driver.last_errors[0].points == ("a", "b")
        assert wide_driver.counters["errors"] == 1

    run(scenario())


def test_driver_reconnects_after_restart():
    async def scenario():
        meter = await start_modbus_device("sdm630", seed=20)
        port = meter.port
        config = device_config(profile="sdm630", port=port, timeout_s=0.3,
                               backoff_min_s=0.05, backoff_max_s=0.2)
        async with driver_for(config) as driver:
            first = await driver.poll()
            await meter.stop()
            await asyncio.sleep(0.05)
            during_outage = await driver.poll()
            outage_errors = list(driver.last_errors)
            meter = await start_modbus_device("sdm630", port=port, seed=21)
            try:
                after = []
                for _ in range(20):
                    await asyncio.sleep(0.05)
                    after = await driver.poll()
                    if after:
                        break
            finally:
                await meter.stop()
        assert len(first) == len(config.points)
        assert during_outage == []
        assert outage_errors
        assert len(after) == len(config.points)
        assert driver.counters["reconnects"] == 1

    run(scenario())


def test_driver_silent_server_times_out():
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(256):
                pass
        writer.close()

    async def scenario():
        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = device_config(port=port, timeout_s=0.2, points=[{"name": "a", "address": 0, "type": "uint16"}])
        try:
            async with driver_for(config) as driver:
                started = time.monotonic()
                readings = await driver.poll()
                elapsed = time.monotonic() - started
        finally:
            server.close()
            await server.wait_closed()
        assert readings == []
        assert [error.reason for error in driver.last_errors] == ["NO_RESPONSE"]
        assert driver.counters["timeouts"] == 1
        assert elapsed < 1.0

    run(scenario())


def test_driver_unreachable_device():
    async def scenario():
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        config = device_config(port=port, timeout_s=0.2, backoff_min_s=10.0,
                               points=[{"name": "a", "address": 0, "type": "uint16"}])
        driver = ModbusTcpDriver(config)
        opened = await driver.open()
        readings = await driver.poll()
        await driver.close()
        return opened, readings, driver

    opened, readings, driver = run(scenario())
    assert opened is False
    assert readings == []
    assert [error.reason for error in driver.last_errors] == ["NOT_CONNECTED"]
    assert driver.counters["connect_failures"] == 1


def test_cpa_start_stop_states():
    async def scenario():
        async with simulator("cpa", seed=22, transition_s=2.0) as compressor:
            compressor.freeze()
            states = []
            async with raw_client(compressor.port) as client:
                stop_echo = await client.write_register(1, 0xFFFF, device_id=16)
                states.append((await client.read_input_registers(1, count=2, device_id=16)).registers)
                compressor.step(2.5)
                states.append((await client.read_input_registers(1, count=2, device_id=16)).registers)
                await client.write_register(1, 0x0001, device_id=16)
                states.append((await client.read_input_registers(1, count=2, device_id=16)).registers)
                compressor.step(2.5)
                states.append((await client.read_input_registers(1, count=2, device_id=16)).registers)
                await client.write_register(1, 0x00FF, device_id=16)
                states.append((await client.read_input_registers(1, count=2, device_id=16)).registers)
        assert stop_echo.registers == [0xFFFF]
        # [operating state, running]: stopping, idle, starting, running, stopping.
        assert states == [[5, 0], [0, 0], [2, 1], [3, 1], [5, 0]]

    run(scenario())


def test_cpa_hours_advance_with_speed():
    async def scenario():
        async with simulator("cpa", seed=23, speed=3600.0, update_interval_s=0.02) as compressor:
            before = compressor.values()["hours"]
            await asyncio.sleep(0.3)
            after = compressor.values()["hours"]
        assert 0.1 < after - before < 1.0  # 0.3 s at 3600x is about 0.3 h

    run(scenario())
