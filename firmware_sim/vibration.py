"""Accelerometer signal sources for the simulated vibration sensor.

Every source has `sample_rate` (int, Hz), `n_channels`, `peak_g` and `read(n)`. `peak_g`
is the largest absolute value the source is expected to produce, which sets the int16
scale. `read(n)` returns the next `n` samples as a float64 array of shape (n, n_channels)
in g, and successive reads continue the signal without a phase jump.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from .scenario import Offsets, Step

logger = logging.getLogger(__name__)

# Defect frequencies of the SKF 6205 deep-groove ball bearing as multiples of shaft speed
# (9 balls, ball diameter 0.3126 in, pitch diameter 1.537 in, 0 degree contact angle).
SKF6205_ORDERS = {"bpfi": 5.4152, "bpfo": 3.5848, "bsf": 2.3568, "ftf": 0.39828}

FAULTS = ("inner", "outer", "ball", "none")


class SyntheticBearing:
    """Single-axis accelerometer on a rolling-element bearing with an optional defect.

    The model follows the usual description of a localised bearing fault:

    - each time a rolling element strikes the defect, the impact rings a structural
      resonance (`resonance_hz`, damping ratio `damping`) as a decaying sinusoid whose peak
      is `defect_g`;
    - impacts repeat at the defect frequency: BPFI for "inner", BPFO for "outer" and
      2 x BSF for "ball" (a ball defect strikes both races once per spin revolution). Each
      spacing varies randomly by `jitter` (relative standard deviation) because the rolling
      elements slip;
    - an inner-race defect turns with the shaft through the load zone, so the impacts are
      amplitude-modulated at shaft rate. A ball defect travels with the cage, so its
      impacts are modulated at the cage rate (FTF). An outer-race defect is fixed in the
      load zone and is not modulated;
    - shaft harmonics 1x, 2x, 3x (`harmonics_g`, peak amplitudes) stand for residual
      unbalance and misalignment, and broadband Gaussian noise (`noise_g`, RMS) for the rest.

    With the defaults the total RMS is about 0.15 g with a fault (kurtosis 7 to 9) and
    0.09 g without one (kurtosis 3). The output depends only on `seed` and the number of samples read, not
    on how the reads are split into blocks.
    """

    n_channels = 1

    def __init__(
        self,
        sample_rate: int = 25600,
        shaft_hz: float = 29.95,
        fault: str = "inner",
        *,
        orders: dict[str, float] | None = None,
        resonance_hz: float = 3500.0,
        damping: float = 0.05,
        defect_g: float = 0.8,
        modulation_depth: float = 0.8,
        jitter: float = 0.01,
        harmonics_g: tuple[float, ...] = (0.06, 0.03, 0.015),
        noise_g: float = 0.08,
        seed: int | None = None,
    ) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
            raise ValueError(f"invalid sample_rate {sample_rate!r}: use a positive integer in Hz")
        if not shaft_hz > 0:
            raise ValueError(f"invalid shaft_hz {shaft_hz!r}: use a positive speed in Hz")
        if fault not in FAULTS:
            raise ValueError(f"invalid fault {fault!r}: use one of {', '.join(FAULTS)}")
        if not 0 < resonance_hz < sample_rate / 2:
            raise ValueError(
                f"invalid resonance_hz {resonance_hz!r}: use 0 < resonance_hz < "
                f"sample_rate / 2 = {sample_rate / 2}"
            )
        if not 0 < damping < 1:
            raise ValueError(f"invalid damping {damping!r}: use a damping ratio in (0, 1)")
        if not 0 <= modulation_depth <= 1:
            raise ValueError(f"invalid modulation_depth {modulation_depth!r}: use 0..1")
        if not 0 <= jitter < 0.2:
            raise ValueError(f"invalid jitter {jitter!r}: use a relative deviation in 0..0.2")
        for name, value in (("defect_g", defect_g), ("noise_g", noise_g)):
            if not value >= 0:
                raise ValueError(f"invalid {name} {value!r}: use a non-negative level in g")
        if any(not a >= 0 for a in harmonics_g):
            raise ValueError(f"invalid harmonics_g {harmonics_g!r}: use non-negative g values")

        self.sample_rate = sample_rate
        self.shaft_hz = float(shaft_hz)
        self.fault = fault
        self.orders = dict(SKF6205_ORDERS if orders is None else orders)
        missing = {"bpfi", "bpfo", "bsf", "ftf"} - self.orders.keys()
        if missing:
            raise ValueError(f"orders is missing {sorted(missing)}: give bpfi, bpfo, bsf and ftf")
        self.resonance_hz = float(resonance_hz)
        self.damping = float(damping)
        self.defect_g = float(defect_g)
        self.modulation_depth = float(modulation_depth)
        self.jitter = float(jitter)
        self.harmonics_g = tuple(float(a) for a in harmonics_g)
        self.noise_g = float(noise_g)

        # Separate streams keep the output independent of the block split.
        noise_seq, jitter_seq, phase_seq = np.random.SeedSequence(seed).spawn(3)
        self._noise_rng = np.random.default_rng(noise_seq)
        self._jitter_rng = np.random.default_rng(jitter_seq)
        phase_rng = np.random.default_rng(phase_seq)
        self._harmonic_phase = phase_rng.uniform(0, 2 * np.pi, len(self.harmonics_g))
        self._modulation_phase = float(phase_rng.uniform(0, 2 * np.pi))

        omega_n = 2 * np.pi * self.resonance_hz
        self._decay_per_s = self.damping * omega_n
        self._omega_d = omega_n * math.sqrt(1 - self.damping**2)
        # The continuous response exp(-a t) sin(w t) peaks at t = atan(w / a) / w.
        t_peak = math.atan2(self._omega_d, self._decay_per_s) / self._omega_d
        peak = math.exp(-self._decay_per_s * t_peak) * math.sin(self._omega_d * t_peak)
        self._ring_gain = 1.0 / peak
        # Ring-down length in samples, until the response falls below 1e-4 of its peak.
        self._ring_length = int(math.ceil(math.log(1e4) / self._decay_per_s * sample_rate)) + 1
        self._ring_t = np.arange(self._ring_length) / sample_rate

        # Scenario ramps and steps, on the signal's own time (samples / sample_rate).
        self.offsets = Offsets(("defect_g", "noise_g"))

        self._position = 0  # samples produced so far
        self._carry = np.zeros(self._ring_length)
        # Mean impact spacing in samples. The first impact falls at a random point of the
        # first interval.
        if self.defect_hz > 0:
            self._interval = sample_rate / self.defect_hz
            self._next_impact = float(phase_rng.uniform(0, 1)) * self._interval
        else:
            self._interval = math.inf
            self._next_impact = math.inf

    @property
    def defect_hz(self) -> float:
        """Impact rate of the configured fault in Hz (0 for "none")."""
        if self.fault == "inner":
            return self.orders["bpfi"] * self.shaft_hz
        if self.fault == "outer":
            return self.orders["bpfo"] * self.shaft_hz
        if self.fault == "ball":
            return 2 * self.orders["bsf"] * self.shaft_hz
        return 0.0

    @property
    def modulation_hz(self) -> float:
        """Rate of the impact amplitude modulation in Hz (0 when not modulated)."""
        if self.fault == "inner":
            return self.shaft_hz
        if self.fault == "ball":
            return self.orders["ftf"] * self.shaft_hz
        return 0.0

    @property
    def peak_g(self) -> float:
        """Upper estimate of |signal|: one full impact, all harmonics in phase, 5 sigma noise."""
        impacts = self.defect_g if self.fault != "none" else 0.0
        return impacts + sum(self.harmonics_g) + 5.0 * self.noise_g

    def read(self, n: int) -> np.ndarray:
        """Generate the next `n` samples, shape (n, 1), in g."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"invalid sample count {n!r}: use a positive integer")
        noise_g = max(0.0, self.noise_g + self.offsets.at("noise_g", self._position / self.sample_rate))
        signal = self._noise_rng.normal(0.0, noise_g, n) if noise_g else np.zeros(n)
        signal += self._harmonics(n)
        signal += self._impacts(n)
        self._position += n
        return signal.reshape(n, 1)

    def apply_step(self, step: Step) -> None:
        """Apply a scenario `ramp` or `set` of `defect_g` (defect growth) or `noise_g`."""
        if step.action not in ("ramp", "set"):
            raise ValueError(f"the bearing signal takes ramp and set steps, not {step.action!r}")
        self.offsets.apply(step)

    def _harmonics(self, n: int) -> np.ndarray:
        t = (self._position + np.arange(n)) / self.sample_rate
        out = np.zeros(n)
        for k, (amplitude, phase) in enumerate(zip(self.harmonics_g, self._harmonic_phase), 1):
            if amplitude:
                # Reduce the phase modulo 2 pi in float64 so long runs keep full precision.
                cycles = np.mod(k * self.shaft_hz * t, 1.0)
                out += amplitude * np.sin(2 * np.pi * cycles + phase)
        return out

    def _impacts(self, n: int) -> np.ndarray:
        """Add impacts that start in this block to the ring-down carried from earlier ones."""
        out = np.zeros(n + self._ring_length)
        out[: self._ring_length] += self._carry
        if self.fault != "none":
            end = self._position + n
            while self._next_impact < end:
                impact_at = self._next_impact  # in samples, fractional
                first = int(math.ceil(impact_at))
                # Sample the continuous ring-down from its true start between two samples.
                t = self._ring_t + (first - impact_at) / self.sample_rate
                wave = np.exp(-self._decay_per_s * t) * np.sin(self._omega_d * t)
                modulation = self._modulation(impact_at / self.sample_rate)
                defect_g = max(0.0, self.defect_g + self.offsets.at("defect_g", impact_at / self.sample_rate))
                gain = defect_g * self._ring_gain * modulation
                index = first - self._position
                out[index : index + self._ring_length] += gain * wave
                spacing = self._interval * (1.0 + self.jitter * self._jitter_rng.standard_normal())
                self._next_impact = impact_at + max(spacing, 0.5 * self._interval)
        self._carry = out[n:].copy()
        return out[:n]

    def _modulation(self, t_s: float) -> float:
        """Return the impact gain in 0..1 at time `t_s` (seconds)."""
        rate = self.modulation_hz
        if rate == 0:
            return 1.0
        depth = self.modulation_depth
        swing = math.cos(2 * np.pi * rate * t_s + self._modulation_phase)
        return (1.0 + depth * swing) / (1.0 + depth)


