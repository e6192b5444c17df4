"""Simulated Cryomech CPA helium compressor with the digital panel (Modbus TCP or RTU).

Follows the register sheet compiled from Cryomech's sample code and public clients: input
registers at PDU address = register - 30000 (so 30001 is address 1), 32-bit values low word
first (CDAB), the 2.x float layout at addresses 1..33 and, for a 3.x panel, scaled-integer
copies at 40..55. Holding register 40001 (address 1) starts the compressor when written 1
and stops it on any other value, by FC06 or FC16.

NOTE: the warning and alarm limits below are assumptions chosen to make scenarios behave
plausibly; Cryomech's own limits were not available.
"""

from __future__ import annotations

import logging
import random

from pymodbus.constants import ExcCodes

from firmware_sim.modbus_encoding import (
    READ_HOLDING_REGISTERS,
    READ_INPUT_REGISTERS,
    WRITE_MULTIPLE_REGISTERS,
    WRITE_SINGLE_REGISTER,
    Drift,
    RegisterSpace,
    approach,
    check_choice,
    check_integer,
    check_range,
    float32_cdab,
    int16_tenths,
    uint32_cdab,
)
from firmware_sim.scenario import Offsets, Step

logger = logging.getLogger(__name__)

CPA_IDLE = 0
CPA_STARTING = 2
CPA_RUNNING = 3
CPA_STOPPING = 5
CPA_ERROR = 7
CPA_POWER_ERROR = 9
CPA_ERROR_STATES = (6, CPA_ERROR, 8, CPA_POWER_ERROR)
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
# Warning and alarm bit names, bit n = weight 2**n, as the panel's sheet lists them.
CPA_BITS = (
    "coolant_in_high", "coolant_in_low", "coolant_out_high", "coolant_out_low", "oil_high", "oil_low",
    "helium_high", "helium_low", "low_pressure_high", "low_pressure_low", "high_pressure_high",
    "high_pressure_low", "delta_pressure_high", "delta_pressure_low", "motor_current_low",
    "three_phase_error", "power_supply_error", "static_pressure_high", "static_pressure_low",
    "motor_stall", "coolant_in_sensor_fault", "coolant_out_sensor_fault", "helium_sensor_fault",
    "oil_sensor_fault", "high_pressure_sensor_fault", "low_pressure_sensor_fault",
    "motor_current_sensor_fault", "motor_current_high", "inverter_error", "driver_comm_loss",
    "inverter_comm_loss",
)
# Assumed limits: (bit name, internal quantity, warning level, alarm level, "high" or "low",
# checked while "running", "stopped" or "always"). Temperatures in degC, pressures in psi.
CPA_LIMITS: tuple[tuple[str, str, float, float, str, str], ...] = (
    ("coolant_in_high", "coolant_in", 30.0, 35.0, "high", "always"),
    ("coolant_out_high", "coolant_out", 45.0, 52.0, "high", "running"),
    ("oil_high", "oil", 55.0, 62.0, "high", "running"),
    ("helium_high", "helium", 85.0, 93.0, "high", "running"),
    ("low_pressure_low", "low", 60.0, 40.0, "low", "running"),
    ("high_pressure_high", "high", 380.0, 420.0, "high", "running"),
    ("static_pressure_low", "static", 190.0, 150.0, "low", "stopped"),
)
CPA_QUANTITIES = ("helium_charge_psi", "coolant_in_c", "coolant_flow_pct", "motor_current_a")
CPA_EVENTS = ("trip", "power_error", "start", "stop", "restart")
# Temperature rise of the coolant through a running compressor at nominal flow, in K.
CPA_COOLANT_RISE_C = 8.0


