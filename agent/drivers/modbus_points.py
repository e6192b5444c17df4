"""Modbus points: data types, byte and word order, decoding, and request planning.

A point is one value of a device: which register table it lives in, its PDU address, its
type and order, and how to scale it. This module turns registers into values and groups
points into read requests, and has no transport code.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

FUNCTIONS = ("input", "holding")  # FC04 read input registers, FC03 read holding registers
FUNCTION_CODES = {"input": 4, "holding": 3}
TYPE_FORMATS = {
    "int16": ">h", "uint16": ">H",
    "int32": ">i", "uint32": ">I", "float32": ">f",
    "int64": ">q", "uint64": ">Q", "float64": ">d",
}
TYPE_REGISTERS = {name: struct.calcsize(fmt) // 2 for name, fmt in TYPE_FORMATS.items()}
# Every accepted point type: the numeric types above, plus a bitfield (named bits of a
# numeric register value) and a string (ASCII in `count` registers).
POINT_TYPES = (*TYPE_FORMATS, "bitfield", "string")
# Each letter is one byte of a 32-bit value, A the most significant. The string lists the bytes
# in the order they travel on the wire: "CDAB" puts the low 16-bit word first.
WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
BITFIELD_OUTPUTS = ("bits", "names")
# The Modbus application protocol caps FC03 and FC04 at 125 registers per request.
PROTOCOL_MAX_REGISTERS = 125


class DecodeError(ValueError):
    """Registers that do not form a valid value of the point's type."""


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def _check_registers(registers: list[int]) -> None:
    for register in registers:
        if isinstance(register, bool) or not isinstance(register, int) or not 0 <= register <= 0xFFFF:
            raise ValueError(f"register value {register!r} is not a 16-bit unsigned integer (0..65535)")


def _ordered_bytes(registers: list[int], word_order: str) -> bytes:
    """Return the registers' bytes most significant first, undoing the wire order.

    CDAB and DCBA put the least significant register first, BADC and DCBA swap the two bytes
    of each register. For 64-bit values the same two swaps apply to four registers.
    """
    if word_order in ("CDAB", "DCBA"):
        registers = registers[::-1]
    wire = b"".join(register.to_bytes(2, "big") for register in registers)
    if word_order in ("BADC", "DCBA"):
        wire = b"".join(wire[i + 1:i + 2] + wire[i:i + 1] for i in range(0, len(wire), 2))
    return wire


def decode_registers(registers: list[int], type: str, word_order: str = "ABCD") -> int | float:
    """Decode one value from its registers as received, in wire order.

    `type` is one of int16, uint16, int32, uint32, float32, int64, uint64, float64.
    `word_order` names the wire order of a 32-bit value's bytes (ABCD = big-endian, CDAB =
    low word first, BADC = bytes swapped in each word, DCBA = little-endian). For 16-bit
    types, BADC and DCBA swap the two bytes and ABCD and CDAB do not. Raises ValueError for
    an unknown type or order, a wrong register count, or a register outside 0..65535.
    """
    if type not in TYPE_FORMATS:
        raise ValueError(f"unknown register type {type!r}: use one of {', '.join(TYPE_FORMATS)}")
    if word_order not in WORD_ORDERS:
        raise ValueError(f"unknown word order {word_order!r}: use one of {', '.join(WORD_ORDERS)}")
    expected = TYPE_REGISTERS[type]
    if len(registers) != expected:
        raise ValueError(f"{type} needs {expected} register(s), got {len(registers)}: {registers!r}")
    _check_registers(registers)
    return struct.unpack(TYPE_FORMATS[type], _ordered_bytes(registers, word_order))[0]


def decode_string(registers: list[int], word_order: str = "ABCD") -> str:
    """Decode ASCII text, two characters per register, trailing NULs and spaces removed.

    ABCD and CDAB send the first character in the high byte of each register, BADC and DCBA
    in the low byte. Bytes outside ASCII become U+FFFD.
    """
    _check_registers(registers)
    wire = b"".join(register.to_bytes(2, "big") for register in registers)
    if word_order in ("BADC", "DCBA"):
        wire = b"".join(wire[i + 1:i + 2] + wire[i:i + 1] for i in range(0, len(wire), 2))
    return wire.split(b"\x00", 1)[0].decode("ascii", "replace").rstrip()


