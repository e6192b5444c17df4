"""Sumitomo F-70 compressor: driver and simulator over real pseudo-terminals."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
import serial

from agent.config_errors import ConfigError, Section
from agent.drivers.base import Reading
from agent.drivers.sumitomo_f70 import (
    ALARM_BITS,
    CONTROL_COMMANDS,
    READ_COMMANDS,
    F70CommandError,
    F70Config,
    F70Driver,
    FrameError,
    Reply,
    build_command,
    crc16_modbus,
    decode_status,
    parse_f70_device,
    parse_frame,
)
from firmware_sim.scenario import Step, load_scenario
from firmware_sim.sumitomo_f70 import F70Model, RunningF70, crc16, error_reply, start_f70

# Request bytes as SHI's command table lists them.
COMMAND_TABLE = {
    "TEA": b"$TEAA4B9\r",
    "TE1": b"$TE140B8\r",
    "TE2": b"$TE241F8\r",
    "TE3": b"$TE38139\r",
    "TE4": b"$TE44378\r",
    "PRA": b"$PRA95F7\r",
    "PR1": b"$PR171F6\r",
    "PR2": b"$PR270B6\r",
    "STA": b"$STA3504\r",
    "ID1": b"$ID1D629\r",
    "ON1": b"$ON177CF\r",
    "OFF": b"$OFF9188\r",
    "RS1": b"$RS12156\r",
    "CHR": b"$CHRFD4C\r",
    "CHP": b"$CHP3CCD\r",
    "POF": b"$POF07BF\r",
}

# SHI's example values (T1 86, T2 40, T3 31 degC, P1 79 psig, firmware 1.6,
# 5842.1 h, Local On) and their reply frames, from SHI's examples or computed with the CRC.
EXAMPLE_REPLIES = {
    "TEA": b"$TEA,086,040,031,000,3798\r",
    "TE1": b"$TE1,086,ADBC\r",
    "TE2": b"$TE2,040,3D7F\r",
    "PRA": b"$PRA,079,000,0CEC\r",
    "PR2": b"$PR2,000,0E58\r",
    "STA": b"$STA,0301,2ED1\r",
    "ID1": b"$ID1,1.6,005842.1,000,1E26\r",
}
EXAMPLE_ECHOES = {
    "ON1": b"$ON1,8936\r",
    "OFF": b"$OFF,BB90\r",
    "RS1": b"$RS1,E3A0\r",
    "CHR": b"$CHR,28FD\r",
    "CHP": b"$CHP,48FC\r",
    "POF": b"$POF,6D47\r",
}

# Distinct served values, so that a value read into the wrong point cannot pass.
DISTINCT = {"t1_c": 86, "t2_c": 40, "t3_c": 31, "t4_c": 7, "p1_psig": 79, "p2_psig": 3}
SIM_KEYS = {
    "helium_discharge_temperature": "t1_c",
    "water_outlet_temperature": "t2_c",
    "water_inlet_temperature": "t3_c",
    "temperature_4": "t4_c",
    "return_pressure": "p1_psig",
    "pressure_2": "p2_psig",
    "status_word": "status_word",
    "operating_state": "state",
    "operating_state_name": "state_name",
    "operating_hours": "hours",
    "firmware_version": "firmware",
}


def example_model(**options) -> F70Model:
    model = F70Model(random.Random(0), hours=5842.1, **options)
    for name, value in {"t1_c": 86, "t2_c": 40, "t3_c": 31, "t4_c": 0, "p1_psig": 79, "p2_psig": 0}.items():
        model.override(name, value)
    return model


def request(mnemonic: str) -> bytes:
    """Return the request line without its CR, computed by the simulator's own CRC."""
    body = b"$" + mnemonic.encode()
    return body + f"{crc16(body):04X}".encode()


