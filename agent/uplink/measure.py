"""Measurements of the uplink recorded in docs/uplink.md: summary size and buffer write load.

Run `python -m agent.uplink.measure [--dir DIR]`. It prints two Markdown tables:

- bytes per channel-minute of a vibration summary and of a points summary, as msgpack,
  as JSON and as the raw samples they summarise;
- bytes written to the disk per hour by the buffer at the demo load (3 sources, one
  summary each per 10 s period), read from /proc/self/io `write_bytes` and counted from
  WAL growth. The hour is simulated: appends run back to back, so only the bytes count;
- the largest WAL and total file sizes relative to the disk budget, sampled just before
  every checkpoint, when the WAL is at its largest.

The summaries have the feature and quality keys that agent.sources produces for the demo
configuration (examples/demo.toml), with plausible values.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.uplink.buffer import SummaryBuffer
from agent.uplink.clock import ClockStatus
from agent.uplink.schema import SCHEMA_VERSION, encode_summary

PERIOD_S = 10.0
SAMPLE_RATE_HZ = 25_600
# Points of the two demo Modbus profiles: (name, unit).
CPA_POINTS = [
    ("operating_state", ""), ("running", ""), ("warning", ""), ("alarm", ""),
    ("coolant_in_temperature", "degC"), ("coolant_out_temperature", "degC"), ("oil_temperature", "degC"),
    ("helium_temperature", "degC"), ("low_pressure", "psi"), ("low_pressure_average", "psi"),
    ("high_pressure", "psi"), ("high_pressure_average", "psi"), ("delta_pressure_average", "psi"),
    ("motor_current", "A"), ("hours", "h"), ("pressure_scale", ""), ("temperature_scale", ""),
]  # fmt: skip
SDM630_POINTS = [
    ("voltage_l1", "V"), ("voltage_l2", "V"), ("voltage_l3", "V"), ("current_l1", "A"), ("current_l2", "A"),
    ("current_l3", "A"), ("total_power", "W"), ("total_power_factor", ""), ("frequency", "Hz"),
    ("import_energy", "kWh"), ("total_energy", "kWh"),
]  # fmt: skip


def vibration_summary(index: int, *, gateway: str = "demo-gateway", alarm: bool = True, seed: int = 0) -> dict[str, Any]:
    """Return a vibration summary of one 10 s window with the demo's features (5 spectral peaks, 4 defects)."""
    rng = random.Random(seed * 1_000_003 + index)
    features: dict[str, Any] = {
        "unit": "g",
        "sample_rate_hz": float(SAMPLE_RATE_HZ),
        "frame_length": 8192,
        "accel_rms": rng.uniform(0.1, 0.2),
        "accel_peak": rng.uniform(0.8, 1.1),
        "peak_to_peak": rng.uniform(1.5, 2.0),
        "crest_factor": rng.uniform(5.0, 7.0),
        "kurtosis": rng.uniform(6.0, 9.0),
        "skewness": rng.uniform(0.4, 0.8),
        "velocity_rms_mm_s": rng.uniform(2.0, 3.0),
        "velocity_band_low_hz": 10.0,
        "velocity_band_high_hz": 1000.0,
        "severity_zone": "B",
        "envelope_rms": rng.uniform(0.1, 0.13),
        "envelope_band_low_hz": 2166.666666666667,
        "envelope_band_high_hz": 5500.0,
        "dsp_ms_per_frame": rng.uniform(0.7, 1.0),
    }

    for peak in range(1, 6):
        features[f"peak{peak}_hz"] = rng.uniform(20.0, 4000.0)
        features[f"peak{peak}_amplitude"] = rng.uniform(0.01, 0.07)
    features["shaft_hz"] = 29.95
    features["dominant_defect"] = "bpfi" if alarm else None
    for defect in ("bpfo", "bpfi", "bsf", "ftf"):
        features[f"{defect}_hz"] = rng.uniform(10.0, 170.0)
        features[f"{defect}_envelope"] = rng.uniform(0.002, 0.09)
        features[f"{defect}_score"] = rng.uniform(1.0, 25.0)
    features["bpfi_sideband_score"] = rng.uniform(5.0, 10.0)

    quality = {
        "frames": 1122, "analysis_frames": 69, "analysis_dropped": 0, "invalid_frames": 0, "bad_crc": 0,
        "bad_header": 0, "missing_frames": 0, "restarts": 0, "bytes_discarded": 0, "resyncs": 0,
        "overflow_frames": 0, "reopens": 0, "read_errors": 0, "open_failures": 0, "callback_errors": 0,
    }  # fmt: skip
    alarms = []
    if alarm:
        score = features["bpfi_score"]
        alarms.append({
            "name": "bearing_bpfi", "grade": "general", "value": score, "limit": 4.0,
            "message": f"BPFI at {features['bpfi_hz']:.1f} Hz stands {score:.1f}x above the envelope noise floor",
        })  # fmt: skip
    return _envelope(gateway, "compressor-motor", "vibration", index, features, quality, alarms)


