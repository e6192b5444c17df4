"""Frames, data types and configuration keys of the Modbus stack, checked against the sheets.

The example frames come from the device sheets (Eastron's protocol document, Cryomech's
sample code, the Banner write-up) with their CRCs. The driver's request bytes and the
simulators' reply bytes are both compared with them on a real pseudo-terminal.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config_errors import ConfigError
from agent.drivers.modbus import (
    BadReply,
    ExceptionReply,
    PointConfig,
    crc16,
    decode_point,
    decode_registers,
    decode_string,
    mbap_frame,
    read_request,
    rtu_frame,
    write_request,
)
from agent.drivers.modbus_frames import check_reply
from firmware_sim.modbus_rtu import crc16 as simulator_crc16
from tests.test_modbus_fixtures import device_config, driver_for, rtu_bus, run

pytestmark = pytest.mark.timeout(60)

# Every RTU example frame of the three sheets, CRC included, in wire order.
SHEET_FRAMES = [
    "01 04 00 00 00 02 71 CB", "01 04 04 43 66 33 34 1B 38", "01 04 00 00 00 06 70 08",
    "01 04 0C 43 66 19 9A 43 65 CC CD 43 67 00 00 9A 7D", "01 04 00 34 00 02 30 05",
    "01 04 04 44 BB 80 00 FE 91", "01 04 00 46 00 02 90 1E", "01 04 00 48 00 04 71 DF",
    "01 04 01 56 00 02 90 27", "01 04 00 00 00 50 F0 36", "01 03 00 00 00 02 C4 0B",
    "01 03 04 3F 80 00 00 F7 CF", "01 10 00 02 00 02 04 42 70 00 00 67 D5", "01 10 00 02 00 02 E0 08",
    "01 90 01 8D C0", "01 84 02 C2 C1", "01 10 00 14 00 02 04 42 70 00 00 E6 F3", "01 10 00 14 00 02 01 CC",
    "10 04 00 01 00 35 62 9C", "10 04 00 01 00 37 E3 5D", "10 04 00 01 00 21 62 93",
    "10 06 00 01 00 01 1A 8B", "10 06 00 01 FF FF DA FB", "10 06 00 01 00 FF 9B 0B",
    "01 03 14 50 00 16 C1 E5", "01 03 14 50 00 06 C0 29",
]


def frame_bytes(text: str) -> bytes:
    return bytes.fromhex(text)


@pytest.mark.parametrize("text", SHEET_FRAMES)
def test_agent_crc_sheet_frames(text):
    frame = frame_bytes(text)
    assert crc16(frame[:-2]).to_bytes(2, "little") == frame[-2:]


@pytest.mark.parametrize("text", SHEET_FRAMES)
def test_simulator_crc_sheet_frames(text):
    frame = frame_bytes(text)
    assert simulator_crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def test_request_builders_sheet_frames():
    assert rtu_frame(1, read_request(1, 4, 0, 2).pdu) == frame_bytes("01 04 00 00 00 02 71 CB")
    assert rtu_frame(16, read_request(16, 4, 1, 53).pdu) == frame_bytes("10 04 00 01 00 35 62 9C")
    assert rtu_frame(16, write_request(16, 1, [0xFFFF]).pdu) == frame_bytes("10 06 00 01 FF FF DA FB")
    demand = write_request(1, 2, [0x4270, 0x0000])
    assert rtu_frame(1, demand.pdu) == frame_bytes("01 10 00 02 00 02 04 42 70 00 00 67 D5")


def test_mbap_sheet_frames():
    assert mbap_frame(0x0999, 1, read_request(1, 4, 1, 53).pdu) == frame_bytes("09 99 00 00 00 06 01 04 00 01 00 35")
    assert mbap_frame(0x0999, 1, write_request(1, 1, [1]).pdu) == frame_bytes("09 99 00 00 00 06 01 06 00 01 00 01")
    assert mbap_frame(0x0999, 1, write_request(1, 1, [0xFFFF]).pdu) == frame_bytes(
        "09 99 00 00 00 06 01 06 00 01 FF FF")


def test_request_builders_reject():
    with pytest.raises(ValueError, match="1..125 registers"):
        read_request(1, 4, 0, 126)
    with pytest.raises(ValueError, match="not a register read"):
        read_request(1, 6, 0, 1)
    with pytest.raises(ValueError, match="16-bit"):
        write_request(1, 0, [0x10000])


def test_check_reply_cases():
    request = read_request(1, 4, 0, 2)
    assert check_reply(request, bytes.fromhex("04 04 43 66 33 34")) == [0x4366, 0x3334]
    with pytest.raises(ExceptionReply) as caught:
        check_reply(request, bytes.fromhex("84 02"))
    assert caught.value.reason == "ILLEGAL_DATA_ADDRESS"
    with pytest.raises(BadReply, match="function code 3"):
        check_reply(request, bytes.fromhex("03 04 43 66 33 34"))
    with pytest.raises(BadReply, match="expected 4"):
        check_reply(request, bytes.fromhex("04 06 43 66 33 34 00 00"))
    with pytest.raises(BadReply, match="does not echo"):
        check_reply(write_request(1, 1, [1]), bytes.fromhex("06 00 01 00 02"))


# --- data types ----------------------------------------------------------------------------

DECODE_64 = [
    ([0x3FF0, 0, 0, 0], "float64", "ABCD", 1.0),
    ([0, 0, 0, 0x3FF0], "float64", "CDAB", 1.0),
    ([0xF03F, 0, 0, 0], "float64", "BADC", 1.0),
    ([0, 0, 0, 0xF03F], "float64", "DCBA", 1.0),
    ([0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE], "int64", "ABCD", -2),
    ([0, 0, 0, 0x0001], "uint64", "CDAB", 1 << 48),
    ([0x0001, 0, 0, 0], "uint64", "CDAB", 1),
]


@pytest.mark.parametrize(("registers", "type_name", "order", "expected"), DECODE_64)
def test_decode_64_bit(registers, type_name, order, expected):
    assert decode_registers(registers, type_name, order) == expected


@given(st.floats(width=64, allow_nan=False), st.sampled_from(["ABCD", "CDAB", "BADC", "DCBA"]))
def test_float64_round_trip(value, order):
    registers = list(struct.unpack(">4H", struct.pack(">d", value)))
    if order in ("CDAB", "DCBA"):
        registers = registers[::-1]
    if order in ("BADC", "DCBA"):
        registers = [((r & 0xFF) << 8) | (r >> 8) for r in registers]
    assert decode_registers(registers, "float64", order) == value


@given(st.integers(-(2**31), 2**31 - 1), st.sampled_from(["ABCD", "CDAB", "BADC", "DCBA"]))
def test_int32_round_trip(value, order):
    data = struct.pack(">i", value)
    wire = bytes(data["ABCD".index(letter)] for letter in order)
    registers = list(struct.unpack(">2H", wire))
    assert decode_registers(registers, "int32", order) == value


def test_decode_string_orders():
    registers = [0x4D52, 0x4931, 0x2000]  # "MRI1 " then NUL
    assert decode_string(registers) == "MRI1"
    assert decode_string([0x524D, 0x3149], "BADC") == "MRI1"


def point(**fields) -> PointConfig:
    base = dict(name="p", function="input", address=0, type="uint16", word_order="ABCD", scale=1.0,
                offset=0.0, unit="", count=1)
    base.update(fields)
    return PointConfig(**base)


def test_bitfield_bits_output():
    field = point(type="bitfield", raw_type="uint16", bits=(("a", 0), ("b", 3)), output="bits")
    assert decode_point(field, [0b1001]) == [("p", 9), ("p.a", 1), ("p.b", 1)]


def test_bitfield_names_output():
    field = point(type="bitfield", raw_type="uint16", bits=(("a", 0), ("b", 3), ("c", 4)), output="names")
    assert decode_point(field, [0b11000]) == [("p", 24), ("p.active", "b,c")]


def test_bitfield_negated_float():
    field = point(type="bitfield", raw_type="float32", word_order="CDAB", scale=-1.0, count=2,
                  bits=(("coolant_in_high", 0),), output="names")
    assert decode_point(field, [0x0000, 0xBF80]) == [("p", 1), ("p.active", "coolant_in_high")]


def test_bitfield_negative_mask_rejected():
    field = point(type="bitfield", raw_type="float32", count=2, bits=(("a", 0),), output="bits")
    with pytest.raises(ValueError, match="negative"):
        decode_point(field, [0xBF80, 0x0000])


def test_scaled_int16():
    assert decode_point(point(type="int16", scale=0.01), [0xFF38]) == [("p", -2.0)]


# --- configuration keys --------------------------------------------------------------------

def config_error(**table) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        device_config(**table)
    return caught.value


ONE_POINT = [{"name": "a", "address": 0, "type": "uint16"}]


def test_config_rtu_needs_port_path():
    error = config_error(transport="rtu", port=502, points=ONE_POINT)
    assert error.key == "modbus[0].port"
    assert "serial device path" in error.allowed


def test_config_rtu_rejects_host():
    error = config_error(transport="rtu", host="10.0.0.1", port="/dev/ttyUSB0", points=ONE_POINT)
    assert error.key == "modbus[0].host"


def test_config_tcp_rejects_baudrate():
    error = config_error(baudrate=9600, points=ONE_POINT)
    assert error.key == "modbus[0].baudrate"
    assert "only to transport" in error.allowed


def test_config_bad_baudrate():
    error = config_error(transport="rtu", port="/dev/ttyUSB0", baudrate=9601, points=ONE_POINT)
    assert error.key == "modbus[0].baudrate"
    assert "9600" in error.allowed


def test_config_bad_parity():
    error = config_error(transport="rtu", port="/dev/ttyUSB0", parity="none", points=ONE_POINT)
    assert error.key == "modbus[0].parity"


def test_config_bad_transport():
    error = config_error(transport="udp", points=ONE_POINT)
    assert error.key == "modbus[0].transport"
    assert "rtu-over-tcp" in error.allowed


def test_config_gateway_needs_port():
    error = config_error(transport="rtu-over-tcp", points=ONE_POINT)
    assert error.key == "modbus[0].port"


def test_config_rtu_unit_zero():
    error = config_error(transport="rtu", port="/dev/ttyUSB0", unit_id=0, points=ONE_POINT)
    assert error.key == "modbus[0].unit_id"


def test_config_string_needs_count():
    error = config_error(points=[{"name": "s", "address": 0, "type": "string"}])
    assert error.key == "modbus[0].points[0].count"


def test_config_count_only_strings():
    error = config_error(points=[{"name": "a", "address": 0, "type": "uint16", "count": 2}])
    assert error.key == "modbus[0].points[0].count"


def test_config_bitfield_needs_bits():
    error = config_error(points=[{"name": "a", "address": 0, "type": "bitfield"}])
    assert error.key == "modbus[0].points[0].bits"


def test_config_bit_out_of_range():
    error = config_error(points=[{"name": "a", "address": 0, "type": "bitfield", "bits": {"x": 16}}])
    assert error.key == "modbus[0].points[0].bits.x"
    assert "0 to 15" in error.allowed


def test_config_bitfield_output_choice():
    error = config_error(points=[{"name": "a", "address": 0, "type": "bitfield", "bits": {"x": 1},
                                  "output": "list"}])
    assert error.key == "modbus[0].points[0].output"


def test_config_function_code():
    config = device_config(points=[{"name": "a", "address": 0, "type": "uint16", "function": 3}])
    assert config.points[0].function == "holding"


def test_config_bad_function():
    error = config_error(points=[{"name": "a", "address": 0, "type": "uint16", "function": 6}])
    assert error.key == "modbus[0].points[0].function"
    assert "function 3" in error.allowed


def test_config_rtu_serial_defaults():
    config = device_config(transport="rtu", port="/dev/ttyUSB0", points=ONE_POINT)
    assert config.serial is not None
    assert config.serial.describe() == "9600 8N1"
    assert config.host is None


# --- the driver's and the simulators' bytes on a pseudo-terminal ---------------------------

def test_sdm630_sheet_frames_on_wire():
    points = [{"name": "voltage_l1", "register": 30001, "type": "float32"}]

    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=41) as bus:
            meter = bus.devices["sdm630"]
            # The document's registers 4366 3334 for 230.2 V, one float32 step above 230.2.
            meter.override("voltage_l1", struct.unpack(">f", bytes.fromhex("43663334"))[0])
            meter.override("total_power", 1500.0)
            config = device_config(transport="rtu", port=bus.port, register_base=30001, points=points)
            async with driver_for(config) as driver:
                readings = await driver.poll()
                exchanges = [(bus.received[-1], bus.sent[-1])]
                await driver.read_registers("input", 0x34, 2)
                exchanges.append((bus.received[-1], bus.sent[-1]))
                await driver.read_registers("holding", 0, 2)
                exchanges.append((bus.received[-1], bus.sent[-1]))
                await driver.write_registers(2, [0x4270, 0x0000], single=False)
                exchanges.append((bus.received[-1], bus.sent[-1]))
                with pytest.raises(ExceptionReply):
                    await driver.read_registers("input", 1, 2)
                exchanges.append((bus.received[-1], bus.sent[-1]))
                return readings, exchanges, meter.model.demand_period_min

    readings, exchanges, period = run(scenario())
    assert readings[0].value == pytest.approx(230.2, abs=1e-4)
    assert exchanges[0] == (frame_bytes("01 04 00 00 00 02 71 CB"), frame_bytes("01 04 04 43 66 33 34 1B 38"))
    assert exchanges[1] == (frame_bytes("01 04 00 34 00 02 30 05"), frame_bytes("01 04 04 44 BB 80 00 FE 91"))
    assert exchanges[2][0] == frame_bytes("01 03 00 00 00 02 C4 0B")
    assert exchanges[3] == (frame_bytes("01 10 00 02 00 02 04 42 70 00 00 67 D5"),
                            frame_bytes("01 10 00 02 00 02 E0 08"))
    assert period == 60
    assert exchanges[4][1] == frame_bytes("01 84 02 C2 C1")


def test_sdm630_three_voltages_frame():
    points = [{"name": f"voltage_l{k}", "register": 30001 + 2 * (k - 1), "type": "float32"} for k in (1, 2, 3)]

    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=42) as bus:
            meter = bus.devices["sdm630"]
            for k, volts in zip((1, 2, 3), (230.1, 229.8, 231.0)):
                meter.override(f"voltage_l{k}", volts)
            config = device_config(transport="rtu", port=bus.port, register_base=30001, points=points)
            async with driver_for(config) as driver:
                await driver.poll()
                return bus.received[-1], bus.sent[-1]

    request, reply = run(scenario())
    assert request == frame_bytes("01 04 00 00 00 06 70 08")
    assert reply == frame_bytes("01 04 0C 43 66 19 9A 43 65 CC CD 43 67 00 00 9A 7D")


def test_sdm630_profile_requests_even():
    async def scenario():
        async with rtu_bus([{"kind": "sdm630"}], seed=43) as bus:
            config = device_config(transport="rtu", port=bus.port, profile="sdm630")
            async with driver_for(config) as driver:
                await driver.poll()
                return driver, bus.received

    driver, received = run(scenario())
    assert driver.last_errors == []
    for frame in received:
        address, count = struct.unpack(">HH", frame[2:6])
        assert address % 2 == 0, frame.hex(" ")
        assert count % 2 == 0, frame.hex(" ")
        assert count <= 80, frame.hex(" ")


def test_cpa_sheet_frames_on_wire():
    # Points that span registers 30001..30053, as Cryomech's sample reads them.
    points = [{"name": "state", "register": 30001, "type": "uint16"},
              {"name": "alarm_bits", "register": 30052, "type": "uint32"}]

    async def scenario():
        async with rtu_bus([{"kind": "cpa"}], seed=44) as bus:
            config = device_config(transport="rtu", port=bus.port, register_base=30000, word_order="CDAB",
                                   unit_id=16, points=points)
            async with driver_for(config) as driver:
                await driver.poll()
                read = (bus.received[-1], bus.sent[-1])
                writes = []
                for value in (0x0001, 0xFFFF, 0x00FF):
                    await driver.write_registers(1, [value])
                    writes.append((bus.received[-1], bus.sent[-1]))
                return read, writes

    read, writes = run(scenario())
    assert read[0] == frame_bytes("10 04 00 01 00 35 62 9C")
    assert read[1][:3] == frame_bytes("10 04 6A")
    assert len(read[1]) == 3 + 106 + 2
    expected = ["10 06 00 01 00 01 1A 8B", "10 06 00 01 FF FF DA FB", "10 06 00 01 00 FF 9B 0B"]
    for (request, reply), text in zip(writes, expected):
        assert request == frame_bytes(text)
        assert reply == frame_bytes(text)  # FC06 replies echo the request


def test_qm30vt2_sheet_frames_on_wire():
    async def scenario():
        async with rtu_bus([{"kind": "qm30vt2"}], seed=45) as bus:
            full = device_config(transport="rtu", port=bus.port, profile="banner_qm30vt2")
            async with driver_for(full) as driver:
                await driver.poll()
                block = (bus.received[-1], bus.sent[-1])
                await driver.read_registers("holding", 5200, 6)
                first_six = bus.received[-1]
                return block, first_six

    block, first_six = run(scenario())
    assert block[0] == frame_bytes("01 03 14 50 00 16 C1 E5")
    assert block[1][:3] == frame_bytes("01 03 2C")
    assert len(block[1]) == 3 + 44 + 2
    assert first_six == frame_bytes("01 03 14 50 00 06 C0 29")
