"""Modbus TCP faults, backoff and isolation, against the pymodbus-based simulators on 127.0.0.1.

Each fault shows the driver recovering, counting it and reporting it by name. The tests
also measure the backoff: a device that stops replying is skipped for a growing, jittered
wait. A slow device does not delay another, and errors reach the log once per cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from agent.drivers.modbus import ModbusDriver
from firmware_sim.scenario import Step
from tests.test_modbus_fixtures import (
    device_config,
    driver_for,
    drivers_for,
    poll_until_good,
    reasons,
    run,
    simulator,
)

pytestmark = pytest.mark.timeout(60)

VOLTAGE = [{"name": "voltage_l1", "register": 30001, "type": "float32"}]


def meter_config(port: int, **table):
    table.setdefault("timeout_s", 0.3)
    table.setdefault("backoff_min_s", 0.05)
    table.setdefault("backoff_max_s", 0.2)
    table.setdefault("points", VOLTAGE)
    return device_config(port=port, register_base=30001, **table)


@contextlib.asynccontextmanager
async def silent_server():
    """A TCP server that accepts connections and never replies."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(256):
                pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


# --- reply faults --------------------------------------------------------------------------

@pytest.mark.parametrize(("fault", "options", "reason", "counter"), [
    ("drop", {}, "NO_RESPONSE", "timeouts"),
    ("delay", {"delay_s": 0.5}, "NO_RESPONSE", "timeouts"),
    ("corrupt", {}, "BAD_REPLY", "bad_replies"),
    ("exception", {"code": 4}, "SERVER_DEVICE_FAILURE", "exception_SERVER_DEVICE_FAILURE"),
])
def test_tcp_fault_recovers(fault, options, reason, counter):
    async def scenario():
        async with simulator("sdm630", seed=81) as meter:
            meter.override("voltage_l1", 231.5)
            meter.faults.add(fault, count=1, **options)
            async with driver_for(meter_config(meter.port)) as driver:
                first = await driver.poll()
                first_reasons = reasons(driver)
                recovered = await poll_until_good(driver)
                return first, first_reasons, recovered, driver.counters

    first, first_reasons, recovered, counters = run(scenario())
    assert first == []
    assert first_reasons == [reason]
    assert counters[counter] == 1
    assert [reading.value for reading in recovered] == [231.5]


def test_tcp_timeout_drops_connection():
    """After a timeout the connection is closed, so the late reply can never be read."""

    async def scenario():
        async with simulator("sdm630", seed=82) as meter:
            meter.override("voltage_l1", 100.0)
            meter.faults.add("delay", count=1, delay_s=0.3)
            async with driver_for(meter_config(meter.port, timeout_s=0.1)) as driver:
                await driver.poll()
                connected_after_timeout = driver.connected
                meter.override("voltage_l1", 200.0)
                await asyncio.sleep(0.3)
                recovered = await poll_until_good(driver)
                return connected_after_timeout, recovered, driver.counters

    connected_after_timeout, recovered, counters = run(scenario())
    assert connected_after_timeout is False
    assert [reading.value for reading in recovered] == [200.0]
    assert counters["reconnects"] == 1


def test_tcp_busy_retried():
    async def scenario():
        async with simulator("sdm630", seed=83) as meter:
            meter.faults.add("busy", count=1)
            async with driver_for(meter_config(meter.port, busy_retry_delay_s=0.01)) as driver:
                return await driver.poll(), driver.last_errors, driver.counters

    readings, errors, counters = run(scenario())
    assert len(readings) == 1
    assert errors == []
    assert counters["busy_retries"] == 1


def test_tcp_busy_exhausted():
    async def scenario():
        async with simulator("sdm630", seed=84) as meter:
            meter.faults.add("busy", count=3)
            async with driver_for(meter_config(meter.port, busy_retries=2, busy_retry_delay_s=0.01)) as driver:
                return await driver.poll(), reasons(driver), driver.counters

    readings, failure_reasons, counters = run(scenario())
    assert readings == []
    assert failure_reasons == ["SERVER_DEVICE_BUSY"]
    assert counters["busy_retries"] == 2


def test_tcp_restart_step_recovers():
    async def scenario():
        async with simulator("sdm630", seed=85) as meter:
            async with driver_for(meter_config(meter.port)) as driver:
                before = await driver.poll()
                meter.apply_step(Step(0.0, "sdm630", "fault", {"kind": "restart", "duration_s": 0.3}))
                await asyncio.sleep(0.1)
                during = await driver.poll()
                during_reasons = reasons(driver)
                recovered = await poll_until_good(driver)
                return before, during, during_reasons, recovered, driver.counters, meter.restarts

    before, during, during_reasons, recovered, counters, restarts = run(scenario())
    assert len(before) == 1
    assert during == []
    assert during_reasons[0] in ("CONNECTION_LOST", "CONNECT_FAILED")
    assert len(recovered) == 1
    assert counters["reconnects"] == 1
    assert restarts == 1


def test_tcp_fault_step_window():
    async def scenario():
        async with simulator("sdm630", seed=86) as meter:
            meter.apply_step(Step(0.0, "sdm630", "fault", {"kind": "exception", "code": 2, "duration_s": 0.2}))
            async with driver_for(meter_config(meter.port)) as driver:
                during = await driver.poll()
                during_reasons = reasons(driver)
                await asyncio.sleep(0.25)
                after = await driver.poll()
                return during, during_reasons, after

    during, during_reasons, after = run(scenario())
    assert during == []
    assert during_reasons == ["ILLEGAL_DATA_ADDRESS"]
    assert len(after) == 1


