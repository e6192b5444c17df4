"""The agent service: wires drivers, analysis, the summary buffer and the uplink.

Phases: setup (open the buffer, compile the DSP kernels, start drivers), run (analyse,
poll, emit one summary per source per period, upload), stop (stop drivers, emit the
last partial window, drain the uplink within its deadline, close the buffer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .config import AgentConfig, VibrationConfig
from .drivers.base import Frame
from .drivers.modbus import ModbusTcpDriver
from .drivers.vibration_serial import SerialFrameReader
from .dsp import warmup as dsp_warmup
from .logutil import RateLimitedLog
from .sources import PointsSource, VibrationSource
from .uplink.buffer import SummaryBuffer
from .uplink.push import Uploader
from .uplink.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)

SummaryCallback = Callable[[dict[str, Any]], None]


class Agent:
    """One running agent built from a validated configuration."""

    def __init__(self, config: AgentConfig, on_summary: SummaryCallback | None = None) -> None:
        self.config = config
        self.on_summary = on_summary
        self.stop_event = asyncio.Event()
        self.buffer: SummaryBuffer | None = None
        self.uploader: Uploader | None = None
        self.vibration: list[tuple[VibrationSource, SerialFrameReader]] = []
        self.points: list[tuple[PointsSource, ModbusTcpDriver]] = []
        self._tasks: list[asyncio.Task] = []
        self._window_start_wall = time.time()
        self._window_start_mono = time.monotonic()
        self._last_driver_counters: dict[str, dict[str, int]] = {}
        self.summaries_written = 0

    async def run(self, duration_s: float | None = None) -> None:
        """Run until `stop()` is called or `duration_s` has passed, then stop cleanly."""
        await self._setup()
        try:
            self._start_tasks()
            if duration_s is None:
                await self.stop_event.wait()
            else:
                try:
                    await asyncio.wait_for(self.stop_event.wait(), timeout=duration_s)
                except TimeoutError:
                    pass
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    # -- setup -----------------------------------------------------------------------

    async def _setup(self) -> None:
        cfg = self.config
        cfg.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        self.buffer = SummaryBuffer(cfg.buffer_path, synchronous=cfg.buffer_synchronous)
        log.info("buffer %s open with %d undelivered summaries", cfg.buffer_path, self.buffer.depth())
        if cfg.uplink.url:
            u = cfg.uplink
            self.uploader = Uploader(self.buffer, u.url, gateway=cfg.gateway_id, batch_size=u.batch_size,
                                     timeout_s=u.timeout_s, backoff_initial_s=u.backoff_initial_s,
                                     backoff_max_s=u.backoff_max_s)
        else:
            log.warning("no uplink url configured; summaries stay in the buffer")

        started = time.perf_counter()
        await asyncio.to_thread(dsp_warmup)
        log.info("analysis kernels ready in %.2f s", time.perf_counter() - started)

        loop = asyncio.get_running_loop()
        for vcfg in cfg.vibration:
            source = VibrationSource(vcfg)
            reader = SerialFrameReader(vcfg.id, vcfg.port, baudrate=vcfg.baudrate,
                                       on_frame=self._frame_callback(loop, source))
            self.vibration.append((source, reader))
        for mcfg in cfg.modbus:
            self.points.append((PointsSource(mcfg.id), ModbusTcpDriver(mcfg)))

    @staticmethod
    def _frame_callback(loop: asyncio.AbstractEventLoop, source: VibrationSource) -> Callable[[Frame], None]:
        def on_frame(frame: Frame) -> None:
            # Called in the reader's thread: hand the frame to the event loop thread.
            try:
                loop.call_soon_threadsafe(source.add_frame, frame)
            except RuntimeError:
                pass  # the loop closed during shutdown; the frame is outside every window
        return on_frame

    def _start_tasks(self) -> None:
        self._window_start_wall = time.time()
        self._window_start_mono = time.monotonic()
        for source, reader in self.vibration:
            reader.start()
            self._tasks.append(asyncio.create_task(source.run_analysis(self.stop_event), name=f"analyse:{source.id}"))
        for source, driver in self.points:
            self._tasks.append(asyncio.create_task(self._poll_loop(source, driver), name=f"poll:{source.id}"))
        self._tasks.append(asyncio.create_task(self._summary_loop(), name="summaries"))
        if self.uploader is not None:
            self._tasks.append(asyncio.create_task(self.uploader.run(self.stop_event), name="uplink"))
        log.info("agent %s running: %d vibration and %d modbus sources, summary every %g s",
                 self.config.gateway_id, len(self.vibration), len(self.points), self.config.summary_period_s)

    # -- run -------------------------------------------------------------------------

    async def _poll_loop(self, source: PointsSource, driver: ModbusTcpDriver) -> None:
        errors = RateLimitedLog(log)
        interval = driver.config.poll_interval_s
        # open() returns False while the device is down; later polls keep reconnecting.
        if not await driver.open():
            log.warning("%s: device not reachable at start; retrying with backoff", source.id)
        next_poll = time.monotonic()
        while not self.stop_event.is_set():
            try:
                readings = await driver.poll()
            except Exception as exc:  # noqa: BLE001 - one device's failure must not stop the agent
                source.add_error()
                errors.log(logging.WARNING, "poll", "%s: poll failed: %s", source.id, exc)
            else:
                source.add_readings(readings)
                if any(r.quality != "good" for r in readings):
                    source.add_error()
            next_poll += interval
            delay = next_poll - time.monotonic()
            if delay < 0:
                next_poll = time.monotonic()
                delay = 0
            try:
                await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def _summary_loop(self) -> None:
        period = self.config.summary_period_s
        next_emit = self._window_start_mono + period
        while not self.stop_event.is_set():
            delay = max(0.0, next_emit - time.monotonic())
            try:
                await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
                return
            except TimeoutError:
                pass
            self.emit_summaries(partial=False)
            next_emit += period

    def emit_summaries(self, *, partial: bool) -> None:
        """Close the current window: write one summary per source to the buffer."""
        now_wall = time.time()
        now_mono = time.monotonic()
        duration = now_mono - self._window_start_mono
        t_start = now_wall - duration
        sources: list[tuple[Any, dict[str, int] | None]] = []
        sources += [(s, self._counter_delta(s.id, r.counters)) for s, r in self.vibration]
        sources += [(s, self._counter_delta(s.id, d.counters)) for s, d in self.points]
        for source, counters in sources:
            features, quality, alarms = source.take_summary(counters)
            if partial:
                quality["partial_window"] = True
            summary = {
                "v": SCHEMA_VERSION,
                "gateway": self.config.gateway_id,
                "source": source.id,
                "kind": source.kind,
                "t_start": t_start,
                "t_end": now_wall,
                "duration_s": duration,
                "features": features,
                "quality": quality,
                "alarms": alarms,
            }
            assert self.buffer is not None
            self.buffer.append(summary)
            self.summaries_written += 1
            if self.on_summary is not None:
                self.on_summary(summary)
        if self.uploader is not None:
            self.uploader.notify()
        self._window_start_mono = now_mono

    def _counter_delta(self, key: str, counters: dict[str, Any]) -> dict[str, int]:
        """Return how much each integer driver counter grew since the last summary."""
        current = {k: v for k, v in dict(counters).items() if isinstance(v, int) and not isinstance(v, bool)}
        previous = self._last_driver_counters.get(key, {})
        self._last_driver_counters[key] = current
        return {k: v - previous.get(k, 0) for k, v in current.items()}

    # -- stop ------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.stop_event.set()
        for _, reader in self.vibration:
            await asyncio.to_thread(reader.stop)
        for source, _ in self.vibration:
            await source.analyse_pending()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, driver in self.points:
            try:
                await asyncio.wait_for(driver.close(), timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - closing must go on for the others
                log.warning("closing %s failed: %s", driver.config.id, exc)

        if self.buffer is not None and (self.vibration or self.points):
            self.emit_summaries(partial=True)
        if self.uploader is not None:
            timeout = self.config.uplink.drain_timeout_s
            delivered = await self.uploader.drain(timeout)
            if not delivered:
                log.warning("uplink not drained within %g s; %d summaries stay buffered for the next start",
                            timeout, self.buffer.depth() if self.buffer else -1)
            await self.uploader.aclose()
        if self.buffer is not None:
            log.info("stopping with %d undelivered summaries in the buffer", self.buffer.depth())
            self.buffer.close()
        log.info("agent stopped after writing %d summaries", self.summaries_written)
