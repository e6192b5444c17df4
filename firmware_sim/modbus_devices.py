"""Simulate an Eastron SDM630 power meter and a Cryomech CPA helium compressor over Modbus TCP.

Each simulated device runs as its own pymodbus TCP server. This module encodes the registers
itself (struct packing, word order, address offsets) from the two devices' protocol
descriptions and shares no code with the agent's Modbus driver, so a test that polls one with
the other checks both.

Physical values drift with seeded noise and follow simple first-order dynamics. An asyncio task
advances the models in simulated time, which runs `speed` times faster than real time.
"""

from __future__ import annotations

import asyncio
import cmath
import inspect
import logging
import math
import random
import struct
from typing import Any, Protocol

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

logger = logging.getLogger(__name__)

KINDS = ("sdm630", "cpa")

READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_REGISTERS = 16

# Simulated time is integrated in steps of at most this many seconds, so a fast `speed` does not
# turn one update into a single huge step. At most MAX_SUBSTEPS are taken per update.
MAX_STEP_S = 5.0
MAX_SUBSTEPS = 1000
# Starting or stopping a local listener takes milliseconds. This bounds the wait if it hangs.
SERVER_CALL_TIMEOUT_S = 5.0


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


# --------------------------------------------------------------------------------------------
# Eastron SDM630
# --------------------------------------------------------------------------------------------

# Input registers (FC04): PDU address (vendor register number - 30001) and the quantity served
# there. Every quantity is a float32 in two registers, most significant register first.
SDM630_INPUT_MAP: tuple[tuple[int, str], ...] = (
    (0x0000, "voltage_l1"), (0x0002, "voltage_l2"), (0x0004, "voltage_l3"),
    (0x0006, "current_l1"), (0x0008, "current_l2"), (0x000A, "current_l3"),
    (0x000C, "power_l1"), (0x000E, "power_l2"), (0x0010, "power_l3"),
    (0x0012, "apparent_power_l1"), (0x0014, "apparent_power_l2"), (0x0016, "apparent_power_l3"),
    (0x0018, "reactive_power_l1"), (0x001A, "reactive_power_l2"), (0x001C, "reactive_power_l3"),
    (0x001E, "power_factor_l1"), (0x0020, "power_factor_l2"), (0x0022, "power_factor_l3"),
    (0x0024, "phase_angle_l1"), (0x0026, "phase_angle_l2"), (0x0028, "phase_angle_l3"),
    (0x002A, "voltage_ln_average"),
    (0x002E, "current_average"),
    (0x0030, "current_sum"),
    (0x0034, "total_power"),
    (0x0038, "total_apparent_power"),
    (0x003C, "total_reactive_power"),
    (0x003E, "total_power_factor"),
    (0x0042, "total_phase_angle"),
    (0x0046, "frequency"),
    (0x0048, "import_energy"), (0x004A, "export_energy"),
    (0x004C, "import_reactive_energy"), (0x004E, "export_reactive_energy"),
    (0x0050, "apparent_energy"),
    (0x0052, "charge"),
    (0x0054, "total_power_demand"), (0x0056, "max_total_power_demand"),
    (0x0064, "total_va_demand"), (0x0066, "max_total_va_demand"),
    (0x0068, "neutral_current_demand"), (0x006A, "max_neutral_current_demand"),
    (0x00C8, "voltage_l1_l2"), (0x00CA, "voltage_l2_l3"), (0x00CC, "voltage_l3_l1"),
    (0x00CE, "voltage_ll_average"),
    (0x00E0, "neutral_current"),
    (0x00EA, "voltage_thd_l1"), (0x00EC, "voltage_thd_l2"), (0x00EE, "voltage_thd_l3"),
    (0x00F0, "current_thd_l1"), (0x00F2, "current_thd_l2"), (0x00F4, "current_thd_l3"),
    (0x00F8, "voltage_thd_average"),
    (0x00FA, "current_thd_average"),
    (0x00FE, "total_power_factor_inverted"),
    (0x0102, "current_demand_l1"), (0x0104, "current_demand_l2"), (0x0106, "current_demand_l3"),
    (0x0108, "max_current_demand_l1"), (0x010A, "max_current_demand_l2"),
    (0x010C, "max_current_demand_l3"),
    (0x014E, "voltage_ll_thd_l1_l2"), (0x0150, "voltage_ll_thd_l2_l3"),
    (0x0152, "voltage_ll_thd_l3_l1"), (0x0154, "voltage_ll_thd_average"),
    (0x0156, "total_energy"),
    (0x0158, "total_reactive_energy"),
    (0x015A, "import_energy_l1"), (0x015C, "import_energy_l2"), (0x015E, "import_energy_l3"),
    (0x0160, "export_energy_l1"), (0x0162, "export_energy_l2"), (0x0164, "export_energy_l3"),
    (0x0166, "total_energy_l1"), (0x0168, "total_energy_l2"), (0x016A, "total_energy_l3"),
    # The vendor lists 30365..30381 only as "per-phase import / export / total reactive
    # energy". The order below (three phases per group) follows the active-energy layout.
    (0x016C, "import_reactive_energy_l1"), (0x016E, "import_reactive_energy_l2"),
    (0x0170, "import_reactive_energy_l3"),
    (0x0172, "export_reactive_energy_l1"), (0x0174, "export_reactive_energy_l2"),
    (0x0176, "export_reactive_energy_l3"),
    (0x0178, "total_reactive_energy_l1"), (0x017A, "total_reactive_energy_l2"),
    (0x017C, "total_reactive_energy_l3"),
)
# One past the last input register. Undocumented addresses below it read 0.0.
SDM630_INPUT_END = 0x017E

