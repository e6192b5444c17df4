"""Spectra and what is read from them: Welch averaging, windows, band RMS, peaks,
shaft speed, and the choice of an envelope band."""

from __future__ import annotations

import math

import numpy as np

from . import _kernels as k
from ._fft import fft_plan

# Flat-top window coefficients (a0..a4 of a cosine sum), the five-term window whose
# scalloping loss is below 0.02 dB, so a tone's amplitude reads right between bins.
# Same values as scipy.signal.windows.flattop.
_FLATTOP = (0.21557895, 0.41663158, 0.277263158, 0.083578947, 0.006947368)
WINDOWS = ("hann", "flattop")


def window(name: str, n: int) -> np.ndarray:
    """Return the periodic window `name` ("hann" or "flattop") of length n, for spectra."""
    if name not in WINDOWS:
        raise ValueError(f"window {name!r} is not supported; use one of {', '.join(WINDOWS)}")
    if not isinstance(n, int) or n < 4:
        raise ValueError(f"window length {n!r} is invalid; use an integer >= 4")
    phase = 2.0 * np.pi * np.arange(n) / n
    if name == "hann":
        return 0.5 - 0.5 * np.cos(phase)
    a = _FLATTOP
    return a[0] - a[1] * np.cos(phase) + a[2] * np.cos(2 * phase) - a[3] * np.cos(3 * phase) + a[4] * np.cos(4 * phase)


def _as_signal(x, name: str = "signal") -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} shape {arr.shape} is invalid; pass a 1-D array of samples")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} dtype {arr.dtype} is invalid; pass float or integer samples")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; drop or repair those samples first")
    return arr


def _check_rate(sample_rate: float) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not (
            math.isfinite(sample_rate) and sample_rate > 0):
        raise ValueError(f"sample rate {sample_rate!r} is invalid; pass a positive number of Hz")
    return float(sample_rate)


