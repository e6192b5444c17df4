"""Per-frame analysis: FrameAnalyzer against the plain numpy/scipy twins in tests/reference.py.

Both sides compute time statistics, the amplitude spectrum, velocity RMS over 10-1000 Hz
and the envelope spectrum of the 2000-5000 Hz band for 4096-sample frames at 25.6 kHz.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.dsp import FrameAnalyzer
from tests import reference

SAMPLE_RATE = 25600.0
FRAME = 4096
BATCH = 64
VELOCITY_BAND = (10.0, 1000.0)
ENVELOPE_BAND = (2000.0, 5000.0)


def _frames(count: int) -> np.ndarray:
    """Return `count` frames in g: shaft tone, a 3.2 kHz resonance rung at 87 Hz, noise."""
    rng = np.random.default_rng(7)
    t = np.arange(count * FRAME) / SAMPLE_RATE
    impacts = (np.sin(2 * np.pi * 87.0 * t) > 0.995).astype(float)
    resonance = np.convolve(impacts, np.exp(-t[:200] * 2000.0) * np.sin(2 * np.pi * 3200.0 * t[:200]), "same")
    x = 0.3 * np.sin(2 * np.pi * 29.95 * t) + 0.5 * resonance + 0.05 * rng.standard_normal(t.size)
    return x.reshape(count, FRAME)


def _reference_features(x: np.ndarray) -> tuple:
    return (
        reference.time_stats(x),
        reference.amplitude_spectrum(x),
        reference.velocity_rms_mm_s(x, SAMPLE_RATE, VELOCITY_BAND),
        reference.envelope_spectrum(x, SAMPLE_RATE, ENVELOPE_BAND),
    )


@pytest.fixture(scope="module")
def analyzer():
    return FrameAnalyzer(SAMPLE_RATE, FRAME, velocity_band=VELOCITY_BAND, envelope_band=ENVELOPE_BAND)


@pytest.fixture(scope="module")
def frames(analyzer):
    x = _frames(BATCH)
    # Check agreement and compile (or load) the kernels outside the timing.
    features = analyzer.analyse(x[0])
    stats, spectrum, velocity, _ = _reference_features(x[0])
    assert math.isclose(features.rms, stats["rms"], rel_tol=1e-9)
    assert math.isclose(features.velocity_rms_mm_s, velocity, rel_tol=1e-6)
    assert np.allclose(features.spectrum, spectrum, rtol=1e-9, atol=1e-12)
    if hasattr(analyzer, "analyse_batch"):
        analyzer.analyse_batch(x)
    return x


@pytest.mark.parametrize("label", ["agent", "reference"])
def test_frame(benchmark, record, analyzer, frames, label):
    benchmark.group = "frame pipeline"
    x = frames[0]
    if label == "agent":
        benchmark(analyzer.analyse, x)
    else:
        benchmark(_reference_features, x)
    record(benchmark, "frame pipeline", label)


def _analyse_each(analyzer, frames):
    return [analyzer.analyse(x) for x in frames]


def _reference_each(frames):
    return [_reference_features(x) for x in frames]


@pytest.mark.parametrize("label", ["agent", "agent analyse x64", "reference"])
def test_batch(benchmark, record, analyzer, frames, label):
    group = f"batch of {BATCH} frames"
    benchmark.group = group
    if label == "agent" and hasattr(analyzer, "analyse_batch"):
        benchmark(analyzer.analyse_batch, frames)
    elif label == "reference":
        benchmark(_reference_each, frames)
    else:
        # Without analyse_batch, "agent" is 64 calls of analyse as well.
        benchmark(_analyse_each, analyzer, frames)
    record(benchmark, group, label)