# Holding registers (FC03), float32 each: PDU address (register - 40001) and quantity.
SDM630_HOLDING_MAP: tuple[tuple[int, str], ...] = (
    (0x0000, "demand_time"), (0x0002, "demand_period"), (0x0006, "system_volts"),
    (0x000A, "system_type"), (0x000C, "pulse_width"), (0x000E, "password_lock"),
    (0x0012, "network_parity_stop"), (0x0014, "network_node"), (0x0016, "pulse_divisor"),
    (0x0018, "password"), (0x001C, "network_baud_rate"), (0x001E, "energy_unit_prefix"),
    (0x0024, "system_power"), (0x0028, "register_order"), (0x002A, "serial_number_high"),
    (0x002C, "serial_number_low"), (0x0056, "pulse_1_energy_type"), (0x00D8, "reset_logged_data"),
)
SDM630_HOLDING_END = 0x00DA
# The v1.8 protocol serves the serial number here as a uint32, most significant register first.
SDM630_SERIAL_ADDRESS = 0xFC00
SDM630_MAX_REGISTERS = 80
SDM630_DEMAND_PERIODS_MIN = (0, 5, 8, 10, 15, 20, 30, 60)


class Sdm630:
    """Eastron SDM630 three-phase meter on the supply of a helium compressor.

    The load is a compressor drawing about `load_w` watts with slow noise, plus occasional
    peaks of 1-3 kW lasting 20-90 s (`peaks_per_hour` on average). The wiring is 3P4W. Power
    factor follows the SDM630 sign convention: negative means an inductive load. The meter
    only imports, so every export register reads 0.
    """

    kind = "sdm630"

    def __init__(
        self,
        rng: random.Random,
        *,
        unit_id: int = 1,
        load_w: float = 8000.0,
        voltage_v: float = 230.0,
        frequency_hz: float = 50.0,
        power_factor: float = 0.88,
        peaks_per_hour: float = 4.0,
        energy_unit: str = "k",
        demand_period_min: int = 60,
        import_kwh: float | None = None,
        serial_number: int | None = None,
    ) -> None:
        check_integer("sdm630", "unit_id", unit_id, 1, 247)
        check_range("sdm630", "load_w", load_w, 0.0, 60000.0)
        check_range("sdm630", "voltage_v", voltage_v, 100.0, 300.0)
        check_range("sdm630", "frequency_hz", frequency_hz, 45.0, 65.0)
        check_range("sdm630", "power_factor", power_factor, 0.5, 1.0)
        check_range("sdm630", "peaks_per_hour", peaks_per_hour, 0.0, 3600.0)
        check_choice("sdm630", "energy_unit", energy_unit, ("k", "M"))
        check_choice("sdm630", "demand_period_min", demand_period_min, SDM630_DEMAND_PERIODS_MIN)
        if import_kwh is not None:
            check_range("sdm630", "import_kwh", import_kwh, 0.0, 1e9)
        if serial_number is not None:
            check_integer("sdm630", "serial_number", serial_number, 0, 0xFFFFFFFF)
        self.rng = rng
        self.unit_id = unit_id
        self.energy_unit = energy_unit
        self.demand_period_min = demand_period_min
        self.peaks_per_hour = peaks_per_hour
        self.voltage_v = voltage_v
        self.serial_number = serial_number if serial_number is not None else rng.randrange(10**7, 10**8)
        self.overrides: dict[str, float] = {}
        self.t_s = 0.0

        self._load = Drift(rng, load_w, 0.04 * load_w, 30.0)
        self._peak_w = 0.0
        self._peak_left_s = 0.0
        shares = [1.0 + rng.uniform(-0.05, 0.05) for _ in range(3)]
        self._shares = [3.0 * share / sum(shares) for share in shares]
        self._voltages = [Drift(rng, voltage_v, 1.2, 60.0) for _ in range(3)]
        self._power_factors = [Drift(rng, power_factor, 0.01, 300.0) for _ in range(3)]
        self._frequency = Drift(rng, frequency_hz, 0.02, 20.0)
        self._voltage_thd = [Drift(rng, 2.0, 0.2, 600.0) for _ in range(3)]
        self._current_thd = [Drift(rng, 12.0, 1.0, 300.0) for _ in range(3)]

        # Counters in kWh, kVArh, kVAh and Ah, before the energy unit prefix is applied.
        total_kwh = import_kwh if import_kwh is not None else rng.uniform(20000.0, 60000.0)
        self._import_kwh = [total_kwh * share / 3.0 for share in self._shares]
        self._import_kvarh = [energy * 0.5 for energy in self._import_kwh]
        self._apparent_kvah = total_kwh / power_factor
        self._charge_ah = total_kwh * 1000.0 / voltage_v / 3.0

        now = self._instant()
        self._power_demand = now["total_power"]
        self._va_demand = now["total_apparent_power"]
        self._neutral_demand = now["neutral_current"]
        self._current_demand = [now[f"current_l{k}"] for k in (1, 2, 3)]
        self._max_power_demand = self._power_demand
        self._max_va_demand = self._va_demand
        self._max_neutral_demand = self._neutral_demand
        self._max_current_demand = list(self._current_demand)

    def advance(self, dt_s: float) -> None:
        self.t_s += dt_s
        self._load.advance(dt_s)
        self._advance_peak(dt_s)
        for drift in (*self._voltages, *self._power_factors, self._frequency,
                      *self._voltage_thd, *self._current_thd):
            drift.advance(dt_s)

        now = self._instant()
        hours = dt_s / 3600.0
        for k in range(3):
            self._import_kwh[k] += max(now[f"power_l{k + 1}"], 0.0) / 1000.0 * hours
            self._import_kvarh[k] += max(now[f"reactive_power_l{k + 1}"], 0.0) / 1000.0 * hours
        self._apparent_kvah += now["total_apparent_power"] / 1000.0 * hours
        self._charge_ah += now["current_average"] * hours

        # The meter's demand is an average over the demand period. An exponential average with
        # the period as time constant approximates it. A period of 0 means no averaging.
        period_s = self.demand_period_min * 60.0
        weight = 1.0 if period_s == 0 else 1.0 - math.exp(-dt_s / period_s)
        self._power_demand += (max(now["total_power"], 0.0) - self._power_demand) * weight
        self._va_demand += (now["total_apparent_power"] - self._va_demand) * weight
        self._neutral_demand += (now["neutral_current"] - self._neutral_demand) * weight
        for k in range(3):
            self._current_demand[k] += (now[f"current_l{k + 1}"] - self._current_demand[k]) * weight
            self._max_current_demand[k] = max(self._max_current_demand[k], self._current_demand[k])
        self._max_power_demand = max(self._max_power_demand, self._power_demand)
        self._max_va_demand = max(self._max_va_demand, self._va_demand)
        self._max_neutral_demand = max(self._max_neutral_demand, self._neutral_demand)

    def _advance_peak(self, dt_s: float) -> None:
        if self._peak_left_s > 0.0:
            self._peak_left_s -= dt_s
            if self._peak_left_s <= 0.0:
                self._peak_w = 0.0
            return
        chance = 1.0 - math.exp(-self.peaks_per_hour * dt_s / 3600.0)
        if self.rng.random() < chance:
            self._peak_w = self.rng.uniform(1000.0, 3000.0)
            self._peak_left_s = self.rng.uniform(20.0, 90.0)

    def _instant(self) -> dict[str, float]:
        """Compute the instantaneous electrical quantities from the current state."""
        load_w = max(self._load.value + self._peak_w, 0.0)
        values: dict[str, float] = {}
        current_phasors = []
        voltage_phasors = []
        for k in range(3):
            phase = k + 1
            voltage = self._voltages[k].value
            power_factor = min(max(self._power_factors[k].value, 0.5), 1.0)
            power = load_w * self._shares[k] / 3.0
            apparent = power / power_factor
            reactive = math.sqrt(max(apparent * apparent - power * power, 0.0))
            current = apparent / voltage
            lag_rad = math.acos(power_factor)
            voltage_angle = -2.0 * math.pi * k / 3.0
            voltage_phasors.append(cmath.rect(voltage, voltage_angle))
            current_phasors.append(cmath.rect(current, voltage_angle - lag_rad))
            values[f"voltage_l{phase}"] = voltage
            values[f"current_l{phase}"] = current
            values[f"power_l{phase}"] = power
            values[f"apparent_power_l{phase}"] = apparent
            values[f"reactive_power_l{phase}"] = reactive
            values[f"power_factor_l{phase}"] = -power_factor
            # Degrees, positive when the current lags the voltage.
            values[f"phase_angle_l{phase}"] = math.degrees(lag_rad)

        total_power = sum(values[f"power_l{k}"] for k in (1, 2, 3))
        total_apparent = sum(values[f"apparent_power_l{k}"] for k in (1, 2, 3))
        total_reactive = sum(values[f"reactive_power_l{k}"] for k in (1, 2, 3))
        total_pf = total_power / total_apparent if total_apparent > 0.0 else 1.0
        currents = [values[f"current_l{k}"] for k in (1, 2, 3)]
        values["voltage_ln_average"] = sum(values[f"voltage_l{k}"] for k in (1, 2, 3)) / 3.0
        values["current_average"] = sum(currents) / 3.0
        values["current_sum"] = sum(currents)
        values["total_power"] = total_power
        values["total_apparent_power"] = total_apparent
        values["total_reactive_power"] = total_reactive
        values["total_power_factor"] = -total_pf
        values["total_power_factor_inverted"] = total_pf
        values["total_phase_angle"] = math.degrees(math.acos(min(total_pf, 1.0)))
        values["frequency"] = self._frequency.value
        values["neutral_current"] = abs(sum(current_phasors))
        line_voltages = [abs(voltage_phasors[k] - voltage_phasors[(k + 1) % 3]) for k in range(3)]
        values["voltage_l1_l2"], values["voltage_l2_l3"], values["voltage_l3_l1"] = line_voltages
        values["voltage_ll_average"] = sum(line_voltages) / 3.0
        return values

    def values(self) -> dict[str, float]:
        """Return every served quantity in the units the meter serves, overrides applied."""
        values = self._instant()
        scale = 1.0 if self.energy_unit == "k" else 0.001

        for k in range(3):
            phase = k + 1
            values[f"import_energy_l{phase}"] = self._import_kwh[k] * scale
            values[f"export_energy_l{phase}"] = 0.0
            values[f"total_energy_l{phase}"] = self._import_kwh[k] * scale
            values[f"import_reactive_energy_l{phase}"] = self._import_kvarh[k] * scale
            values[f"export_reactive_energy_l{phase}"] = 0.0
            values[f"total_reactive_energy_l{phase}"] = self._import_kvarh[k] * scale
            values[f"voltage_thd_l{phase}"] = max(self._voltage_thd[k].value, 0.0)
            values[f"current_thd_l{phase}"] = max(self._current_thd[k].value, 0.0)
            values[f"current_demand_l{phase}"] = self._current_demand[k]
            values[f"max_current_demand_l{phase}"] = self._max_current_demand[k]

        values["import_energy"] = sum(self._import_kwh) * scale
        values["export_energy"] = 0.0
        values["total_energy"] = values["import_energy"] + values["export_energy"]
        values["import_reactive_energy"] = sum(self._import_kvarh) * scale
        values["export_reactive_energy"] = 0.0
        values["total_reactive_energy"] = values["import_reactive_energy"]
        values["apparent_energy"] = self._apparent_kvah * scale
        values["charge"] = self._charge_ah * scale

        values["total_power_demand"] = self._power_demand
        values["max_total_power_demand"] = self._max_power_demand
        values["total_va_demand"] = self._va_demand
        values["max_total_va_demand"] = self._max_va_demand
        values["neutral_current_demand"] = self._neutral_demand
        values["max_neutral_current_demand"] = self._max_neutral_demand

        values["voltage_thd_average"] = sum(values[f"voltage_thd_l{k}"] for k in (1, 2, 3)) / 3.0
        values["current_thd_average"] = sum(values[f"current_thd_l{k}"] for k in (1, 2, 3)) / 3.0
        # L-L voltage THD is modelled as the mean of the two phases' L-N THD.
        for a, b in ((1, 2), (2, 3), (3, 1)):
            values[f"voltage_ll_thd_l{a}_l{b}"] = (values[f"voltage_thd_l{a}"] + values[f"voltage_thd_l{b}"]) / 2.0
        values["voltage_ll_thd_average"] = values["voltage_thd_average"]

        values.update(self.holding_values())
        values.update(self.overrides)
        return values

    def holding_values(self) -> dict[str, float]:
        """Return the setup parameters served as holding registers."""
        period = self.demand_period_min
        return {
            "demand_time": (self.t_s / 60.0) % period if period else 0.0,
            "demand_period": float(period),
            "system_volts": self.voltage_v,
            "system_type": 3.0,  # 3P4W
            "pulse_width": 100.0,  # ms
            "password_lock": 0.0,  # 0 = locked
            "network_parity_stop": 0.0,  # no parity, one stop bit
            "network_node": float(self.unit_id),
            "pulse_divisor": 0.0,
            "password": 1000.0,
            "network_baud_rate": 2.0,  # 9600 baud
            "energy_unit_prefix": 0.0 if self.energy_unit == "k" else 1.0,
            # NOTE: the protocol document names "system power" without its meaning; this is an
            # assumed rating of 100 A per phase.
            "system_power": 3.0 * self.voltage_v * 100.0,
            "register_order": 0.0,
            "serial_number_high": float(self.serial_number // 65536),
            "serial_number_low": float(self.serial_number % 65536),
            "pulse_1_energy_type": 1.0,
            "reset_logged_data": 0.0,
        }

    def encode(self) -> tuple[RegisterSpace, RegisterSpace]:
        """Encode the current values as input and holding register spaces."""
        values = self.values()
        inputs = [0] * SDM630_INPUT_END
        for address, name in SDM630_INPUT_MAP:
            inputs[address:address + 2] = float32_abcd(values[name])
        holdings = [0] * SDM630_HOLDING_END
        for address, name in SDM630_HOLDING_MAP:
            holdings[address:address + 2] = float32_abcd(values[name])
        input_space = RegisterSpace()
        input_space.add_block(0, inputs)
        holding_space = RegisterSpace()
        holding_space.add_block(0, holdings)
        holding_space.add_block(SDM630_SERIAL_ADDRESS, uint32_abcd(self.serial_number))
        return input_space, holding_space

    def handle(self, function_code: int, address: int, count: int,
               written: list[int] | None) -> list[int] | ExcCodes:
        """Serve one request with the meter's rules, returning registers or an exception code."""
        # NOTE: the real meter also accepts FC16 writes of setup parameters. This simulator
        # does not model writes and rejects them with ILLEGAL_FUNCTION.
        if function_code not in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS) or written is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        # A count over the meter's limit is a value out of range, which the Modbus application
        # protocol reports as exception 03. The meter's document names no exception code.
        if count > SDM630_MAX_REGISTERS:
            return ExcCodes.ILLEGAL_VALUE
        # Reads must start and end on a float boundary. The vendor document allows one
        # exception, a single-register read, which gets the float's high word here.
        if address % 2 or (count % 2 and count != 1):
            return ExcCodes.ILLEGAL_ADDRESS
        input_space, holding_space = self.encode()
        space = input_space if function_code == READ_INPUT_REGISTERS else holding_space
        registers = space.read(address, count)
        return ExcCodes.ILLEGAL_ADDRESS if registers is None else registers


