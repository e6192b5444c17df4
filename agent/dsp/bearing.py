"""Rolling-element bearing defect frequencies."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFECTS = ("bpfo", "bpfi", "bsf", "ftf")


@dataclass(frozen=True, slots=True)
class DefectOrders:
    """Defect frequencies as multiples of shaft speed.

    bpfo: outer-race ball pass; bpfi: inner-race ball pass; bsf: ball spin (one contact
    per revolution of the ball; a ball defect that strikes both races shows at 2 x bsf);
    ftf: fundamental train (cage) frequency.
    """

    bpfo: float
    bpfi: float
    bsf: float
    ftf: float

    def frequencies_hz(self, shaft_hz: float) -> dict[str, float]:
        """Return each defect frequency in Hz at the given shaft speed."""
        if not (math.isfinite(shaft_hz) and shaft_hz > 0):
            raise ValueError(f"shaft speed {shaft_hz!r} Hz is invalid; pass a positive finite speed")
        return {name: getattr(self, name) * shaft_hz for name in DEFECTS}


def orders_from_geometry(balls: int, ball_diameter: float, pitch_diameter: float,
                         contact_angle_deg: float = 0.0) -> DefectOrders:
    """Compute defect orders from bearing geometry (diameters in any one unit).

    Uses the rigid-body kinematic formulas for a stationary outer race and an
    inner race turning with the shaft.
    """
    if balls < 3:
        raise ValueError(f"balls={balls} is invalid; a bearing has at least 3 rolling elements")
    if not (0 < ball_diameter < pitch_diameter):
        raise ValueError(
            f"ball diameter {ball_diameter} and pitch diameter {pitch_diameter} are invalid; "
            "both must be positive with the ball smaller than the pitch circle")
    if not (0 <= contact_angle_deg < 90):
        raise ValueError(f"contact angle {contact_angle_deg} deg is invalid; use 0 <= angle < 90")
    ratio = ball_diameter / pitch_diameter * math.cos(math.radians(contact_angle_deg))
    return DefectOrders(
        bpfo=balls / 2 * (1 - ratio),
        bpfi=balls / 2 * (1 + ratio),
        bsf=pitch_diameter / (2 * ball_diameter) * (1 - ratio * ratio),
        ftf=0.5 * (1 - ratio),
    )
