"""Modbus frames: request PDUs, RTU and MBAP framing, reply checks and error types.

The driver builds its frames here instead of through pymodbus' client, for three reasons.
It must tell a CRC error, a reply from another unit and a silent device apart, which
pymodbus 3.16 reports alike as a timeout. It must match each reply to its request on an RTU
bus that has no transaction ids. And the simulators use pymodbus, so a framing mistake
cannot hide on both sides of a test.

Reply readers take a `read(n, deadline)` callable that returns up to n bytes and returns
fewer only once the monotonic `deadline` has passed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_REGISTERS = 16

# Names of the Modbus exception codes, as the Modbus application protocol spells them.
EXCEPTION_NAMES = {
    1: "ILLEGAL_FUNCTION",
    2: "ILLEGAL_DATA_ADDRESS",
    3: "ILLEGAL_DATA_VALUE",
    4: "SERVER_DEVICE_FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER_DEVICE_BUSY",
    7: "NEGATIVE_ACKNOWLEDGE",
    8: "MEMORY_PARITY_ERROR",
    10: "GATEWAY_PATH_UNAVAILABLE",
    11: "GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND",
}
# Exception codes after which the same request may succeed a moment later.
BUSY_CODES = (5, 6)

ReadFunction = Callable[[int, float], bytes]


def exception_name(code: int) -> str:
    """Return the protocol name of an exception code, or EXCEPTION_<code> for an unknown one."""
    return EXCEPTION_NAMES.get(code, f"EXCEPTION_{code}")


# --------------------------------------------------------------------------------------------
# Errors: each carries the `reason` that the driver reports and counts.
# --------------------------------------------------------------------------------------------

class ModbusError(Exception):
    """A request that produced no usable reply."""

    reason = "ERROR"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NoResponse(ModbusError):
    """No reply, or only part of one, arrived before the timeout."""

    reason = "NO_RESPONSE"


class CrcError(ModbusError):
    """An RTU reply whose CRC does not match its bytes."""

    reason = "CRC_ERROR"


class BadReply(ModbusError):
    """A reply that does not fit its request: function, length, unit id or header."""

    reason = "BAD_REPLY"


class ExceptionReply(ModbusError):
    """The device replied with a Modbus exception code."""

    def __init__(self, function_code: int, code: int) -> None:
        self.function_code = function_code
        self.code = code
        self.reason = exception_name(code)
        super().__init__(f"device replied to function {function_code} with exception {code} ({self.reason})")


class LinkError(ModbusError):
    """The connection or serial port is not usable.

    `reason` is NOT_CONNECTED (waiting before the next connect attempt), CONNECT_FAILED,
    CONNECTION_LOST or PORT_LOST.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Request:
    """One request PDU for one unit, and what its reply must look like.

    `count` is the number of registers a read requests (0 for writes).
    """

    unit_id: int
    function_code: int
    pdu: bytes
    count: int = 0

    @property
    def reply_length(self) -> int:
        """Length in bytes of a normal reply's PDU (function code included)."""
        if self.function_code in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
            return 2 + 2 * self.count
        return 5


def read_request(unit_id: int, function_code: int, address: int, count: int) -> Request:
    """Build a FC03 or FC04 read of `count` registers from PDU address `address`."""
    if function_code not in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
        raise ValueError(f"function code {function_code} is not a register read (use 3 or 4)")
    if not 1 <= count <= 125 or not 0 <= address <= 0xFFFF or address + count > 0x10000:
        raise ValueError(f"cannot read {count} registers from address {address}: "
                         "use 1..125 registers inside 0..65535")
    return Request(unit_id, function_code, struct.pack(">BHH", function_code, address, count), count)


def write_request(unit_id: int, address: int, values: list[int], single: bool | None = None) -> Request:
    """Build a FC06 write of one register, or a FC16 write of several.

    `single` None uses FC06 for one value. True forces FC06, False forces FC16.
    """
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise ValueError(f"register value {value!r} is not a 16-bit unsigned integer (0..65535)")
    if single is None:
        single = len(values) == 1
    if single:
        if len(values) != 1:
            raise ValueError(f"function 6 writes exactly one register, got {len(values)} values")
        pdu = struct.pack(">BHH", WRITE_SINGLE_REGISTER, address, values[0])
        return Request(unit_id, WRITE_SINGLE_REGISTER, pdu)
    if not 1 <= len(values) <= 123:
        raise ValueError(f"function 16 writes 1..123 registers, got {len(values)} values")
    pdu = struct.pack(f">BHHB{len(values)}H", WRITE_MULTIPLE_REGISTERS, address, len(values),
                      2 * len(values), *values)
    return Request(unit_id, WRITE_MULTIPLE_REGISTERS, pdu)


