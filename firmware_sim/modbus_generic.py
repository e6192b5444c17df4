"""Simulated generic chiller and room-environment sensor (Modbus RTU or TCP).

NOTE: neither register map comes from a vendor document. They are the layouts that the
agent's generic_chiller and generic_room profiles define, written here on their own from
that description. The chiller serves holding registers from 40001, the room sensor input
registers from 30001, as scaled 16-bit integers and big-endian 32- and 64-bit values.
"""

from __future__ import annotations

import random

from pymodbus.constants import ExcCodes

from firmware_sim.modbus_encoding import (
    READ_HOLDING_REGISTERS,
    READ_INPUT_REGISTERS,
    WRITE_SINGLE_REGISTER,
    Drift,
    approach,
    ascii_registers,
    check_integer,
    check_range,
    float32_abcd,
    float64_abcd,
    scaled_int16,
    scaled_uint16,
    uint32_abcd,
)
from firmware_sim.scenario import Offsets, Step

# Specific heat of water in kJ/(kg K); a litre of coolant is taken as one kilogram.
WATER_CP_KJ_PER_KG_K = 4.186

CHILLER_BITS = ("supply_temperature_high", "flow_low", "pressure_high", "pressure_low", "pump_fault",
                "refrigerant_fault", "sensor_fault")
CHILLER_STOPPED, CHILLER_RUNNING, CHILLER_TRIPPED = 0, 1, 2
CHILLER_QUANTITIES = ("flow_lpm", "heat_load_kw", "supply_temperature_c", "ambient_c")
CHILLER_EVENTS = ("pump_fault", "refrigerant_fault", "start", "stop", "clear")
CHILLER_REGISTERS = 24
CHILLER_SETPOINT_ADDRESS = 6


