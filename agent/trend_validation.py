"""Change detection on labelled NAB series, scored against NAB's anomaly windows.

`python -m agent.trend_validation FOLDER` reads every CSV in FOLDER that
`combined_windows.json` in the same folder labels, runs one `ChangeMonitor` (CUSUM and
Page-Hinkley) per series with the parameters in `NAB_PARAMETERS`, and prints markdown:
windows, windows detected, false positives, detection delays and every alarm.
`--sensitivity` adds the same totals for parameter sets next to the chosen one.

NAB timestamps carry no timezone. They are read as UTC, which keeps every difference
between two timestamps right because UTC has no daylight-saving jumps.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .dsp.trend import ChangeMonitor, ChangePoint, Cusum, PageHinkley

HOUR = 3600.0
DAY = 86400.0

WINDOWS_FILE = "combined_windows.json"
LABELS_FILE = "combined_labels.json"


@dataclass(frozen=True)
class MonitorParameters:
    """Parameters of the CUSUM, the Page-Hinkley test and the monitor that combines them.

    Times are in seconds. Drifts and thresholds are in standard deviations per value, as in
    `Cusum` and `PageHinkley`.
    """

    time_constant: float = 1.0 * DAY
    cusum_drift: float = 1.5
    cusum_threshold: float = 10.0
    ph_delta: float = 1.0
    ph_threshold: float = 400.0
    learning_time: float = 7.0 * DAY
    learning_samples: int = 100
    refractory: float = 1.0 * DAY
    min_std: float = 1e-6
    max_gap: float | None = None
    use_cusum: bool = True
    use_page_hinkley: bool = True

    def monitor(self) -> ChangeMonitor:
        cusum = None
        page_hinkley = None
        if self.use_cusum:
            cusum = Cusum(self.time_constant, drift=self.cusum_drift, threshold=self.cusum_threshold,
                          learning_time=self.learning_time, learning_samples=self.learning_samples,
                          min_std=self.min_std, max_gap=self.max_gap)
        if self.use_page_hinkley:
            page_hinkley = PageHinkley(delta=self.ph_delta, threshold=self.ph_threshold,
                                       learning_time=self.learning_time, learning_samples=self.learning_samples,
                                       min_std=self.min_std, max_gap=self.max_gap)
        return ChangeMonitor(cusum, page_hinkley, refractory=self.refractory)

    def describe(self) -> str:
        return (f"time constant {self.time_constant / HOUR:g} h, CUSUM drift {self.cusum_drift:g} "
                f"and threshold {self.cusum_threshold:g}, Page-Hinkley delta {self.ph_delta:g} and threshold "
                f"{self.ph_threshold:g}, learning {self.learning_time / DAY:g} days and at least "
                f"{self.learning_samples} values, refractory {self.refractory / HOUR:g} h")


# One set for every series. It sits inside a region of the grid where the neighbouring sets
# give similar totals (see `SENSITIVITY_VARIANTS`), rather than at the best single cell.
NAB_PARAMETERS = MonitorParameters()

SENSITIVITY_VARIANTS = {
    "chosen": {},
    "CUSUM drift 2": {"cusum_drift": 2.0},
    "CUSUM drift 1": {"cusum_drift": 1.0},
    "CUSUM threshold 7": {"cusum_threshold": 7.0},
    "CUSUM threshold 14": {"cusum_threshold": 14.0},
    "CUSUM drift 2, threshold 5": {"cusum_drift": 2.0, "cusum_threshold": 5.0},
    "time constant 6 h": {"time_constant": 6 * HOUR},
    "time constant 3 days": {"time_constant": 3 * DAY},
    "Page-Hinkley threshold 200": {"ph_threshold": 200.0},
    "Page-Hinkley delta 2": {"ph_delta": 2.0},
    "learning 2 days": {"learning_time": 2 * DAY},
    "refractory 6 h": {"refractory": 6 * HOUR},
    "relearn after gaps over 1 day": {"max_gap": 1 * DAY},
    "CUSUM only": {"use_page_hinkley": False},
    "Page-Hinkley only": {"use_cusum": False},
}


@dataclass(frozen=True)
class Series:
    name: str
    times: np.ndarray
    values: np.ndarray
    duplicates_dropped: int


@dataclass(frozen=True)
class FileScore:
    """Alarms of one series scored against its labelled windows. Times are in seconds."""

    name: str
    rows: int
    duplicates_dropped: int
    windows: list[tuple[float, float]]
    labels: list[float]
    alarms: list[ChangePoint]
    # Per window: time from its start to its first alarm, None for a missed window.
    delays: list[float | None]
    # Per window: time from its first label to its first alarm (negative = before the label).
    label_offsets: list[float | None]
    false_positives: int

    @property
    def detected(self) -> int:
        return sum(delay is not None for delay in self.delays)


def parse_timestamp(text: str) -> float:
    """Return seconds since the epoch of a NAB timestamp such as "2014-03-07 03:41:00", read as UTC."""
    try:
        stamp = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"timestamp {text!r} is invalid; NAB timestamps look like '2014-03-07 03:41:00'") from None
    if stamp.tzinfo is not None:
        raise ValueError(f"timestamp {text!r} carries a timezone; NAB timestamps have none")
    return stamp.replace(tzinfo=timezone.utc).timestamp()


def load_series(path: Path) -> Series:
    """Read a NAB CSV (header `timestamp,value`), dropping rows whose timestamp repeats the previous one.

    The first row of each run of equal timestamps is kept. Raises ValueError when a
    timestamp goes backwards, a value is not a finite number, or the header is wrong.
    """
    times: list[float] = []
    values: list[float] = []
    duplicates = 0
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != ["timestamp", "value"]:
            raise ValueError(f"{path.name}: header {header!r} is invalid; a NAB CSV starts with 'timestamp,value'")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise ValueError(f"{path.name} line {line}: {len(row)} fields; a NAB row has a timestamp and a value")
            t = parse_timestamp(row[0])
            try:
                x = float(row[1])
            except ValueError:
                raise ValueError(f"{path.name} line {line}: value {row[1]!r} is not a number") from None
            if not math.isfinite(x):
                raise ValueError(f"{path.name} line {line}: value {row[1]!r} is not finite")
            if times and t == times[-1]:
                duplicates += 1
                continue
            if times and t < times[-1]:
                raise ValueError(f"{path.name} line {line}: timestamp {row[0]!r} is earlier than the row before; "
                                 "sort the file by time")
            times.append(t)
            values.append(x)
    return Series(path.name, np.array(times), np.array(values), duplicates)


def _load_json_by_file(path: Path) -> dict:
    with path.open() as handle:
        return {Path(key).name: value for key, value in json.load(handle).items()}


def load_windows(folder: Path) -> dict[str, list[tuple[float, float]]]:
    """Return the labelled windows per CSV file name, as (start, end) in seconds."""
    return {name: [(parse_timestamp(start), parse_timestamp(end)) for start, end in pairs]
            for name, pairs in _load_json_by_file(folder / WINDOWS_FILE).items()}


def load_labels(folder: Path) -> dict[str, list[float]]:
    """Return the labelled anomaly times per CSV file name, or no labels when the file is absent."""
    path = folder / LABELS_FILE
    if not path.is_file():
        return {}
    return {name: [parse_timestamp(stamp) for stamp in stamps]
            for name, stamps in _load_json_by_file(path).items()}


def detect_changes(series: Series, parameters: MonitorParameters = NAB_PARAMETERS) -> list[ChangePoint]:
    """Return the alarms of one monitor run over the whole series."""
    monitor = parameters.monitor()
    alarms = []
    for t, x in zip(series.times.tolist(), series.values.tolist()):
        alarm = monitor.update(t, x)
        if alarm is not None:
            alarms.append(alarm)
    return alarms


def score_alarms(series: Series, windows: list[tuple[float, float]], labels: list[float],
                 alarms: list[ChangePoint]) -> FileScore:
    """Score alarms: the first alarm inside a window detects it, an alarm outside all windows is a false positive."""
    delays: list[float | None] = []
    label_offsets: list[float | None] = []
    for start, end in windows:
        inside = [alarm.t for alarm in alarms if start <= alarm.t <= end]
        window_labels = [label for label in labels if start <= label <= end]
        delays.append(inside[0] - start if inside else None)
        label_offsets.append(inside[0] - window_labels[0] if inside and window_labels else None)
    false_positives = sum(not any(start <= alarm.t <= end for start, end in windows) for alarm in alarms)
    return FileScore(series.name, int(series.times.size), series.duplicates_dropped, windows, labels, alarms,
                     delays, label_offsets, false_positives)


def evaluate_folder(folder: Path, parameters: MonitorParameters = NAB_PARAMETERS) -> list[FileScore]:
    """Run the monitor over every labelled CSV in `folder` and score it."""
    windows = load_windows(folder)
    labels = load_labels(folder)
    scores = []
    for name in sorted(windows):
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is labelled in {WINDOWS_FILE} but not found; copy the CSV or drop its label")
        series = load_series(path)
        alarms = detect_changes(series, parameters)
        scores.append(score_alarms(series, windows[name], labels.get(name, []), alarms))
    return scores


def _format_time(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def _format_hours(seconds: float | None, signed: bool = False) -> str:
    if seconds is None:
        return "missed"
    return f"{seconds / HOUR:+.1f} h" if signed else f"{seconds / HOUR:.1f} h"


def markdown_report(scores: list[FileScore]) -> str:
    """Return the summary table and the list of alarms per file, in markdown."""
    lines = [
        "| file | rows used | duplicates dropped | windows | windows detected | false positives "
        "| delay from window start | alarm minus label |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for score in scores:
        delays = ", ".join(_format_hours(d) for d in score.delays)
        offsets = ", ".join(_format_hours(d, signed=True) for d in score.label_offsets)
        lines.append(f"| {score.name} | {score.rows} | {score.duplicates_dropped} | {len(score.windows)} | "
                     f"{score.detected} | {score.false_positives} | {delays} | {offsets} |")
    lines.append(f"| all | {sum(s.rows for s in scores)} | {sum(s.duplicates_dropped for s in scores)} | "
                 f"{sum(len(s.windows) for s in scores)} | {sum(s.detected for s in scores)} | "
                 f"{sum(s.false_positives for s in scores)} | | |")
    lines.append("")
    for score in scores:
        lines.append(f"Alarms in {score.name}:")
        lines.append("")
        for alarm in score.alarms:
            inside = any(start <= alarm.t <= end for start, end in score.windows)
            where = "in a window" if inside else "false positive"
            lines.append(f"- {_format_time(alarm.t)} {alarm.direction}, {alarm.detector} "
                         f"({alarm.statistic:.1f}), {where}")
        if not score.alarms:
            lines.append("- none")
        lines.append("")
    return "\n".join(lines)


def sensitivity_report(folder: Path, base: MonitorParameters = NAB_PARAMETERS) -> str:
    """Return totals over all files for each parameter set in `SENSITIVITY_VARIANTS`, in markdown."""
    lines = ["| parameter set | windows detected | false positives |", "|---|---|---|"]
    for label, changes in SENSITIVITY_VARIANTS.items():
        scores = evaluate_folder(folder, replace(base, **changes))
        windows = sum(len(s.windows) for s in scores)
        lines.append(f"| {label} | {sum(s.detected for s in scores)} of {windows} | "
                     f"{sum(s.false_positives for s in scores)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.trend_validation",
                                     description="Score the trend change detectors on labelled NAB series.")
    parser.add_argument("folder", type=Path, help=f"folder with the NAB CSV files, {WINDOWS_FILE} and {LABELS_FILE}")
    parser.add_argument("--sensitivity", action="store_true",
                        help="also print totals for parameter sets next to the chosen one")
    args = parser.parse_args(argv)
    if not (args.folder / WINDOWS_FILE).is_file():
        parser.error(f"{args.folder / WINDOWS_FILE} not found; pass the folder that contains the NAB labels")
    print(f"Parameters: {NAB_PARAMETERS.describe()}.")
    print()
    print(markdown_report(evaluate_folder(args.folder)))
    if args.sensitivity:
        print(sensitivity_report(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
