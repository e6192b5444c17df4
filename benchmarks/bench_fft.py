"""Real FFT: agent.dsp.rfft (compiled kernel behind the public wrapper) against numpy and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

import agent.dsp

SIZES = (1024, 4096, 16384, 65536)


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"n={n}")
def signal(request):
    n = request.param
    x = np.random.default_rng(n).standard_normal(n)
    # Check the agent's result and compile (or load) the kernel outside the timing.
    expected = np.fft.rfft(x)
    error = np.max(np.abs(agent.dsp.rfft(x) - expected)) / np.max(np.abs(expected))
    assert error < 1e-12, f"agent.dsp.rfft differs from numpy.fft.rfft by {error:.1e} at n={n}"
    return x


IMPLEMENTATIONS = {
    "agent": agent.dsp.rfft,
    "numpy": np.fft.rfft,
    "scipy": scipy.fft.rfft,
}


@pytest.mark.parametrize("label", IMPLEMENTATIONS)
def test_rfft(benchmark, record, signal, label):
    group = f"rfft n={signal.size}"
    benchmark.group = group
    benchmark(IMPLEMENTATIONS[label], signal)
    record(benchmark, group, label)
