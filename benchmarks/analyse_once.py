"""Import the analysis code, analyse one 4096-sample frame and print the process's peak RSS.

    python benchmarks/analyse_once.py agent       # agent.dsp.FrameAnalyzer (Numba kernels)
    python benchmarks/analyse_once.py reference   # tests/reference.py (numpy + scipy)

bench_start.py times this script as a whole process. The agent variant compiles its
kernels or loads them from the Numba cache (NUMBA_CACHE_DIR) on the first call. The last
output line is "peak_rss_mib <value>": VmHWM from /proc/self/status. getrusage's ru_maxrss
is not used because Linux keeps it across fork and exec, so a child of a large process
(such as pytest) would report its parent's peak.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

SAMPLE_RATE = 25600.0
FRAME = 4096


def main(variant: str) -> int:
    import numpy as np

    t = np.arange(FRAME) / SAMPLE_RATE
    x = 0.3 * np.sin(2 * np.pi * 29.95 * t) + 0.05 * np.random.default_rng(1).standard_normal(FRAME)
    if variant == "agent":
        from agent.dsp import FrameAnalyzer

        features = FrameAnalyzer(SAMPLE_RATE, FRAME).analyse(x)
        rms = features.rms
    elif variant == "reference":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests import reference

        rms = reference.time_stats(x)["rms"]
        reference.amplitude_spectrum(x)
        reference.velocity_rms_mm_s(x, SAMPLE_RATE, (10.0, 1000.0))
        reference.envelope_spectrum(x, SAMPLE_RATE, (2000.0, 5000.0))
    else:
        print(f"variant {variant!r} is invalid; use 'agent' or 'reference'", file=sys.stderr)
        return 2
    print(f"rms {rms:.6f}")
    print(f"peak_rss_mib {peak_rss_mib():.1f}")
    return 0


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # the value is in kB
    except OSError:
        pass
    # NOTE: outside Linux, ru_maxrss may include the parent's peak (see the module docstring).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
