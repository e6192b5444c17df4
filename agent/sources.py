"""Per-source pipelines: frame assembly, analysis and window aggregation.

Each source turns what its driver delivers into one summary per period. These classes
hold no sockets or ports themselves: the service feeds them and requests summaries.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import Any

import numpy as np

from .config import VibrationConfig
from .drivers.base import Frame, Reading
from .dsp import (
    DEFECTS,
    FrameAnalyzer,
    FrameFeatures,
    band_rms,
    defect_indicators,
    estimate_shaft_speed,
    select_envelope_band,
    severity_zone,
    spectral_peaks,
)
from .logutil import RateLimitedLog

log = logging.getLogger(__name__)

# Analysis frames waiting for a worker thread beyond this count are dropped (and counted),
# so a slow gateway falls behind by a bounded amount instead of growing memory.
MAX_PENDING_FRAMES = 16

# Frames whose envelope kurtosis decides an automatic envelope band.
BAND_SELECTION_FRAMES = 8

# A speed estimate whose running-speed peak is less prominent than this over the
# median of the search band is treated as unknown, and no defect is scored.
MIN_SPEED_PROMINENCE = 2.0


def vibration_metric_names(cfg: VibrationConfig) -> set[str]:
    """Return the feature names a vibration source's summaries carry (alarm rules use them)."""
    names = {"accel_rms", "accel_peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness",
             "velocity_rms_mm_s", "envelope_rms", "shaft_hz", "dsp_ms_per_frame", "bpfi_sideband_score",
             "shaft_speed_prominence", "sample_rate_hz", "frame_length"}
    for name in DEFECTS:
        names |= {f"{name}_hz", f"{name}_envelope", f"{name}_score"}
    for lo, hi in cfg.bands_hz:
        names.add(f"band_{lo:g}_{hi:g}_hz_rms")
    for i in range(1, cfg.peaks + 1):
        names |= {f"peak{i}_hz", f"peak{i}_amplitude"}
    return names