# Sampling rates of the CWRU files shipped for tests: 97 (normal baseline) and 109 were
# recorded at 48 kHz, the 12k drive-end fault files 105, 119 and 130 at 12 kHz. The .mat
# files do not store their rate, so other files need `sample_rate=`.
CWRU_SAMPLE_RATES = {97: 48000, 105: 12000, 109: 48000, 119: 12000, 130: 12000}
CWRU_CHANNELS = ("DE", "FE", "BA")


class Recording:
    """Accelerometer channel read from a CWRU bearing .mat file, looped when it ends.

    The variable is chosen by file number (`X097_DE_time` for 97.mat), because some CWRU
    files also contain arrays of other recordings. The number comes from the leading
    digits of the file name unless `file_number` is given. The shaft speed comes from the
    file's `X<nnn>RPM` variable (None when the file has none). Values are taken as g.
    """

    n_channels = 1

    def __init__(
        self,
        path: str | Path,
        channel: str = "DE",
        *,
        sample_rate: int | None = None,
        file_number: int | None = None,
    ) -> None:
        self.path = Path(path)
        if channel not in CWRU_CHANNELS:
            raise ValueError(f"invalid channel {channel!r}: use one of {', '.join(CWRU_CHANNELS)}")
        if not self.path.is_file():
            raise FileNotFoundError(
                f"recording not found: {self.path}; pass the path of a CWRU .mat file"
            )
        if file_number is None:
            file_number = _file_number_from_name(self.path)
        self.file_number = file_number
        self.channel = channel

        if sample_rate is None:
            sample_rate = CWRU_SAMPLE_RATES.get(file_number)
            if sample_rate is None:
                raise ValueError(
                    f"sample rate of {self.path.name} (file {file_number}) is unknown; "
                    f"pass --sample-rate (sample_rate= in Python; 12000 or 48000 for CWRU files)"
                )
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
            raise ValueError(f"invalid sample_rate {sample_rate!r}: use a positive integer in Hz")
        self.sample_rate = sample_rate

        contents = _load_mat(self.path)
        self.variable = f"X{file_number:03d}_{channel}_time"
        if self.variable not in contents:
            present = sorted(k for k in contents if not k.startswith("__"))
            raise KeyError(
                f"{self.path.name} has no variable {self.variable} (it has {present}); "
                f"choose another channel or pass --file-number (file_number= in Python)"
            )
        data = np.asarray(contents[self.variable], dtype=np.float64).reshape(-1)
        if data.size == 0:
            raise ValueError(f"{self.path.name}: variable {self.variable} is empty")
        if not np.all(np.isfinite(data)):
            raise ValueError(f"{self.path.name}: variable {self.variable} contains NaN or inf")
        self.data = np.ascontiguousarray(data)

        rpm_variable = f"X{file_number:03d}RPM"
        if rpm_variable in contents:
            self.rpm: float | None = float(np.asarray(contents[rpm_variable]).reshape(-1)[0])
        else:
            self.rpm = None
            logger.warning("%s has no %s variable; shaft speed unknown", self.path.name, rpm_variable)
        self._position = 0

    @property
    def shaft_hz(self) -> float | None:
        """Shaft speed in Hz from the file's RPM variable, or None."""
        return None if self.rpm is None else self.rpm / 60.0

    @property
    def peak_g(self) -> float:
        """Largest absolute value in the recording."""
        return float(np.max(np.abs(self.data)))

    def read(self, n: int) -> np.ndarray:
        """Return the next `n` samples, shape (n, 1), wrapping to the start at the end."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"invalid sample count {n!r}: use a positive integer")
        indices = (self._position + np.arange(n)) % self.data.size
        self._position = (self._position + n) % self.data.size
        return self.data[indices].reshape(n, 1)


def _file_number_from_name(path: Path) -> int:
    match = re.match(r"\d+", path.stem)
    if match is None:
        raise ValueError(
            f"cannot tell the CWRU file number from the name {path.name!r}; "
            f"rename it to <number>.mat or pass --file-number (file_number= in Python)"
        )
    return int(match.group())


def _load_mat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise ImportError(
            "reading .mat recordings needs scipy: pip install imaging-edge-agent[recordings]"
        ) from error
    from scipy.io.matlab import MatReadError

    try:
        return loadmat(path)
    except (MatReadError, ValueError, OSError, NotImplementedError) as error:
        raise ValueError(f"cannot read {path} as a MATLAB .mat file: {error}") from error