# --------------------------------------------------------------------------------------------
# Cryomech CPA
# --------------------------------------------------------------------------------------------

CPA_IDLE = 0
CPA_STARTING = 2
CPA_RUNNING = 3
CPA_STOPPING = 5
CPA_PRESSURE_UNITS = {"psi": 0, "bar": 1, "kPa": 2}
CPA_TEMPERATURE_UNITS = {"F": 0, "C": 1, "K": 2}
# Last input address of each register layout: 2.x ends at 30033, 3.x adds copies up to 30055.
CPA_LAYOUT_END = {"2.x": 33, "3.x": 55}
# Float32 quantities at odd addresses 7..27, least significant register first.
CPA_FLOAT_MAP: tuple[tuple[int, str], ...] = (
    (7, "coolant_in_temperature"), (9, "coolant_out_temperature"), (11, "oil_temperature"),
    (13, "helium_temperature"), (15, "low_pressure"), (17, "low_pressure_average"),
    (19, "high_pressure"), (21, "high_pressure_average"), (23, "delta_pressure_average"),
    (25, "motor_current"), (27, "hours"),
)
# 3.x layout: the same quantities times ten as 16-bit registers at 40..49.
CPA_TENTHS_MAP: tuple[tuple[int, str], ...] = (
    (40, "coolant_in_temperature"), (41, "coolant_out_temperature"), (42, "oil_temperature"),
    (43, "helium_temperature"), (44, "low_pressure"), (45, "low_pressure_average"),
    (46, "high_pressure"), (47, "high_pressure_average"), (48, "delta_pressure_average"),
    (49, "motor_current"),
)
PSI_PER_BAR = 14.503773773