def points_summary(
    index: int, *, source: str = "compressor", points: list[tuple[str, str]] | None = None, gateway: str = "demo-gateway"
) -> dict[str, Any]:
    """Return a points summary of one 10 s window: last, min, max, mean, unit and n of each point, polled at 1 s."""
    rng = random.Random(zlib.crc32(source.encode()) * 1_000_003 + index)
    if points is not None:
        chosen = points
    elif source == "compressor":
        chosen = CPA_POINTS
    else:
        chosen = SDM630_POINTS
    features: dict[str, Any] = {}
    for name, unit in chosen:
        base = rng.uniform(0.0, 300.0)
        spread = rng.uniform(0.0, 1.0)
        features[name] = {
            "last": base, "unit": unit, "n": int(PERIOD_S),
            "min": base - spread, "max": base + spread, "mean": base + rng.uniform(-spread, spread),
        }  # fmt: skip
    quality = {"polls": 10, "poll_errors": 0, "requests": 10, "errors": 0, "timeouts": 0, "connect_failures": 0, "reconnects": 0}
    return _envelope(gateway, source, "points", index, features, quality, [])


def demo_period(index: int, *, alarm: bool = True) -> list[dict[str, Any]]:
    """Return the three summaries the demo service writes at the end of one period."""
    return [
        vibration_summary(index, alarm=alarm),
        points_summary(index, source="compressor"),
        points_summary(index, source="power"),
    ]


def _envelope(gateway: str, source: str, kind: str, index: int, features: dict, quality: dict, alarms: list) -> dict[str, Any]:
    t_end = 1_796_400_000.0 + PERIOD_S * (index + 1)
    return {
        "v": SCHEMA_VERSION,
        "gateway": gateway,
        "source": source,
        "seq": index + 1,
        "kind": kind,
        "t_start": t_end - PERIOD_S,
        "t_end": t_end,
        "duration_s": PERIOD_S,
        "features": features,
        "quality": quality,
        "alarms": alarms,
    }


# -- compactness ---------------------------------------------------------------------


@dataclass(frozen=True)
class SizeRow:
    label: str
    channels: int
    msgpack_bytes_per_channel_minute: float
    json_bytes_per_channel_minute: float
    raw_bytes_per_channel_minute: float


def compactness() -> list[SizeRow]:
    """Return the bytes per channel-minute of summaries (msgpack, JSON) and of the raw samples.

    A vibration summary covers one accelerometer channel sampled at 25.6 kHz as int16. A
    points summary covers its points, each one float32 per 1 s poll; its figures are per point.
    """
    per_minute = 60.0 / PERIOD_S
    rows = []
    vibration = [vibration_summary(i, alarm=True) for i in range(6)]
    rows.append(_size_row("vibration (1 accelerometer channel)", vibration, 1, SAMPLE_RATE_HZ * 2 * 60.0, per_minute))
    for source, points in (("compressor", CPA_POINTS), ("power", SDM630_POINTS)):
        summaries = [points_summary(i, source=source) for i in range(6)]
        rows.append(_size_row(f"points, {source} ({len(points)} points)", summaries, len(points), 4 * 60.0, per_minute))
    return rows


def _size_row(label: str, summaries: list[dict], channels: int, raw_per_channel_minute: float, per_minute: float) -> SizeRow:
    packed = sum(len(encode_summary(s)) for s in summaries) / len(summaries)
    as_json = sum(len(json.dumps(s, separators=(",", ":")).encode()) for s in summaries) / len(summaries)
    return SizeRow(label, channels, packed * per_minute / channels, as_json * per_minute / channels, raw_per_channel_minute)


# -- write load ----------------------------------------------------------------------


class _FixedClock:
    """Clock with a fixed synchronisation state, so the measurement does not depend on the host's NTP."""

    def __init__(self, status: ClockStatus) -> None:
        self._status = status
        self.boot_id = "measure"

    def status(self) -> ClockStatus:
        return self._status

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class WriteRow:
    mode: str
    clock: str
    process_write_bytes: int
    wal_bytes: int
    commits: int