def fast_config(port: str, **changes) -> F70Config:
    settings = dict(id="f70", port=port, reply_timeout_s=0.2, command_gap_s=0.0,
                    reopen_min_s=0.05, reopen_max_s=0.2, report_t4=True, report_p2=True)
    settings.update(changes)
    return F70Config(**settings)


def section(table: dict) -> Section:
    return Section("agent.toml", "f70[0]", table)


def by_point(readings: list[Reading]) -> dict[str, object]:
    return {reading.point: reading.value for reading in readings}


def expected_value(values: dict, point: str) -> object:
    """Return the simulator's value for a driver point (alarm_active with the default mask)."""
    word = values["status_word"]
    flags = {
        "system_on": word & 0x0001,
        "solenoid_on": (word >> 8) & 1,
        "db25_config_2": (word >> 15) & 1,
        "alarm_active": int(bool(word & 0x00FE)),
    }
    if point in flags:
        return flags[point]
    if point.startswith("alarm_"):
        return int(point.removeprefix("alarm_") in values["alarms"])
    return values[SIM_KEYS[point]]


def wrong_points(readings: list[Reading], values: dict) -> list[str]:
    """Return the points whose value differs from the simulator's."""
    return [f"{r.point}={r.value!r}" for r in readings if r.value != expected_value(values, r.point)]


def step(sim: RunningF70, action: str, **params) -> Step:
    return Step(sim.sim_time(), "f70", action, params)


@pytest.fixture
def sim(tmp_path):
    device = start_f70(link=str(tmp_path / "f70-port"), seed=3)
    for name, value in DISTINCT.items():
        device.model.override(name, value)
    device.freeze()
    yield device
    device.stop()


class Session:
    """A driver opened on the running event loop, closed at the end."""

    def __init__(self, config: F70Config) -> None:
        self.driver = F70Driver(config)

    async def __aenter__(self) -> F70Driver:
        await self.driver.open()
        return self.driver

    async def __aexit__(self, *exc_info) -> None:
        await self.driver.close()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


# CRC and wire format


def test_crc_check_value_driver():
    assert crc16_modbus(b"123456789") == 0x4B37


def test_crc_check_value_simulator():
    assert crc16(b"123456789") == 0x4B37


@pytest.mark.parametrize("mnemonic", sorted(COMMAND_TABLE))
def test_request_bytes_match_table(mnemonic):
    assert build_command(mnemonic) == COMMAND_TABLE[mnemonic]


def test_every_command_in_table():
    assert set(READ_COMMANDS) | set(CONTROL_COMMANDS) == set(COMMAND_TABLE)


def test_build_command_rejects_unknown():
    with pytest.raises(ValueError, match="unknown F-70 command 'IDN'"):
        build_command("IDN")


@pytest.mark.parametrize("mnemonic", sorted(EXAMPLE_REPLIES))
def test_sim_reply_matches_example(mnemonic):
    assert example_model().respond(request(mnemonic)) == EXAMPLE_REPLIES[mnemonic]


@pytest.mark.parametrize("mnemonic", sorted(EXAMPLE_ECHOES))
def test_sim_echo_matches_example(mnemonic):
    assert example_model().respond(request(mnemonic)) == EXAMPLE_ECHOES[mnemonic]


def test_sim_status_off_and_tripped():
    model = example_model()
    model.respond(request("OFF"))
    assert model.respond(request("STA")) == b"$STA,0000,FAD0\r"
    model.respond(request("ON1"))
    model.trip("helium_temperature")
    assert model.respond(request("STA")) == b"$STA,0C08,BECD\r"


def test_sim_id1_without_third_field():
    model = example_model(id1_third_field=False)
    assert model.respond(request("ID1")) == b"$ID1,1.6,005842.1,00C5\r"


def test_sim_pr1_crc_without_comma():
    model = example_model(crc_without_comma=("PR1",))
    assert model.respond(request("PR1")) == b"$PR1,079,2EBD\r"


