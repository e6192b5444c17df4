"""Modbus RTU: the driver on a real pseudo-terminal bus and through a TCP gateway.

Each fault that gateways meet in the field has a test. The faults are dropped, slow, late,
corrupted and exception replies, a device that reboots, a dead device on a shared bus, a
serial adapter that is unplugged and comes back under a new name, and a gateway restart. Each shows that the driver
recovers, counts the fault and reports it, and never gives a value to the wrong device or
register. pymodbus serves as an independent master and slave to cross-check both sides.
"""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
import serial
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.drivers.modbus import ModbusDriver
from firmware_sim.modbus_rtu import crc16 as simulator_crc16
from tests.test_modbus_fixtures import (
    by_name,
    device_config,
    driver_for,
    drivers_for,
    poll_until_good,
    reasons,
    rtu_bus,
    run,
)

pytestmark = pytest.mark.timeout(60)

VOLTAGE = [{"name": "voltage_l1", "register": 30001, "type": "float32"}]
TWO_METERS = [{"kind": "sdm630", "name": "meter_a", "unit_id": 1}, {"kind": "sdm630", "name": "meter_b", "unit_id": 2}]


def meter_config(bus, unit_id: int = 1, **table):
    table.setdefault("timeout_s", 0.3)
    table.setdefault("backoff_min_s", 0.05)
    table.setdefault("backoff_max_s", 0.2)
    table.setdefault("points", VOLTAGE)
    return device_config(id=f"meter{unit_id}", transport="rtu", port=bus.port, unit_id=unit_id,
                         register_base=30001, **table)


async def poll_for(driver: ModbusDriver, duration_s: float, interval_s: float) -> list[float]:
    """Poll like the service's loop for `duration_s`; return the voltage of each good poll."""
    values = []
    started = time.monotonic()
    next_poll = started
    while time.monotonic() - started < duration_s:
        readings = await driver.poll()
        values.extend(reading.value for reading in readings)
        next_poll += interval_s
        await asyncio.sleep(max(next_poll - time.monotonic(), 0.0))
    return values


# --- shared bus ----------------------------------------------------------------------------

def test_two_units_own_values():
    async def scenario():
        async with rtu_bus(TWO_METERS, seed=51) as bus:
            bus.devices["meter_a"].override("voltage_l1", 100.0)
            bus.devices["meter_b"].override("voltage_l1", 200.0)
            async with drivers_for(meter_config(bus, 1), meter_config(bus, 2)) as (a, b):
                rounds = [await asyncio.gather(a.poll(), b.poll()) for _ in range(5)]
                return rounds

    for first, second in run(scenario()):
        assert [reading.value for reading in first] == [100.0]
        assert [reading.value for reading in second] == [200.0]


def test_dead_unit_isolated():
    async def scenario():
        async with rtu_bus(TWO_METERS, seed=52) as bus:
            bus.devices["meter_a"].override("voltage_l1", 100.0)
            bus.devices["meter_b"].override("voltage_l1", 200.0)
            configs = [meter_config(bus, 1), meter_config(bus, 2),
                       meter_config(bus, 9, timeout_s=0.15, backoff_min_s=0.4, backoff_max_s=2.0)]
            async with drivers_for(*configs) as (a, b, dead):
                results = await asyncio.gather(*(poll_for(driver, 1.5, 0.1) for driver in (a, b, dead)))
                return results, dead.counters

    (live_a, live_b, dead_values), dead_counters = run(scenario(), 30.0)
    # 15 polls each at 0.1 s; the dead unit may cost them a timeout now and then.
    assert len(live_a) >= 10
    assert len(live_b) >= 10
    assert set(live_a) == {100.0}
    assert set(live_b) == {200.0}
    assert dead_values == []
    assert dead_counters["requests"] <= 4
    assert dead_counters["skipped_polls"] >= 8
    assert dead_counters["timeouts"] == dead_counters["requests"]