def write_load(
    directory: Path, *, mode: str, clock: ClockStatus, periods: int = 360, ack_every: int = 6, batched: bool = True
) -> WriteRow:
    """Append `periods` demo periods (360 = one hour) and release them as an uplink would.

    With `batched`, the three summaries of a period go in one append_many transaction.
    Without it, each summary gets its own append transaction.

    mode "push": release after every period, as the uploader does when the collector is up.
    mode "pull": release every `ack_every` periods, as a poller acknowledging once a minute.
    mode "outage": never release (collector down).
    """
    path = directory / f"write-load-{mode}-{clock.value}.sqlite"
    for suffix in ("", "-wal", "-shm", ".seq"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    buffer = SummaryBuffer(path, synchronous="FULL", clock=_FixedClock(clock), budget_bytes=64 * 2**20)
    wal = Path(f"{path}-wal")
    wal_bytes = 0
    commits = 0
    before = _process_write_bytes()
    try:
        for period in range(periods):
            size = wal.stat().st_size if wal.exists() else 0
            summaries = demo_period(period, alarm=period % 2 == 0)
            if batched:
                seqs = [seq for seq, _ in buffer.append_many(summaries)]
                commits += 1
            else:
                seqs = [buffer.append(item)[0] for item in summaries]
                commits += len(summaries)
            grown = (wal.stat().st_size if wal.exists() else 0) - size
            wal_bytes += max(grown, 0)
            if mode == "push" or (mode == "pull" and (period + 1) % ack_every == 0):
                size = wal.stat().st_size if wal.exists() else 0
                buffer.release_upto(seqs[-1])
                commits += 1
                grown = (wal.stat().st_size if wal.exists() else 0) - size
                wal_bytes += max(grown, 0)
    finally:
        buffer.close()
    after = _process_write_bytes()
    written = -1 if before is None or after is None else after - before
    return WriteRow(mode if batched else f"{mode}, one append per summary", clock.value, written, wal_bytes, commits)


@dataclass(frozen=True)
class PeakRow:
    budget_bytes: int
    wal_limit_bytes: int
    peak_wal_bytes: int
    peak_total_bytes: int
    evicted: int


def budget_peaks(directory: Path, budget_bytes: int) -> PeakRow:
    """Fill a buffer with twice its budget of demo summaries, then quarantine, requeue and release.

    Sizes are taken from the files on disk just before each checkpoint and after each call.
    """
    path = directory / f"peaks-{budget_bytes}.sqlite"
    peaks = {"wal": 0, "total": 0}

    class MeasuredBuffer(SummaryBuffer):
        def _checkpoint(self) -> None:
            peaks["wal"] = max(peaks["wal"], self._wal_size())
            peaks["total"] = max(peaks["total"], self._disk_usage())
            super()._checkpoint()

    buffer = MeasuredBuffer(path, synchronous="NORMAL", clock=_FixedClock(ClockStatus.UNSYNCED), budget_bytes=budget_bytes)
    try:
        last = 0
        for period in range(2 * budget_bytes // 4000):
            last = buffer.append_many(demo_period(period, alarm=period % 3 == 0))[-1][0]
            peaks["total"] = max(peaks["total"], buffer.disk_usage())
        buffer.quarantine([seq for seq, _ in buffer.pending(50)], status=400, reason="measurement")
        buffer.requeue_quarantined()
        buffer.release_upto(last)
        peaks["total"] = max(peaks["total"], buffer.disk_usage())
        evicted = sum(value for name, value in buffer.counters().items() if name.startswith("evicted_"))
        wal_limit = buffer._limits.wal_limit
    finally:
        buffer.close()
    return PeakRow(budget_bytes, wal_limit, peaks["wal"], peaks["total"], evicted)


def _process_write_bytes() -> int | None:
    try:
        with open("/proc/self/io", encoding="ascii") as file:
            for line in file:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure summary sizes and buffer write load for docs/uplink.md.")
    parser.add_argument("--dir", default=None, help="directory for the buffer files (default: a new temporary directory)")
    args = parser.parse_args(argv)
    # The eviction warnings of the budget measurement are expected.
    logging.basicConfig(level=logging.ERROR)

    print("| summary | msgpack B/channel-min | JSON B/channel-min | raw B/channel-min | raw / msgpack |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in compactness():
        ratio = row.raw_bytes_per_channel_minute / row.msgpack_bytes_per_channel_minute
        print(
            f"| {row.label} | {row.msgpack_bytes_per_channel_minute:,.0f} | {row.json_bytes_per_channel_minute:,.0f} "
            f"| {row.raw_bytes_per_channel_minute:,.0f} | {ratio:.2f} |"
        )
    print()

    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="uplink-measure-"))
    try:
        print("| release pattern | clock | write_bytes per hour | WAL bytes per hour | commits per hour |")
        print("| --- | --- | ---: | ---: | ---: |")
        for mode, clock, batched in (
            ("push", ClockStatus.SYNCED, True),
            ("push", ClockStatus.SYNCED, False),
            ("pull", ClockStatus.SYNCED, True),
            ("outage", ClockStatus.SYNCED, True),
            ("push", ClockStatus.UNSYNCED, True),
        ):
            row = write_load(directory, mode=mode, clock=clock, batched=batched)
            written = "n/a" if row.process_write_bytes < 0 else f"{row.process_write_bytes / 1e6:.2f} MB"
            print(f"| {row.mode} | {row.clock} | {written} | {row.wal_bytes / 1e6:.2f} MB | {row.commits} |")
        print()

        print("| budget | WAL share | peak WAL / share | peak files / budget | evicted |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for budget in (2**20, 4 * 2**20, 32 * 2**20):
            peak = budget_peaks(directory, budget)
            print(
                f"| {budget // 2**20} MiB | {peak.wal_limit_bytes // 1024} KiB | {peak.peak_wal_bytes / peak.wal_limit_bytes:.2f} "
                f"| {peak.peak_total_bytes / budget:.3f} | {peak.evicted} |"
            )
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