class CryomechCpa:
    """Cryomech CPA helium compressor (a CPA1110 by default) cooled by a water chiller.

    Internally pressures are in psi and temperatures in degrees C. The served values use the
    panel's configured units, which registers 30029 and 30030 report. Running, the supply
    (high) side settles near `high_pressure_psi` and the return (low) side near
    `low_pressure_psi`. Stopped, both settle at `static_pressure_psi`, the helium charge.
    The coolant warms by 8 K through a running compressor at nominal flow (more at lower
    flow), and the oil and helium temperatures follow the coolant outlet. Start and stop
    take `transition_s` simulated seconds.

    Warnings and alarms follow the limits in CPA_LIMITS. An alarm while the motor runs trips
    the compressor into state 7 (error), motor off, until a stop command clears it.

    Scenario quantities (offsets): helium_charge_psi (a leak lowers the charge, and with it
    both running pressures), coolant_in_c, coolant_flow_pct (percent of nominal flow),
    motor_current_a. Events: trip (optional `alarm` = a bit name), power_error (state 9),
    start, stop, restart (clear an error and start).
    """

    kind = "cpa"
    quantities = CPA_QUANTITIES
    events = CPA_EVENTS

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
        self.offsets = Offsets(CPA_QUANTITIES)
        # Bits set by set_faults() stay set; the limit checks add their own on top.
        self.forced_warnings = 0
        self.forced_alarms = 0
        self.warnings = 0
        self.alarms = 0
        self._latched_alarms = 0
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
        self._coolant_out_c = coolant_in + (CPA_COOLANT_RISE_C if energized else 0.0)
        self._oil_c = self._coolant_out_c + (12.0 if energized else 5.0)
        self._helium_c = self._coolant_out_c + (37.0 if energized else 5.0)
        self._motor_a = motor_current_a if energized else 0.0
        self.set_faults(warnings=warnings, alarms=alarms)

    @property
    def energized(self) -> bool:
        return self.state in (CPA_STARTING, CPA_RUNNING)

    def set_faults(self, warnings: int | None = None, alarms: int | None = None) -> None:
        """Force warning and alarm bits (sums of the panel's bit weights) on until set again."""
        for name, mask in (("warnings", warnings), ("alarms", alarms)):
            if mask is None:
                continue
            if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < 2**31:
                raise ValueError(f"invalid cpa {name} bitmask {mask!r}: expected an integer from 0 to 2**31 - 1")
            setattr(self, f"forced_{name}", mask)
        self.warnings, self.alarms = self._check_limits()

    def command(self, value: int) -> None:
        """Apply a write to holding register 40001: 1 starts the compressor, anything else stops it.

        A stop in an error state clears the error and the latched alarms: the panel goes idle.
        """
        self.last_command = value
        if value == 1:
            if self.state in (CPA_IDLE, CPA_STOPPING):
                self.state = CPA_STARTING
                self._state_left_s = self.transition_s
                logger.info("cpa: start command, state starting")
        elif self.state in CPA_ERROR_STATES:
            self.state = CPA_IDLE
            self._latched_alarms = 0
            self.warnings, self.alarms = self._check_limits()
            logger.info("cpa: stop command (value 0x%04X) clears the error, state idle", value)
        elif self.state in (CPA_STARTING, CPA_RUNNING):
            self.state = CPA_STOPPING
            self._state_left_s = self.transition_s
            logger.info("cpa: stop command (value 0x%04X), state stopping", value)

    def trip(self, state: int = CPA_ERROR, alarm: str = "three_phase_error") -> None:
        """Stop the motor at once with an alarm, as the panel does on a fault."""
        if alarm not in CPA_BITS:
            raise ValueError(f"cpa has no alarm {alarm!r}; it has {', '.join(CPA_BITS)}")
        self._latched_alarms |= 1 << CPA_BITS.index(alarm)
        self.state = state
        self._state_left_s = 0.0
        self.warnings, self.alarms = self._check_limits()
        logger.info("cpa: tripped with alarm %s, state %d", alarm, state)

    def event(self, step: Step) -> None:
        """Apply a scenario event (see the class description for the names)."""
        name = step.param("name", str)
        if name == "trip":
            self.trip(CPA_ERROR, step.param("alarm", str, "three_phase_error"))
        elif name == "power_error":
            self.trip(CPA_POWER_ERROR, "power_supply_error")
        elif name == "start":
            self.command(1)
        elif name == "stop":
            self.command(0xFFFF)
        elif name == "restart":
            if self.state in CPA_ERROR_STATES:
                self.command(0xFFFF)
            self.command(1)
        else:
            raise ValueError(f"cpa has no event {name!r}; it has {', '.join(CPA_EVENTS)}")

    def _static_psi_now(self) -> float:
        return max(self._static_psi + self.offsets.at("helium_charge_psi", self.t_s), 0.0)

    def _flow_fraction(self) -> float:
        return min(max(1.0 + self.offsets.at("coolant_flow_pct", self.t_s) / 100.0, 0.05), 2.0)

    def _check_limits(self) -> tuple[int, int]:
        """Return the warning and alarm masks of the current physical state."""
        energized = self.energized
        levels = {
            "coolant_in": self._coolant_in.value + self.offsets.at("coolant_in_c", self.t_s),
            "coolant_out": self._coolant_out_c, "oil": self._oil_c, "helium": self._helium_c,
            "low": self._low_psi, "high": self._high_psi, "static": self._static_psi_now(),
        }
        warnings = self.forced_warnings
        alarms = self.forced_alarms | self._latched_alarms
        for bit_name, quantity, warn, alarm, side, when in CPA_LIMITS:
            if when == "running" and not energized or when == "stopped" and energized:
                continue
            value = levels[quantity]
            weight = 1 << CPA_BITS.index(bit_name)
            if value > warn if side == "high" else value < warn:
                warnings |= weight
            if value > alarm if side == "high" else value < alarm:
                alarms |= weight
        return warnings, alarms

    def advance(self, dt_s: float) -> None:
        self.t_s += dt_s
        if self.state in (CPA_STARTING, CPA_STOPPING):
            self._state_left_s -= dt_s
            if self._state_left_s <= 0.0:
                self.state = CPA_RUNNING if self.state == CPA_STARTING else CPA_IDLE
        energized = self.energized
        if energized:
            self.hours += dt_s / 3600.0

        coolant_in = self._coolant_in.advance(dt_s) + self.offsets.at("coolant_in_c", self.t_s)
        for drift in (self._noise_high, self._noise_low, self._noise_current, self._noise_temperature):
            drift.advance(dt_s)
        # A helium leak lowers the charge (the static pressure). Running, the supply side moves
        # with the charge, and the return side falls faster, with the charge squared.
        static = self._static_psi_now()
        charge = static / self._static_psi if self._static_psi > 0 else 0.0
        if energized:
            high_target = self._high_target_psi + (static - self._static_psi)
            low_target = self._low_target_psi * charge * charge
            motor_target = self._motor_target_a + self.offsets.at("motor_current_a", self.t_s)
            self._high_psi = approach(self._high_psi, high_target, dt_s, 15.0)
            self._low_psi = approach(self._low_psi, low_target, dt_s, 15.0)
            self._motor_a = approach(self._motor_a, max(motor_target, 0.0), dt_s, 1.0)
        else:
            self._high_psi = approach(self._high_psi, static, dt_s, 60.0)
            self._low_psi = approach(self._low_psi, static, dt_s, 60.0)
            self._motor_a = approach(self._motor_a, 0.0, dt_s, 1.0)
        self._high_average_psi = approach(self._high_average_psi, self._high_psi, dt_s, 30.0)
        self._low_average_psi = approach(self._low_average_psi, self._low_psi, dt_s, 30.0)
        rise = CPA_COOLANT_RISE_C / self._flow_fraction() if energized else 0.0
        self._coolant_out_c = approach(self._coolant_out_c, coolant_in + rise, dt_s, 60.0)
        self._oil_c = approach(self._oil_c, self._coolant_out_c + (12.0 if energized else 5.0), dt_s, 600.0)
        self._helium_c = approach(self._helium_c, self._coolant_out_c + (37.0 if energized else 5.0), dt_s, 300.0)

        self.warnings, self.alarms = self._check_limits()
        new_alarms = self.alarms & ~self.forced_alarms & ~self._latched_alarms
        if new_alarms and energized:
            names = [name for bit, name in enumerate(CPA_BITS) if new_alarms >> bit & 1]
            self._latched_alarms |= new_alarms
            self.state = CPA_ERROR
            logger.info("cpa: alarm %s trips the compressor, state error", ",".join(names))

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
            "coolant_in_temperature": self._temperature(
                self._coolant_in.value + self.offsets.at("coolant_in_c", self.t_s)),
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
        # pymodbus builds the FC06 echo by reading the register back, with function code 6.
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

