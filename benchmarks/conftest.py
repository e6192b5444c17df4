"""Collection and ratio summary for the pytest-benchmark suite in this folder.

`make bench` runs `pytest benchmarks --benchmark-only`. Files named bench_*.py are
collected here (pytest's default pattern is test_*.py, and the project's testpaths
keeps `make test` out of this folder). Each benchmark records its min and median
under a comparison group, and the terminal summary prints, per group, the ratio of
the agent's time to each baseline measured in the same run, next to its target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

# Targets for the agent/baseline time ratio, by group and baseline.
TARGETS = {
    ("rfft n=4096", "numpy"): 0.45,
    ("frame pipeline", "reference"): 0.30,
}
FRAMES_PER_SECOND_PER_CHANNEL = 25600.0 / 2048  # 4096-sample frames every 2048 samples


@dataclass
class Timing:
    min_s: float
    median_s: float
    extra: dict = field(default_factory=dict)


_results: dict[str, dict[str, Timing]] = {}


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def record():
    """Return a function that stores a finished benchmark's min and median under (group, label)."""

    def store(benchmark, group: str, label: str, **extra) -> None:
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        stats = benchmark.stats.stats
        _results.setdefault(group, {})[label] = Timing(stats.min, stats.median, extra)

    return store


def _format_ratio(group: str, label: str, subject: Timing, baseline: Timing) -> str:
    ratio_min = subject.min_s / baseline.min_s
    ratio_median = subject.median_s / baseline.median_s
    line = f"  {group}: agent/{label} = {ratio_min:.2f} (min), {ratio_median:.2f} (median)"
    target = TARGETS.get((group, label))
    if target is not None:
        verdict = "meets" if ratio_median <= target else "MISSES"
        line += f"; target <= {target:.2f}: {verdict}"
    return line


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    write = terminalreporter.write_line
    terminalreporter.section("agent / baseline ratios (same run)")
    for group, timings in _results.items():
        subject = timings.get("agent")
        if subject is None:
            continue
        for label, baseline in timings.items():
            if label != "agent":
                write(_format_ratio(group, label, subject, baseline))

    frame = _results.get("frame pipeline", {})
    for label, timing in frame.items():
        channels = 1.0 / (FRAMES_PER_SECOND_PER_CHANNEL * timing.median_s)
        write(f"  channels one core sustains at 25.6 kHz, 50 % overlap ({label}, median frame "
              f"{timing.median_s * 1e6:.0f} us): {channels:.0f}")

    for group in ("start cold", "start warm"):
        for label, timing in _results.get(group, {}).items():
            rss = timing.extra.get("peak_rss_mib")
            if rss is not None:
                write(f"  {group} ({label}): median {timing.median_s:.2f} s, peak RSS {rss:.0f} MiB")