# --- backoff -------------------------------------------------------------------------------

def test_silent_device_backoff_grows():
    async def scenario():
        async with silent_server() as port:
            config = meter_config(port, timeout_s=0.05, backoff_min_s=0.1, backoff_max_s=0.4)
            async with driver_for(config) as driver:
                waits = []
                for _ in range(4):
                    await driver.poll()
                    waits.append(driver.backoff_remaining_s())
                    skipped = await driver.poll()
                    assert skipped == []
                    assert reasons(driver) == ["BACKOFF"]
                    await asyncio.sleep(driver.backoff_remaining_s() + 0.01)
                return waits, driver.counters

    waits, counters = run(scenario())
    for wait, nominal in zip(waits, (0.1, 0.2, 0.4, 0.4)):
        assert 0.8 * nominal - 0.02 <= wait <= 1.2 * nominal, (wait, nominal)
    assert counters["backoffs"] == 4
    assert counters["skipped_polls"] == 4
    assert counters["timeouts"] == 4


def test_reconnect_backoff_grows():
    async def scenario():
        async with silent_server() as port:
            pass  # the port is now closed: connects are refused
        config = meter_config(port, backoff_min_s=0.1, backoff_max_s=0.4)
        driver = ModbusDriver(config)
        opened = await driver.open()
        waits = [driver._link.reopen_in_s()]
        for _ in range(3):
            await asyncio.sleep(waits[-1] + 0.01)
            await driver.poll()
            waits.append(driver._link.reopen_in_s())
        not_connected = await driver.poll()
        not_connected_reasons = reasons(driver)
        await driver.close()
        return opened, waits, not_connected, not_connected_reasons, driver.counters

    opened, waits, not_connected, not_connected_reasons, counters = run(scenario())
    assert opened is False
    for wait, nominal in zip(waits, (0.1, 0.2, 0.4, 0.4)):
        assert 0.8 * nominal - 0.02 <= wait <= 1.2 * nominal, (wait, nominal)
    assert not_connected == []
    assert not_connected_reasons == ["NOT_CONNECTED"]
    assert counters["connect_failures"] == 4


def test_backoff_jitter_differs():
    async def scenario():
        async with silent_server() as port:
            configs = [meter_config(port, id=f"d{i}", timeout_s=0.05, backoff_min_s=1.0, backoff_max_s=2.0)
                       for i in range(6)]
            async with drivers_for(*configs) as drivers:
                await asyncio.gather(*(driver.poll() for driver in drivers))
                return [driver.backoff_remaining_s() for driver in drivers]

    waits = run(scenario())
    assert len({round(wait, 3) for wait in waits}) > 1


# --- isolation and logging -----------------------------------------------------------------

def test_slow_device_never_delays_other():
    async def scenario():
        async with simulator("sdm630", seed=87) as slow, simulator("sdm630", seed=88) as fast:
            slow.faults.add("delay", delay_s=0.3)
            slow_driver = ModbusDriver(meter_config(slow.port, timeout_s=0.2, backoff_min_s=0.05, backoff_max_s=0.05))
            fast_driver = ModbusDriver(meter_config(fast.port, id="fast"))
            await slow_driver.open()
            await fast_driver.open()
            durations = []

            async def fast_loop():
                for _ in range(10):
                    started = time.monotonic()
                    readings = await fast_driver.poll()
                    durations.append((time.monotonic() - started, len(readings)))
                    await asyncio.sleep(0.05)

            async def slow_loop():
                for _ in range(6):
                    await slow_driver.poll()
                    await asyncio.sleep(0.05)

            await asyncio.gather(fast_loop(), slow_loop())
            await slow_driver.close()
            await fast_driver.close()
            return durations, slow_driver.counters

    durations, slow_counters = run(scenario())
    assert slow_counters["timeouts"] >= 2
    for duration, count in durations:
        assert count == 1
        assert duration < 0.15


def test_errors_logged_once(caplog):
    async def scenario():
        async with simulator("sdm630", seed=89) as meter:
            meter.faults.add("exception", count=5, code=4)
            async with driver_for(meter_config(meter.port, id="power-meter")) as driver:
                for _ in range(5):
                    await driver.poll()
                await driver.poll()
                return driver.counters

    with caplog.at_level(logging.INFO, logger="agent.drivers.modbus_driver"):
        counters = run(scenario())
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    recoveries = [record for record in caplog.records if "succeeded again" in record.getMessage()]
    assert counters["exception_SERVER_DEVICE_FAILURE"] == 5
    assert len(warnings) == 1
    assert "power-meter" in warnings[0].getMessage()
    assert "SERVER_DEVICE_FAILURE" in warnings[0].getMessage()
    assert len(recoveries) == 1


def test_counters_are_ints():
    async def scenario():
        async with simulator("sdm630", seed=90) as meter:
            meter.faults.add("exception", count=1, code=2)
            async with driver_for(meter_config(meter.port)) as driver:
                await driver.poll()
                return driver.counters

    counters = run(scenario())
    assert all(isinstance(value, int) and not isinstance(value, bool) for value in counters.values())
    assert counters["exception_ILLEGAL_DATA_ADDRESS"] == 1


def test_poll_after_close_raises():
    async def scenario():
        async with simulator("sdm630", seed=91) as meter:
            driver = ModbusDriver(meter_config(meter.port))
            await driver.open()
            await driver.close()
            with pytest.raises(RuntimeError, match="after close"):
                await driver.poll()

    run(scenario())