@dataclass(frozen=True, slots=True)
class PointConfig:
    """One value of a device: where it lives and how to decode it.

    `address` is the PDU address sent on the wire and `count` the number of registers.
    The engineering value is raw * scale + offset, in `unit`. For a bitfield, `raw_type` is
    the numeric type that contains the mask, and the mask is round(raw * scale + offset).
    `bits` maps bit names to bit indexes. `output` "bits" reports one 0/1 reading per named
    bit, and "names" one reading that lists the set bits' names.
    """

    name: str
    function: str
    address: int
    type: str
    word_order: str | None
    scale: float
    offset: float
    unit: str
    count: int
    raw_type: str = ""
    bits: tuple[tuple[str, int], ...] = ()
    output: str = ""

    @property
    def end(self) -> int:
        """First PDU address after this point."""
        return self.address + self.count


def decode_point(point: PointConfig, registers: list[int]) -> list[tuple[str, int | float | str]]:
    """Decode a point from its own registers into (reading name, value) pairs.

    A numeric or string point gives one pair under its name. A bitfield gives the mask under
    its name, then `<name>.<bit>` = 0 or 1 per named bit ("bits" output) or `<name>.active` =
    the set bits' names joined by commas ("names" output). Raises DecodeError for a bitfield
    mask that is negative or not finite, and ValueError for a wrong register count.
    """
    if len(registers) != point.count:
        raise ValueError(f"point {point.name!r} needs {point.count} registers, got {len(registers)}")
    order = point.word_order or "ABCD"
    if point.type == "string":
        return [(point.name, decode_string(registers, order))]
    if point.type != "bitfield":
        raw = decode_registers(registers, point.type, order)
        if point.scale == 1.0 and point.offset == 0.0:
            return [(point.name, raw)]
        return [(point.name, raw * point.scale + point.offset)]

    value = decode_registers(registers, point.raw_type, order) * point.scale + point.offset
    if not math.isfinite(value) or value < -0.5:
        raise DecodeError(f"point {point.name!r}: bitmask {value!r} is negative or not finite "
                          "(a negated encoding needs scale = -1)")
    # A float32 represents integers exactly only up to 2**24, so a float mask is rounded first.
    mask = round(value)
    decoded: list[tuple[str, int | float | str]] = [(point.name, mask)]
    if point.output == "names":
        active = [name for name, bit in point.bits if mask >> bit & 1]
        decoded.append((f"{point.name}.active", ",".join(active)))
    else:
        decoded.extend((f"{point.name}.{name}", mask >> bit & 1) for name, bit in point.bits)
    return decoded


# --------------------------------------------------------------------------------------------
# Request planning
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request and the points decoded from its reply."""

    function: str
    address: int
    count: int
    points: tuple[PointConfig, ...]

    @property
    def function_code(self) -> int:
        return FUNCTION_CODES[self.function]


def aligned_start(address: int, even: bool) -> int:
    return address - address % 2 if even else address


def aligned_end(end: int, even: bool) -> int:
    return end + end % 2 if even else end


def plan_requests(points: tuple[PointConfig, ...] | list[PointConfig], max_registers: int,
                  even_alignment: bool = False, max_gap_registers: int | None = None) -> list[ReadBlock]:
    """Group points into the fewest read requests that respect the device's limits.

    Points of one function are taken in address order. Each joins the current request while
    the request stays within `max_registers` and the run of unused registers before the point
    is at most `max_gap_registers` (default: no limit beyond `max_registers`). Without a
    tighter gap limit, extending each request as far as possible gives the minimum number of
    requests. With `even_alignment`, every request starts and ends on an even address.
    """
    max_gap = max_registers if max_gap_registers is None else max_gap_registers
    blocks: list[ReadBlock] = []
    for function in FUNCTIONS:
        selected = sorted((point for point in points if point.function == function),
                          key=lambda point: (point.address, point.count))
        start = end = 0
        members: list[PointConfig] = []
        for point in selected:
            point_start = aligned_start(point.address, even_alignment)
            point_end = aligned_end(point.end, even_alignment)
            if members and point.address - end <= max_gap and max(end, point_end) - start <= max_registers:
                end = max(end, point_end)
                members.append(point)
                continue
            if members:
                blocks.append(ReadBlock(function, start, end - start, tuple(members)))
            start, end, members = point_start, point_end, [point]
        if members:
            blocks.append(ReadBlock(function, start, end - start, tuple(members)))
    return blocks