def test_settings_conflict_rejected():
    async def scenario():
        async with rtu_bus(TWO_METERS, seed=53) as bus:
            async with driver_for(meter_config(bus, 1, baudrate=9600)):
                other = ModbusDriver(meter_config(bus, 2, baudrate=19200))
                with pytest.raises(ValueError, match="same baudrate"):
                    await other.open()

    run(scenario())


def test_min_gap_kept():
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=54) as bus:
            config = device_config(transport="rtu", port=bus.port, profile="sdm630")
            async with driver_for(config) as driver:
                await driver.poll()
                started = time.monotonic()
                for _ in range(3):
                    await driver.poll()
                return time.monotonic() - started, driver.counters["requests"]

    elapsed, requests = run(scenario())
    assert requests == 8
    assert elapsed >= 6 * 0.06  # six requests, each after a gap of at least 60 ms


# --- reply faults --------------------------------------------------------------------------

def test_dropped_reply_recovers():
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=55) as bus:
            bus.devices["sdm630"].faults.add("drop", count=1)
            async with driver_for(meter_config(bus)) as driver:
                first = await driver.poll()
                first_reasons = reasons(driver)
                recovered = await poll_until_good(driver)
                return first, first_reasons, recovered, driver.counters, bus.devices["sdm630"].values()

    first, first_reasons, recovered, counters, truth = run(scenario())
    assert first == []
    assert first_reasons == ["NO_RESPONSE"]
    assert counters["timeouts"] == 1
    assert counters["backoffs"] == 1
    assert recovered[0].value == pytest.approx(truth["voltage_l1"], rel=1e-6)


@pytest.mark.parametrize(("fault", "reason", "counter"), [
    ("corrupt", "CRC_ERROR", "crc_errors"),
    ("bad_crc", "CRC_ERROR", "crc_errors"),
])
def test_damaged_reply_counted(fault, reason, counter):
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=56) as bus:
            bus.devices["sdm630"].faults.add(fault, count=1)
            async with driver_for(meter_config(bus)) as driver:
                first = await driver.poll()
                first_reasons = reasons(driver)
                second = await driver.poll()
                return first, first_reasons, second, driver.counters

    first, first_reasons, second, counters = run(scenario())
    assert first == []
    assert first_reasons == [reason]
    assert counters[counter] == 1
    assert len(second) == 1


def test_exception_reply_named():
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=57) as bus:
            bus.devices["sdm630"].faults.add("exception", count=1, code=4)
            async with driver_for(meter_config(bus)) as driver:
                first = await driver.poll()
                first_reasons = reasons(driver)
                second = await driver.poll()
                return first, first_reasons, second, driver.counters

    first, first_reasons, second, counters = run(scenario())
    assert first == []
    assert first_reasons == ["SERVER_DEVICE_FAILURE"]
    assert counters["exception_SERVER_DEVICE_FAILURE"] == 1
    assert counters["backoffs"] == 0
    assert len(second) == 1


def test_busy_reply_retried():
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=58) as bus:
            bus.devices["sdm630"].faults.add("busy", count=1)
            async with driver_for(meter_config(bus, busy_retry_delay_s=0.01)) as driver:
                readings = await driver.poll()
                return readings, driver.last_errors, driver.counters

    readings, errors, counters = run(scenario())
    assert len(readings) == 1
    assert errors == []
    assert counters["busy_retries"] == 1
    assert counters["errors"] == 0


def test_device_reboot_recovers():
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=59) as bus:
            async with driver_for(meter_config(bus, timeout_s=0.1)) as driver:
                await bus.devices["sdm630"].restart(0.4)
                during = await driver.poll()
                during_reasons = reasons(driver)
                recovered = await poll_until_good(driver)
                return during, during_reasons, recovered

    during, during_reasons, recovered = run(scenario())
    assert during == []
    assert during_reasons == ["NO_RESPONSE"]
    assert len(recovered) == 1


