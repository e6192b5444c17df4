"""Per-frame vibration analysis: validation in Python, work in compiled kernels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _kernels as k
from ._fft import _all_finite, fft_plan
from .bearing import DEFECTS, DefectOrders
from .spectrum import check_spectrum

G_TO_M_S2 = 9.80665
INPUT_UNITS = {"g": G_TO_M_S2, "m/s2": 1.0}


def frame_length_for(sample_rate: float, max_bin_hz: float = 3.2, minimum: int = 4096) -> int:
    """Return the shortest power-of-two frame of at least `minimum` samples whose FFT bins
    are at most `max_bin_hz` wide.

    Bearing diagnosis needs bins of a few Hz to tell BPFO, BPFI and their neighbours apart
    below 200 Hz, so a faster stream needs a longer frame.
    """
    if not (math.isfinite(sample_rate) and sample_rate > 0):
        raise ValueError(f"sample rate {sample_rate!r} is invalid; pass a positive number of Hz")
    n = minimum
    while sample_rate / n > max_bin_hz:
        n *= 2
    return n


def velocity_band_for(shaft_hz: float | None) -> tuple[float, float]:
    """Return the ISO 20816 velocity band: 2-1000 Hz below 600 rpm (10 Hz), else 10-1000 Hz."""
    if shaft_hz is not None and shaft_hz < 10.0:
        return (2.0, 1000.0)
    return (10.0, 1000.0)


@dataclass(frozen=True, slots=True)
class FrameFeatures:
    """Features of one analysis frame. Acceleration values are in the input unit.

    kurtosis is Pearson's (3 for Gaussian noise); velocity_rms_mm_s covers the configured
    velocity band; envelope_spectrum is the amplitude spectrum of the band-passed
    envelope, bin k at k * sample_rate / frame_length Hz like `spectrum`, but only up to
    about the envelope band's width (the envelope is computed at baseband).
    """

    rms: float
    peak: float
    peak_to_peak: float
    crest_factor: float
    kurtosis: float
    skewness: float
    velocity_rms_mm_s: float
    envelope_rms: float
    spectrum: np.ndarray
    envelope_spectrum: np.ndarray


class FrameAnalyzer:
    """Analyse fixed-length frames of one channel at one sample rate.

    Parameters
    ----------
    sample_rate : float
        Samples per second.
    frame_length : int
        Samples per frame, a power of two >= 64.
    velocity_band : (float, float)
        Band in Hz for velocity RMS; 10-1000 Hz is the ISO 20816 band.
    envelope_band : (float, float)
        Band-pass in Hz applied before the Hilbert envelope; it should contain a
        structural resonance that the bearing impacts excite.
    input_unit : "g" or "m/s2"
    """

    def __init__(self, sample_rate: float, frame_length: int = 4096,
                 velocity_band: tuple[float, float] = (10.0, 1000.0),
                 envelope_band: tuple[float, float] = (2000.0, 5000.0),
                 input_unit: str = "g") -> None:
        if not (isinstance(sample_rate, (int, float)) and math.isfinite(sample_rate) and sample_rate > 0):
            raise ValueError(f"sample rate {sample_rate!r} is invalid; pass a positive number of Hz")
        if not isinstance(frame_length, int) or frame_length < 64 or frame_length & (frame_length - 1):
            raise ValueError(
                f"frame length {frame_length!r} is not supported; use a power of two >= 64 "
                "such as 4096")
        if input_unit not in INPUT_UNITS:
            raise ValueError(f"input unit {input_unit!r} is invalid; use one of {sorted(INPUT_UNITS)}")
        nyquist = sample_rate / 2
        df = sample_rate / frame_length
        for name, (lo, hi) in (("velocity band", velocity_band), ("envelope band", envelope_band)):
            if not (0 < lo < hi):
                raise ValueError(f"{name} {lo}-{hi} Hz is invalid; expected 0 < low < high")
            if hi > nyquist:
                raise ValueError(
                    f"{name} {lo}-{hi} Hz reaches above the Nyquist frequency {nyquist:g} Hz of a "
                    f"{sample_rate:g} Hz stream; choose a band below {nyquist:g} Hz")
            if hi - lo < 2 * df:
                raise ValueError(
                    f"{name} {lo}-{hi} Hz is narrower than two FFT bins ({df:.3g} Hz each); "
                    "widen the band or use a longer frame")
        self.sample_rate = float(sample_rate)
        self.frame_length = frame_length
        self.velocity_band = (float(velocity_band[0]), float(velocity_band[1]))
        self.envelope_band = (float(envelope_band[0]), float(envelope_band[1]))
        self.input_unit = input_unit
        self._to_m_s2 = INPUT_UNITS[input_unit]
        self._plan = fft_plan(frame_length)
        self._window = np.hanning(frame_length + 1)[:-1].copy()  # periodic Hann
        # The envelope is computed at baseband on the shortest power of two (>= 64) that
        # contains twice the band's bins, so its spectrum reaches up to the band width.
        band_bins = int(math.floor(self.envelope_band[1] / df)) - int(math.ceil(self.envelope_band[0] / df)) + 1
        points = 64
        while points < 2 * band_bins and points < frame_length:
            points *= 2
        self.envelope_points = points
        self._envelope_plan = fft_plan(points)
        self._envelope_window = np.hanning(points + 1)[:-1].copy()

    @property
    def bin_hz(self) -> float:
        return self.sample_rate / self.frame_length

    def _validate(self, frames: np.ndarray, ndim: int) -> np.ndarray:
        x = np.asarray(frames)
        expected = f"({self.frame_length},)" if ndim == 1 else f"(n_frames, {self.frame_length})"
        if x.ndim != ndim or x.shape[-1] != self.frame_length or x.size == 0:
            raise ValueError(f"frame shape {x.shape} is invalid; expected {expected} samples of one channel")
        if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"frame dtype {x.dtype} is invalid; pass float or integer samples")
        x = np.ascontiguousarray(x, dtype=np.float64)
        if not _all_finite(x.reshape(-1)):
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise ValueError(f"frame has {bad} NaN or infinite samples; drop or repair the frame before analysis")
        constant = np.ptp(np.atleast_2d(x), axis=1) == 0.0
        if np.any(constant):
            where = int(np.argmax(constant))
            raise ValueError(
                f"frame {where} is constant ({np.atleast_2d(x)[where, 0]!r} in every sample), so its crest "
                "factor and kurtosis are undefined; check that the sensor is connected")
        return x

    def analyse_batch(self, frames: np.ndarray) -> BatchFeatures:
        """Analyse many frames (n_frames, frame_length) in one call, spread over threads."""
        x = self._validate(frames, 2)
        n_frames, n = x.shape
        stats = np.empty((n_frames, k.N_STATS))
        spectra = np.empty((n_frames, n // 2 + 1))
        envelopes = np.empty((n_frames, self.envelope_points // 2 + 1))
        k._batch_kernel(x, self.sample_rate, self._window, self._plan.tables, self.velocity_band[0],
                        self.velocity_band[1], self.envelope_band[0], self.envelope_band[1],
                        self._to_m_s2, self._envelope_window, self._envelope_plan.tables,
                        stats, spectra, envelopes)
        return BatchFeatures(
            rms=stats[:, k.RMS].copy(),
            peak=stats[:, k.PEAK].copy(),
            peak_to_peak=stats[:, k.PEAK_TO_PEAK].copy(),
            crest_factor=stats[:, k.CREST].copy(),
            kurtosis=stats[:, k.KURTOSIS].copy(),
            skewness=stats[:, k.SKEWNESS].copy(),
            velocity_rms_mm_s=stats[:, k.VELOCITY_RMS].copy(),
            envelope_rms=stats[:, k.ENVELOPE_RMS].copy(),
            spectrum=spectra,
            envelope_spectrum=envelopes,
        )

    def analyse(self, frame: np.ndarray) -> FrameFeatures:
        """Analyse one frame of acceleration samples (1-D, float, input unit)."""
        x = self._validate(frame, 1)

        n = self.frame_length
        stats = np.empty(k.N_STATS)
        spectrum = np.empty(n // 2 + 1)
        envelope = np.empty(self.envelope_points // 2 + 1)
        k._frame_kernel(x, self.sample_rate, self._window, self._plan.tables, self.velocity_band[0],
                        self.velocity_band[1], self.envelope_band[0], self.envelope_band[1], self._to_m_s2,
                        self._envelope_window, self._envelope_plan.tables, stats, spectrum, envelope)
        return FrameFeatures(
            rms=float(stats[k.RMS]),
            peak=float(stats[k.PEAK]),
            peak_to_peak=float(stats[k.PEAK_TO_PEAK]),
            crest_factor=float(stats[k.CREST]),
            kurtosis=float(stats[k.KURTOSIS]),
            skewness=float(stats[k.SKEWNESS]),
            velocity_rms_mm_s=float(stats[k.VELOCITY_RMS]),
            envelope_rms=float(stats[k.ENVELOPE_RMS]),
            spectrum=spectrum,
            envelope_spectrum=envelope,
        )


@dataclass(frozen=True, slots=True)
class BatchFeatures:
    """Features of many frames: each field is an array with one entry (or row) per frame."""

    rms: np.ndarray
    peak: np.ndarray
    peak_to_peak: np.ndarray
    crest_factor: np.ndarray
    kurtosis: np.ndarray
    skewness: np.ndarray
    velocity_rms_mm_s: np.ndarray
    envelope_rms: np.ndarray
    spectrum: np.ndarray
    envelope_spectrum: np.ndarray


@dataclass(frozen=True, slots=True)
class DefectIndicators:
    """Envelope amplitude (input unit) and score of each defect frequency.

    A score is the mean peak over the harmonics divided by the envelope spectrum's
    median, so about 1 means "not above the noise floor". `dominant` is the defect with
    the highest score if that score reaches the threshold, else None.
    """

    frequencies_hz: dict[str, float]
    amplitudes: dict[str, float]
    scores: dict[str, float]
    dominant: str | None
    bpfi_sideband_score: float


def defect_indicators(envelope_spectrum: np.ndarray, bin_hz: float, shaft_hz: float,
                      orders: DefectOrders, *, harmonics: int = 3, tolerance: float = 0.02,
                      threshold: float = 4.0, floor_band_hz: tuple[float, float] | None = None
                      ) -> DefectIndicators:
    """Score the bearing defect frequencies in an (averaged) envelope spectrum.

    `tolerance` is the relative search width around each harmonic, which absorbs the
    slip of rolling elements and an imprecise shaft speed. The noise floor is the median
    of the spectrum over `floor_band_hz` (default: from half the cage frequency to just
    above the highest harmonic searched).
    """
    spec = check_spectrum(envelope_spectrum, bin_hz)
    if not (isinstance(harmonics, int) and 1 <= harmonics <= 10):
        raise ValueError(f"harmonics={harmonics!r} is invalid; use 1 to 10")
    if not (0 < tolerance < 0.2):
        raise ValueError(f"tolerance={tolerance!r} is invalid; use a fraction between 0 and 0.2")
    freqs = orders.frequencies_hz(shaft_hz)
    top_hz = (spec.size - 1) * bin_hz
    highest = max(freqs.values()) * harmonics * (1 + tolerance)
    if highest > top_hz:
        raise ValueError(
            f"the highest defect harmonic ({highest:.1f} Hz) lies above the spectrum's top "
            f"frequency {top_hz:.1f} Hz; reduce harmonics or raise the sample rate")
    if floor_band_hz is None:
        floor_band_hz = (0.5 * freqs["ftf"], highest + 10 * bin_hz)

    f = np.array([freqs[name] for name in DEFECTS])
    amplitudes = np.empty(len(DEFECTS))
    scores = np.empty(len(DEFECTS))
    sidebands = np.empty(len(DEFECTS))
    bpfi = DEFECTS.index("bpfi")
    k._defect_kernel(spec, float(bin_hz), f, harmonics, float(tolerance),
                     float(floor_band_hz[0]), float(floor_band_hz[1]), bpfi, float(shaft_hz),
                     amplitudes, scores, sidebands)
    best = int(np.argmax(scores))
    dominant = DEFECTS[best] if scores[best] >= threshold else None
    return DefectIndicators(
        frequencies_hz=freqs,
        amplitudes={name: float(a) for name, a in zip(DEFECTS, amplitudes)},
        scores={name: float(s) for name, s in zip(DEFECTS, scores)},
        dominant=dominant,
        bpfi_sideband_score=float(sidebands[bpfi]),
    )