class CryomechCpa:
    """Cryomech CPA helium compressor (a CPA1110 by default) cooled by a water chiller.

    Internally pressures are in psi and temperatures in degrees C. The served values use the
    panel's configured units, which registers 30029 and 30030 report. Running, the supply
    (high) side settles near `high_pressure_psi` and the return (low) side near
    `low_pressure_psi`. Stopped, both settle at `static_pressure_psi`. The helium, oil and
    coolant-out temperatures rise above the coolant inlet temperature while the motor runs.
    Start and stop take `transition_s` simulated seconds.
    """

    kind = "cpa"

    def __init__(
        self,
        rng: random.Random,
        *,
        unit_id: int = 1,
        layout: str = "3.x",
        pressure_unit: str = "psi",
        temperature_unit: str = "C",
        unmapped_reads: str = "exception",
        running: bool = True,
        hours: float | None = None,
        transition_s: float = 3.0,
        motor_current_a: float = 14.0,
        coolant_in_c: float = 20.0,
        high_pressure_psi: float = 290.0,
        low_pressure_psi: float = 95.0,
        static_pressure_psi: float = 220.0,
        warnings: int = 0,
        alarms: int = 0,
        serial_number: int | None = None,
        model_code: int = 0x0413,
        software_revision: tuple[int, int, int] = (3, 2, 5),
    ) -> None:
        check_integer("cpa", "unit_id", unit_id, 0, 255)
        check_choice("cpa", "layout", layout, tuple(CPA_LAYOUT_END))
        check_choice("cpa", "pressure_unit", pressure_unit, tuple(CPA_PRESSURE_UNITS))
        check_choice("cpa", "temperature_unit", temperature_unit, tuple(CPA_TEMPERATURE_UNITS))
        check_choice("cpa", "unmapped_reads", unmapped_reads, ("exception", "zeros"))
        check_choice("cpa", "running", running, (True, False))
        check_range("cpa", "transition_s", transition_s, 0.0, 600.0)
        check_range("cpa", "motor_current_a", motor_current_a, 0.0, 100.0)
        check_range("cpa", "coolant_in_c", coolant_in_c, 0.0, 40.0)
        check_range("cpa", "high_pressure_psi", high_pressure_psi, 0.0, 500.0)
        check_range("cpa", "low_pressure_psi", low_pressure_psi, 0.0, 500.0)
        check_range("cpa", "static_pressure_psi", static_pressure_psi, 0.0, 500.0)
        if hours is not None:
            check_range("cpa", "hours", hours, 0.0, 400000.0)
        if serial_number is not None:
            check_integer("cpa", "serial_number", serial_number, 0, 0xFFFF)
        check_integer("cpa", "model_code", model_code, 0, 0xFFFF)
        if len(software_revision) != 3 or not all(0 <= part <= 255 for part in software_revision):
            raise ValueError(f"invalid cpa option software_revision={software_revision!r}: "
                             "expected (major, minor, patch) with each part from 0 to 255")
        self.rng = rng
        # The panel appears to ignore the unit id on TCP, so the server replies to every unit id.
        self.unit_id = unit_id
        self.layout = layout
        self.pressure_unit = pressure_unit
        self.temperature_unit = temperature_unit
        self.unmapped_reads = unmapped_reads
        self.transition_s = transition_s
        self.model_code = model_code
        self.software_revision = software_revision
        self.serial_number = serial_number if serial_number is not None else rng.randrange(1000, 60000)
        self.overrides: dict[str, float] = {}
        self.warnings = 0
        self.alarms = 0
        self.set_faults(warnings=warnings, alarms=alarms)
        self.last_command = 0
        self.t_s = 0.0

        self.state = CPA_RUNNING if running else CPA_IDLE
        self._state_left_s = 0.0
        self.hours = hours if hours is not None else rng.uniform(5000.0, 40000.0)
        self._motor_target_a = motor_current_a
        self._high_target_psi = high_pressure_psi
        self._low_target_psi = low_pressure_psi
        self._static_psi = static_pressure_psi
        self._coolant_in = Drift(rng, coolant_in_c, 0.3, 300.0)
        self._noise_high = Drift(rng, 0.0, 1.0, 10.0)
        self._noise_low = Drift(rng, 0.0, 0.5, 10.0)
        self._noise_current = Drift(rng, 0.0, 0.2, 5.0)
        self._noise_temperature = Drift(rng, 0.0, 0.1, 30.0)

        energized = self.energized
        self._high_psi = high_pressure_psi if energized else static_pressure_psi
        self._low_psi = low_pressure_psi if energized else static_pressure_psi
        self._high_average_psi = self._high_psi
        self._low_average_psi = self._low_psi
        coolant_in = self._coolant_in.value
        self._coolant_out_c = coolant_in + (8.0 if energized else 0.0)
        self._oil_c = coolant_in + (20.0 if energized else 5.0)
        self._helium_c = coolant_in + (45.0 if energized else 5.0)
        self._motor_a = motor_current_a if energized else 0.0

    @property
    def energized(self) -> bool:
        return self.state in (CPA_STARTING, CPA_RUNNING)

    def set_faults(self, warnings: int | None = None, alarms: int | None = None) -> None:
        """Set the warning and alarm bitmasks (sums of the panel's bit weights)."""
        for name, mask in (("warnings", warnings), ("alarms", alarms)):
            if mask is None:
                continue
            if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < 2**31:
                raise ValueError(f"invalid cpa {name} bitmask {mask!r}: expected an integer from 0 to 2**31 - 1")
            setattr(self, name, mask)

    def command(self, value: int) -> None:
        """Apply a write to holding register 40001: 1 starts the compressor, anything else stops it."""
        self.last_command = value
        if value == 1:
            if self.state in (CPA_IDLE, CPA_STOPPING):
                self.state = CPA_STARTING
                self._state_left_s = self.transition_s
                logger.info("cpa: start command, state starting")
        elif self.state in (CPA_STARTING, CPA_RUNNING):
            self.state = CPA_STOPPING
            self._state_left_s = self.transition_s
            logger.info("cpa: stop command (value 0x%04X), state stopping", value)

    def advance(self, dt_s: float) -> None:
        self.t_s += dt_s
        if self.state in (CPA_STARTING, CPA_STOPPING):
            self._state_left_s -= dt_s
            if self._state_left_s <= 0.0:
                self.state = CPA_RUNNING if self.state == CPA_STARTING else CPA_IDLE
        energized = self.energized
        if energized:
            self.hours += dt_s / 3600.0

        coolant_in = self._coolant_in.advance(dt_s)
        for drift in (self._noise_high, self._noise_low, self._noise_current, self._noise_temperature):
            drift.advance(dt_s)
        if energized:
            self._high_psi = approach(self._high_psi, self._high_target_psi, dt_s, 15.0)
            self._low_psi = approach(self._low_psi, self._low_target_psi, dt_s, 15.0)
            self._motor_a = approach(self._motor_a, self._motor_target_a, dt_s, 1.0)
        else:
            self._high_psi = approach(self._high_psi, self._static_psi, dt_s, 60.0)
            self._low_psi = approach(self._low_psi, self._static_psi, dt_s, 60.0)
            self._motor_a = approach(self._motor_a, 0.0, dt_s, 1.0)
        self._high_average_psi = approach(self._high_average_psi, self._high_psi, dt_s, 30.0)
        self._low_average_psi = approach(self._low_average_psi, self._low_psi, dt_s, 30.0)
        self._coolant_out_c = approach(self._coolant_out_c, coolant_in + (8.0 if energized else 0.0), dt_s, 60.0)
        self._oil_c = approach(self._oil_c, coolant_in + (20.0 if energized else 5.0), dt_s, 600.0)
        self._helium_c = approach(self._helium_c, coolant_in + (45.0 if energized else 5.0), dt_s, 300.0)

    def _pressure(self, psi: float) -> float:
        if self.pressure_unit == "bar":
            return psi / PSI_PER_BAR
        if self.pressure_unit == "kPa":
            return psi / PSI_PER_BAR * 100.0
        return psi

    def _temperature(self, celsius: float) -> float:
        if self.temperature_unit == "F":
            return celsius * 9.0 / 5.0 + 32.0
        if self.temperature_unit == "K":
            return celsius + 273.15
        return celsius

    def values(self) -> dict[str, float]:
        """Return every served quantity in the panel's units, overrides applied."""
        energized = self.energized
        high = self._high_psi + (self._noise_high.value if energized else 0.0)
        low = self._low_psi + (self._noise_low.value if energized else 0.0)
        noise_c = self._noise_temperature.value
        motor = max(self._motor_a + (self._noise_current.value if energized else 0.0), 0.0)
        values: dict[str, float] = {
            "operating_state": float(self.state),
            "running": 1.0 if energized else 0.0,
            # The 2.x float registers carry the negative of the bitmask (0.0, not -0.0, for none).
            "warning": -float(self.warnings) if self.warnings else 0.0,
            "alarm": -float(self.alarms) if self.alarms else 0.0,
            "coolant_in_temperature": self._temperature(self._coolant_in.value),
            "coolant_out_temperature": self._temperature(self._coolant_out_c + noise_c),
            "oil_temperature": self._temperature(self._oil_c + noise_c),
            "helium_temperature": self._temperature(self._helium_c + noise_c),
            "low_pressure": self._pressure(low),
            "low_pressure_average": self._pressure(self._low_average_psi),
            "high_pressure": self._pressure(high),
            "high_pressure_average": self._pressure(self._high_average_psi),
            "delta_pressure_average": self._pressure(self._high_average_psi - self._low_average_psi),
            "motor_current": motor,
            "hours": self.hours,
            "pressure_scale": float(CPA_PRESSURE_UNITS[self.pressure_unit]),
            "temperature_scale": float(CPA_TEMPERATURE_UNITS[self.temperature_unit]),
            "serial_number": float(self.serial_number),
            "model_code": float(self.model_code),
            "warning_bits": float(self.warnings),
            "alarm_bits": float(self.alarms),
        }
        values.update(self.overrides)
        return values

    def encode(self) -> tuple[RegisterSpace, RegisterSpace]:
        """Encode the current values as input and holding register spaces."""
        values = self.values()
        end = CPA_LAYOUT_END[self.layout]
        # Index 0 is address 0, which is outside the map and never served from this list.
        registers = [0] * (end + 1)
        registers[1] = int(values["operating_state"]) & 0xFFFF
        registers[2] = int(values["running"]) & 0xFFFF
        registers[3:5] = float32_cdab(values["warning"])
        registers[5:7] = float32_cdab(values["alarm"])
        for address, name in CPA_FLOAT_MAP:
            registers[address:address + 2] = float32_cdab(values[name])
        registers[29] = int(values["pressure_scale"]) & 0x00FF
        registers[30] = int(values["temperature_scale"]) & 0x00FF
        registers[31] = int(values["serial_number"]) & 0xFFFF
        registers[32] = int(values["model_code"]) & 0xFFFF
        major, minor, patch = self.software_revision
        registers[33] = major << 8 | minor
        if self.layout == "3.x":
            registers[35] = patch << 8
            for address, name in CPA_TENTHS_MAP:
                registers[address] = int16_tenths(values[name])
            registers[50:52] = uint32_cdab(round(values["hours"] * 10.0))
            registers[52:54] = uint32_cdab(int(values["warning_bits"]))
            registers[54:56] = uint32_cdab(int(values["alarm_bits"]))
        input_space = RegisterSpace()
        input_space.add_block(1, registers[1:])
        holding_space = RegisterSpace()
        holding_space.add_block(1, [self.last_command])
        return input_space, holding_space

    def handle(self, function_code: int, address: int, count: int,
               written: list[int] | None) -> list[int] | ExcCodes:
        """Serve one request with the panel's rules, returning registers or an exception code."""
        if function_code in (WRITE_SINGLE_REGISTER, WRITE_MULTIPLE_REGISTERS) and written is not None:
            if address != 1 or len(written) != 1:
                return ExcCodes.ILLEGAL_ADDRESS
            self.command(written[0])
            return []
        # The reply to FC06 is an echo, which pymodbus builds by reading the register back.
        if function_code not in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS, WRITE_SINGLE_REGISTER):
            return ExcCodes.ILLEGAL_FUNCTION
        input_space, holding_space = self.encode()
        space = input_space if function_code == READ_INPUT_REGISTERS else holding_space
        registers = space.read(address, count)
        if registers is not None:
            return registers
        # No public source documents the panel's reply at address 0 or past its map.
        if self.unmapped_reads == "zeros":
            return space.read_or_zeros(address, count)
        return ExcCodes.ILLEGAL_ADDRESS


