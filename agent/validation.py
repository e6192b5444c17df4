"""Bearing diagnosis of CWRU recordings, as the agent would run it on a live stream.

`edge-agent validate-cwru DIR` prints a markdown table per file. Reading `.mat` files
needs scipy (`pip install imaging-edge-agent[recordings]`); the agent itself does not.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dsp import (
    ZONE_LIMITS_MM_S,
    DefectOrders,
    FrameAnalyzer,
    defect_indicators,
    estimate_shaft_speed,
    frame_length_for,
    select_envelope_band,
    severity_zone,
)

# Frames used to choose the envelope band, as the agent does at the start of a stream.
BAND_SELECTION_FRAMES = 8

# Drive-end bearing of the CWRU rig, SKF 6205-2RS, as multiples of shaft speed.
CWRU_DE_ORDERS = DefectOrders(bpfo=3.5848, bpfi=5.4152, bsf=2.3568, ftf=0.39828)

# Sample rates by file number: the normal baseline 97 and the 48k drive-end files run at
# 48 kHz, the 12k drive-end fault files at 12 kHz. Numbers missing here need --sample-rate.
CWRU_SAMPLE_RATES = {97: 48000, 98: 48000, 99: 48000, 100: 48000, 105: 12000, 109: 48000,
                     119: 12000, 130: 12000}

# Known fault of each file in the shared set, used only to print the expected column.
CWRU_KNOWN_FAULTS = {97: "normal", 105: "inner race", 109: "inner race", 119: "ball", 130: "outer race"}
EXPECTED_INDICATOR = {"normal": None, "inner race": "bpfi", "outer race": "bpfo", "ball": "bsf"}


@dataclass(frozen=True)
class FileDiagnosis:
    file: str
    sample_rate: int
    rpm: float
    frame_length: int
    frames: int
    velocity_rms_mm_s: float
    kurtosis: float
    crest_factor: float
    scores: dict[str, float]
    dominant: str | None
    known_fault: str
    envelope_band: tuple[float, float]
    shaft_hz: float


def load_cwru(path: Path) -> tuple[np.ndarray, int, float, int]:
    """Return (drive-end samples in g, sample rate, rpm, file number) of one CWRU .mat file."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise RuntimeError("reading .mat files needs scipy: pip install 'imaging-edge-agent[recordings]'") from exc
    match = re.match(r"(\d+)", path.name)
    if match is None:
        raise ValueError(f"{path.name}: the file name does not start with a CWRU file number")
    number = int(match.group(1))
    if number not in CWRU_SAMPLE_RATES:
        raise ValueError(f"{path.name}: sample rate of CWRU file {number} is unknown; add it to CWRU_SAMPLE_RATES")
    contents = loadmat(str(path))
    # Choose by file number: some CWRU files also carry arrays of other recordings.
    x = np.asarray(contents[f"X{number:03d}_DE_time"], dtype=np.float64).ravel()
    rpm = float(np.asarray(contents[f"X{number:03d}RPM"]).ravel()[0])
    return x, CWRU_SAMPLE_RATES[number], rpm, number


def diagnose(x: np.ndarray, sample_rate: int, rpm: float | None, *, overlap: float = 0.5,
             envelope_band: tuple[float, float] | None = (2000.0, 5000.0), threshold: float = 4.0,
             speed_search_hz: tuple[float, float] = (20.0, 40.0)
             ) -> tuple[int, int, float, float, float, dict[str, float], str | None, tuple[float, float], float]:
    """Analyse a whole recording in overlapping frames and score the averaged envelope spectrum.

    envelope_band=None chooses the band from the first frames; rpm=None estimates the
    shaft speed from the averaged spectrum within `speed_search_hz`, as the agent does
    when a channel has no speed input.
    """
    n = frame_length_for(sample_rate)
    if envelope_band is None:
        count = min(BAND_SELECTION_FRAMES, x.size // n)
        envelope_band, _ = select_envelope_band(x[:count * n].reshape(count, n), float(sample_rate))
    analyzer = FrameAnalyzer(float(sample_rate), n, envelope_band=envelope_band)
    hop = int(n * (1 - overlap))
    velocity_sq = kurtosis = crest = 0.0
    envelope_power = np.zeros(analyzer.envelope_points // 2 + 1)
    spectrum_power = np.zeros(n // 2 + 1)
    frames = 0
    for start in range(0, x.size - n + 1, hop):
        f = analyzer.analyse(x[start:start + n])
        velocity_sq += f.velocity_rms_mm_s ** 2
        kurtosis += f.kurtosis
        crest += f.crest_factor
        envelope_power += f.envelope_spectrum ** 2
        spectrum_power += f.spectrum ** 2
        frames += 1
    if frames == 0:
        raise ValueError(f"recording of {x.size} samples is shorter than one {n}-sample frame")
    if rpm is None:
        shaft_hz, _ = estimate_shaft_speed(np.sqrt(spectrum_power / frames), analyzer.bin_hz, speed_search_hz)
    else:
        shaft_hz = rpm / 60.0
    indicators = defect_indicators(np.sqrt(envelope_power / frames), analyzer.bin_hz, shaft_hz,
                                   CWRU_DE_ORDERS, threshold=threshold)
    return (n, frames, math.sqrt(velocity_sq / frames), kurtosis / frames, crest / frames,
            indicators.scores, indicators.dominant, envelope_band, shaft_hz)


def diagnose_file(path: Path, *, automatic: bool = False) -> FileDiagnosis:
    """Diagnose one CWRU file: with the recorded speed and a 2-5 kHz envelope band, or
    with `automatic`, with the band chosen from the data and the speed estimated."""
    x, rate, rpm, number = load_cwru(path)
    if automatic:
        result = diagnose(x, rate, None, envelope_band=None)
    else:
        result = diagnose(x, rate, rpm)
    n, frames, velocity, kurt, crest, scores, dominant, band, shaft_hz = result
    return FileDiagnosis(path.name, rate, rpm, n, frames, velocity, kurt, crest, scores, dominant,
                         CWRU_KNOWN_FAULTS.get(number, "unknown"), band, shaft_hz)


def markdown_table(results: list[FileDiagnosis]) -> str:
    header = ("| file | rate (Hz) | rpm | frame | frames | velocity RMS (mm/s) | zone | kurtosis | crest | "
              "envelope band (Hz) | shaft (Hz) | BPFO score | BPFI score | BSF score | FTF score | verdict | "
              "known fault |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        verdict = r.dominant.upper() if r.dominant else "no bearing defect"
        zone = severity_zone(r.velocity_rms_mm_s, ZONE_LIMITS_MM_S["rigid"])
        s = r.scores
        lines.append(f"| {r.file} | {r.sample_rate} | {r.rpm:g} | {r.frame_length} | {r.frames} | "
                     f"{r.velocity_rms_mm_s:.3f} | {zone} | {r.kurtosis:.2f} | {r.crest_factor:.2f} | "
                     f"{r.envelope_band[0]:.0f}-{r.envelope_band[1]:.0f} | {r.shaft_hz:.2f} | "
                     f"{s['bpfo']:.1f} | {s['bpfi']:.1f} | {s['bsf']:.1f} | {s['ftf']:.1f} | {verdict} | "
                     f"{r.known_fault} |")
    return "\n".join(lines)
