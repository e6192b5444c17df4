"""Helpers shared by the Modbus test files. This file contains no tests.

Every helper starts real parts: simulators on 127.0.0.1 with ephemeral ports or on
pseudo-terminals, and the agent's driver talking to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

from agent.config_errors import Section
from agent.drivers.base import Reading
from agent.drivers.modbus import ModbusDeviceConfig, ModbusDriver, make_modbus_driver, parse_modbus_device
from firmware_sim.modbus_devices import RunningBus, RunningDevice, start_modbus_device, start_modbus_rtu_bus

# Which simulator serves which profile.
PROFILE_KINDS = {
    "sdm630": "sdm630", "cryomech_cpa": "cpa", "banner_qm30vt2": "qm30vt2",
    "generic_chiller": "chiller", "generic_room": "room",
}


def run(coroutine: Any, timeout_s: float = 20.0) -> Any:
    """Run a coroutine on a new event loop, failing after `timeout_s` seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def device_config(**table: Any) -> ModbusDeviceConfig:
    """Parse a [[modbus]] table; `id` defaults to "dev" and, for TCP, `host` to 127.0.0.1."""
    table.setdefault("id", "dev")
    if table.get("transport", "tcp") != "rtu":
        table.setdefault("host", "127.0.0.1")
    return parse_modbus_device(Section("test.toml", "modbus[0]", table))


def float32(value: float) -> float:
    """Round a Python float to the nearest float32, as the wire carries it."""
    return struct.unpack(">f", struct.pack(">f", value))[0]


@contextlib.asynccontextmanager
async def simulator(kind: str, **options: Any) -> AsyncIterator[RunningDevice]:
    device = await start_modbus_device(kind, **options)
    try:
        yield device
    finally:
        await device.stop()


@contextlib.asynccontextmanager
async def rtu_bus(devices: list[dict[str, Any]], **options: Any) -> AsyncIterator[RunningBus]:
    bus = await start_modbus_rtu_bus(devices, **options)
    try:
        yield bus
    finally:
        await bus.stop()


@contextlib.asynccontextmanager
async def drivers_for(*configs: ModbusDeviceConfig) -> AsyncIterator[list[ModbusDriver]]:
    drivers = [make_modbus_driver(config) for config in configs]
    for driver in drivers:
        await driver.open()
    try:
        yield drivers
    finally:
        for driver in drivers:
            await driver.close()


@contextlib.asynccontextmanager
async def driver_for(config: ModbusDeviceConfig) -> AsyncIterator[ModbusDriver]:
    async with drivers_for(config) as drivers:
        yield drivers[0]


def by_name(readings: list[Reading]) -> dict[str, Any]:
    return {reading.point: reading.value for reading in readings}


def reasons(driver: ModbusDriver) -> list[str]:
    return [error.reason for error in driver.last_errors]


async def poll_until_good(driver: ModbusDriver, attempts: int = 40, delay_s: float = 0.05) -> list[Reading]:
    """Poll until a poll returns readings and no errors; return them (empty if none did)."""
    for _ in range(attempts):
        readings = await driver.poll()
        if readings and not driver.last_errors:
            return readings
        await asyncio.sleep(delay_s)
    return []


def expected_value(config: ModbusDeviceConfig, name: str, truth: dict[str, float]) -> tuple[float, float]:
    """Return the value a point should decode to, and the tolerance of its encoding."""
    point = next(point for point in config.points if point.name == name)
    value = truth[name]
    if point.type == "bitfield":
        return float(round(abs(value))), 0.0
    if point.type in ("float32",):
        return float32(value), abs(value) * 1e-6 + 1e-9
    if point.type == "float64":
        return value, abs(value) * 1e-12
    # A scaled integer is rounded to the nearest count of `scale`.
    return value, abs(point.scale) / 2.0 + 1e-9


def assert_matches_truth(config: ModbusDeviceConfig, readings: list[Reading], truth: dict[str, float]) -> None:
    """Check that every numeric point decoded to the simulator's true value."""
    values = by_name(readings)
    for point in config.points:
        if point.type == "string":
            continue
        assert point.name in values, f"{config.id}: no reading for {point.name}"
        expected, tolerance = expected_value(config, point.name, truth)
        assert math.isclose(values[point.name], expected, abs_tol=tolerance), (
            f"{config.id}.{point.name}: decoded {values[point.name]}, simulator {expected}")
