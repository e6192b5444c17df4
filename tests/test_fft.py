"""The compiled FFT kernels in agent.dsp._fft against numpy.fft."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dsp import _fft, rfft
from agent.dsp._fft import FftPlan, fft_plan

RTOL = 1e-12
EXPONENTS = st.integers(2, 16)  # lengths 4 .. 65536
SEEDS = st.integers(0, 2**32 - 1)


def _rel_error(actual, expected) -> float:
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


def _kernel_rfft(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty(x.size // 2 + 1, dtype=np.complex128)
    _fft._rfft(x, fft_plan(x.size).tables, out)
    return out


def _kernel_ifft(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.complex128)
    _fft._ifft_inplace(a, fft_plan(a.size).tables)
    return a


@pytest.mark.parametrize("exponent", range(2, 17))
def test_rfft_matches_numpy_every_length(exponent):
    n = 2**exponent
    x = np.random.default_rng(exponent).standard_normal(n)
    assert _rel_error(_kernel_rfft(x), np.fft.rfft(x)) < RTOL


@pytest.mark.parametrize("exponent", range(2, 17))
def test_ifft_matches_numpy_every_length(exponent):
    n = 2**exponent
    rng = np.random.default_rng(exponent)
    a = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    assert _rel_error(_kernel_ifft(a), np.fft.ifft(a)) < RTOL


@settings(max_examples=40, deadline=None)
@given(exponent=EXPONENTS, seed=SEEDS, scale=st.floats(1e-6, 1e6), offset=st.floats(-10.0, 10.0))
def test_rfft_matches_numpy(exponent, seed, scale, offset):
    x = scale * (np.random.default_rng(seed).standard_normal(2**exponent) + offset)
    assert _rel_error(_kernel_rfft(x), np.fft.rfft(x)) < RTOL


@settings(max_examples=40, deadline=None)
@given(exponent=EXPONENTS, seed=SEEDS, scale=st.floats(1e-6, 1e6))
def test_ifft_matches_numpy(exponent, seed, scale):
    rng = np.random.default_rng(seed)
    n = 2**exponent
    a = scale * (rng.standard_normal(n) + 1j * rng.standard_normal(n))
    assert _rel_error(_kernel_ifft(a), np.fft.ifft(a)) < RTOL


@settings(max_examples=25, deadline=None)
@given(exponent=EXPONENTS, seed=SEEDS)
def test_ifft_inverts_numpy_fft(exponent, seed):
    rng = np.random.default_rng(seed)
    n = 2**exponent
    a = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    assert _rel_error(_kernel_ifft(np.fft.fft(a)), a) < RTOL


@settings(max_examples=25, deadline=None)
@given(exponent=EXPONENTS, seed=SEEDS)
def test_rfft_parseval(exponent, seed):
    n = 2**exponent
    x = np.random.default_rng(seed).standard_normal(n)
    spectrum = _kernel_rfft(x)
    # One-sided spectrum: the DC and Nyquist bins count once, every other bin twice.
    power = np.abs(spectrum) ** 2
    energy = (power[0] + power[-1] + 2.0 * np.sum(power[1:-1])) / n
    assert math.isclose(energy, np.sum(x**2), rel_tol=1e-10)


@settings(max_examples=25, deadline=None)
@given(exponent=EXPONENTS, seed=SEEDS, gain=st.floats(-100.0, 100.0))
def test_rfft_linearity(exponent, seed, gain):
    rng = np.random.default_rng(seed)
    n = 2**exponent
    x = rng.standard_normal(n)
    y = rng.standard_normal(n)
    combined = _kernel_rfft(gain * x + y)
    expected = gain * _kernel_rfft(x) + _kernel_rfft(y)
    assert _rel_error(combined, expected) < 1e-11


@pytest.mark.parametrize("n", [4, 8, 64, 4096, 65536])
@pytest.mark.parametrize("position", [0, 1, 3])
def test_rfft_impulse(n, position):
    x = np.zeros(n)
    x[position] = 1.0
    k = np.arange(n // 2 + 1)
    expected = np.exp(-2j * np.pi * k * position / n)
    assert np.max(np.abs(_kernel_rfft(x) - expected)) < 1e-12


@pytest.mark.parametrize("n", [4, 16, 4096, 65536])
def test_rfft_tone_on_bin(n):
    t = np.arange(n)
    amplitude = 2.5
    for k0 in sorted({1, max(1, n // 8), n // 2 - 1}):
        spectrum = _kernel_rfft(amplitude * np.cos(2 * np.pi * k0 * t / n))
        assert abs(spectrum[k0] - amplitude * n / 2) < 1e-9 * n, k0
        others = np.delete(spectrum, k0)
        assert np.max(np.abs(others)) < 1e-9 * n, k0

        spectrum = _kernel_rfft(amplitude * np.sin(2 * np.pi * k0 * t / n))
        assert abs(spectrum[k0] - (-1j) * amplitude * n / 2) < 1e-9 * n, k0


@pytest.mark.parametrize("n", [4, 4096])
def test_rfft_dc_and_nyquist(n):
    t = np.arange(n)
    dc = _kernel_rfft(np.full(n, 3.0))
    assert dc[0] == pytest.approx(3.0 * n, rel=1e-14)
    assert np.max(np.abs(dc[1:])) < 1e-12 * n
    nyquist = _kernel_rfft(np.cos(np.pi * t))
    assert nyquist[-1] == pytest.approx(float(n), rel=1e-14)
    assert np.max(np.abs(nyquist[:-1])) < 1e-12 * n


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("n", [4, 16, 4096])
def test_kernel_propagates_non_finite(n, bad):
    # The kernel checks nothing: one bad sample makes every bin NaN or infinite.
    x = np.random.default_rng(n).standard_normal(n)
    x[1] = bad
    spectrum = _kernel_rfft(x)
    assert not np.any(np.isfinite(spectrum))
    if np.isnan(bad):
        assert np.all(np.isnan(spectrum))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_public_rfft_rejects_non_finite(bad):
    x = np.ones(64)
    x[5] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        rfft(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_detects_each_value(bad):
    x = np.random.default_rng(0).standard_normal(4096)
    assert _fft._all_finite(x)
    x[4000] = bad
    assert not _fft._all_finite(x)


def test_all_finite_accepts_extreme_values():
    assert _fft._all_finite(np.array([1e308, 1e308, -1e308, 5e-324, 0.0]))


@pytest.mark.parametrize("n", [-4, 0, 1, 2, 3, 6, 100, 4095, 4097])
def test_plan_rejects_unsupported_length(n):
    with pytest.raises(ValueError, match=rf"FFT length {n} is not supported; use a power of two of at least 4"):
        FftPlan(n)


def test_plan_rejects_float_length():
    with pytest.raises(ValueError, match="FFT length 4096.0 is not supported"):
        FftPlan(4096.0)


def test_plan_is_cached_and_read_only():
    plan = fft_plan(1024)
    assert fft_plan(1024) is plan
    assert plan.n == 1024
    for table in plan.tables:
        assert not table.flags.writeable


def _run_concurrently(worker, count: int = 2) -> list[BaseException]:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            worker(index)
        except BaseException as exc:  # collected and reported by the test's assert
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.mark.parametrize("n", [64, 4096])
def test_rfft_two_threads_share_plan(n):
    plan = fft_plan(n)
    inputs = [np.random.default_rng(seed).standard_normal(n) for seed in (1, 2)]
    expected = [np.fft.rfft(x) for x in inputs]
    mismatches = [0, 0]

    def worker(index: int) -> None:
        out = np.empty(n // 2 + 1, dtype=np.complex128)
        for _ in range(300):
            _fft._rfft(inputs[index], plan.tables, out)
            if _rel_error(out, expected[index]) >= RTOL:
                mismatches[index] += 1

    assert _run_concurrently(worker) == []
    assert mismatches == [0, 0]


def test_ifft_two_threads_share_plan():
    n = 4096
    plan = fft_plan(n)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(n) + 1j * rng.standard_normal(n) for _ in range(2)]
    expected = [np.fft.ifft(a) for a in inputs]
    mismatches = [0, 0]

    def worker(index: int) -> None:
        for _ in range(200):
            a = inputs[index].copy()
            _fft._ifft_inplace(a, plan.tables)
            if _rel_error(a, expected[index]) >= RTOL:
                mismatches[index] += 1

    assert _run_concurrently(worker) == []
    assert mismatches == [0, 0]