class VibrationSource:
    """Assemble analysis frames from a sensor's frame stream and aggregate their features.

    Frames of the configured channel are joined into analysis frames of `frame_length`
    samples that advance by `frame_length * (1 - overlap)`. A change of sample rate or
    scale restarts the assembly, because samples of two rates cannot share a frame.
    """

    kind = "vibration"

    def __init__(self, cfg: VibrationConfig) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.hop = max(1, int(round(cfg.frame_length * (1.0 - cfg.overlap))))
        self.analyzer: FrameAnalyzer | None = None
        self._sample_rate: float | None = None
        self._bands: list[tuple[float, float]] = []
        self._samples = np.empty(0)
        self._pending: deque[np.ndarray] = deque()
        self._wake = asyncio.Event()
        self._errors = RateLimitedLog(log)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.counters = {"frames": 0, "analysis_frames": 0, "analysis_dropped": 0,
                         "invalid_frames": 0, "stream_restarts": 0}
        self._window = _VibrationWindow()
        self.last_features: dict[str, Any] = {}
        # The last window's averaged spectra, for the diagnostics API (plain lists).
        self.latest_spectrum: dict[str, Any] | None = None

    def _error(self, level: int, key: str, msg: str, *args: object) -> None:
        """Log (rate-limited) and remember the error for the diagnostics."""
        self.last_error = msg % args
        self.last_error_at = time.time()
        self._errors.log(level, key, msg, *args)

    def add_frame(self, frame: Frame) -> None:
        """Take one received frame (call from the event loop thread)."""
        if self.cfg.channel >= frame.n_channels:
            self.counters["invalid_frames"] += 1
            self._error(logging.ERROR, "channel", "%s: configured channel %d is not in a %d-channel stream",
                             self.id, self.cfg.channel, frame.n_channels)
            return
        self.counters["frames"] += 1
        self._window.frames += 1
        if self._sample_rate != frame.sample_rate:
            self._start_stream(frame.sample_rate)
        if self._sample_rate is None:
            return
        chunk = frame.samples[:, self.cfg.channel].astype(np.float64) * frame.scale
        self._samples = np.concatenate((self._samples, chunk))
        n = self.cfg.frame_length
        while self._samples.size >= n:
            if len(self._pending) >= MAX_PENDING_FRAMES:
                self._pending.popleft()
                self.counters["analysis_dropped"] += 1
                self._window.dropped += 1
            self._pending.append(self._samples[:n].copy())
            self._samples = self._samples[self.hop:]
        if self._pending:
            self._wake.set()

    def _start_stream(self, sample_rate: float) -> None:
        if self._sample_rate is not None:
            self.counters["stream_restarts"] += 1
            log.warning("%s: sample rate changed from %g to %g Hz; restarting frame assembly",
                        self.id, self._sample_rate, sample_rate)
        self._samples = np.empty(0)
        self._pending.clear()
        self._window = _VibrationWindow()
        self.analyzer = None
        self._sample_rate = sample_rate
        nyquist = sample_rate / 2
        self._bands = [b for b in self.cfg.bands_hz if b[1] <= nyquist]
        for band in self.cfg.bands_hz:
            if band[1] > nyquist:
                log.error("%s: band %g-%g Hz lies above the Nyquist frequency of a %g Hz stream; "
                          "it is left out", self.id, band[0], band[1], sample_rate)
        if self.cfg.envelope_band_hz is not None:
            self._make_analyzer(self.cfg.envelope_band_hz)
        else:
            log.info("%s: choosing the envelope band from the first %d frames", self.id, BAND_SELECTION_FRAMES)

    def _make_analyzer(self, envelope_band: tuple[float, float]) -> None:
        assert self._sample_rate is not None
        sample_rate = self._sample_rate
        try:
            self.analyzer = FrameAnalyzer(sample_rate, self.cfg.frame_length,
                                          velocity_band=self.cfg.velocity_band_hz,
                                          envelope_band=envelope_band,
                                          input_unit=self.cfg.input_unit)
        except ValueError as exc:
            self.analyzer = None
            self._sample_rate = None
            self.counters["invalid_frames"] += 1
            self._error(logging.ERROR, "config", "%s: cannot analyse a %g Hz stream: %s", self.id, sample_rate, exc)
            return
        bin_hz = self.analyzer.bin_hz
        speed = self.cfg.shaft_hz if self.cfg.shaft_hz is not None else self.cfg.shaft_search_hz[0]
        bpfo_hz = self.cfg.orders.bpfo * speed
        if bin_hz > 0.05 * bpfo_hz:
            log.warning("%s: frame_length %d gives %.2f Hz bins at %g Hz, too coarse to separate bearing "
                        "defect frequencies near %.1f Hz; use a longer frame", self.id,
                        self.cfg.frame_length, bin_hz, sample_rate, bpfo_hz)

    async def run_analysis(self, stop: asyncio.Event) -> None:
        """Analyse pending frames in a worker thread until `stop` is set."""
        while not stop.is_set():
            waiting_for_band = self.analyzer is None and len(self._pending) < BAND_SELECTION_FRAMES
            if not self._pending or waiting_for_band:
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    # Reap both helpers, so none is left pending when the loop closes.
                    waiter.cancel()
                    stopper.cancel()
                    await asyncio.gather(waiter, stopper, return_exceptions=True)
                continue
            await self.analyse_pending()

    async def _choose_envelope_band(self) -> None:
        frames = np.stack(list(self._pending)[:BAND_SELECTION_FRAMES])
        rate = self._sample_rate
        try:
            band, prominence = await asyncio.to_thread(select_envelope_band, frames, rate)
        except ValueError as exc:
            self._pending.popleft()
            self.counters["invalid_frames"] += 1
            self._error(logging.WARNING, "band", "%s: envelope band selection failed: %s", self.id, exc)
            return
        if rate != self._sample_rate:
            return  # the stream restarted while the band was being chosen
        log.info("%s: envelope band %.0f-%.0f Hz chosen (envelope line prominence %.1f)",
                 self.id, band[0], band[1], prominence)
        self._make_analyzer(band)

    async def analyse_pending(self) -> None:
        """Analyse every frame waiting now (also used to finish the last window at stop)."""
        if (self.analyzer is None and self._sample_rate is not None
                and len(self._pending) >= BAND_SELECTION_FRAMES):
            await self._choose_envelope_band()
        while self._pending and self.analyzer is not None:
            x = self._pending.popleft()
            analyzer = self.analyzer
            started = time.perf_counter()
            try:
                features = await asyncio.to_thread(analyzer.analyse, x)
            except ValueError as exc:
                self.counters["invalid_frames"] += 1
                self._window.invalid += 1
                self._error(logging.WARNING, "analyse", "%s: analysis frame rejected: %s", self.id, exc)
                continue
            self._window.add(features, time.perf_counter() - started)
            self.counters["analysis_frames"] += 1

    def take_summary(self, driver_counters: dict[str, int] | None) -> tuple[dict, dict, list]:
        """Return (features, quality, alarms) of the window so far and start a new window."""
        window, self._window = self._window, _VibrationWindow()
        quality: dict[str, Any] = {
            "frames": window.frames,
            "analysis_frames": window.n,
            "analysis_dropped": window.dropped,
            "invalid_frames": window.invalid,
        }
        if driver_counters:
            quality.update(driver_counters)
        if window.n == 0 or self.analyzer is None:
            return {}, quality, []

        cfg = self.cfg
        analyzer = self.analyzer
        velocity = math.sqrt(window.velocity_sq / window.n)
        zone = severity_zone(velocity, cfg.zone_limits_mm_s)
        spectrum = np.sqrt(window.spectrum_power / window.n)
        envelope = np.sqrt(window.envelope_power / window.n)
        features: dict[str, Any] = {
            "unit": cfg.input_unit,
            "sample_rate_hz": analyzer.sample_rate,
            "frame_length": cfg.frame_length,
            "accel_rms": math.sqrt(window.rms_sq / window.n),
            "accel_peak": window.peak,
            "peak_to_peak": window.peak_to_peak,
            "crest_factor": window.crest / window.n,
            "kurtosis": window.kurtosis / window.n,
            "skewness": window.skewness / window.n,
            "velocity_rms_mm_s": velocity,
            "velocity_band_low_hz": analyzer.velocity_band[0],
            "velocity_band_high_hz": analyzer.velocity_band[1],
            "severity_zone": zone,
            "envelope_rms": math.sqrt(window.envelope_rms_sq / window.n),
            "envelope_band_low_hz": analyzer.envelope_band[0],
            "envelope_band_high_hz": analyzer.envelope_band[1],
            "dsp_ms_per_frame": 1000.0 * window.dsp_seconds / window.n,
        }
        for i, (lo, hi) in enumerate(self._bands):
            features[f"band_{lo:g}_{hi:g}_hz_rms"] = float(band_rms(spectrum, analyzer.bin_hz, [[lo, hi]])[0])
        if cfg.peaks:
            for i, (freq, amp) in enumerate(spectral_peaks(spectrum, analyzer.bin_hz, cfg.peaks)):
                features[f"peak{i + 1}_hz"] = freq
                features[f"peak{i + 1}_amplitude"] = amp

        shaft_hz = cfg.shaft_hz
        if shaft_hz is None:
            try:
                shaft_hz, prominence = estimate_shaft_speed(spectrum, analyzer.bin_hz, cfg.shaft_search_hz,
                                                            cfg.shaft_harmonics)
            except ValueError as exc:
                self._error(logging.ERROR, "speed", "%s: shaft speed estimation failed: %s", self.id, exc)
                shaft_hz, prominence = None, 0.0
            features["shaft_speed_prominence"] = prominence
            if prominence < MIN_SPEED_PROMINENCE:
                shaft_hz = None
                quality["shaft_speed_unknown"] = True
            features["shaft_speed_estimated"] = True
        features["shaft_hz"] = shaft_hz

        indicators = None
        if shaft_hz is not None:
            try:
                indicators = defect_indicators(envelope, analyzer.bin_hz, shaft_hz, cfg.orders,
                                               harmonics=cfg.defect_harmonics, tolerance=cfg.defect_tolerance,
                                               threshold=cfg.defect_threshold)
            except ValueError as exc:
                self._error(logging.ERROR, "defects", "%s: defect scoring failed: %s", self.id, exc)
        features["dominant_defect"] = indicators.dominant if indicators else None
        for name in DEFECTS:
            features[f"{name}_hz"] = indicators.frequencies_hz[name] if indicators else None
            features[f"{name}_envelope"] = indicators.amplitudes[name] if indicators else None
            features[f"{name}_score"] = indicators.scores[name] if indicators else None
        features["bpfi_sideband_score"] = indicators.bpfi_sideband_score if indicators else None

        nonfinite = [name for name, value in features.items() if isinstance(value, float) and not math.isfinite(value)]
        for name in nonfinite:
            features[name] = None
        if nonfinite:
            quality["nonfinite_features"] = len(nonfinite)
            self._error(logging.ERROR, "nonfinite", "%s: non-finite features left out of the summary: %s",
                             self.id, ", ".join(nonfinite))

        self.latest_spectrum = {
            "source": self.id,
            "unit": cfg.input_unit,
            "bin_hz": analyzer.bin_hz,
            "spectrum": spectrum.tolist(),
            "envelope_spectrum": envelope.tolist(),
            "envelope_band_hz": list(analyzer.envelope_band),
            "shaft_hz": shaft_hz,
            "defect_hz": dict(indicators.frequencies_hz) if indicators else {},
            "dominant_defect": indicators.dominant if indicators else None,
            "velocity_rms_mm_s": velocity,
            "severity_zone": zone,
        }
        alarms = []
        if zone in ("C", "D"):
            limit = cfg.zone_limits_mm_s[1] if zone == "C" else cfg.zone_limits_mm_s[2]
            alarms.append({
                "name": "vibration_severity",
                "grade": "general" if zone == "C" else "severe",
                "value": velocity, "limit": limit,
                "message": f"velocity RMS {velocity:.2f} mm/s is in zone {zone}",
            })
        if indicators is not None and indicators.dominant is not None:
            name = indicators.dominant
            alarms.append({
                "name": f"bearing_{name}",
                "grade": "general",
                "value": indicators.scores[name], "limit": cfg.defect_threshold,
                "message": (f"{name.upper()} at {indicators.frequencies_hz[name]:.1f} Hz stands "
                            f"{indicators.scores[name]:.1f}x above the envelope noise floor"),
            })
        self.last_features = features
        return features, quality, alarms