def check_reply(request: Request, pdu: bytes) -> list[int]:
    """Check a reply PDU against its request and return the registers read (empty for writes).

    Raises ExceptionReply for an exception reply and BadReply for any mismatch.
    """
    function = pdu[0]
    if function == request.function_code | 0x80:
        if len(pdu) != 2:
            raise BadReply(f"exception reply of {len(pdu)} bytes, expected 2")
        raise ExceptionReply(request.function_code, pdu[1])
    if function != request.function_code:
        raise BadReply(f"reply has function code {function}, the request had {request.function_code}")
    if request.function_code in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
        if len(pdu) < 2 or pdu[1] != 2 * request.count or len(pdu) != 2 + 2 * request.count:
            raise BadReply(f"reply carries {len(pdu) - 2} data bytes, expected {2 * request.count}")
        return list(struct.unpack(f">{request.count}H", pdu[2:]))
    # A write's reply echoes the address and the value (FC06) or the count (FC16).
    if pdu[:5] != request.pdu[:5]:
        raise BadReply(f"write reply {pdu.hex(' ')} does not echo the request {request.pdu[:5].hex(' ')}")
    return []


# --------------------------------------------------------------------------------------------
# RTU framing
# --------------------------------------------------------------------------------------------

def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Return the Modbus RTU CRC-16 of `data` (reflected polynomial 0xA001, initial 0xFFFF).

    The frame carries it low byte first.
    """
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def rtu_frame(unit_id: int, pdu: bytes) -> bytes:
    """Return the RTU frame of a PDU: unit id, PDU, CRC low byte first."""
    body = bytes([unit_id]) + pdu
    return body + crc16(body).to_bytes(2, "little")


def _rtu_frame_length(function: int, third_byte: int) -> int | None:
    """Return the full length of a reply frame from its first three bytes, or None if unknown."""
    if function & 0x80:
        return 5
    if function in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
        return 5 + third_byte
    if function in (WRITE_SINGLE_REGISTER, WRITE_MULTIPLE_REGISTERS):
        return 8
    return None


@dataclass(slots=True)
class ReplyStats:
    """Line events during one request, for the driver's counters."""

    stray_replies: int = 0
    discarded_bytes: int = 0
    opened: bool = False  # the link was opened for this request
    reopened: bool = False  # ... and had been open before
    sent: bytes = b""


def read_rtu_reply(read: ReadFunction, request: Request, deadline: float, stats: ReplyStats) -> bytes:
    """Read the RTU reply to `request` and return its PDU.

    A valid frame from another unit id (a late reply to an earlier request on the bus) is
    counted in `stats.stray_replies` and skipped, and reading goes on until the deadline.
    Raises NoResponse if nothing arrived, BadReply for an incomplete or unframeable reply,
    CrcError for a CRC mismatch.
    """
    while True:
        head = read(3, deadline)
        if not head:
            raise NoResponse("no reply before the timeout")
        if len(head) < 3:
            raise BadReply(f"reply ended after {len(head)} bytes: {head.hex(' ')}")
        length = _rtu_frame_length(head[1], head[2])
        if length is None:
            raise BadReply(f"reply starts with unit {head[0]} and unknown function code {head[1]}")
        rest = read(length - 3, deadline)
        frame = head + rest
        if len(frame) < length:
            raise BadReply(f"reply ended after {len(frame)} of {length} bytes")
        received_crc = int.from_bytes(frame[-2:], "little")
        if crc16(frame[:-2]) != received_crc:
            raise CrcError(f"reply CRC {frame[-2:].hex(' ')} does not match its {length} bytes")
        if frame[0] != request.unit_id:
            stats.stray_replies += 1
            continue
        return frame[1:-2]


# --------------------------------------------------------------------------------------------
# MBAP (Modbus TCP) framing
# --------------------------------------------------------------------------------------------

def mbap_frame(transaction_id: int, unit_id: int, pdu: bytes) -> bytes:
    """Return the Modbus TCP frame of a PDU: MBAP header (protocol 0) and PDU."""
    return struct.pack(">HHHB", transaction_id & 0xFFFF, 0, len(pdu) + 1, unit_id) + pdu


def read_mbap_reply(read: ReadFunction, request: Request, transaction_id: int, deadline: float,
                    stats: ReplyStats) -> bytes:
    """Read the Modbus TCP reply with `transaction_id` and return its PDU.

    A reply with another transaction id (late, to an earlier request) is counted in
    `stats.stray_replies` and skipped. Raises NoResponse if no matching reply arrived,
    BadReply for a header that is not Modbus TCP or a reply from another unit id.
    """
    while True:
        header = read(7, deadline)
        if not header:
            raise NoResponse("no reply before the timeout")
        if len(header) < 7:
            raise BadReply(f"reply ended after {len(header)} header bytes")
        tid, protocol, length, unit = struct.unpack(">HHHB", header)
        if protocol != 0 or not 3 <= length <= 254:
            raise BadReply(f"reply header {header.hex(' ')} is not Modbus TCP "
                           f"(protocol {protocol}, length {length})")
        body = read(length - 1, deadline)
        if len(body) < length - 1:
            raise BadReply(f"reply ended after {len(body)} of {length - 1} PDU bytes")
        if tid != transaction_id:
            stats.stray_replies += 1
            continue
        if unit != request.unit_id:
            raise BadReply(f"reply from unit {unit} to a request for unit {request.unit_id}")
        return body