@pytest.mark.parametrize("line", [
    b"*IDN?",  # no '$'
    b"$POF7BF",  # CRC without its leading zero
    b"$TEAa4b9",  # lowercase CRC digits
    b"$TEAA4B8",  # wrong CRC
    b"$XYZ" + f"{crc16(b'$XYZ'):04X}".encode(),  # unknown mnemonic
    b"$TEAA4B9A",  # too long
    b"",
])
def test_sim_rejects_malformed(line):
    assert example_model().respond(line) == b"$???,3278\r"


def test_sim_error_reply_bytes():
    assert error_reply() == b"$???,3278\r"


def test_sim_serves_pty_raw(sim):
    with serial.Serial(sim.path, 9600, timeout=1.0) as port:
        port.write(b"$STA3504\r")
        status = port.read_until(b"\r")
        port.write(b"*IDN?\r")
        rejected = port.read_until(b"\r")
    assert status == b"$STA,0301,2ED1\r"
    assert rejected == b"$???,3278\r"


def test_parse_frame_example():
    reply = parse_frame(b"$TEA,086,040,031,000,3798")
    assert reply == Reply("TEA", ("086", "040", "031", "000"))


def test_parse_frame_error_reply():
    assert parse_frame(b"$???,3278") == Reply("???", ())


def test_parse_frame_pr1_either():
    reply = parse_frame(b"$PR1,079,2EBD", "either")
    assert reply.crc_without_comma


def test_parse_frame_pr1_strict_rejects():
    with pytest.raises(FrameError, match="CRC mismatch"):
        parse_frame(b"$PR1,079,2EBD", "with_comma")


def test_parse_frame_bad_crc():
    with pytest.raises(FrameError, match="received 3799"):
        parse_frame(b"$TEA,086,040,031,000,3799")


# Status word


@pytest.mark.parametrize("word, state, alarms", [
    (0x0301, "local_on", ()),
    (0x0000, "local_off", ()),
    (0x0C08, "fault_off", ("helium_temperature",)),
    (0x0E40, "oil_fault_off", ("oil_level",)),
    (0x0A01, "cold_head_pause", ()),
    (0x08B0, "cold_head_run", ("pressure", "water_flow", "water_temperature")),
    (0x0606, "remote_on", ("phase_sequence_fuse", "motor_temperature")),
])
def test_status_decoded(word, state, alarms):
    status = decode_status(word)
    assert status.state_name == state
    assert status.alarms == alarms


def test_status_flags():
    status = decode_status(0x8301)
    assert status.config_2
    assert status.solenoid_on
    assert status.system_on
    assert status.state == 1


@pytest.mark.parametrize("mask, name", ALARM_BITS)
def test_status_each_alarm_bit(mask, name):
    assert decode_status(mask).alarms == (name,)


def test_status_rejects_wide_word():
    with pytest.raises(ValueError, match="0x10000|65536"):
        decode_status(0x10000)


def test_alarm_summary_mask(sim):
    sim.model.trip("helium_temperature")
    isis_style = fast_config(sim.path, alarm_mask=0x00F6, commands=("STA",))

    async def poll(config):
        async with Session(config) as driver:
            return by_point(await driver.poll())

    default = run(poll(fast_config(sim.path, commands=("STA",))))
    isis = run(poll(isis_style))
    assert default["alarm_active"] == 1
    assert isis["alarm_active"] == 0
    assert isis["alarm_helium_temperature"] == 1


# Configuration


def test_config_defaults():
    config = parse_f70_device(section({"id": "f70", "port": "/dev/serial/by-id/usb-FTDI-if00-port0"}))
    assert (config.baudrate, config.bytesize, config.parity, config.stopbits) == (9600, 8, "none", 1)
    assert config.commands == ("TEA", "PRA", "STA", "ID1")
    assert config.reply_crc_coverage == "either"
    assert config.id1_third_field == "optional"
    assert config.alarm_mask == 0x00FE