# --- late replies ----------------------------------------------------------------------------

def test_late_reply_other_unit():
    """Unit 1 replies after the driver gave up, while unit 2's request is on the line."""

    async def scenario():
        async with rtu_bus(TWO_METERS, seed=60) as bus:
            meter_a, meter_b = bus.devices["meter_a"], bus.devices["meter_b"]
            meter_a.override("voltage_l1", 100.0)
            meter_b.override("voltage_l1", 200.0)
            # A's reply comes at 0.35 s, B's at about 0.15 + 0.3 s: A's late frame arrives first.
            meter_a.faults.add("delay", count=1, delay_s=0.35)
            meter_b.faults.add("delay", count=1, delay_s=0.3)
            config_a = meter_config(bus, 1, timeout_s=0.1, backoff_min_s=1.0, backoff_max_s=2.0)
            config_b = meter_config(bus, 2, timeout_s=1.0)
            async with drivers_for(config_a, config_b) as (a, b):
                a_readings = await a.poll()
                b_readings = await b.poll()
                b_again = await b.poll()
                return a_readings, b_readings, b_again, a.counters, b.counters

    a_readings, b_readings, b_again, a_counters, b_counters = run(scenario())
    assert a_readings == []
    assert a_counters["timeouts"] == 1
    assert [reading.value for reading in b_readings] in ([200.0], [])
    assert [reading.value for reading in b_again] == [200.0]
    dropped = b_counters["stray_replies"] + b_counters["discarded_bytes"] + a_counters["discarded_bytes"]
    assert dropped > 0


def test_late_reply_same_unit():
    """A reply to the first request arrives late; the device's next values come from their own registers."""
    points = [{"name": "voltage_l1", "register": 30001, "type": "float32"},
              {"name": "frequency", "register": 30071, "type": "float32"}]

    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=61) as bus:
            meter = bus.devices["sdm630"]
            meter.override("voltage_l1", 111.0)
            meter.override("frequency", 49.5)
            meter.faults.add("delay", count=1, delay_s=0.2)
            config = meter_config(bus, timeout_s=0.1, max_gap_registers=0, points=points)
            async with driver_for(config) as driver:
                first = await driver.poll()
                later = [by_name(await driver.poll()) for _ in range(3)]
                await asyncio.sleep(0.3)
                later += [by_name(await driver.poll()) for _ in range(3)]
                return first, later, driver.counters

    first, later, counters = run(scenario())
    assert first == []
    assert counters["timeouts"] == 1
    for values in later:
        assert values.get("voltage_l1", 111.0) == 111.0
        assert values.get("frequency", 49.5) == 49.5
    assert later[-1] == {"voltage_l1": 111.0, "frequency": 49.5}


# --- the serial port goes away -----------------------------------------------------------

def test_port_loss_recovers(tmp_path):
    link = str(tmp_path / "ttyRS485")

    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=62, link=link) as bus:
            async with driver_for(meter_config(bus, backoff_min_s=0.05, backoff_max_s=0.1)) as driver:
                before = await driver.poll()
                old_path = bus.path
                await bus.remove_port()
                lost = await driver.poll()
                lost_reasons = reasons(driver)
                away = await driver.poll()
                away_reasons = reasons(driver)
                await asyncio.sleep(0.15)
                await bus.restore_port()
                recovered = await poll_until_good(driver)
                return before, old_path, bus.path, lost, lost_reasons, away, away_reasons, recovered, driver.counters

    (before, old_path, new_path, lost, lost_reasons, away, away_reasons, recovered,
     counters) = run(scenario())
    assert len(before) == 1
    assert lost == []
    assert lost_reasons == ["PORT_LOST"]
    assert away == []
    assert away_reasons[0] in ("CONNECT_FAILED", "NOT_CONNECTED")
    assert len(recovered) == 1
    assert counters["link_errors"] == 1
    assert counters["connect_failures"] >= 1
    assert counters["reconnects"] == 1
    assert new_path is not None
    assert old_path is not None