# --------------------------------------------------------------------------------------------
# Serving a model over Modbus TCP
# --------------------------------------------------------------------------------------------

class DeviceModel(Protocol):
    kind: str
    unit_id: int
    overrides: dict[str, float]

    def advance(self, dt_s: float) -> None: ...

    def values(self) -> dict[str, float]: ...

    def handle(self, function_code: int, address: int, count: int,
               written: list[int] | None) -> list[int] | ExcCodes: ...


MODEL_CLASSES: dict[str, type] = {"sdm630": Sdm630, "cpa": CryomechCpa}


def full_range_blocks() -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
    """Build pymodbus blocks that accept every address, so the model decides every reply.

    pymodbus 3.16 checks a request against its own blocks before it calls the device action,
    and replies ILLEGAL_ADDRESS for anything outside them. With blocks that cover the whole
    16-bit address space, every request that fits reaches the model.
    """
    return (
        [SimData(0, values=[False] * 65536, datatype=DataType.BITS)],
        [SimData(0, values=[False] * 65536, datatype=DataType.BITS)],
        [SimData(0, count=65536, values=0, datatype=DataType.REGISTERS)],
        [SimData(0, count=65536, values=0, datatype=DataType.REGISTERS)],
    )


def make_action(model: DeviceModel):
    """Wrap a model as a pymodbus SimDevice action that fills the served registers in place."""

    async def action(function_code: int, start_address: int, address: int, count: int,
                     registers: list[int], written: list[int] | list[bool] | None) -> ExcCodes | None:
        written_registers = None if written is None else [int(value) for value in written]
        result = model.handle(function_code, address, count, written_registers)
        if isinstance(result, ExcCodes):
            return result
        if written is None:
            offset = address - start_address
            registers[offset:offset + len(result)] = result
        return None

    return action


