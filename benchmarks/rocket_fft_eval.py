"""Compare rocket-fft's numpy.fft.rfft inside @njit with agent/dsp/_fft.py and numpy.

rocket-fft is not a project dependency, so this script runs in a scratch virtual
environment, not under pytest:

    python3 -m venv /tmp/rfenv
    /tmp/rfenv/bin/pip install numpy numba rocket-fft
    NUMBA_CACHE_DIR=$(mktemp -d) /tmp/rfenv/bin/python benchmarks/rocket_fft_eval.py

It loads `_fft.py` by path, so it needs only numpy and numba beside rocket-fft. Each
round times every variant once, in turn, so machine drift hits all of them alike. The
figures are medians over rounds of the best-of-repeat time per call, in microseconds.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import timeit
from pathlib import Path

import numpy as np
from numba import njit

import rocket_fft  # noqa: F401  (registers the numpy.fft overloads for Numba)

SIZES = (1024, 4096, 16384, 65536)
ROUNDS = 15
CALLS_IN_LOOP = 50


def load_fft_module():
    """Import agent/dsp/_fft.py without importing the agent package."""
    path = Path(__file__).resolve().parent.parent / "agent" / "dsp" / "_fft.py"
    spec = importlib.util.spec_from_file_location("agent_fft", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fft = load_fft_module()
_rfft = fft._rfft


@njit(nogil=True)
def rocket_rfft(x):
    return np.fft.rfft(x)


@njit(nogil=True)
def own_rfft(x, tables):
    out = np.empty(x.size // 2 + 1, dtype=np.complex128)
    _rfft(x, tables, out)
    return out


@njit(nogil=True)
def rocket_loop(x, calls):
    total = 0.0
    for _ in range(calls):
        total += np.fft.rfft(x)[1].real
    return total


@njit(nogil=True)
def own_loop(x, tables, calls):
    total = 0.0
    out = np.empty(x.size // 2 + 1, dtype=np.complex128)
    for _ in range(calls):
        _rfft(x, tables, out)
        total += out[1].real
    return total


def best_time_us(func, number: int) -> float:
    return min(timeit.repeat(func, number=number, repeat=3)) / number * 1e6


def main() -> int:
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, rocket-fft {rocket_fft.__version__}")
    print("n, then median us per call: numpy.fft.rfft from Python | rocket in @njit | own in @njit "
          "| rocket loop in @njit | own loop in @njit; ratios own/rocket")
    for n in SIZES:
        x = np.random.default_rng(n).standard_normal(n)
        tables = fft.fft_plan(n).tables
        expected = np.fft.rfft(x)
        for result in (rocket_rfft(x), own_rfft(x, tables)):
            error = np.max(np.abs(result - expected)) / np.max(np.abs(expected))
            assert error < 1e-12, f"n={n}: relative error {error:.2e} against numpy.fft.rfft"
        rocket_loop(x, 1)
        own_loop(x, tables, 1)

        number = max(20, 200_000 // n)
        loop_number = max(2, number // CALLS_IN_LOOP)
        samples: dict[str, list[float]] = {name: [] for name in ("numpy", "rocket", "own", "rocket_loop", "own_loop")}
        for _ in range(ROUNDS):
            samples["numpy"].append(best_time_us(lambda: np.fft.rfft(x), number))
            samples["rocket"].append(best_time_us(lambda: rocket_rfft(x), number))
            samples["own"].append(best_time_us(lambda: own_rfft(x, tables), number))
            samples["rocket_loop"].append(
                best_time_us(lambda: rocket_loop(x, CALLS_IN_LOOP), loop_number) / CALLS_IN_LOOP)
            samples["own_loop"].append(
                best_time_us(lambda: own_loop(x, tables, CALLS_IN_LOOP), loop_number) / CALLS_IN_LOOP)
        median = {name: statistics.median(values) for name, values in samples.items()}
        print(f"{n:6d}: {median['numpy']:8.2f} | {median['rocket']:8.2f} | {median['own']:8.2f} "
              f"| {median['rocket_loop']:8.2f} | {median['own_loop']:8.2f}; "
              f"own/rocket {median['own'] / median['rocket']:.2f} (called from Python), "
              f"{median['own_loop'] / median['rocket_loop']:.2f} (inside @njit); "
              f"rocket/numpy {median['rocket'] / median['numpy']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