def test_port_loss_fault_step(tmp_path):
    from firmware_sim.scenario import Step

    link = str(tmp_path / "ttyBUS")

    async def scenario():
        async with rtu_bus(TWO_METERS, seed=63, link=link) as bus:
            async with drivers_for(meter_config(bus, 1), meter_config(bus, 2)) as (a, b):
                await a.poll()
                bus.devices["meter_a"].apply_step(Step(0.0, "meter_a", "fault", {"kind": "port_loss", "duration_s": 0.2}))
                await asyncio.sleep(0.05)
                during = await b.poll()
                recovered = [await poll_until_good(driver) for driver in (a, b)]
                return during, recovered, bus.port_losses

    during, recovered, losses = run(scenario())
    assert during == []
    assert losses == 1
    assert [len(readings) for readings in recovered] == [1, 1]


# --- RTU through a TCP gateway -------------------------------------------------------------

def gateway_config(bus, unit_id: int = 1, **table):
    table.setdefault("timeout_s", 0.3)
    table.setdefault("backoff_min_s", 0.05)
    table.setdefault("backoff_max_s", 0.2)
    return device_config(id=f"meter{unit_id}", transport="rtu-over-tcp", host="127.0.0.1", port=bus.port,
                         unit_id=unit_id, register_base=30001, points=VOLTAGE, **table)


def test_gateway_two_units():
    async def scenario():
        async with rtu_bus(TWO_METERS, transport="rtu-over-tcp", seed=64) as bus:
            bus.devices["meter_a"].override("voltage_l1", 100.0)
            bus.devices["meter_b"].override("voltage_l1", 200.0)
            async with drivers_for(gateway_config(bus, 1), gateway_config(bus, 2)) as (a, b):
                first, second = await asyncio.gather(a.poll(), b.poll())
                return first, second, a._link is b._link

    first, second, shared = run(scenario())
    assert [reading.value for reading in first] == [100.0]
    assert [reading.value for reading in second] == [200.0]
    assert shared


def test_gateway_restart_recovers():
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], transport="rtu-over-tcp", seed=65) as bus:
            async with driver_for(gateway_config(bus)) as driver:
                before = await driver.poll()
                restart = asyncio.create_task(bus.restart(0.3))
                await asyncio.sleep(0.1)
                during = await driver.poll()
                during_reasons = reasons(driver)
                await restart
                recovered = await poll_until_good(driver)
                return before, during, during_reasons, recovered, driver.counters

    before, during, during_reasons, recovered, counters = run(scenario())
    assert len(before) == 1
    assert during == []
    assert during_reasons[0] in ("CONNECTION_LOST", "CONNECT_FAILED", "NOT_CONNECTED")
    assert len(recovered) == 1
    assert counters["reconnects"] == 1


def test_gateway_slow_reply_drained():
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], transport="rtu-over-tcp", seed=66) as bus:
            meter = bus.devices["sdm630"]
            meter.override("voltage_l1", 123.0)
            meter.faults.add("delay", count=1, delay_s=0.15)
            async with driver_for(gateway_config(bus, timeout_s=0.1)) as driver:
                first = await driver.poll()
                recovered = await poll_until_good(driver)
                return first, recovered, driver.counters

    first, recovered, counters = run(scenario())
    assert first == []
    assert [reading.value for reading in recovered] == [123.0]
    assert counters["discarded_bytes"] == 9  # the late 9-byte reply, dropped


def test_serial_url_port():
    """A pyserial URL works as the RTU port: here socket:// to the simulated gateway."""

    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], transport="rtu-over-tcp", seed=67) as bus:
            bus.devices["sdm630"].override("voltage_l1", 222.0)
            config = device_config(transport="rtu", port=f"socket://127.0.0.1:{bus.port}", register_base=30001,
                                   points=VOLTAGE, timeout_s=0.5)
            async with driver_for(config) as driver:
                return await driver.poll()

    assert [reading.value for reading in run(scenario())] == [222.0]