async def reject_other_unit(function_code: int, start_address: int, address: int, count: int,
                            registers: list[int], written: list[int] | list[bool] | None) -> ExcCodes:
    """Reject a request to an absent unit id as a Modbus TCP gateway does (exception 0x0B)."""
    return ExcCodes.GATEWAY_NO_RESPONSE


class RunningDevice:
    """One simulated device served by its own pymodbus TCP server.

    `unit_id` is the id the device responds to. The CPA responds to every unit id, as the real
    panel appears to, and reports its configured id here. `values()` returns the true values in
    engineering units, keyed by quantity name.
    """

    def __init__(self, model: DeviceModel, server: ModbusTcpServer, host: str, port: int,
                 speed: float, update_interval_s: float) -> None:
        self.model = model
        self.kind = model.kind
        self.unit_id = model.unit_id
        self.host = host
        self.port = port
        self.speed = speed
        self.update_interval_s = update_interval_s
        self.frozen = False
        self._server = server
        self._task: asyncio.Task | None = None

    def values(self) -> dict[str, float]:
        return self.model.values()

    def freeze(self) -> None:
        """Stop the update task from advancing the model. Requests still get replies."""
        self.frozen = True

    def resume(self) -> None:
        self.frozen = False

    def step(self, seconds: float) -> None:
        """Advance the model by `seconds` of simulated time, in bounded sub-steps."""
        if seconds < 0:
            raise ValueError(f"cannot step a simulated device by a negative time: {seconds} s")
        if seconds == 0:
            return
        steps = min(MAX_SUBSTEPS, max(1, math.ceil(seconds / MAX_STEP_S)))
        for _ in range(steps):
            self.model.advance(seconds / steps)

    def override(self, name: str, value: float) -> None:
        """Serve `value` for quantity `name` until cleared. Other quantities are not recomputed."""
        known = self.model.values()
        if name not in known:
            raise KeyError(f"unknown {self.kind} quantity {name!r}; known: {', '.join(sorted(known))}")
        self.model.overrides[name] = value

    def clear_overrides(self) -> None:
        self.model.overrides.clear()

    def start_updates(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run_updates(), name=f"{self.kind} simulator updates")

    async def _run_updates(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.update_interval_s)
            now = loop.time()
            elapsed = now - last
            last = now
            if self.frozen:
                continue
            try:
                self.step(elapsed * self.speed)
            except Exception:
                logger.exception("%s simulator on port %d: model update failed, updates stop",
                                 self.kind, self.port)
                raise

    async def stop(self) -> None:
        """Stop the updates and the server, closing every client connection."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await asyncio.wait_for(self._server.shutdown(), SERVER_CALL_TIMEOUT_S)
        logger.info("%s simulator on %s:%d stopped", self.kind, self.host, self.port)


def bound_port(server: ModbusTcpServer) -> int:
    """Return the TCP port a listening pymodbus server is bound to.

    In pymodbus 3.16 the listening server's `transport` is the asyncio.Server created by
    loop.create_server, whose sockets report the real port when port 0 was requested.
    """
    sockets = getattr(server.transport, "sockets", None)
    if not sockets:
        raise RuntimeError("cannot find the bound port: the pymodbus server has no listening socket")
    return int(sockets[0].getsockname()[1])


async def start_modbus_device(
    kind: str,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int = 0,
    speed: float = 1.0,
    update_interval_s: float = 0.25,
    **options: Any,
) -> RunningDevice:
    """Start a simulated device on its own Modbus TCP server and return it running.

    `kind` is "sdm630" or "cpa". Port 0 binds an ephemeral port, which `.port` reports.
    `seed` makes the noise reproducible. Simulated time runs `speed` times faster than real
    time, advanced every `update_interval_s` real seconds. `options` go to the device model
    (see Sdm630 and CryomechCpa for the names). Raises ValueError for an invalid argument and
    OSError if the port cannot be bound.
    """
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown Modbus device kind {kind!r}: expected one of {', '.join(KINDS)}")
    check_range(kind, "speed", speed, 0.0, 1e6)
    check_range(kind, "update_interval_s", update_interval_s, 0.001, 3600.0)
    check_integer(kind, "port", port, 0, 65535)
    model_class = MODEL_CLASSES[kind]
    accepted = [name for name in inspect.signature(model_class).parameters if name != "rng"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown {kind} option {unknown[0]!r}: expected one of {', '.join(accepted)}")
    model = model_class(random.Random(seed), **options)

    if kind == "cpa":
        # Device id 0 in pymodbus serves every unit id that has no device of its own.
        devices = [SimDevice(0, simdata=full_range_blocks(), action=make_action(model))]
    else:
        devices = [
            SimDevice(model.unit_id, simdata=full_range_blocks(), action=make_action(model)),
            SimDevice(0, simdata=full_range_blocks(), action=reject_other_unit),
        ]
    server = ModbusTcpServer(devices, address=(host, port))
    try:
        await asyncio.wait_for(server.serve_forever(background=True), SERVER_CALL_TIMEOUT_S)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {host}:{port} for the {kind} simulator "
                      "(port in use or address not local); choose another port or 0") from exc
    device = RunningDevice(model, server, host, bound_port(server), speed, update_interval_s)
    device.start_updates()
    logger.info("%s simulator listening on %s:%d (unit id %d, seed %d, speed %g)",
                kind, host, device.port, model.unit_id, seed, speed)
    return device