class GenericChiller:
    """Water chiller that cools a helium compressor: a pump loop and a refrigeration stage.

    Running, the supply temperature settles at the setpoint while the heat load stays within
    `capacity_kw`, and rises with the excess otherwise. The return temperature is the supply
    plus load / (flow x specific heat), so a falling flow warms the return side. The supply
    pressure grows with the square of the flow. A pump or refrigerant fault stops the
    chiller (status 2) until cleared.

    Scenario quantities (offsets): flow_lpm, heat_load_kw, supply_temperature_c, ambient_c.
    Events: pump_fault, refrigerant_fault, start, stop, clear. The setpoint (40007) can be
    written with FC06.
    """

    kind = "chiller"
    quantities = CHILLER_QUANTITIES
    events = CHILLER_EVENTS

    def __init__(self, rng: random.Random, *, unit_id: int = 1, setpoint_c: float = 15.0,
                 flow_lpm: float = 20.0, heat_load_kw: float = 8.0, capacity_kw: float = 12.0,
                 ambient_c: float = 24.0, run_hours: float | None = None) -> None:
        check_integer("chiller", "unit_id", unit_id, 1, 247)
        check_range("chiller", "setpoint_c", setpoint_c, 5.0, 30.0)
        check_range("chiller", "flow_lpm", flow_lpm, 1.0, 200.0)
        check_range("chiller", "heat_load_kw", heat_load_kw, 0.0, 100.0)
        check_range("chiller", "capacity_kw", capacity_kw, 1.0, 200.0)
        check_range("chiller", "ambient_c", ambient_c, -10.0, 50.0)
        self.rng = rng
        self.unit_id = unit_id
        self.setpoint_c = setpoint_c
        self.capacity_kw = capacity_kw
        self.overrides: dict[str, float] = {}
        self.offsets = Offsets(CHILLER_QUANTITIES)
        self.t_s = 0.0
        self.status = CHILLER_RUNNING
        self.fault_bits = 0
        self.run_hours = run_hours if run_hours is not None else rng.uniform(2000.0, 30000.0)
        self.cooling_energy_kwh = self.run_hours * heat_load_kw * 0.8
        self._nominal_flow = flow_lpm
        self._ambient = ambient_c
        self._load = Drift(rng, heat_load_kw, 0.03 * heat_load_kw, 60.0)
        self._flow_noise = Drift(rng, 0.0, 0.1, 5.0)
        self._supply_c = setpoint_c
        self._flow = flow_lpm

    @property
    def running(self) -> bool:
        return self.status == CHILLER_RUNNING

    def _heat_load(self) -> float:
        return max(self._load.value + self.offsets.at("heat_load_kw", self.t_s), 0.0)

    def advance(self, dt_s: float) -> None:
        self.t_s += dt_s
        self._load.advance(dt_s)
        self._flow_noise.advance(dt_s)
        offset = self.offsets.at
        flow_target = max(self._nominal_flow + offset("flow_lpm", self.t_s), 0.0) if self.running else 0.0
        self._flow = approach(self._flow, flow_target, dt_s, 3.0)
        ambient = self._ambient + offset("ambient_c", self.t_s)
        if self.running and not self.fault_bits & (1 << CHILLER_BITS.index("refrigerant_fault")):
            excess_kw = max(self._heat_load() - self.capacity_kw, 0.0)
            supply_target = self.setpoint_c + 1.5 * excess_kw
            self.run_hours += dt_s / 3600.0
            self.cooling_energy_kwh += self._cooling_power() * dt_s / 3600.0
        else:
            supply_target = ambient
        self._supply_c = approach(self._supply_c, supply_target, dt_s, 120.0)

    def _supply(self) -> float:
        return self._supply_c + self.offsets.at("supply_temperature_c", self.t_s)

    def _cooling_power(self) -> float:
        """Heat carried by the coolant, in kW: flow x specific heat x temperature difference."""
        flow_kg_s = max(self._flow + self._flow_noise.value, 0.0) / 60.0
        return flow_kg_s * WATER_CP_KJ_PER_KG_K * (self._return() - self._supply())

    def _return(self) -> float:
        flow_kg_s = max(self._flow + self._flow_noise.value, 0.0) / 60.0
        # Without flow the return side is capped at a plausible stagnation rise.
        rise = min(self._heat_load() / (flow_kg_s * WATER_CP_KJ_PER_KG_K), 40.0) if flow_kg_s > 0.01 else 40.0
        return self._supply() + rise

    def event(self, step: Step) -> None:
        """Apply a scenario event (see the class description for the names)."""
        name = step.param("name", str)
        if name in ("pump_fault", "refrigerant_fault"):
            self.fault_bits |= 1 << CHILLER_BITS.index(name)
            self.status = CHILLER_TRIPPED
        elif name == "start":
            if not self.fault_bits:
                self.status = CHILLER_RUNNING
        elif name == "stop":
            self.status = CHILLER_STOPPED
        elif name == "clear":
            self.fault_bits = 0
            if self.status == CHILLER_TRIPPED:
                self.status = CHILLER_STOPPED
        else:
            raise ValueError(f"chiller has no event {name!r}; it has {', '.join(CHILLER_EVENTS)}")

    def alarm_bits(self) -> int:
        bits = self.fault_bits
        flow = max(self._flow + self._flow_noise.value, 0.0)
        pressure = self._pressure()
        checks = (
            ("supply_temperature_high", self._supply() > self.setpoint_c + 5.0),
            ("flow_low", self.running and flow < 0.5 * self._nominal_flow),
            ("pressure_high", pressure > 5.0),
            ("pressure_low", self.running and pressure < 1.0),
        )
        for name, active in checks:
            if active:
                bits |= 1 << CHILLER_BITS.index(name)
        return bits

    def _pressure(self) -> float:
        """Supply pressure in bar (gauge): a static head plus the pump's share."""
        ratio = max(self._flow, 0.0) / self._nominal_flow
        return 0.5 + 2.0 * ratio * ratio

    def values(self) -> dict[str, float]:
        """Return every served quantity in engineering units, overrides applied."""
        values = {
            "supply_temperature": self._supply(),
            "return_temperature": self._return(),
            "flow": max(self._flow + self._flow_noise.value, 0.0),
            "supply_pressure": self._pressure(),
            "alarm": float(self.alarm_bits()),
            "status": float(self.status),
            "setpoint": self.setpoint_c,
            "run_hours": float(int(self.run_hours)),
            "cooling_power": self._cooling_power(),
            "cooling_energy": self.cooling_energy_kwh,
        }
        values.update(self.overrides)
        return values

    def registers(self) -> list[int]:
        """Encode the holding registers from PDU address 0 (register 40001)."""
        v = self.values()
        registers = [
            scaled_int16(v["supply_temperature"], 0.1), scaled_int16(v["return_temperature"], 0.1),
            scaled_uint16(v["flow"], 0.1), scaled_uint16(v["supply_pressure"], 0.01),
            int(v["alarm"]) & 0xFFFF, int(v["status"]) & 0xFFFF, scaled_int16(v["setpoint"], 0.1),
        ]
        registers += uint32_abcd(int(v["run_hours"]))
        registers += float32_abcd(v["cooling_power"])
        registers += float64_abcd(v["cooling_energy"])
        return registers + [0] * (CHILLER_REGISTERS - len(registers))

    def handle(self, function_code: int, address: int, count: int,
               written: list[int] | None) -> list[int] | ExcCodes:
        """Serve FC03 reads of the map and FC06 writes of the setpoint."""
        if function_code == WRITE_SINGLE_REGISTER and written is not None:
            if address != CHILLER_SETPOINT_ADDRESS:
                return ExcCodes.ILLEGAL_ADDRESS
            celsius = (written[0] - 0x10000 if written[0] & 0x8000 else written[0]) / 10.0
            if not 5.0 <= celsius <= 30.0:
                return ExcCodes.ILLEGAL_VALUE
            self.setpoint_c = celsius
            return []
        if function_code not in (READ_HOLDING_REGISTERS, WRITE_SINGLE_REGISTER) or written is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        if address < 0 or address + count > CHILLER_REGISTERS:
            return ExcCodes.ILLEGAL_ADDRESS
        return self.registers()[address:address + count]


