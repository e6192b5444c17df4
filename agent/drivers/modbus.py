"""Poll Modbus devices over TCP, RTU on a serial port, or RTU through a TCP gateway.

One `[[modbus]]` table of the agent's TOML configuration describes one device: how it is
reached, how fast it may be polled, and its points (register, type, byte and word order,
scale). A `profile` key loads default points, request limits and serial settings from a
register-map file in `agent/drivers/samples/`. The driver groups the points into as few read
requests as the device's limits allow and decodes each point from the reply.

This module is the public entry point. The work is split by concept:

- `modbus_points`: data types, decoding and request planning;
- `modbus_config`: `[[modbus]]` tables and profiles;
- `modbus_frames`: request PDUs, RTU and Modbus TCP framing, error types;
- `modbus_links`: connections and serial ports, shared by the devices behind them;
- `modbus_driver`: the polling driver, its backoff, counters and log messages.

The service creates one driver per device with `make_modbus_driver(config)`.
"""

from __future__ import annotations

from agent.drivers.modbus_config import (
    TRANSPORTS,
    ModbusDeviceConfig,
    Profile,
    SerialSettings,
    list_profiles,
    load_profile,
    parse_modbus_device,
    samples_dir,
)
from agent.drivers.modbus_driver import COUNTER_NAMES, ModbusDriver, RequestError
from agent.drivers.modbus_frames import (
    EXCEPTION_NAMES,
    BadReply,
    CrcError,
    ExceptionReply,
    LinkError,
    ModbusError,
    NoResponse,
    crc16,
    mbap_frame,
    read_request,
    rtu_frame,
    write_request,
)
from agent.drivers.modbus_points import (
    FUNCTIONS,
    POINT_TYPES,
    PROTOCOL_MAX_REGISTERS,
    TYPE_FORMATS,
    TYPE_REGISTERS,
    WORD_ORDERS,
    DecodeError,
    PointConfig,
    ReadBlock,
    decode_point,
    decode_registers,
    decode_string,
    plan_requests,
)

# The driver's first name, from when it spoke only Modbus TCP. It handles every transport.
ModbusTcpDriver = ModbusDriver


def make_modbus_driver(config: ModbusDeviceConfig) -> ModbusDriver:
    """Create the driver of one device; its `transport` selects TCP, RTU or RTU over TCP."""
    return ModbusDriver(config)


__all__ = [
    "COUNTER_NAMES", "EXCEPTION_NAMES", "FUNCTIONS", "POINT_TYPES", "PROTOCOL_MAX_REGISTERS",
    "TRANSPORTS", "TYPE_FORMATS", "TYPE_REGISTERS", "WORD_ORDERS",
    "BadReply", "CrcError", "DecodeError", "ExceptionReply", "LinkError", "ModbusDeviceConfig",
    "ModbusDriver", "ModbusError", "ModbusTcpDriver", "NoResponse", "PointConfig", "Profile",
    "ReadBlock", "RequestError", "SerialSettings",
    "crc16", "decode_point", "decode_registers", "decode_string", "list_profiles", "load_profile",
    "make_modbus_driver", "mbap_frame", "parse_modbus_device", "plan_requests", "read_request",
    "rtu_frame", "samples_dir", "write_request",
]
