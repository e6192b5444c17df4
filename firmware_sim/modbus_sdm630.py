"""Simulated Eastron SDM630 three-phase power meter (Modbus RTU, or behind a TCP gateway).

Follows the vendor's protocol description: input registers at PDU address = register -
30001, every value a float32 in two registers, most significant register first unless the
register-order parameter (holding 40041) was written with 2141.0 in reversed order; reads
must start and end on an even address and ask for at most 80 registers; one parameter (two
registers) per FC16 write; FC08 sub-function 0 echoes the request.
"""

from __future__ import annotations

import cmath
import math
import random
import struct

from pymodbus.constants import ExcCodes

from firmware_sim.modbus_encoding import (
    READ_HOLDING_REGISTERS,
    READ_INPUT_REGISTERS,
    WRITE_MULTIPLE_REGISTERS,
    Drift,
    RegisterSpace,
    check_choice,
    check_integer,
    check_range,
    float32_abcd,
    uint32_abcd,
)
from firmware_sim.scenario import Offsets, Step

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
# Writing this value to the register-order parameter selects the word order it is written in.
SDM630_REGISTER_ORDER_KEY = 2141.0
SDM630_REGISTER_ORDER_ADDRESS = 0x0028
# Holding parameters a FC16 write may change, and the values each accepts (None: any).
SDM630_WRITABLE: dict[int, tuple[str, tuple[float, ...] | None]] = {
    0x0002: ("demand_period", tuple(float(period) for period in SDM630_DEMAND_PERIODS_MIN)),
    0x000C: ("pulse_width", (60.0, 100.0, 200.0)),
    0x000E: ("password_lock", None),
    0x0012: ("network_parity_stop", (0.0, 1.0, 2.0, 3.0)),
    0x0014: ("network_node", tuple(float(node) for node in range(1, 248))),
    0x001C: ("network_baud_rate", (0.0, 1.0, 2.0, 3.0, 4.0)),
    0x001E: ("energy_unit_prefix", (0.0, 1.0)),
    0x0028: ("register_order", (SDM630_REGISTER_ORDER_KEY,)),
    0x00D8: ("reset_logged_data", (1.0, 2.0, 3.0)),
}
SDM630_QUANTITIES = ("voltage_v", "voltage_l1_v", "voltage_l2_v", "voltage_l3_v", "load_w",
                     "frequency_hz", "power_factor")
SDM630_EVENTS = ("reset_energy", "reset_demand")
# Options of a CT scanner's supply: idle near 10 kW, about 30 scans an hour of 40-90 kW for
# 5-60 s each (an estimate of typical diagnostic CT loads, not a measured profile).
CT_SCANNER_LOAD = {"load_w": 10000.0, "peaks_per_hour": 30.0, "peak_w": (30000.0, 80000.0),
                   "peak_s": (5.0, 60.0)}

# Below this voltage a phase carries no load: the supply is out.
SDM630_OUTAGE_V = 20.0