ROOM_BITS = ("temperature_sensor_fault", "humidity_sensor_fault", "oxygen_sensor_fault", "oxygen_low")
ROOM_QUANTITIES = ("temperature_c", "humidity_pct", "oxygen_pct", "air_pressure_hpa")
ROOM_EVENTS = ("oxygen_sensor_fault", "clear")
ROOM_REGISTERS = 18
ROOM_NAME_ADDRESS = 10
ROOM_NAME_REGISTERS = 8
# A common alarm level for oxygen deficiency, in percent by volume.
OXYGEN_LOW_PCT = 19.5


class GenericRoom:
    """Room-environment sensor in a scanner room: temperature, humidity, oxygen, air pressure.

    Every value wanders slowly around its mean. The status word flags an oxygen level below
    19.5 % and a failed oxygen cell, which reads 0.

    Scenario quantities (offsets): temperature_c, humidity_pct, oxygen_pct, air_pressure_hpa.
    Events: oxygen_sensor_fault, clear.
    """

    kind = "room"
    quantities = ROOM_QUANTITIES
    events = ROOM_EVENTS

    def __init__(self, rng: random.Random, *, unit_id: int = 1, temperature_c: float = 21.0,
                 humidity_pct: float = 45.0, oxygen_pct: float = 20.9, air_pressure_hpa: float = 1013.0,
                 sensor_name: str = "ROOM-ENV-1") -> None:
        check_integer("room", "unit_id", unit_id, 1, 247)
        check_range("room", "temperature_c", temperature_c, -20.0, 60.0)
        check_range("room", "humidity_pct", humidity_pct, 0.0, 100.0)
        check_range("room", "oxygen_pct", oxygen_pct, 0.0, 30.0)
        check_range("room", "air_pressure_hpa", air_pressure_hpa, 800.0, 1100.0)
        if not sensor_name.isascii() or len(sensor_name) > 2 * ROOM_NAME_REGISTERS:
            raise ValueError(f"invalid room option sensor_name={sensor_name!r}: "
                             "expected ASCII text of at most 16 characters")
        self.rng = rng
        self.unit_id = unit_id
        self.sensor_name = sensor_name
        self.overrides: dict[str, float] = {}
        self.offsets = Offsets(ROOM_QUANTITIES)
        self.t_s = 0.0
        self.fault_bits = 0
        self._temperature = Drift(rng, temperature_c, 0.3, 600.0)
        self._humidity = Drift(rng, humidity_pct, 2.0, 900.0)
        self._oxygen = Drift(rng, oxygen_pct, 0.05, 120.0)
        self._pressure = Drift(rng, air_pressure_hpa, 1.5, 1800.0)

    def advance(self, dt_s: float) -> None:
        self.t_s += dt_s
        for drift in (self._temperature, self._humidity, self._oxygen, self._pressure):
            drift.advance(dt_s)

    def event(self, step: Step) -> None:
        """Apply a scenario event: oxygen_sensor_fault fails the oxygen cell, clear repairs it."""
        name = step.param("name", str)
        if name == "oxygen_sensor_fault":
            self.fault_bits |= 1 << ROOM_BITS.index("oxygen_sensor_fault")
        elif name == "clear":
            self.fault_bits = 0
        else:
            raise ValueError(f"room has no event {name!r}; it has {', '.join(ROOM_EVENTS)}")

    def values(self) -> dict[str, float]:
        """Return every served quantity in engineering units, overrides applied."""
        offset = self.offsets.at
        t_s = self.t_s
        oxygen = max(self._oxygen.value + offset("oxygen_pct", t_s), 0.0)
        status = self.fault_bits
        if status & 1 << ROOM_BITS.index("oxygen_sensor_fault"):
            oxygen = 0.0
        elif oxygen < OXYGEN_LOW_PCT:
            status |= 1 << ROOM_BITS.index("oxygen_low")
        values = {
            "temperature": self._temperature.value + offset("temperature_c", t_s),
            "humidity": min(max(self._humidity.value + offset("humidity_pct", t_s), 0.0), 100.0),
            "oxygen": oxygen,
            "status": float(status),
            "air_pressure": self._pressure.value + offset("air_pressure_hpa", t_s),
        }
        values.update(self.overrides)
        return values

    def registers(self) -> list[int]:
        """Encode the input registers from PDU address 0 (register 30001)."""
        v = self.values()
        registers = [scaled_int16(v["temperature"], 0.1), scaled_uint16(v["humidity"], 0.1),
                     scaled_uint16(v["oxygen"], 0.01), int(v["status"]) & 0xFFFF]
        registers += float32_abcd(v["air_pressure"])
        registers += [0] * (ROOM_NAME_ADDRESS - len(registers))
        registers += ascii_registers(self.sensor_name, ROOM_NAME_REGISTERS)
        return registers

    def handle(self, function_code: int, address: int, count: int,
               written: list[int] | None) -> list[int] | ExcCodes:
        """Serve FC04 reads of the map."""
        if function_code != READ_INPUT_REGISTERS or written is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        if address < 0 or address + count > ROOM_REGISTERS:
            return ExcCodes.ILLEGAL_ADDRESS
        return self.registers()[address:address + count]
