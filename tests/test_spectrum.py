"""Spectral features against scipy and plain numpy twins."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import signal

from agent.dsp import (
    FrameAnalyzer,
    amplitude_spectrum,
    band_rms,
    estimate_shaft_speed,
    select_envelope_band,
    spectral_peaks,
    welch,
    window,
)
from agent.dsp import _kernels as k
from agent.dsp._fft import fft_plan

from . import reference as ref

RTOL = 1e-9


@pytest.mark.parametrize("name", ["hann", "flattop"])
def test_window_matches_scipy(name):
    assert np.allclose(window(name, 1024), signal.get_window(name, 1024, fftbins=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["hann", "flattop"])
@pytest.mark.parametrize("scaling", ["density", "spectrum"])
def test_welch_matches_scipy(name, scaling):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(20000) + 0.5 * np.sin(2 * np.pi * 50 * np.arange(20000) / 5000)
    f, p = welch(x, 5000.0, 1024, 0.5, name, scaling)
    f_ref, p_ref = signal.welch(x, 5000.0, window=name, nperseg=1024, noverlap=512, scaling=scaling)
    assert np.allclose(f, f_ref)
    assert np.max(np.abs(p - p_ref)) / np.max(p_ref) < RTOL


def test_welch_rejects_short_signal():
    with pytest.raises(ValueError, match="shorter than one segment"):
        welch(np.ones(100), 1000.0, 256)


def _tone(freq, amplitude, fs=10000.0, n=8192):
    return amplitude * np.sin(2 * np.pi * freq * np.arange(n) / fs)


def test_band_rms_of_tone():
    x = _tone(1234.5, 2.0)
    spec = amplitude_spectrum(x)
    rms = band_rms(spec, 10000.0 / 8192, [[1000.0, 1500.0], [3000.0, 3500.0]])
    assert rms[0] == pytest.approx(2.0 / math.sqrt(2), rel=1e-3)
    assert rms[1] < 1e-3


def test_band_rms_matches_parseval_reference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(4096)
    spec = ref.amplitude_spectrum(x)
    w = ref.hann(4096)
    X = np.fft.rfft((x - x.mean()) * w)
    f = np.fft.rfftfreq(4096, 1 / 8000.0)
    sel = (f >= 100) & (f <= 900)
    expected = math.sqrt(2 * np.sum(np.abs(X[sel]) ** 2) / (4096 * np.sum(w**2)))
    assert band_rms(spec, 8000.0 / 4096, [[100.0, 900.0]])[0] == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("freq", [1000.0, 1000.3, 1000.61, 1001.1])
def test_peaks_interpolate_hann(freq):
    fs, n = 10000.0, 8192
    spec = amplitude_spectrum(_tone(freq, 1.5, fs, n), "hann")
    (f, a), = spectral_peaks(spec, fs / n, 1)
    assert abs(f - freq) < 0.05 * fs / n
    assert a == pytest.approx(1.5, rel=0.01)


@pytest.mark.parametrize("freq", [1000.0, 1000.61])
def test_peaks_flattop_amplitude(freq):
    fs, n = 10000.0, 8192
    spec = amplitude_spectrum(_tone(freq, 1.5, fs, n), "flattop")
    (f, a), = spectral_peaks(spec, fs / n, 1, window_name="flattop")
    assert a == pytest.approx(1.5, rel=0.002)


def _reference_peaks(spec, bin_hz, count):
    found = []
    for i in range(1, spec.size - 1):
        if spec[i] > spec[i - 1] and spec[i] >= spec[i + 1]:
            lm, l0, lp = np.log(spec[i - 1:i + 2])
            denom = lm - 2 * l0 + lp
            delta = float(np.clip(0.5 * (lm - lp) / denom, -0.5, 0.5)) if denom < 0 else 0.0
            value = spec[i] / (np.sinc(delta) / (1 - delta**2)) if delta else spec[i]
            found.append(((i + delta) * bin_hz, value))
    return sorted(found, key=lambda p: -p[1])[:count]


def test_peaks_match_reference():
    rng = np.random.default_rng(7)
    spec = np.abs(rng.standard_normal(513)) + 0.01
    got = spectral_peaks(spec, 2.0, 6)
    expected = _reference_peaks(spec, 2.0, 6)
    assert len(got) == 6
    for (f, a), (fr, ar) in zip(got, expected):
        assert f == pytest.approx(fr, rel=RTOL)
        assert a == pytest.approx(ar, rel=RTOL)


def test_shaft_speed_from_harmonics():
    fs, n = 5120.0, 16384
    t = np.arange(n) / fs
    rng = np.random.default_rng(1)
    x = sum(a * np.sin(2 * np.pi * h * 24.7 * t) for h, a in ((1, 1.0), (2, 0.5), (3, 0.3)))
    x = x + 0.05 * rng.standard_normal(n)
    speed, prominence = estimate_shaft_speed(amplitude_spectrum(x), fs / n, (10.0, 60.0), harmonics=3)
    assert speed == pytest.approx(24.7, abs=0.05)
    assert prominence > 5


def test_harmonic_sum_matches_reference():
    rng = np.random.default_rng(2)
    spec = np.abs(rng.standard_normal(2049))
    best, score, median = k._harmonic_sum_kernel(spec, 1.25, 10.0, 80.0, 0.3125, 3)
    candidates = 10.0 + 0.3125 * np.arange(int((80.0 - 10.0) / 0.3125) + 1)
    bins = np.arange(spec.size) * 1.25
    sums = np.array([sum(np.interp(h * f, bins, spec) for h in (1, 2, 3)) for f in candidates])
    assert best == pytest.approx(candidates[np.argmax(sums)])
    assert score == pytest.approx(sums.max(), rel=RTOL)
    assert median == pytest.approx(np.median(sums), rel=RTOL)


def test_band_prominence_matches_reference():
    rng = np.random.default_rng(9)
    x = rng.standard_normal(4096)
    x[::400] += 8.0
    bands = np.array([[500.0, 1500.0], [2000.0, 3000.0]])
    plan = fft_plan(4096)
    spectrum = np.empty(2049, dtype=np.complex128)
    from agent.dsp._fft import _rfft

    _rfft(x - x.mean(), plan.tables, spectrum)
    out = np.empty(2)
    k._band_prominence_kernel(spectrum, 8000.0 / 4096, bands, ref.hann(4096), 5.0, 500.0, plan.tables, out)
    f = np.fft.rfftfreq(4096, 1 / 8000.0)
    sel = (f >= 5.0) & (f <= 500.0)
    for i, band in enumerate(bands):
        env_spec = ref.amplitude_spectrum(ref.envelope(x, 8000.0, tuple(band)))[sel]
        assert out[i] == pytest.approx(env_spec.max() / np.median(env_spec), rel=1e-8)


def test_envelope_band_finds_resonance():
    fs, n = 25600.0, 8192
    rng = np.random.default_rng(11)
    t = np.arange(n * 4) / fs
    x = 0.05 * rng.standard_normal(t.size)
    # Impacts at 107 Hz ring a 6 kHz resonance with 1 % damping (time constant 2.7 ms).
    ring = 0.5 * np.exp(-2 * np.pi * 0.01 * 6000.0 * t[:800]) * np.sin(2 * np.pi * 6000.0 * t[:800])
    for start in range(0, t.size - 800, int(fs / 107.3)):
        x[start:start + 800] += ring
    frames = x.reshape(4, n)
    (lo, hi), prominence = select_envelope_band(frames, fs)
    assert lo <= 6000.0 <= hi
    assert prominence > 10.0


def test_batch_equals_single_frames():
    rng = np.random.default_rng(12)
    frames = rng.standard_normal((5, 4096))
    analyzer = FrameAnalyzer(12000.0, 4096)
    batch = analyzer.analyse_batch(frames)
    for i, frame in enumerate(frames):
        one = analyzer.analyse(frame)
        assert batch.kurtosis[i] == pytest.approx(one.kurtosis, rel=RTOL)
        assert batch.velocity_rms_mm_s[i] == pytest.approx(one.velocity_rms_mm_s, rel=RTOL)
        assert np.allclose(batch.envelope_spectrum[i], one.envelope_spectrum, rtol=RTOL, atol=0)


def test_batch_rejects_constant_frame():
    frames = np.random.default_rng(1).standard_normal((3, 4096))
    frames[1] = 0.5
    with pytest.raises(ValueError, match="frame 1 is constant"):
        FrameAnalyzer(12000.0, 4096).analyse_batch(frames)


def test_shaft_speed_in_narrow_band():
    fs, n = 25600.0, 8192
    t = np.arange(n) / fs
    x = np.sin(2 * np.pi * 24.6 * t) + 0.01 * np.random.default_rng(3).standard_normal(n)
    speed, _ = estimate_shaft_speed(amplitude_spectrum(x), fs / n, (23.0, 25.5))
    assert 23.0 <= speed <= 25.5
    assert speed == pytest.approx(24.6, abs=0.5)
