"""Compiled per-frame kernels. They trust their inputs: the wrappers in `vibration.py`
validate shapes, dtypes, finiteness and bands before calling them."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._fft import _ifft_inplace, _rfft

_JIT = dict(cache=True, nogil=True)

# Indices into the statistics vector returned by `_frame_kernel`.
MEAN, RMS, PEAK, PEAK_TO_PEAK, CREST, KURTOSIS, SKEWNESS, VELOCITY_RMS, ENVELOPE_RMS = range(9)
N_STATS = 9


@njit(**_JIT)
def _time_stats(x, out):
    """Fill mean, RMS, peak, peak-to-peak, crest factor, kurtosis and skewness of `x`.

    Moments are central (mean removed). Kurtosis is Pearson's (3.0 for a Gaussian).
    """
    n = x.size
    mean = 0.0
    for i in range(n):
        mean += x[i]
    mean /= n

    m2 = 0.0
    m3 = 0.0
    m4 = 0.0
    peak = 0.0
    lo = x[0]
    hi = x[0]
    for i in range(n):
        d = x[i] - mean
        d2 = d * d
        m2 += d2
        m3 += d2 * d
        m4 += d2 * d2
        if abs(d) > peak:
            peak = abs(d)
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
    m2 /= n
    m3 /= n
    m4 /= n
    rms = math.sqrt(m2)

    out[MEAN] = mean
    out[RMS] = rms
    out[PEAK] = peak
    out[PEAK_TO_PEAK] = hi - lo
    out[CREST] = peak / rms
    out[KURTOSIS] = m4 / (m2 * m2)
    out[SKEWNESS] = m3 / (m2 * rms)


@njit(**_JIT)
def _frame_kernel(x, sample_rate, window, fft_tables,
                  velocity_lo_hz, velocity_hi_hz, envelope_lo_hz, envelope_hi_hz,
                  to_m_s2, stats, spectrum, envelope_spectrum):
    """Analyse one frame of acceleration samples.

    Writes the statistics vector, the one-sided amplitude spectrum of the Hann-windowed
    frame (peak amplitude, input units) and the amplitude spectrum of the band-passed
    Hilbert envelope (input units). `to_m_s2` converts the input unit to m/s^2 for the
    velocity integration.
    """
    n = x.size
    m = n // 2
    df = sample_rate / n
    _time_stats(x, stats)
    mean = stats[MEAN]

    window_sum = 0.0
    window_power = 0.0
    for i in range(n):
        window_sum += window[i]
        window_power += window[i] * window[i]

    # Windowed spectrum of the mean-removed frame.
    xw = np.empty(n)
    for i in range(n):
        xw[i] = (x[i] - mean) * window[i]
    spec = np.empty(m + 1, dtype=np.complex128)
    _rfft(xw, fft_tables, spec)
    amp_scale = 2.0 / window_sum
    for k in range(m + 1):
        spectrum[k] = abs(spec[k]) * amp_scale

    # Velocity RMS by integration in the frequency domain: V(f) = A(f) / (2 pi f).
    # Parseval with the window's power gain: rms^2 = 2 * sum|X_k|^2 / (n * sum w^2).
    acc = 0.0
    for k in range(1, m):
        f = k * df
        if f >= velocity_lo_hz and f <= velocity_hi_hz:
            w = 2.0 * math.pi * f
            mag2 = spec[k].real * spec[k].real + spec[k].imag * spec[k].imag
            acc += mag2 / (w * w)
    stats[VELOCITY_RMS] = math.sqrt(2.0 * acc / (n * window_power)) * to_m_s2 * 1000.0

    # Analytic signal of the band-passed frame: keep the positive-frequency bins inside
    # the band, doubled, and transform back. Its magnitude is the envelope.
    for i in range(n):
        xw[i] = x[i] - mean
    _rfft(xw, fft_tables, spec)
    z = np.zeros(n, dtype=np.complex128)
    for k in range(1, m):
        f = k * df
        if f >= envelope_lo_hz and f <= envelope_hi_hz:
            z[k] = 2.0 * spec[k]
    _ifft_inplace(z, fft_tables)

    env_mean = 0.0
    for i in range(n):
        xw[i] = abs(z[i])
        env_mean += xw[i]
    env_mean /= n
    env_power = 0.0
    for i in range(n):
        d = xw[i] - env_mean
        env_power += d * d
        xw[i] = d * window[i]
    stats[ENVELOPE_RMS] = math.sqrt(env_power / n)
    _rfft(xw, fft_tables, spec)
    for k in range(m + 1):
        envelope_spectrum[k] = abs(spec[k]) * amp_scale


@njit(**_JIT)
def _defect_kernel(envelope_spectrum, df, frequencies, n_harmonics, tolerance,
                   floor_lo_hz, floor_hi_hz, amplitudes, scores):
    """Score each defect frequency in an envelope amplitude spectrum.

    For each frequency f and harmonic h, take the largest bin within h*f*(1 +- tolerance)
    (at least one bin either side). `amplitudes` gets the fundamental's peak; `scores`
    gets the mean harmonic peak divided by the spectrum's median between floor_lo_hz and
    floor_hi_hz, so a score near 1 means "at the noise floor".
    """
    n_bins = envelope_spectrum.size
    lo_bin = max(1, int(math.floor(floor_lo_hz / df)))
    hi_bin = min(n_bins - 1, int(math.ceil(floor_hi_hz / df)))
    floor = np.median(envelope_spectrum[lo_bin:hi_bin + 1])
    if floor <= 0.0:
        floor = 1e-300

    for d in range(frequencies.size):
        total = 0.0
        for h in range(1, n_harmonics + 1):
            centre = h * frequencies[d]
            width = max(centre * tolerance, df)
            a = max(1, int(math.floor((centre - width) / df)))
            b = min(n_bins - 1, int(math.ceil((centre + width) / df)))
            best = 0.0
            for k in range(a, b + 1):
                if envelope_spectrum[k] > best:
                    best = envelope_spectrum[k]
            if h == 1:
                amplitudes[d] = best
            total += best
        scores[d] = total / n_harmonics / floor
