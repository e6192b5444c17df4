"""Simulated Banner QM30VT2 vibration and temperature sensor (Modbus RTU on RS-485).

Serves the summary block that Golioth's reference firmware for this sensor reads: holding
registers 45201..45222 (PDU addresses 5200..5221) with function 03, one 16-bit value each
with a fixed decimal scale, unsigned except the two temperatures. The sensor's other
registers are not documented, so any read outside the block gets exception 02 and any
other function exception 01 (assumptions).
"""

from __future__ import annotations

import math
import random

from pymodbus.constants import ExcCodes

from firmware_sim.modbus_encoding import (
    READ_HOLDING_REGISTERS,
    Drift,
    check_integer,
    check_range,
    scaled_int16,
    scaled_uint16,
)
from firmware_sim.scenario import Offsets, Step

QM30VT2_START = 5200
# (served quantity, scale of one count, signed) in register order from PDU address 5200.
QM30VT2_BLOCK: tuple[tuple[str, float, bool], ...] = (
    ("z_rms_velocity_in_s", 0.0001, False), ("z_rms_velocity", 0.001, False),
    ("temperature_f", 0.01, True), ("temperature", 0.01, True),
    ("x_rms_velocity_in_s", 0.0001, False), ("x_rms_velocity", 0.001, False),
    ("z_peak_acceleration", 0.001, False), ("x_peak_acceleration", 0.001, False),
    ("z_peak_frequency", 0.1, False), ("x_peak_frequency", 0.1, False),
    ("z_rms_acceleration", 0.001, False), ("x_rms_acceleration", 0.001, False),
    ("z_kurtosis", 0.001, False), ("x_kurtosis", 0.001, False),
    ("z_crest_factor", 0.001, False), ("x_crest_factor", 0.001, False),
    ("z_peak_velocity_in_s", 0.0001, False), ("z_peak_velocity", 0.001, False),
    ("x_peak_velocity_in_s", 0.0001, False), ("x_peak_velocity", 0.001, False),
    ("z_hf_rms_acceleration", 0.001, False), ("x_hf_rms_acceleration", 0.001, False),
)
QM30VT2_QUANTITIES = ("velocity_mm_s", "temperature_c", "acceleration_g", "defect")
QM30VT2_EVENTS = ("bearing_defect", "clear")
MM_PER_INCH = 25.4


