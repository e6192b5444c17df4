"""Register encoding and small model building blocks shared by the simulated Modbus devices.

Every encoder here is written from the devices' protocol descriptions and shares no code
with the agent's decoder, so a test that polls a simulator with the agent checks both.
"""

from __future__ import annotations

import math
import random
import struct
from typing import Any

READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_REGISTERS = 16
DIAGNOSTICS = 8

# --------------------------------------------------------------------------------------------
# Register encoding, written independently of the agent's decoder.
# --------------------------------------------------------------------------------------------

def float32_abcd(value: float) -> list[int]:
    """Encode a float32 as two registers, most significant register first (Eastron order)."""
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return [high, low]


def float32_cdab(value: float) -> list[int]:
    """Encode a float32 as two registers, least significant register first (Cryomech order)."""
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return [low, high]


def uint32_cdab(value: int) -> list[int]:
    """Encode an unsigned 32-bit integer as two registers, least significant register first."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"uint32 value {value} is out of range 0..4294967295")
    return [value & 0xFFFF, value >> 16]


def uint32_abcd(value: int) -> list[int]:
    """Encode an unsigned 32-bit integer as two registers, most significant register first."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"uint32 value {value} is out of range 0..4294967295")
    return [value >> 16, value & 0xFFFF]


def int16_tenths(value: float) -> int:
    """Encode value * 10 as a two's-complement 16-bit register, clamped to the int16 range."""
    scaled = max(-32768, min(32767, round(value * 10.0)))
    return scaled & 0xFFFF


class RegisterSpace:
    """Sparse register map made of contiguous blocks, each a start address and its registers."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, list[int]]] = []

    def add_block(self, start: int, registers: list[int]) -> None:
        self.blocks.append((start, registers))

    def read(self, address: int, count: int) -> list[int] | None:
        """Return `count` registers from `address`, or None unless one block holds them all."""
        for start, registers in self.blocks:
            if start <= address and address + count <= start + len(registers):
                offset = address - start
                return registers[offset:offset + count]
        return None

    def read_or_zeros(self, address: int, count: int) -> list[int]:
        """Return `count` registers from `address`, with 0 for every address outside the map."""
        result = [0] * count
        for start, registers in self.blocks:
            for index in range(count):
                offset = address + index - start
                if 0 <= offset < len(registers):
                    result[index] = registers[offset]
        return result


# --------------------------------------------------------------------------------------------
# Small stochastic building blocks.
# --------------------------------------------------------------------------------------------

class Drift:
    """Ornstein-Uhlenbeck noise that reverts to `mean` with time constant `tau_s`.

    `sigma` is the stationary standard deviation. The update is the exact discretisation, so
    it stays stable for any step length.
    """

    def __init__(self, rng: random.Random, mean: float, sigma: float, tau_s: float) -> None:
        self.rng = rng
        self.mean = mean
        self.sigma = sigma
        self.tau_s = tau_s
        self.value = mean + sigma * rng.gauss(0.0, 1.0)

    def advance(self, dt_s: float) -> float:
        decay = math.exp(-dt_s / self.tau_s)
        spread = self.sigma * math.sqrt(1.0 - decay * decay)
        self.value = self.mean + (self.value - self.mean) * decay + spread * self.rng.gauss(0.0, 1.0)
        return self.value


def approach(value: float, target: float, dt_s: float, tau_s: float) -> float:
    """Move `value` toward `target` as a first-order lag with time constant `tau_s`."""
    return target + (value - target) * math.exp(-dt_s / tau_s)


def check_choice(kind: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"invalid {kind} option {name}={value!r}: expected one of {allowed}")


def check_range(kind: str, name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"invalid {kind} option {name}={value!r}: expected a number from {low} to {high}")


def check_integer(kind: str, name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"invalid {kind} option {name}={value!r}: expected an integer from {low} to {high}")



def float64_abcd(value: float) -> list[int]:
    """Encode a float64 as four registers, most significant register first."""
    return list(struct.unpack(">4H", struct.pack(">d", value)))


def scaled_uint16(value: float, scale: float) -> int:
    """Encode value / scale as an unsigned 16-bit register, clamped to 0..65535."""
    return max(0, min(0xFFFF, round(value / scale)))


def scaled_int16(value: float, scale: float) -> int:
    """Encode value / scale as a two's-complement 16-bit register, clamped to the int16 range."""
    return max(-32768, min(32767, round(value / scale))) & 0xFFFF


def ascii_registers(text: str, count: int) -> list[int]:
    """Encode ASCII text in `count` registers, two characters each, padded with NULs."""
    data = text.encode("ascii")[:2 * count].ljust(2 * count, b"\x00")
    return [data[i] << 8 | data[i + 1] for i in range(0, 2 * count, 2)]
