"""Start-up: a new process that imports the analysis code and analyses one frame.

Cold: the agent's Numba cache directory is empty, so every kernel compiles. Warm: the
directory contains the previous run's cache. The reference process imports numpy and scipy
and runs the tests/reference.py twins once; it has no cache to warm. Each round is one
whole `python benchmarks/analyse_once.py` process, so interpreter start-up counts too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "analyse_once.py"
ROOT = SCRIPT.parent.parent


class Child:
    """Run analyse_once.py with a given Numba cache directory and keep the largest peak RSS."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.cache_dir = None
        self.peak_rss_mib = 0.0

    def run(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if self.cache_dir is not None:
            env["NUMBA_CACHE_DIR"] = self.cache_dir
        result = subprocess.run([sys.executable, str(SCRIPT), self.variant], env=env, cwd=ROOT,
                                capture_output=True, text=True, check=True)
        rss = float(result.stdout.split("peak_rss_mib")[-1])
        self.peak_rss_mib = max(self.peak_rss_mib, rss)


@pytest.fixture
def cache_root():
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as root:
        yield Path(root)


def test_start_cold(benchmark, record, cache_root):
    child = Child("agent")
    rounds = iter(range(100))

    def fresh_cache():
        child.cache_dir = str(cache_root / f"cold-{next(rounds)}")

    benchmark.group = "start cold"
    benchmark.pedantic(child.run, setup=fresh_cache, rounds=3, iterations=1)
    benchmark.extra_info["peak_rss_mib"] = child.peak_rss_mib
    record(benchmark, "start cold", "agent", peak_rss_mib=child.peak_rss_mib)


@pytest.mark.parametrize("variant", ["agent", "reference"])
def test_start_warm(benchmark, record, cache_root, variant):
    child = Child(variant)
    if variant == "agent":
        child.cache_dir = str(cache_root / "warm")
        child.run()  # populates the cache
        child.peak_rss_mib = 0.0  # that run compiled; keep only the warm runs' peak
    benchmark.group = "start warm"
    benchmark.pedantic(child.run, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_mib"] = child.peak_rss_mib
    record(benchmark, "start warm", variant, peak_rss_mib=child.peak_rss_mib)
