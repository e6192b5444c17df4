"""Vibration and trend analysis core: pure functions and classes, no I/O.

The real FFT is the project's own Numba kernel (`_fft.py`): a four-step, radix-4
Stockham FFT of the half-length complex sequence plus a split step for real input, so
every stage of the per-frame analysis runs in compiled code. On a 2-core x86-64 VM it
takes 0.45-0.6x the time of numpy.fft.rfft at N = 4096, and the whole per-frame
pipeline 0.06-0.08x the time of the same features in numpy/scipy. rocket-fft, which
makes numpy.fft callable inside @njit, was about level with it and was not adopted, to
keep a native extension out of the gateway's dependencies. Figures and commands are in
docs/benchmarks.md.
"""

from .bearing import DEFECTS, DefectOrders, orders_from_geometry
from .severity import ZONE_LIMITS_MM_S, severity_zone
from .spectrum import (
    amplitude_spectrum,
    band_rms,
    estimate_shaft_speed,
    select_envelope_band,
    spectral_peaks,
    welch,
    window,
)
from .trend import BaselineStep, ChangeMonitor, ChangePoint, Cusum, EwmaBaseline, PageHinkley
from .trend_slope import Forecast, SlopeEstimate, TheilSenSlope
from .vibration import (
    G_TO_M_S2,
    BatchFeatures,
    DefectIndicators,
    FrameAnalyzer,
    FrameFeatures,
    defect_indicators,
    frame_length_for,
    velocity_band_for,
)
from ._fft import fft_plan
from . import _fft

__all__ = [
    "BaselineStep",
    "BatchFeatures",
    "ChangeMonitor",
    "ChangePoint",
    "Cusum",
    "EwmaBaseline",
    "Forecast",
    "PageHinkley",
    "SlopeEstimate",
    "TheilSenSlope",
    "DEFECTS",
    "DefectIndicators",
    "DefectOrders",
    "FrameAnalyzer",
    "FrameFeatures",
    "G_TO_M_S2",
    "ZONE_LIMITS_MM_S",
    "defect_indicators",
    "frame_length_for",
    "orders_from_geometry",
    "amplitude_spectrum",
    "band_rms",
    "estimate_shaft_speed",
    "rfft",
    "select_envelope_band",
    "severity_zone",
    "spectral_peaks",
    "velocity_band_for",
    "warmup",
    "welch",
    "window",
]


def rfft(x):
    """Return the one-sided FFT of real `x` (length a power of two >= 4), like numpy.fft.rfft."""
    import numpy as np

    arr = np.ascontiguousarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"input shape {arr.shape} is invalid; rfft takes a 1-D array")
    out = _fft._rfft_checked(arr, fft_plan(arr.size).tables)
    if out.size == 0:
        raise ValueError("input contains NaN or infinite values; rfft needs finite samples")
    return out


def warmup() -> None:
    """Compile (or load from the Numba cache) every kernel by analysing a synthetic frame."""
    import numpy as np

    n = 1024
    t = np.arange(n) / 8192.0
    x = np.sin(2 * np.pi * 100.0 * t) + 0.1 * np.cos(2 * np.pi * 2500.0 * t)
    analyzer = FrameAnalyzer(8192.0, n, velocity_band=(10.0, 1000.0), envelope_band=(2000.0, 3000.0))
    features = analyzer.analyse(x)
    orders = DefectOrders(bpfo=3.5848, bpfi=5.4152, bsf=2.3568, ftf=0.39828)
    defect_indicators(features.envelope_spectrum, analyzer.bin_hz, 20.0, orders)
    rfft(x)
    frames = np.stack([x, x[::-1].copy()])
    analyzer.analyse_batch(frames)
    band_rms(features.spectrum, analyzer.bin_hz, [[10.0, 500.0]])
    spectral_peaks(features.spectrum, analyzer.bin_hz, 3)
    estimate_shaft_speed(features.spectrum, analyzer.bin_hz, (10.0, 100.0))
    select_envelope_band(frames, 8192.0, [[1000.0, 2000.0], [2000.0, 3000.0]], (20.0, 400.0))
    welch(np.concatenate([x, x]), 8192.0, 1024)