def test_config_full_table():
    config = parse_f70_device(section({
        "id": "f70", "port": "rfc2217://gateway:4001", "reply_timeout_s": 2, "poll_interval_s": 30,
        "command_gap_s": 0.1, "commands": ["STA", "TE1", "TE4"], "report_t4": True,
        "id1_third_field": "required", "reply_crc_coverage": "with_comma", "field_format": "lenient",
        "alarm_mask": 0x00F6,
    }))
    assert config.commands == ("STA", "TE1", "TE4")
    assert config.poll_interval_s == 30.0
    assert config.alarm_mask == 0x00F6


@pytest.mark.parametrize("table, key, message", [
    ({"port": "/dev/ttyUSB0"}, "id", "required"),
    ({"id": "f70", "port": "ttyUSB0"}, "port", "absolute device path"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "baud": 9600}, "baud", "unknown keys"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "commands": ["TEA", "IDN"]}, "commands", "read commands from"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "commands": ["ON1"]}, "commands", "never polled"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "commands": ["TEA", "TEA"]}, "commands", "repeated"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "commands": []}, "commands", "non-empty"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "commands": ["TE4"]}, "commands", "report_t4 = true"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "stopbits": 3}, "stopbits", "1, 1.5 or 2"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "reply_timeout_s": 0}, "reply_timeout_s", "between"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "alarm_mask": 0x0100}, "alarm_mask", "alarm bits only"),
    ({"id": "f70", "port": "/dev/ttyUSB0", "reply_crc_coverage": "any"}, "reply_crc_coverage", "either"),
])
def test_config_rejects(table, key, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse_f70_device(section(table))
    assert caught.value.key == f"f70[0].{key}"


def test_sample_config_parses():
    import tomllib

    import agent.drivers

    path = Path(agent.drivers.__file__).parent / "samples" / "sumitomo_f70.toml"
    table = tomllib.loads(path.read_text(encoding="utf-8"))
    configs = [parse_f70_device(s) for s in Section(str(path), "", table).table_list("f70")]
    assert [c.id for c in configs] == ["mri1-f70"]


# Polling the simulator


def test_poll_matches_sim(sim):
    async def poll():
        async with Session(fast_config(sim.link)) as driver:
            return await driver.poll(), dict(driver.counters), driver.last_errors

    readings, counters, errors = run(poll())
    values = sim.values()
    points = by_point(readings)
    assert errors == []
    assert wrong_points(readings, values) == []
    assert points["helium_discharge_temperature"] == 86
    assert points["return_pressure"] == 79
    assert points["operating_state_name"] == "local_on"
    assert points["firmware_version"] == values["firmware"]
    assert points["operating_hours"] == values["hours"]
    assert counters["replies"] == 4
    assert counters["commands"] == 4


def test_poll_readings_shape(sim):
    async def poll():
        async with Session(fast_config(sim.path)) as driver:
            return await driver.poll()

    readings = run(poll())
    units = {r.point: r.unit for r in readings}
    assert {r.device for r in readings} == {"f70"}
    assert {r.quality for r in readings} == {"good"}
    assert units["helium_discharge_temperature"] == "degC"
    assert units["return_pressure"] == "psig"
    assert units["operating_hours"] == "h"
    assert all(r.t_wall > 1e9 for r in readings)


def test_poll_leaves_out_unused_channels(sim):
    async def poll():
        async with Session(fast_config(sim.path, report_t4=False, report_p2=False)) as driver:
            return by_point(await driver.poll())

    points = run(poll())
    assert "temperature_4" not in points
    assert "pressure_2" not in points
    assert points["water_inlet_temperature"] == 31


def test_poll_single_channel_commands(sim):
    config = fast_config(sim.path, commands=("TE1", "TE2", "TE3", "TE4", "PR1", "PR2"))

    async def poll():
        async with Session(config) as driver:
            return await driver.poll()

    readings = run(poll())
    assert len(readings) == 6
    assert wrong_points(readings, sim.values()) == []


def test_poll_sends_no_operating_command(sim):
    async def poll_twice():
        async with Session(fast_config(sim.path)) as driver:
            await driver.poll()
            await driver.poll()

    run(poll_twice())
    assert sim.model.operating_commands == 0


def test_poll_before_open_raises(sim):
    driver = F70Driver(fast_config(sim.path))
    with pytest.raises(RuntimeError, match="before open"):
        run(driver.poll())


def test_id1_two_fields_accepted():
    device = start_f70(seed=1, id1_third_field=False, hours=1234.5)

    async def poll():
        async with Session(fast_config(device.path, commands=("ID1",))) as driver:
            return by_point(await driver.poll())

    try:
        points = run(poll())
    finally:
        device.stop()
    assert points["operating_hours"] == 1234.5


def test_id1_third_field_required(sim):
    sim.model.id1_third_field = False

    async def poll():
        config = fast_config(sim.path, commands=("ID1",), id1_third_field="required")
        async with Session(config) as driver:
            readings = await driver.poll()
            return readings, driver.last_errors, driver.counters["malformed_replies"]

    readings, errors, malformed = run(poll())
    assert readings == []
    assert [e.reason for e in errors] == ["MALFORMED_REPLY"]
    assert malformed == 1


def test_pr1_crc_without_comma_accepted(sim):
    sim.model.crc_without_comma = frozenset({"PR1"})

    async def poll(coverage):
        async with Session(fast_config(sim.path, commands=("PR1",), reply_crc_coverage=coverage)) as driver:
            return by_point(await driver.poll()), dict(driver.counters)

    lenient, lenient_counters = run(poll("either"))
    strict, strict_counters = run(poll("with_comma"))
    assert lenient == {"return_pressure": 79}
    assert lenient_counters["crc_without_comma"] == 1
    assert strict == {}
    assert strict_counters["crc_errors"] == 1


def test_field_format_strict_and_lenient():
    strict = F70Driver(fast_config("/dev/null"))
    lenient = F70Driver(fast_config("/dev/null", field_format="lenient"))
    reply = Reply("TEA", ("-05", "040", "031", "000"))
    with pytest.raises(FrameError, match="T1 field '-05'"):
        strict._decode("TEA", reply, 0.0, 0.0)
    readings = lenient._decode("TEA", reply, 0.0, 0.0)
    assert readings[0].value == -5


# Operating commands


def test_control_commands_change_state(sim):
    sim.resume()

    async def sequence():
        states = []
        async with Session(fast_config(sim.path, commands=("STA",))) as driver:
            for action in (driver.turn_off, driver.turn_on, driver.pause_cold_head,
                           driver.resume_cold_head, driver.turn_off, driver.run_cold_head):
                await action()
                states.append(by_point(await driver.poll())["operating_state_name"])
            sim.model.trip("motor_temperature")
            states.append(by_point(await driver.poll())["operating_state_name"])
            await driver.reset_faults()
            states.append(by_point(await driver.poll())["operating_state_name"])
            return states, driver.counters["control_commands"]

    states, sent = run(sequence())
    assert states == ["local_off", "local_on", "cold_head_pause", "local_on", "local_off",
                      "cold_head_run", "fault_off", "local_off"]
    assert sent == 7


def test_control_command_fails_without_echo(sim):
    sim.apply_step(step(sim, "fault", kind="no_reply", duration_s=5.0))

    async def turn_on():
        async with Session(fast_config(sim.path)) as driver:
            await driver.turn_on()

    with pytest.raises(F70CommandError, match="ON1 failed: NO_REPLY"):
        run(turn_on())


def test_send_control_rejects_read_command(sim):
    async def send():
        async with Session(fast_config(sim.path)) as driver:
            await driver.send_control("TEA")

    with pytest.raises(ValueError, match="not an F-70 operating command"):
        run(send())


# Faults: each is counted, reported and recovered from, and no value lands in the wrong point


def fault_then_recover(sim: RunningF70, kind: str, duration_s: float, **params):
    """Poll during a fault and after it; return both polls' readings, the errors and counters."""
    config = fast_config(sim.path, commands=("TEA", "PRA", "STA"))

    async def exercise():
        async with Session(config) as driver:
            sim.apply_step(step(sim, "fault", kind=kind, duration_s=duration_s, **params))
            during = await driver.poll()
            errors = list(driver.last_errors)
            await asyncio.sleep(duration_s + 0.4)
            after = await driver.poll()
            return during, errors, after, list(driver.last_errors), dict(driver.counters)

    return run(exercise())


@pytest.mark.parametrize("kind, counter, reason", [
    ("corrupt", "crc_errors", "CRC_ERROR"),
    ("bad_crc", "crc_errors", "CRC_ERROR"),
    ("corrupt_commands", "error_replies", "ERROR_REPLY"),
    ("no_reply", "timeouts", "NO_REPLY"),
])
def test_fault_counted_and_recovered(sim, kind, counter, reason):
    during, errors, after, errors_after, counters = fault_then_recover(sim, kind, 0.3)
    values = sim.values()
    assert counters[counter] >= 1
    assert reason in {e.reason for e in errors}
    assert wrong_points(during, values) == []
    assert errors_after == []
    assert wrong_points(after, values) == []
    assert len(after) == len(by_point(after)) > 10


def test_fault_slow_reply_late(sim):
    during, errors, after, errors_after, counters = fault_then_recover(sim, "slow_reply", 0.05, delay_s=0.35)
    values = sim.values()
    assert counters["timeouts"] >= 1
    assert counters["late_replies"] >= 1
    assert "NO_REPLY" in {e.reason for e in errors}
    assert wrong_points(during, values) == []
    assert errors_after == []
    assert wrong_points(after, values) == []


def test_fault_garbage_skipped(sim):
    during, errors, after, errors_after, counters = fault_then_recover(sim, "garbage", 0.3)
    values = sim.values()
    assert counters["garbage_bytes"] >= 1
    assert wrong_points(during, values) == []
    assert "helium_discharge_temperature" in by_point(during)
    assert errors_after == []


def test_late_reply_flushed_before_request(sim):
    """A reply that arrives after its timeout is discarded before the next request."""
    # TEA times out at 0.2 s, its reply arrives at 0.3 s and PRA is sent at 0.5 s.
    config = fast_config(sim.path, commands=("TEA", "PRA"), command_gap_s=0.3)

    async def exercise():
        async with Session(config) as driver:
            sim.apply_step(step(sim, "fault", kind="slow_reply", duration_s=0.05, delay_s=0.3))
            readings = await driver.poll()
            return readings, [e.reason for e in driver.last_errors], dict(driver.counters)

    readings, reasons, counters = run(exercise())
    assert by_point(readings) == {"return_pressure": 79, "pressure_2": 3}
    assert reasons == ["NO_REPLY"]
    assert counters["late_replies"] == 1


def test_port_removed_and_restored(sim):
    config = fast_config(sim.link, commands=("TEA", "STA"))

    async def exercise():
        async with Session(config) as driver:
            before = await driver.poll()
            sim.apply_step(step(sim, "fault", kind="port_removed", duration_s=0.5))
            during = await driver.poll()
            reasons = {e.reason for e in driver.last_errors}
            deadline = time.monotonic() + 4.0
            after: list[Reading] = []
            while not after and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                after = await driver.poll()
            return before, during, reasons, after, dict(driver.counters)

    before, during, reasons, after, counters = run(exercise())
    assert before
    assert during == []
    assert reasons <= {"PORT_LOST", "NOT_OPEN"}
    assert counters["port_errors"] == 1
    assert counters["reopens"] == 1
    assert os.readlink(sim.link) == sim.path
    assert wrong_points(after, sim.values()) == []


def test_loopback_echo_detected():
    """With TX looped to RX (pyserial's loop:// port) the driver receives its own request."""
    async def poll():
        async with Session(fast_config("loop://", commands=("STA",))) as driver:
            readings = await driver.poll()
            return readings, [e.reason for e in driver.last_errors], dict(driver.counters)

    readings, reasons, counters = run(poll())
    assert readings == []
    assert reasons == ["NO_REPLY"]
    assert counters["echoed_requests"] == 1
    assert counters["crc_errors"] == 0


def test_open_missing_port_retries(tmp_path):
    link = tmp_path / "by-id" / "usb-f70"
    link.parent.mkdir()
    config = fast_config(str(link), commands=("STA",))

    async def exercise():
        driver = F70Driver(config)
        opened = await driver.open()
        device = start_f70(link=str(link), seed=2)
        try:
            await asyncio.sleep(0.25)
            readings = await driver.poll()
        finally:
            await driver.close()
            device.stop()
        return opened, readings, dict(driver.counters)

    opened, readings, counters = run(exercise())
    assert not opened
    assert counters["open_failures"] == 1
    assert by_point(readings)["operating_state_name"] == "local_on"


def test_power_cycle_silent_then_off(sim):
    sim.resume()
    config = fast_config(sim.path, commands=("STA",))

    async def exercise():
        async with Session(config) as driver:
            sim.apply_step(step(sim, "event", name="power_cycle", duration_s=0.3))
            during = await driver.poll()
            await asyncio.sleep(0.35)
            after = by_point(await driver.poll())
            return during, after, driver.counters["timeouts"]

    during, after, timeouts = run(exercise())
    assert during == []
    assert timeouts == 1
    assert after["operating_state_name"] == "local_off"


# Scenarios


def test_scenario_step_changes_reading(sim):
    sim.model.clear_overrides()
    config = fast_config(sim.path, commands=("TE3",))

    async def exercise():
        async with Session(config) as driver:
            before = by_point(await driver.poll())["water_inlet_temperature"]
            sim.apply_step(step(sim, "set", quantity="t3_c", value=6.0))
            after = by_point(await driver.poll())["water_inlet_temperature"]
            return before, after

    before, after = run(exercise())
    assert after - before == 6
    assert after == sim.values()["t3_c"]


def test_scenario_trip_read_as_alarm(sim):
    sim.apply_step(step(sim, "event", name="trip", alarm="water_flow"))

    async def poll():
        async with Session(fast_config(sim.path, commands=("STA",))) as driver:
            return by_point(await driver.poll())

    points = run(poll())
    assert points["alarm_water_flow"] == 1
    assert points["alarm_active"] == 1
    assert points["operating_state_name"] == "fault_off"


def test_scenario_unknown_quantity(sim):
    with pytest.raises(ValueError, match="no quantity 'oil_c'"):
        sim.apply_step(step(sim, "set", quantity="oil_c", value=1.0))


def test_scenario_unknown_fault(sim):
    with pytest.raises(ValueError, match="no fault 'drop'"):
        sim.apply_step(step(sim, "fault", kind="drop", duration_s=1.0))


def test_cold_head_drift_trips():
    """The built-in scenario raises the water warning first, then trips on helium temperature."""
    scenario = load_scenario("cold_head_drift")
    model = F70Model(random.Random(scenario.seed))
    device = RunningF70(model)
    pending = list(scenario.steps)
    first_seen: dict[str, float] = {}
    try:
        while model.t_s < scenario.duration_s:
            while pending and pending[0].at_s <= model.t_s:
                device.apply_step(pending.pop(0))
            model.advance(600.0)
            for alarm in model.values()["alarms"]:
                first_seen.setdefault(alarm, model.t_s)
    finally:
        device.stop()
    assert {step.device for step in scenario.steps} == {"f70"}
    assert "helium_temperature" in first_seen
    assert first_seen["water_temperature"] < first_seen["helium_temperature"]
    assert model.values()["state_name"] == "fault_off"
