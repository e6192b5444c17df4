"""Plain numpy/scipy twins of the compiled analysis, written for clarity, not speed."""

from __future__ import annotations

import numpy as np

G = 9.80665


def time_stats(x: np.ndarray) -> dict[str, float]:
    d = x - x.mean()
    rms = np.sqrt(np.mean(d**2))
    return {
        "mean": float(x.mean()),
        "rms": float(rms),
        "peak": float(np.max(np.abs(d))),
        "peak_to_peak": float(np.ptp(x)),
        "crest_factor": float(np.max(np.abs(d)) / rms),
        "kurtosis": float(np.mean(d**4) / np.mean(d**2) ** 2),
        "skewness": float(np.mean(d**3) / rms**3),
    }


def hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def amplitude_spectrum(x: np.ndarray) -> np.ndarray:
    w = hann(x.size)
    return np.abs(np.fft.rfft((x - x.mean()) * w)) * 2.0 / w.sum()


def velocity_rms_mm_s(x_g: np.ndarray, fs: float, band: tuple[float, float]) -> float:
    n = x_g.size
    w = hann(n)
    spec = np.fft.rfft((x_g - x_g.mean()) * w)
    f = np.fft.rfftfreq(n, 1 / fs)
    sel = (f >= band[0]) & (f <= band[1]) & (np.arange(f.size) > 0) & (np.arange(f.size) < n // 2)
    v2 = np.abs(spec[sel]) ** 2 / (2 * np.pi * f[sel]) ** 2
    return float(np.sqrt(2 * v2.sum() / (n * np.sum(w**2))) * G * 1000)


def envelope(x: np.ndarray, fs: float, band: tuple[float, float]) -> np.ndarray:
    """Return the Hilbert envelope of x band-passed by zeroing FFT bins outside the band."""
    from scipy.signal import hilbert

    n = x.size
    spec = np.fft.rfft(x - x.mean())
    f = np.fft.rfftfreq(n, 1 / fs)
    keep = (f >= band[0]) & (f <= band[1])
    keep[0] = False
    keep[-1] = False
    banded = np.fft.irfft(np.where(keep, spec, 0), n)
    return np.abs(hilbert(banded))


def envelope_spectrum(x: np.ndarray, fs: float, band: tuple[float, float]) -> np.ndarray:
    env = envelope(x, fs, band)
    return amplitude_spectrum(env)


def baseband_envelope_spectrum(x: np.ndarray, fs: float, band: tuple[float, float], points: int) -> np.ndarray:
    """Return the envelope spectrum computed at baseband, as the compiled kernel does.

    The band's bins of the analytic signal are shifted down to bin 0 and transformed back
    with `points` points, which samples the envelope exactly every n / points samples.
    """
    n = x.size
    spec = np.fft.rfft(x - x.mean())
    f = np.fft.rfftfreq(n, 1 / fs)
    keep = np.flatnonzero((f >= band[0]) & (f <= band[1]) & (np.arange(f.size) > 0) & (np.arange(f.size) < n // 2))
    z = np.zeros(points, dtype=complex)
    count = min(keep.size, points)
    z[:count] = 2 * spec[keep[:count]]
    env = np.abs(np.fft.ifft(z)) * points / n
    return amplitude_spectrum(env)
