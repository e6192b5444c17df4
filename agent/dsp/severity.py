"""Vibration severity zones by velocity RMS."""

from __future__ import annotations

import math

# Zone boundaries in mm/s RMS (A/B, B/C, C/D) for ISO 10816-3 / 20816-3 group 2 machines
# (medium size, 15-300 kW): rigid and flexible foundations.
ZONE_LIMITS_MM_S = {
    "rigid": (1.4, 2.8, 4.5),
    "flexible": (2.3, 4.5, 7.1),
}


def severity_zone(velocity_rms_mm_s: float, limits: tuple[float, float, float]) -> str:
    """Return the zone letter A, B, C or D for a velocity RMS in mm/s.

    A: newly commissioned; B: unrestricted long-term operation; C: restricted operation,
    plan maintenance; D: damage is likely.
    """
    if not math.isfinite(velocity_rms_mm_s) or velocity_rms_mm_s < 0:
        raise ValueError(f"velocity RMS {velocity_rms_mm_s!r} mm/s is invalid; expected a finite value >= 0")
    ab, bc, cd = limits
    if not (0 < ab < bc < cd):
        raise ValueError(f"zone limits {limits!r} are invalid; expected three increasing positive values")
    if velocity_rms_mm_s < ab:
        return "A"
    if velocity_rms_mm_s < bc:
        return "B"
    if velocity_rms_mm_s < cd:
        return "C"
    return "D"