class Sdm630:
    """Eastron SDM630 three-phase meter on the supply of a helium compressor.

    The load is a compressor drawing about `load_w` watts with slow noise, plus occasional
    peaks of `peak_w` (default 1-3 kW) lasting `peak_s` (default 20-90 s), `peaks_per_hour`
    on average. CT_SCANNER_LOAD gives the supply of a CT scanner instead: idle near 10 kW
    and scans of 40-90 kW lasting 5-60 s. The wiring is 3P4W. Power
    factor follows the SDM630 sign convention: negative means an inductive load. The meter
    only imports, so every export register reads 0.

    Scenario quantities (offsets added to the physical values): voltage_v (all phases),
    voltage_l1_v, voltage_l2_v, voltage_l3_v, load_w, frequency_hz, power_factor. The load
    draws constant power, so a voltage sag raises the currents. Events: reset_energy,
    reset_demand.
    """

    kind = "sdm630"
    quantities = SDM630_QUANTITIES
    events = SDM630_EVENTS
    diagnostics = True

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
        peak_w: tuple[float, float] = (1000.0, 3000.0),
        peak_s: tuple[float, float] = (20.0, 90.0),
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
        for name, (low, high), top in (("peak_w", peak_w, 200000.0), ("peak_s", peak_s, 86400.0)):
            if not 0.0 <= low <= high <= top:
                raise ValueError(f"sdm630: {name} = {(low, high)!r} is invalid; expected 0 <= low <= high <= {top:g}")
        self.peak_w_range = (float(peak_w[0]), float(peak_w[1]))
        self.peak_s_range = (float(peak_s[0]), float(peak_s[1]))
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
        self.offsets = Offsets(SDM630_QUANTITIES)
        self.t_s = 0.0
        self.word_order = "ABCD"
        self.parameters: dict[str, float] = {"pulse_width": 100.0, "password_lock": 0.0,
                                             "network_parity_stop": 0.0, "network_node": float(unit_id),
                                             "network_baud_rate": 2.0}

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
            self._peak_w = self.rng.uniform(*self.peak_w_range)
            self._peak_left_s = self.rng.uniform(*self.peak_s_range)

    def _instant(self) -> dict[str, float]:
        """Compute the instantaneous electrical quantities from the current state."""
        offset = self.offsets.at
        t_s = self.t_s
        load_w = max(self._load.value + self._peak_w + offset("load_w", t_s), 0.0)
        values: dict[str, float] = {}
        current_phasors = []
        voltage_phasors = []
        for k in range(3):
            phase = k + 1
            voltage = max(self._voltages[k].value + offset("voltage_v", t_s) + offset(f"voltage_l{phase}_v", t_s), 0.0)
            power_factor = min(max(self._power_factors[k].value + offset("power_factor", t_s), 0.5), 1.0)
            power = load_w * self._shares[k] / 3.0 if voltage >= SDM630_OUTAGE_V else 0.0
            apparent = power / power_factor
            reactive = math.sqrt(max(apparent * apparent - power * power, 0.0))
            current = apparent / voltage if voltage > 0.0 else 0.0
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
        values["frequency"] = self._frequency.value + offset("frequency_hz", t_s)
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
            "pulse_width": self.parameters["pulse_width"],  # ms
            "password_lock": self.parameters["password_lock"],  # 0 = locked
            "network_parity_stop": self.parameters["network_parity_stop"],  # 0 = no parity, one stop bit
            "network_node": self.parameters["network_node"],
            "pulse_divisor": 0.0,
            "password": 1000.0,
            "network_baud_rate": self.parameters["network_baud_rate"],  # 2 = 9600 baud
            "energy_unit_prefix": 0.0 if self.energy_unit == "k" else 1.0,
            # NOTE: the protocol document names "system power" without its meaning; this is an
            # assumed rating of 100 A per phase.
            "system_power": 3.0 * self.voltage_v * 100.0,
            "register_order": SDM630_REGISTER_ORDER_KEY,
            "serial_number_high": float(self.serial_number // 65536),
            "serial_number_low": float(self.serial_number % 65536),
            "pulse_1_energy_type": 1.0,
            "reset_logged_data": 0.0,
        }

    def event(self, step: Step) -> None:
        """Apply a scenario event: reset_energy zeroes the energy counters, reset_demand the maxima."""
        name = step.param("name", str)
        if name == "reset_energy":
            self._reset_energy()
        elif name == "reset_demand":
            self._reset_demand()
        else:
            raise ValueError(f"sdm630 has no event {name!r}; it has {', '.join(SDM630_EVENTS)}")

    def _reset_energy(self) -> None:
        self._import_kwh = [0.0, 0.0, 0.0]
        self._import_kvarh = [0.0, 0.0, 0.0]
        self._apparent_kvah = 0.0
        self._charge_ah = 0.0

    def _reset_demand(self) -> None:
        self._max_power_demand = self._power_demand
        self._max_va_demand = self._va_demand
        self._max_neutral_demand = self._neutral_demand
        self._max_current_demand = list(self._current_demand)

    def _float(self, value: float) -> list[int]:
        registers = float32_abcd(value)
        return registers if self.word_order == "ABCD" else registers[::-1]

    def encode(self) -> tuple[RegisterSpace, RegisterSpace]:
        """Encode the current values as input and holding register spaces."""
        values = self.values()
        inputs = [0] * SDM630_INPUT_END
        for address, name in SDM630_INPUT_MAP:
            inputs[address:address + 2] = self._float(values[name])
        holdings = [0] * SDM630_HOLDING_END
        for address, name in SDM630_HOLDING_MAP:
            holdings[address:address + 2] = self._float(values[name])
        input_space = RegisterSpace()
        input_space.add_block(0, inputs)
        holding_space = RegisterSpace()
        holding_space.add_block(0, holdings)
        holding_space.add_block(SDM630_SERIAL_ADDRESS, uint32_abcd(self.serial_number))
        return input_space, holding_space

    def handle(self, function_code: int, address: int, count: int,
               written: list[int] | None) -> list[int] | ExcCodes:
        """Serve one request with the meter's rules, returning registers or an exception code."""
        if function_code == WRITE_MULTIPLE_REGISTERS and written is not None:
            return self._write(address, written)
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

    def _write(self, address: int, written: list[int]) -> list[int] | ExcCodes:
        """Apply a FC16 write of one parameter (two registers)."""
        if len(written) != 2:
            return ExcCodes.ILLEGAL_VALUE
        if address not in SDM630_WRITABLE:
            return ExcCodes.ILLEGAL_ADDRESS
        name, accepted = SDM630_WRITABLE[address]
        as_written = struct.unpack(">f", struct.pack(">HH", *written))[0]
        swapped = struct.unpack(">f", struct.pack(">HH", written[1], written[0]))[0]
        if address == SDM630_REGISTER_ORDER_ADDRESS:
            # The meter adopts the word order in which the key value was written.
            if as_written == SDM630_REGISTER_ORDER_KEY:
                self.word_order = "ABCD"
            elif swapped == SDM630_REGISTER_ORDER_KEY:
                self.word_order = "CDAB"
            else:
                return ExcCodes.ILLEGAL_VALUE
            return []
        value = as_written if self.word_order == "ABCD" else swapped
        if accepted is not None and value not in accepted:
            return ExcCodes.ILLEGAL_VALUE
        if name == "demand_period":
            self.demand_period_min = int(value)
        elif name == "energy_unit_prefix":
            self.energy_unit = "k" if value == 0.0 else "M"
        elif name == "reset_logged_data":
            if value == 1.0:
                self._reset_energy()
            else:
                self._reset_demand()
        else:
            self.parameters[name] = value
        return []
