"""Compiled analysis kernels against the numpy/scipy twins in tests/reference.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dsp import (
    DefectOrders,
    FrameAnalyzer,
    defect_indicators,
    orders_from_geometry,
    rfft,
    severity_zone,
)

from . import reference as ref

RTOL = 1e-9


def _rel(a, b):
    a = np.asarray(a)
    b = np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("n", [4, 8, 64, 1024, 4096, 65536])
def test_rfft_matches_numpy(n):
    x = np.random.default_rng(n).standard_normal(n)
    assert _rel(rfft(x), np.fft.rfft(x)) < 1e-12


@settings(max_examples=40, deadline=None)
@given(exponent=st.integers(2, 12), seed=st.integers(0, 2**32 - 1))
def test_rfft_parseval_and_linearity(exponent, seed):
    n = 2**exponent
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    y = rng.standard_normal(n)
    X = rfft(x)
    # Parseval for the one-sided spectrum: DC and Nyquist bins count once, the rest twice.
    energy = (abs(X[0]) ** 2 + abs(X[-1]) ** 2 + 2 * np.sum(np.abs(X[1:-1]) ** 2)) / n
    assert math.isclose(energy, np.sum(x**2), rel_tol=1e-10)
    assert _rel(rfft(2.5 * x + y), 2.5 * X + rfft(y)) < 1e-12


@pytest.mark.parametrize("n", [0, 3, 6, 100, 4095])
def test_rfft_rejects_unsupported_length(n):
    with pytest.raises(ValueError, match="power of two"):
        rfft(np.ones(n))


def test_rfft_rejects_nan():
    x = np.ones(16)
    x[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rfft(x)


def _signal(fs=12000.0, n=4096, seed=1):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    return 0.3 * np.sin(2 * np.pi * 29.95 * t) + 0.1 * np.sin(2 * np.pi * 3100 * t) + 0.05 * rng.standard_normal(n) + 0.02


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_frame_time_stats_match_reference(seed):
    x = _signal(seed=seed)
    f = FrameAnalyzer(12000.0, 4096).analyse(x)
    expected = ref.time_stats(x)
    for name in ("rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness"):
        assert math.isclose(getattr(f, name), expected[name], rel_tol=RTOL), name


def test_frame_spectrum_matches_reference():
    x = _signal()
    f = FrameAnalyzer(12000.0, 4096).analyse(x)
    assert _rel(f.spectrum, ref.amplitude_spectrum(x)) < RTOL


def test_frame_velocity_matches_reference():
    x = _signal()
    f = FrameAnalyzer(12000.0, 4096, velocity_band=(10.0, 1000.0)).analyse(x)
    assert math.isclose(f.velocity_rms_mm_s, ref.velocity_rms_mm_s(x, 12000.0, (10.0, 1000.0)), rel_tol=RTOL)


def test_velocity_of_pure_tone():
    # A 1 g sine at 100 Hz has velocity amplitude g / (2 pi 100) m/s, RMS that / sqrt(2).
    fs, n = 25600.0, 8192
    t = np.arange(n) / fs
    f_hz = 100.0 * round(n * 100.0 / fs) / (n * 100.0 / fs)  # on a bin centre
    x = np.sin(2 * np.pi * f_hz * t)
    v = FrameAnalyzer(fs, n).analyse(x).velocity_rms_mm_s
    expected = 9.80665 / (2 * np.pi * f_hz) / math.sqrt(2) * 1000
    assert math.isclose(v, expected, rel_tol=0.01)


def test_frame_envelope_matches_reference():
    x = _signal()
    analyzer = FrameAnalyzer(12000.0, 4096, envelope_band=(2000.0, 5000.0))
    f = analyzer.analyse(x)
    expected = ref.baseband_envelope_spectrum(x, 12000.0, (2000.0, 5000.0), analyzer.envelope_points)
    assert _rel(f.envelope_spectrum, expected) < RTOL


def test_baseband_envelope_close_to_full_rate():
    # The baseband envelope is sampled exactly; only its spectrum above half the reduced
    # rate folds back. Bearing lines at low frequency must read the same as at full rate.
    rng = np.random.default_rng(3)
    fs, n = 25600.0, 8192
    t = np.arange(n) / fs
    carrier = np.sin(2 * np.pi * 3500.0 * t)
    x = (1 + 0.5 * np.sin(2 * np.pi * 162.0 * t)) * carrier + 0.05 * rng.standard_normal(n)
    analyzer = FrameAnalyzer(fs, n, envelope_band=(2000.0, 5000.0))
    base = analyzer.analyse(x).envelope_spectrum
    full = ref.envelope_spectrum(x, fs, (2000.0, 5000.0))
    k = round(162.0 / analyzer.bin_hz)
    assert base[k] == pytest.approx(full[k], rel=0.01)
    assert analyzer.envelope_points < n


def test_shortest_frame_analyses():
    x = _signal(fs=8192.0, n=64)
    f = FrameAnalyzer(8192.0, 64, velocity_band=(200.0, 1000.0), envelope_band=(2000.0, 4000.0)).analyse(x)
    assert math.isclose(f.rms, ref.time_stats(x)["rms"], rel_tol=RTOL)


@pytest.mark.parametrize("bad, match", [
    (np.full(4096, np.nan), "NaN"),
    (np.full(4096, np.inf), "NaN or infinite"),
    (np.full(4096, 0.25), "constant"),
    (np.zeros(2048), "shape"),
    (np.zeros((4096, 2)), "shape"),
])
def test_frame_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        FrameAnalyzer(12000.0, 4096).analyse(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sample_rate=8000.0, envelope_band=(2000.0, 5000.0)), "Nyquist"),
    (dict(sample_rate=12000.0, frame_length=4000), "power of two"),
    (dict(sample_rate=float("nan")), "sample rate"),
    (dict(sample_rate=12000.0, input_unit="mm"), "input unit"),
])
def test_analyzer_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrameAnalyzer(**kwargs)


def test_geometry_gives_cwru_orders():
    # SKF 6205: 9 balls, 0.3126 in balls, 1.537 in pitch diameter, 0 degree contact.
    o = orders_from_geometry(9, 0.3126, 1.537, 0.0)
    assert math.isclose(o.bpfo, 3.5848, abs_tol=1e-3)
    assert math.isclose(o.bpfi, 5.4152, abs_tol=1e-3)
    assert math.isclose(o.ftf, 0.39828, abs_tol=1e-4)
    assert math.isclose(o.bsf, 2.3568, abs_tol=1e-3)


def _peak(env, bin_hz, centre, tol):
    w = max(centre * tol, bin_hz)
    a = max(1, int(math.floor((centre - w) / bin_hz)))
    b = min(env.size - 1, int(math.ceil((centre + w) / bin_hz)))
    return env[a:b + 1].max()


def _reference_scores(env, bin_hz, freqs, harmonics, tol, floor_band, shaft_hz):
    lo = max(1, int(math.floor(floor_band[0] / bin_hz)))
    hi = min(env.size - 1, int(math.ceil(floor_band[1] / bin_hz)))
    floor = np.median(env[lo:hi + 1])
    scores = {}
    for name, f in freqs.items():
        peaks = [_peak(env, bin_hz, h * f, tol) for h in range(1, harmonics + 1)]
        scores[name] = float(np.mean(peaks) / floor)
        if name == "bpfi":
            # Sidebands at +- shaft rate, searched with the harmonic's absolute width.
            sidebands = []
            for h in range(1, harmonics + 1):
                c = h * f
                lower = _peak(env, bin_hz, c - shaft_hz, tol * c / max(c - shaft_hz, bin_hz))
                upper = _peak(env, bin_hz, c + shaft_hz, tol * c / (c + shaft_hz))
                sidebands.append(0.5 * (lower + upper))
            sideband_score = np.mean(sidebands) / floor
            scores[name] = float(scores[name] + 0.5 * max(0.0, sideband_score - 2.0))
    return scores


def test_defect_scores_match_reference():
    rng = np.random.default_rng(5)
    env = np.abs(rng.standard_normal(2049)) * 0.01
    orders = DefectOrders(bpfo=3.5848, bpfi=5.4152, bsf=2.3568, ftf=0.39828)
    bin_hz = 12000 / 4096
    env[round(162.1 / bin_hz)] = 0.5
    got = defect_indicators(env, bin_hz, 29.95, orders, floor_band_hz=(6.0, 600.0))
    expected = _reference_scores(env, bin_hz, orders.frequencies_hz(29.95), 3, 0.02, (6.0, 600.0), 29.95)
    for name, value in expected.items():
        assert math.isclose(got.scores[name], value, rel_tol=RTOL), name
    assert got.dominant == "bpfi"


def test_bpfi_sidebands_raise_score():
    orders = DefectOrders(bpfo=3.5848, bpfi=5.4152, bsf=2.3568, ftf=0.39828)
    bin_hz = 12000 / 4096
    base = np.full(2049, 0.01)
    for h in (1, 2, 3):
        base[round(h * 162.2 / bin_hz)] = 0.1
    with_sidebands = base.copy()
    for h in (1, 2, 3):
        for side in (-29.95, 29.95):
            with_sidebands[round((h * 162.2 + side) / bin_hz)] = 0.1
    plain = defect_indicators(base, bin_hz, 29.95, orders)
    modulated = defect_indicators(with_sidebands, bin_hz, 29.95, orders)
    assert modulated.scores["bpfi"] > plain.scores["bpfi"]
    assert modulated.bpfi_sideband_score > 5.0
    assert plain.bpfi_sideband_score == pytest.approx(1.0)


def test_defect_rejects_coarse_spectrum():
    orders = DefectOrders(bpfo=3.5848, bpfi=5.4152, bsf=2.3568, ftf=0.39828)
    with pytest.raises(ValueError, match="above the spectrum"):
        defect_indicators(np.ones(16), 5.0, 29.95, orders)


@pytest.mark.parametrize("v, zone", [(0.5, "A"), (1.4, "B"), (2.79, "B"), (3.0, "C"), (4.5, "D")])
def test_severity_zone_rigid(v, zone):
    assert severity_zone(v, (1.4, 2.8, 4.5)) == zone


def test_severity_zone_rejects_nan():
    with pytest.raises(ValueError, match="invalid"):
        severity_zone(float("nan"), (1.4, 2.8, 4.5))


CWRU = Path(__file__).resolve().parents[2] / "shared" / "data" / "cwru"


@pytest.mark.skipif(not (CWRU / "105.mat").exists(), reason="CWRU recordings not found")
def test_frame_matches_reference_on_recording():
    from scipy.io import loadmat

    x = loadmat(str(CWRU / "105.mat"))["X105_DE_time"].ravel()[10000:14096]
    analyzer = FrameAnalyzer(12000.0, 4096, envelope_band=(2000.0, 5000.0))
    f = analyzer.analyse(x)
    expected = ref.time_stats(x)
    for name in ("rms", "peak", "crest_factor", "kurtosis", "skewness"):
        assert math.isclose(getattr(f, name), expected[name], rel_tol=RTOL), name
    assert math.isclose(f.velocity_rms_mm_s, ref.velocity_rms_mm_s(x, 12000.0, (10.0, 1000.0)), rel_tol=RTOL)
    assert _rel(f.spectrum, ref.amplitude_spectrum(x)) < RTOL
    expected_env = ref.baseband_envelope_spectrum(x, 12000.0, (2000.0, 5000.0), analyzer.envelope_points)
    assert _rel(f.envelope_spectrum, expected_env) < RTOL