class _VibrationWindow:
    """Running sums over the analysis frames of one summary window."""

    def __init__(self) -> None:
        self.n = 0
        self.frames = 0
        self.dropped = 0
        self.invalid = 0
        self.rms_sq = 0.0
        self.velocity_sq = 0.0
        self.envelope_rms_sq = 0.0
        self.peak = 0.0
        self.peak_to_peak = 0.0
        self.crest = 0.0
        self.kurtosis = 0.0
        self.skewness = 0.0
        self.dsp_seconds = 0.0
        # Sums of squared amplitude spectra: their mean over overlapping frames is Welch's
        # averaged spectrum, steadier than any single frame's.
        self.envelope_power: np.ndarray | float = 0.0
        self.spectrum_power: np.ndarray | float = 0.0

    def add(self, f: FrameFeatures, seconds: float) -> None:
        self.n += 1
        self.rms_sq += f.rms * f.rms
        self.velocity_sq += f.velocity_rms_mm_s * f.velocity_rms_mm_s
        self.envelope_rms_sq += f.envelope_rms * f.envelope_rms
        self.peak = max(self.peak, f.peak)
        self.peak_to_peak = max(self.peak_to_peak, f.peak_to_peak)
        self.crest += f.crest_factor
        self.kurtosis += f.kurtosis
        self.skewness += f.skewness
        self.dsp_seconds += seconds
        self.envelope_power = self.envelope_power + f.envelope_spectrum * f.envelope_spectrum
        self.spectrum_power = self.spectrum_power + f.spectrum * f.spectrum