# --- cross-checks with pymodbus ------------------------------------------------------------

def test_pymodbus_reads_pty_bus():
    async def scenario():
        async with rtu_bus(TWO_METERS, seed=68) as bus:
            bus.devices["meter_b"].override("voltage_l1", 200.0)
            client = AsyncModbusSerialClient(str(bus.port), baudrate=9600, timeout=1.0, retries=0,
                                             reconnect_delay=0)
            assert await client.connect()
            try:
                return await client.read_input_registers(0, count=2, device_id=2)
            finally:
                client.close()

    reply = run(scenario())
    assert reply.registers == list(struct.unpack(">2H", struct.pack(">f", 200.0)))


def test_pymodbus_reads_gateway():
    async def scenario():
        async with rtu_bus([{"kind": "cpa"}], transport="rtu-over-tcp", seed=69) as bus:
            bus.devices["cpa"].override("motor_current", 25.0)
            client = AsyncModbusTcpClient("127.0.0.1", port=int(bus.port), framer=FramerType.RTU, timeout=1.0,
                                          retries=0, reconnect_delay=0)
            assert await client.connect()
            try:
                return await client.read_input_registers(25, count=2, device_id=16)
            finally:
                client.close()

    assert run(scenario()).registers == [0x0000, 0x41C8]  # 25.0, low word first


def test_agent_reads_pymodbus_rtu_slave():
    """The driver's RTU framing against pymodbus' RTU server, an independent slave."""
    registers = [0x4366, 0x3334] + [0] * 8

    async def scenario():
        device = SimDevice(1, simdata=([SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                                       [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                                       [SimData(0, values=registers, datatype=DataType.REGISTERS)],
                                       [SimData(0, values=registers, datatype=DataType.REGISTERS)]))
        server = ModbusTcpServer([device], address=("127.0.0.1", 0), framer=FramerType.RTU)
        await asyncio.wait_for(server.serve_forever(background=True), 5.0)
        port = server.transport.sockets[0].getsockname()[1]
        try:
            config = device_config(transport="rtu-over-tcp", host="127.0.0.1", port=port, register_base=30001,
                                   points=VOLTAGE, timeout_s=1.0)
            async with driver_for(config) as driver:
                return await driver.poll(), driver.last_errors
        finally:
            await asyncio.wait_for(server.shutdown(), 5.0)

    readings, errors = run(scenario())
    assert errors == []
    assert readings[0].value == pytest.approx(230.2, abs=1e-4)


# --- the simulated slave's own rules ----------------------------------------------------------

def test_slave_silent_on_bad_crc():
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=70) as bus:
            port = serial.serial_for_url(str(bus.port), baudrate=9600, timeout=0.2)
            try:
                frame = bytes.fromhex("01 04 00 00 00 02")
                bad = frame + b"\x00\x00"
                await asyncio.to_thread(port.write, bad)
                silent = await asyncio.to_thread(port.read, 9)
                await asyncio.sleep(0.02)
                good = frame + simulator_crc16(frame).to_bytes(2, "little")
                await asyncio.to_thread(port.write, good)
                reply = await asyncio.to_thread(port.read, 9)
                diagnostics = bytes.fromhex("01 08 00 00 12 34")
                await asyncio.to_thread(port.write, diagnostics + simulator_crc16(diagnostics).to_bytes(2, "little"))
                echo = await asyncio.to_thread(port.read, 8)
                return silent, reply, echo
            finally:
                port.close()

    silent, reply, echo = run(scenario())
    assert silent == b""
    assert reply[:3] == bytes.fromhex("01 04 04")
    assert echo[:6] == bytes.fromhex("01 08 00 00 12 34")