def welch(x, sample_rate: float, segment_length: int = 4096, overlap: float = 0.5,
          window_name: str = "hann", scaling: str = "density") -> tuple[np.ndarray, np.ndarray]:
    """Average the spectra of overlapping windowed segments (Welch's method).

    Returns (frequencies in Hz, values). scaling="density" gives a one-sided power
    spectral density in units^2/Hz; scaling="spectrum" gives the one-sided power spectrum
    in units^2, whose square root is the RMS of a tone at that bin (sqrt(2) times less than
    its peak). Each segment's mean is removed first. Matches scipy.signal.welch with
    detrend="constant" and average="mean".
    """
    x = _as_signal(x)
    fs = _check_rate(sample_rate)
    if not isinstance(segment_length, int) or segment_length < 4 or segment_length & (segment_length - 1):
        raise ValueError(f"segment length {segment_length!r} is not supported; use a power of two >= 4")
    if x.size < segment_length:
        raise ValueError(f"signal of {x.size} samples is shorter than one segment of {segment_length}; "
                         "pass more samples or a shorter segment")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap {overlap!r} is invalid; use a fraction 0 <= overlap < 1")
    if scaling not in ("density", "spectrum"):
        raise ValueError(f"scaling {scaling!r} is invalid; use 'density' or 'spectrum'")
    w = window(window_name, segment_length)
    hop = max(1, segment_length - int(round(segment_length * overlap)))
    power = np.empty(segment_length // 2 + 1)
    k._welch_kernel(x, segment_length, hop, w, fft_plan(segment_length).tables, power)
    scale = 1.0 / (fs * np.sum(w * w)) if scaling == "density" else 1.0 / np.sum(w) ** 2
    values = power * scale
    values[1:-1] *= 2.0  # one-sided: fold the negative frequencies in, except DC and Nyquist
    return np.arange(values.size) * fs / segment_length, values


def amplitude_spectrum(x, window_name: str = "hann") -> np.ndarray:
    """Return the one-sided peak-amplitude spectrum of x (input units), mean removed."""
    x = _as_signal(x)
    n = x.size
    w = window(window_name, n)
    plan = fft_plan(n)
    out = np.empty(n // 2 + 1, dtype=np.complex128)
    from ._fft import _rfft

    _rfft((x - x.mean()) * w, plan.tables, out)
    return np.abs(out) * 2.0 / w.sum()


def check_spectrum(amplitude, bin_hz: float) -> np.ndarray:
    spec = np.ascontiguousarray(amplitude, dtype=np.float64)
    if spec.ndim != 1 or spec.size < 3:
        raise ValueError(f"spectrum shape {spec.shape} is invalid; pass a 1-D spectrum of >= 3 bins")
    if not np.all(np.isfinite(spec)):
        raise ValueError("spectrum contains NaN or infinite values; compute it from finite samples")
    if not (math.isfinite(bin_hz) and bin_hz > 0):
        raise ValueError(f"bin width {bin_hz!r} Hz is invalid; pass sample_rate / frame_length")
    return spec


def window_power_gain(window_name: str, n: int) -> float:
    """Return (sum w)^2 / (n * sum w^2): 2/3 for Hann, the factor band RMS needs."""
    w = window(window_name, n)
    return float(w.sum() ** 2 / (n * np.sum(w * w)))


def band_rms(amplitude, bin_hz: float, bands, window_name: str = "hann") -> np.ndarray:
    """Return the RMS (input units) inside each [low, high] Hz band of an amplitude spectrum.

    `amplitude` is the one-sided peak-amplitude spectrum made with `window_name`, for
    example `FrameFeatures.spectrum` (Hann).
    """
    spec = check_spectrum(amplitude, bin_hz)
    b = np.asarray(bands, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 2 or not np.all(np.isfinite(b)) or np.any(b[:, 0] >= b[:, 1]) or np.any(b < 0):
        raise ValueError(f"bands {bands!r} are invalid; pass [[low, high], ...] in Hz with 0 <= low < high")
    nyquist = (spec.size - 1) * bin_hz
    if np.any(b[:, 1] > nyquist):
        raise ValueError(f"a band in {bands!r} reaches above the Nyquist frequency {nyquist:g} Hz; lower it")
    n = 2 * (spec.size - 1)
    out = np.empty(b.shape[0])
    k._band_rms_kernel(spec, float(bin_hz), window_power_gain(window_name, n), np.ascontiguousarray(b), out)
    return out


def spectral_peaks(amplitude, bin_hz: float, count: int = 5, band_hz: tuple[float, float] | None = None,
                   window_name: str = "hann") -> list[tuple[float, float]]:
    """Return up to `count` (frequency Hz, amplitude) of the largest spectral peaks, largest first.

    Frequencies are interpolated between bins. Amplitudes from a Hann spectrum are
    corrected for the scalloping loss; a flat-top spectrum needs no correction.
    """
    spec = check_spectrum(amplitude, bin_hz)
    if not isinstance(count, int) or not 1 <= count <= 100:
        raise ValueError(f"peak count {count!r} is invalid; use 1 to 100")
    if window_name not in WINDOWS:
        raise ValueError(f"window {window_name!r} is not supported; use one of {', '.join(WINDOWS)}")
    lo, hi = band_hz if band_hz is not None else (bin_hz, (spec.size - 1) * bin_hz)
    freqs = np.empty(count)
    amps = np.empty(count)
    found = k._peaks_kernel(spec, float(bin_hz), float(lo), float(hi), window_name == "hann", freqs, amps)
    return [(float(freqs[i]), float(amps[i])) for i in range(found)]


def estimate_shaft_speed(amplitude, bin_hz: float, search_hz: tuple[float, float] = (5.0, 100.0),
                         harmonics: int = 1) -> tuple[float, float]:
    """Estimate shaft speed in Hz from the harmonics of running speed in a spectrum.

    Returns (speed Hz, prominence): the prominence is the best harmonic sum divided by
    the median over all candidates, so values near 1 mean no clear running-speed family
    (treat the speed as unknown). The step is a quarter bin and the result is refined by
    the interpolated peak nearest the fundamental.
    """
    spec = check_spectrum(amplitude, bin_hz)
    lo, hi = float(search_hz[0]), float(search_hz[1])
    if not 0 < lo < hi:
        raise ValueError(f"search band {search_hz!r} Hz is invalid; expected 0 < low < high")
    if hi * harmonics > (spec.size - 2) * bin_hz:
        raise ValueError(f"search band up to {hi:g} Hz with {harmonics} harmonics exceeds the spectrum; "
                         "lower the band or the harmonics")
    best, score, median = k._harmonic_sum_kernel(spec, float(bin_hz), lo, hi, bin_hz / 4.0, harmonics)
    prominence = score / median if median > 0 else 0.0
    # Refine with the interpolated peak near the best candidate, kept inside the band (a
    # band narrower than a bin relies on the interpolation alone).
    peaks = spectral_peaks(spec, bin_hz, 1, (best - 1.5 * bin_hz, best + 1.5 * bin_hz))
    if peaks:
        best = min(hi, max(lo, peaks[0][0]))
    return float(best), float(prominence)


def candidate_envelope_bands(sample_rate: float, low_hz: float = 500.0, high_hz: float = 10000.0) -> np.ndarray:
    """Return [low, high] bands to try for envelope analysis.

    The bands span `low_hz` up to `high_hz` or 95 % of the Nyquist frequency, whichever is
    lower, with widths of 1/12, 1/6 and 1/3 of that top, each stepped by half its width.
    The 10 kHz default keeps out the mounted sensor's own resonance and electrical
    spikes, which make a band's envelope impulsive without any bearing impact.
    """
    top = min(high_hz, 0.95 * sample_rate / 2.0)
    bands = []
    for width in (top / 12.0, top / 6.0, top / 3.0):
        start = low_hz
        while start + width <= top:
            bands.append((start, start + width))
            start += width / 2.0
    if not bands:
        raise ValueError(f"sample rate {sample_rate:g} Hz leaves no room for an envelope band above {low_hz:g} Hz")
    return np.array(bands)


def select_envelope_band(frames, sample_rate: float, bands=None,
                         modulation_hz: tuple[float, float] = (5.0, 500.0)) -> tuple[tuple[float, float], float]:
    """Choose the envelope band whose envelope spectrum shows the clearest periodic line.

    `frames` is (n_frames, frame_length) or one frame. For each candidate band the ratio
    of the envelope spectrum's largest line within `modulation_hz` to its median there is
    averaged over the frames, and the highest wins: bearing impacts ring a structural
    resonance, so the band around it carries their repetition rate most clearly. (The
    kurtosis of the envelope is not used, because sharp impact onsets make bands away
    from the resonance look more impulsive than the resonance itself.)
    Returns ((low, high) Hz, mean prominence of that band).
    """
    fs = _check_rate(sample_rate)
    data = np.atleast_2d(np.asarray(frames, dtype=np.float64))
    if data.ndim != 2:
        raise ValueError(f"frames shape {np.shape(frames)} is invalid; pass (n_frames, frame_length)")
    n = data.shape[1]
    if n < 64 or n & (n - 1):
        raise ValueError(f"frame length {n} is not supported; use a power of two >= 64")
    if not np.all(np.isfinite(data)):
        raise ValueError("frames contain NaN or infinite values; drop or repair them first")
    lo, hi = float(modulation_hz[0]), float(modulation_hz[1])
    if not 0 < lo < hi or hi - lo < 4 * fs / n:
        raise ValueError(f"modulation band {modulation_hz!r} Hz is invalid; expected 0 < low < high, "
                         f"at least four bins of {fs / n:g} Hz wide")
    b = candidate_envelope_bands(fs) if bands is None else np.ascontiguousarray(bands, dtype=np.float64)
    plan = fft_plan(n)
    w = window("hann", n)
    totals = np.zeros(b.shape[0])
    out = np.empty(b.shape[0])
    spectrum = np.empty(n // 2 + 1, dtype=np.complex128)
    from ._fft import _rfft

    for row in data:
        if np.ptp(row) == 0.0:
            raise ValueError("a frame is constant, so it has no envelope; check that the sensor is connected")
        _rfft(row - row.mean(), plan.tables, spectrum)
        k._band_prominence_kernel(spectrum, fs / n, b, w, lo, hi, plan.tables, out)
        totals += out
    best = int(np.argmax(totals))
    return (float(b[best, 0]), float(b[best, 1])), float(totals[best] / data.shape[0])