class PointsSource:
    """Aggregate polled values per point over one summary window: last, min, max, mean."""

    kind = "points"

    def __init__(self, source_id: str) -> None:
        self.id = source_id
        self._points: dict[str, dict[str, Any]] = {}
        self._polls = 0
        self._errors = 0
        self.last_values: dict[str, Any] = {}

    def add_readings(self, readings: list[Reading]) -> None:
        self._polls += 1
        for r in readings:
            if r.quality != "good":
                continue
            value = r.value
            p = self._points.get(r.point)
            if isinstance(value, str):
                self._points[r.point] = {"last": value, "unit": r.unit, "n": (p or {}).get("n", 0) + 1}
                continue
            value = float(value)
            if not math.isfinite(value):
                continue
            if p is None or "sum" not in p:
                p = {"last": value, "min": value, "max": value, "sum": 0.0, "unit": r.unit, "n": 0}
                self._points[r.point] = p
            p["last"] = value
            p["min"] = min(p["min"], value)
            p["max"] = max(p["max"], value)
            p["sum"] += value
            p["n"] += 1
            self.last_values[r.point] = value

    def add_error(self) -> None:
        self._errors += 1

    def take_summary(self, driver_counters: dict[str, int] | None) -> tuple[dict, dict, list]:
        points, self._points = self._points, {}
        quality: dict[str, Any] = {"polls": self._polls, "poll_errors": self._errors}
        self._polls = 0
        self._errors = 0
        if driver_counters:
            quality.update(driver_counters)
        features: dict[str, Any] = {}
        for name, p in points.items():
            entry = {"last": p["last"], "unit": p["unit"], "n": p["n"]}
            if "sum" in p:
                entry.update(min=p["min"], max=p["max"], mean=p["sum"] / p["n"])
            features[name] = entry
        return features, quality, []
