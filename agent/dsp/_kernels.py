"""Compiled per-frame kernels. They trust their inputs: the wrappers in `vibration.py`
validate shapes, dtypes, finiteness and bands before calling them."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

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
                  to_m_s2, envelope_window, envelope_tables, stats, spectrum, envelope_spectrum):
    """Analyse one frame of acceleration samples.

    Writes the statistics vector, the one-sided amplitude spectrum of the Hann-windowed
    frame (peak amplitude, input units) and the amplitude spectrum of the band-passed
    Hilbert envelope (input units). `window` must be the periodic Hann window of the
    frame's length. `to_m_s2` converts the input unit to m/s^2 for the velocity
    integration. The envelope is computed at baseband with `envelope_window.size` points
    (see below), so `envelope_spectrum` has envelope_window.size / 2 + 1 bins of the same
    width as `spectrum`.
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

    # One transform of the mean-removed frame serves both spectra: the periodic Hann
    # window 0.5 - 0.5 cos(2 pi i / n) is, in the frequency domain, the three-tap
    # convolution Xw[k] = 0.5 X[k] - 0.25 (X[k-1] + X[k+1]), with X[-1] = conj(X[1])
    # and X[m+1] = conj(X[m-1]) for real input.
    xw = np.empty(n)
    for i in range(n):
        xw[i] = x[i] - mean
    spec = np.empty(m + 1, dtype=np.complex128)
    _rfft(xw, fft_tables, spec)
    windowed = np.empty(m + 1, dtype=np.complex128)
    windowed[0] = 0.5 * spec[0] - 0.5 * spec[1].real
    windowed[m] = 0.5 * spec[m] - 0.5 * spec[m - 1].real
    for k in range(1, m):
        windowed[k] = 0.5 * spec[k] - 0.25 * (spec[k - 1] + spec[k + 1])
    amp_scale = 2.0 / window_sum
    for k in range(m + 1):
        spectrum[k] = abs(windowed[k]) * amp_scale

    # Velocity RMS by integration in the frequency domain: V(f) = A(f) / (2 pi f).
    # Parseval with the window's power gain: rms^2 = 2 * sum|X_k|^2 / (n * sum w^2).
    acc = 0.0
    for k in range(1, m):
        f = k * df
        if f >= velocity_lo_hz and f <= velocity_hi_hz:
            w = 2.0 * math.pi * f
            mag2 = windowed[k].real * windowed[k].real + windowed[k].imag * windowed[k].imag
            acc += mag2 / (w * w)
    stats[VELOCITY_RMS] = math.sqrt(2.0 * acc / (n * window_power)) * to_m_s2 * 1000.0

    # Envelope at baseband. The analytic band-passed signal keeps the bins k_lo..k_hi,
    # doubled. Shifting them down to start at bin 0 changes only its phase, not its
    # magnitude, and a shorter inverse transform of p points samples that magnitude
    # exactly at every (n / p)-th instant: |z[j n / p]| = (p / n) |ifft_p(Z[k_lo + .])[j]|.
    p = envelope_window.size
    z = np.zeros(p, dtype=np.complex128)
    for k in range(1, m):
        f = k * df
        if f >= envelope_lo_hz and f <= envelope_hi_hz:
            break
    k_lo = k
    for k in range(k_lo, m):
        if k * df > envelope_hi_hz:
            break
        if k - k_lo < p:
            z[k - k_lo] = 2.0 * spec[k]
    _ifft_inplace(z, envelope_tables)

    env = np.empty(p)
    env_mean = 0.0
    ratio = p / n
    for i in range(p):
        env[i] = abs(z[i]) * ratio
        env_mean += env[i]
    env_mean /= p
    env_power = 0.0
    env_window_sum = 0.0
    for i in range(p):
        d = env[i] - env_mean
        env_power += d * d
        env[i] = d * envelope_window[i]
        env_window_sum += envelope_window[i]
    stats[ENVELOPE_RMS] = math.sqrt(env_power / p)
    env_spec = np.empty(p // 2 + 1, dtype=np.complex128)
    _rfft(env, envelope_tables, env_spec)
    env_scale = 2.0 / env_window_sum
    for k in range(p // 2 + 1):
        envelope_spectrum[k] = abs(env_spec[k]) * env_scale


# The largest of a few bins of envelope noise is typically 1.5-2 times the spectrum's
# median, so a sideband score up to 2 is no evidence of modulation.
SIDEBAND_NOISE_SCORE = 2.0


@njit(**_JIT)
def _peak_near(spectrum, df, centre, tolerance):
    """Largest bin within centre * (1 +- tolerance), at least one bin either side."""
    n_bins = spectrum.size
    width = max(centre * tolerance, df)
    a = max(1, int(math.floor((centre - width) / df)))
    b = min(n_bins - 1, int(math.ceil((centre + width) / df)))
    best = 0.0
    for k in range(a, b + 1):
        if spectrum[k] > best:
            best = spectrum[k]
    return best


@njit(**_JIT)
def _defect_kernel(envelope_spectrum, df, frequencies, n_harmonics, tolerance,
                   floor_lo_hz, floor_hi_hz, sideband_index, sideband_hz,
                   amplitudes, scores, sideband_scores):
    """Score each defect frequency in an envelope amplitude spectrum.

    For each frequency f and harmonic h, take the largest bin within h*f*(1 +- tolerance).
    `amplitudes` gets the fundamental's peak; `scores` gets the mean harmonic peak divided
    by the spectrum's median between floor_lo_hz and floor_hi_hz, so a score near 1 means
    "at the noise floor".

    The defect at `sideband_index` (BPFI: the inner race turns with the shaft, so its
    impacts are modulated at shaft rate) also gets `sideband_scores`: the mean peak at
    h*f +- sideband_hz over the floor. Half of what that sideband score exceeds
    SIDEBAND_NOISE_SCORE is added to its score, so sidebands raise it and never lower it.
    """
    n_bins = envelope_spectrum.size
    lo_bin = max(1, int(math.floor(floor_lo_hz / df)))
    hi_bin = min(n_bins - 1, int(math.ceil(floor_hi_hz / df)))
    floor = np.median(envelope_spectrum[lo_bin:hi_bin + 1])
    if floor <= 0.0:
        floor = 1e-300

    for d in range(frequencies.size):
        total = 0.0
        sidebands = 0.0
        for h in range(1, n_harmonics + 1):
            centre = h * frequencies[d]
            best = _peak_near(envelope_spectrum, df, centre, tolerance)
            if h == 1:
                amplitudes[d] = best
            total += best
            if d == sideband_index:
                # The sideband spacing is the shaft rate itself, so its tolerance is
                # that of the shaft speed, not of the harmonic.
                lower = _peak_near(envelope_spectrum, df, centre - sideband_hz, tolerance * centre / max(centre - sideband_hz, df))
                upper = _peak_near(envelope_spectrum, df, centre + sideband_hz, tolerance * centre / (centre + sideband_hz))
                sidebands += 0.5 * (lower + upper)
        harmonic_score = total / n_harmonics / floor
        if d == sideband_index:
            sideband_scores[d] = sidebands / n_harmonics / floor
            scores[d] = harmonic_score + 0.5 * max(0.0, sideband_scores[d] - SIDEBAND_NOISE_SCORE)
        else:
            sideband_scores[d] = 0.0
            scores[d] = harmonic_score


@njit(cache=True, nogil=True, parallel=True)
def _batch_kernel(frames, sample_rate, window, fft_tables, velocity_lo_hz, velocity_hi_hz,
                  envelope_lo_hz, envelope_hi_hz, to_m_s2, envelope_window, envelope_tables,
                  stats, spectra, envelope_spectra):
    """Run `_frame_kernel` on every row of `frames`, rows spread over threads.

    Each row writes only its own rows of the outputs, so the threads never share data.
    """
    for i in prange(frames.shape[0]):
        _frame_kernel(frames[i], sample_rate, window, fft_tables, velocity_lo_hz, velocity_hi_hz,
                      envelope_lo_hz, envelope_hi_hz, to_m_s2, envelope_window, envelope_tables,
                      stats[i], spectra[i], envelope_spectra[i])


@njit(**_JIT)
def _band_rms_kernel(amplitude, bin_hz, power_gain, bands, out):
    """RMS (input units) of each band [lo, hi] Hz from a one-sided amplitude spectrum.

    `power_gain` is (sum w)^2 / (n * sum w^2) of the window that made the spectrum, so
    that band_rms^2 = power_gain / 2 * sum(A_k^2) over the bins inside the band.
    """
    n_bins = amplitude.size
    for b in range(bands.shape[0]):
        lo = bands[b, 0]
        hi = bands[b, 1]
        acc = 0.0
        for k in range(1, n_bins - 1):
            f = k * bin_hz
            if f >= lo and f <= hi:
                acc += amplitude[k] * amplitude[k]
        out[b] = math.sqrt(0.5 * power_gain * acc)


@njit(**_JIT)
def _peaks_kernel(amplitude, bin_hz, lo_hz, hi_hz, hann_correction, freqs, amps):
    """Find the largest local maxima of an amplitude spectrum between lo_hz and hi_hz.

    Fills `freqs` and `amps` (their common length is the number of peaks wanted) in
    descending amplitude; unused slots stay at 0. The frequency is refined by a parabola
    through the logarithms of the three bins around the maximum, which is exact for a
    Gaussian main lobe and close for Hann and flat-top. With `hann_correction` the
    amplitude is divided by the Hann kernel at the fractional offset, which removes the
    scalloping loss of up to 1.42 dB between bins.
    Returns the number of peaks found.
    """
    n_bins = amplitude.size
    want = freqs.size
    found = 0
    for i in range(want):
        freqs[i] = 0.0
        amps[i] = 0.0
    first = max(1, int(math.ceil(lo_hz / bin_hz)))
    last = min(n_bins - 2, int(math.floor(hi_hz / bin_hz)))
    for k in range(first, last + 1):
        a0 = amplitude[k]
        if not (a0 > amplitude[k - 1] and a0 >= amplitude[k + 1]):
            continue
        am = amplitude[k - 1]
        ap = amplitude[k + 1]
        delta = 0.0
        if am > 0.0 and ap > 0.0:
            lm = math.log(am)
            l0 = math.log(a0)
            lp = math.log(ap)
            denom = lm - 2.0 * l0 + lp
            if denom < 0.0:
                delta = 0.5 * (lm - lp) / denom
                if delta > 0.5:
                    delta = 0.5
                elif delta < -0.5:
                    delta = -0.5
        value = a0
        if hann_correction and delta != 0.0:
            x = math.pi * delta
            # Normalised Hann kernel: sinc(delta) / (1 - delta^2), 1 at delta = 0.
            value = a0 / (math.sin(x) / x / (1.0 - delta * delta))
        # Insert into the sorted top list.
        if found < want or value > amps[want - 1]:
            pos = found if found < want else want - 1
            while pos > 0 and amps[pos - 1] < value:
                if pos < want:
                    amps[pos] = amps[pos - 1]
                    freqs[pos] = freqs[pos - 1]
                pos -= 1
            amps[pos] = value
            freqs[pos] = (k + delta) * bin_hz
            if found < want:
                found += 1
    return found


@njit(**_JIT)
def _welch_kernel(x, segment_length, hop, window, fft_tables, power):
    """Accumulate the mean |X_k|^2 over Hann- (or otherwise) windowed segments of x.

    Each segment has its own mean removed before windowing. Writes the average of
    |rfft(segment * window)|^2 into `power` and returns the number of segments.
    """
    n_segments = (x.size - segment_length) // hop + 1
    m = segment_length // 2
    seg = np.empty(segment_length)
    spec = np.empty(m + 1, dtype=np.complex128)
    for k in range(m + 1):
        power[k] = 0.0
    for s in range(n_segments):
        start = s * hop
        mean = 0.0
        for i in range(segment_length):
            mean += x[start + i]
        mean /= segment_length
        for i in range(segment_length):
            seg[i] = (x[start + i] - mean) * window[i]
        _rfft(seg, fft_tables, spec)
        for k in range(m + 1):
            power[k] += spec[k].real * spec[k].real + spec[k].imag * spec[k].imag
    for k in range(m + 1):
        power[k] /= n_segments
    return n_segments


@njit(**_JIT)
def _harmonic_sum_kernel(amplitude, bin_hz, lo_hz, hi_hz, step_hz, n_harmonics):
    """Return the frequency in [lo_hz, hi_hz] whose harmonics 1..n carry the most amplitude.

    Each candidate f, stepped by `step_hz`, scores the sum over h of the spectrum
    linearly interpolated at h * f. Returns (best frequency, best score, median score).
    """
    n_bins = amplitude.size
    n_steps = int((hi_hz - lo_hz) / step_hz) + 1
    scores = np.empty(n_steps)
    best_f = lo_hz
    best = -1.0
    for s in range(n_steps):
        f = lo_hz + s * step_hz
        total = 0.0
        for h in range(1, n_harmonics + 1):
            pos = h * f / bin_hz
            k = int(pos)
            if k + 1 >= n_bins:
                break
            frac = pos - k
            total += amplitude[k] * (1.0 - frac) + amplitude[k + 1] * frac
        scores[s] = total
        if total > best:
            best = total
            best_f = f
    return best_f, best, np.median(scores)


@njit(**_JIT)
def _band_prominence_kernel(spectrum, bin_hz, bands, window, lo_hz, hi_hz, fft_tables, out):
    """Envelope-spectrum prominence of the signal band-passed to each band.

    `spectrum` is the unwindowed rfft of the mean-removed frame. For each band the
    Hilbert envelope of the band-passed signal is windowed and transformed, and `out` gets
    the envelope spectrum's largest bin between lo_hz and hi_hz divided by its median
    there. Repeated impacts that ring a resonance inside the band make that ratio large.
    """
    m = spectrum.size - 1
    n = 2 * m
    z = np.empty(n, dtype=np.complex128)
    env = np.empty(n)
    env_spec = np.empty(m + 1, dtype=np.complex128)
    first = max(1, int(math.ceil(lo_hz / bin_hz)))
    last = min(m, int(math.floor(hi_hz / bin_hz)))
    mags = np.empty(last - first + 1)
    for b in range(bands.shape[0]):
        for i in range(n):
            z[i] = 0.0
        for k in range(1, m):
            f = k * bin_hz
            if f >= bands[b, 0] and f <= bands[b, 1]:
                z[k] = 2.0 * spectrum[k]
        _ifft_inplace(z, fft_tables)
        mean = 0.0
        for i in range(n):
            env[i] = abs(z[i])
            mean += env[i]
        mean /= n
        for i in range(n):
            env[i] = (env[i] - mean) * window[i]
        _rfft(env, fft_tables, env_spec)
        for k in range(first, last + 1):
            mags[k - first] = abs(env_spec[k])
        median = np.median(mags)
        out[b] = mags.max() / median if median > 0.0 else 0.0