class Qm30vt2:
    """Banner QM30VT2 on the motor of a water pump or compressor, running at `shaft_hz`.

    RMS velocity, RMS acceleration and the surface temperature wander slowly around their
    means. A bearing defect of severity 0..1 raises kurtosis, crest factor and the
    high-frequency acceleration, the usual early signs of rolling-element wear. The values
    keep the sheet's consistency rules: in/s x 25.4 = mm/s, degF = degC x 9/5 + 32, crest
    factor = peak / RMS acceleration.

    Scenario quantities (offsets): velocity_mm_s, temperature_c, acceleration_g, defect
    (severity). Events: bearing_defect (optional `severity`, default 1), clear.
    """

    kind = "qm30vt2"
    quantities = QM30VT2_QUANTITIES
    events = QM30VT2_EVENTS

    def __init__(self, rng: random.Random, *, unit_id: int = 1, velocity_mm_s: float = 1.2,
                 temperature_c: float = 38.0, shaft_hz: float = 24.6, acceleration_g: float = 0.08) -> None:
        check_integer("qm30vt2", "unit_id", unit_id, 1, 247)
        check_range("qm30vt2", "velocity_mm_s", velocity_mm_s, 0.0, 60.0)
        check_range("qm30vt2", "temperature_c", temperature_c, -40.0, 100.0)
        check_range("qm30vt2", "shaft_hz", shaft_hz, 1.0, 200.0)
        check_range("qm30vt2", "acceleration_g", acceleration_g, 0.0, 10.0)
        self.rng = rng
        self.unit_id = unit_id
        self.shaft_hz = shaft_hz
        self.overrides: dict[str, float] = {}
        self.offsets = Offsets(QM30VT2_QUANTITIES)
        self.t_s = 0.0
        self.defect = 0.0
        self._velocity = [Drift(rng, velocity_mm_s, 0.05 * velocity_mm_s, 60.0),
                          Drift(rng, 0.8 * velocity_mm_s, 0.05 * velocity_mm_s, 60.0)]
        self._acceleration = [Drift(rng, acceleration_g, 0.05 * acceleration_g, 30.0),
                              Drift(rng, 0.9 * acceleration_g, 0.05 * acceleration_g, 30.0)]
        self._temperature = Drift(rng, temperature_c, 0.3, 600.0)
        self._frequency = [Drift(rng, shaft_hz, 0.05, 20.0), Drift(rng, shaft_hz, 0.05, 20.0)]
        self._crest_noise = [Drift(rng, 0.0, 0.1, 10.0), Drift(rng, 0.0, 0.1, 10.0)]

    def advance(self, dt_s: float) -> None:
        self.t_s += dt_s
        for drift in (*self._velocity, *self._acceleration, self._temperature, *self._frequency,
                      *self._crest_noise):
            drift.advance(dt_s)

    def event(self, step: Step) -> None:
        """Apply a scenario event: bearing_defect sets the defect severity, clear removes it."""
        name = step.param("name", str)
        if name == "bearing_defect":
            severity = float(step.param("severity", (int, float), 1.0))
            check_range("qm30vt2", "severity", severity, 0.0, 1.0)
            self.defect = severity
        elif name == "clear":
            self.defect = 0.0
        else:
            raise ValueError(f"qm30vt2 has no event {name!r}; it has {', '.join(QM30VT2_EVENTS)}")

    def values(self) -> dict[str, float]:
        """Return every served quantity in engineering units, overrides applied."""
        offset = self.offsets.at
        t_s = self.t_s
        defect = min(max(self.defect + offset("defect", t_s), 0.0), 1.0)
        celsius = self._temperature.value + offset("temperature_c", t_s)
        values: dict[str, float] = {"temperature": celsius, "temperature_f": celsius * 9.0 / 5.0 + 32.0}
        for index, axis in enumerate(("z", "x")):
            velocity = max(self._velocity[index].value + offset("velocity_mm_s", t_s), 0.0)
            rms_g = max(self._acceleration[index].value + offset("acceleration_g", t_s), 0.0) * (1.0 + defect)
            crest = 3.2 + 3.0 * defect + self._crest_noise[index].value
            peak_velocity = velocity * math.sqrt(2.0) * (1.0 + 0.3 * defect)
            values[f"{axis}_rms_velocity"] = velocity
            values[f"{axis}_rms_velocity_in_s"] = velocity / MM_PER_INCH
            values[f"{axis}_rms_acceleration"] = rms_g
            values[f"{axis}_crest_factor"] = crest
            values[f"{axis}_peak_acceleration"] = rms_g * crest
            values[f"{axis}_kurtosis"] = 3.0 + 6.0 * defect
            values[f"{axis}_peak_frequency"] = self._frequency[index].value
            values[f"{axis}_peak_velocity"] = peak_velocity
            values[f"{axis}_peak_velocity_in_s"] = peak_velocity / MM_PER_INCH
            values[f"{axis}_hf_rms_acceleration"] = 0.02 + 0.4 * defect
        values.update(self.overrides)
        return values

    def registers(self) -> list[int]:
        """Encode the summary block, 22 registers from PDU address 5200."""
        values = self.values()
        return [scaled_int16(values[name], scale) if signed else scaled_uint16(values[name], scale)
                for name, scale, signed in QM30VT2_BLOCK]

    def handle(self, function_code: int, address: int, count: int,
               written: list[int] | None) -> list[int] | ExcCodes:
        """Serve one request: FC03 reads inside the summary block only."""
        if function_code != READ_HOLDING_REGISTERS or written is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        offset = address - QM30VT2_START
        if offset < 0 or offset + count > len(QM30VT2_BLOCK):
            return ExcCodes.ILLEGAL_ADDRESS
        return self.registers()[offset:offset + count]
