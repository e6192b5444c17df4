"""The agent service: wires drivers, analysis, the summary buffer and the uplink.

The agent runs in three phases:

- setup: open the buffer, compile the DSP kernels, start the local API;
- run: sources under supervision, one summary per source per period, upload, watchdog;
- stop: stop drivers, write the last partial window, drain the uplink within its
  deadline, close the buffer.

A reload (SIGHUP) swaps the sources and keeps the buffer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .alarms import AlarmEngine
from .config import AgentConfig, load_config
from .config_errors import ConfigError
from .drivers.base import Frame
from .drivers.modbus import make_modbus_driver
from .drivers.sumitomo_f70 import F70Driver
from .drivers.vibration_serial import SerialFrameReader
from .kpi import KpiTracker
from .state_store import StateStore
from .dsp import warmup as dsp_warmup
from .logutil import RateLimitedLog
from .sources import PointsSource, VibrationSource
from .systemd import Notifier
from .uplink.buffer import SummaryBuffer
from .uplink.clock import ClockMonitor
from .uplink.push import Uploader
from .uplink.schema import SCHEMA_VERSION, SchemaError

log = logging.getLogger(__name__)

SummaryCallback = Callable[[dict[str, Any]], None]

# Restart delays of a failed source task: doubling from the first to the last, with
# +-20 % jitter so that devices that failed together do not retry together.
RESTART_BACKOFF_S = (1.0, 60.0)

# Test hook: when set, the event loop blocks for this many seconds once, shortly after
# start, so tests can show that a stuck loop stops feeding the systemd watchdog.
STALL_ENV = "EDGE_AGENT_TEST_STALL_S"


@dataclass
class SourceState:
    """Supervision and diagnostics record of one source."""

    id: str
    kind: str
    source: Any
    driver: Any
    tasks: list[asyncio.Task] = field(default_factory=list)
    kpi: KpiTracker | None = None
    builtin_alarms: dict[str, dict[str, Any]] = field(default_factory=dict)
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_summary: dict[str, Any] | None = None


class Agent:
    """One running agent built from a validated configuration."""

    def __init__(self, config: AgentConfig, on_summary: SummaryCallback | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.on_summary = on_summary
        self.notifier = notifier or Notifier()
        self.stop_event = asyncio.Event()
        self.buffer: SummaryBuffer | None = None
        self.uploader: Uploader | None = None
        self.sources: dict[str, SourceState] = {}
        self._sources_stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._uplink_task: asyncio.Task | None = None
        self._window_start_mono = time.monotonic()
        self._last_driver_counters: dict[str, dict[str, int]] = {}
        self._errors = RateLimitedLog(log)
        self._reload_lock = asyncio.Lock()
        self.started_mono = time.monotonic()
        self.started_wall = time.time()
        self.summaries_written = 0
        self.summaries_rejected = 0
        self.reloads = 0
        self.reload_failures = 0
        self.watchdog_pings = 0
        self.api: Any = None
        self.state_store: StateStore | None = None
        self.clock_monitor: ClockMonitor | None = None
        self._pull_runner: Any = None
        self.alarms = AlarmEngine(config.alarms, config.alarm_response_s)
        self.alarm_events = 0
        self._last_eval_t = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, duration_s: float | None = None) -> None:
        """Run until `stop()` is called or `duration_s` has passed, then stop cleanly."""
        await self._setup()
        try:
            self._start_sources()
            self._start_service_tasks()
            self.notifier.ready(self._status_line())
            log.info("agent %s %s ready: %s", self.config.gateway_id, __version__, self._status_line())
            stall = os.environ.get(STALL_ENV)
            if stall:
                self._tasks.append(asyncio.create_task(self._stall(float(stall)), name="test-stall"))
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

    async def reload(self, path: str | None = None) -> bool:
        """Load the configuration again and swap the sources; keep the old one if invalid.

        Buffered summaries stay, the current window of every source is written out as a
        partial summary first, and the uplink is rebuilt only if its settings changed.
        """
        async with self._reload_lock:
            path = path or self.config.path
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(load_config, path)
                if new.buffer_path != self.config.buffer_path:
                    raise ConfigError(path, "buffer.path", str(new.buffer_path),
                                      f"the running buffer {self.config.buffer_path} (moving it needs a restart)")
            except ConfigError as exc:
                self.reload_failures += 1
                log.error("reload rejected, keeping the running configuration: %s", exc)
                self.notifier.send("READY=1", f"STATUS=reload rejected: {exc}")
                return False
            await self._stop_sources()
            self.emit_summaries(partial=True)
            old_uplink = self.config.uplink
            saved = self.alarms.state()
            self.config = new
            self.alarms = AlarmEngine(new.alarms, new.alarm_response_s)
            self.alarms.restore(saved)
            if new.uplink != old_uplink:
                await self._restart_uplink()
            self._start_sources()
            self.reloads += 1
            log.info("configuration reloaded from %s: %s", path, self._status_line())
            self.notifier.send("READY=1", f"STATUS={self._status_line()}")
            return True

    # -- setup -------------------------------------------------------------------------

    async def _setup(self) -> None:
        cfg = self.config
        self.notifier.status("starting: opening buffer")
        cfg.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        self.buffer = SummaryBuffer(cfg.buffer_path, synchronous=cfg.buffer_synchronous,
                                    budget_bytes=cfg.buffer_budget_bytes)
        self.clock_monitor = ClockMonitor(self.buffer)
        log.info("buffer %s open with %d undelivered summaries", cfg.buffer_path, self.buffer.depth())
        self.state_store = StateStore(cfg.buffer_path.with_name("state.sqlite"))
        restored = self.alarms.restore(self.state_store.load("alarms") or {})
        if restored:
            log.info("resumed the state of %d alarm rules", restored)
        self._make_uploader()

        self.notifier.status("starting: loading analysis kernels")
        started = time.perf_counter()
        await asyncio.to_thread(dsp_warmup)
        log.info("analysis kernels ready in %.2f s", time.perf_counter() - started)

        if cfg.pull.enabled:
            from .uplink.auth import read_token_file
            from .uplink.pull import start_pull_server

            token = read_token_file(cfg.pull.token_file) if cfg.pull.token_file else None
            self._pull_runner, port = await start_pull_server(self.buffer, host=cfg.pull.host, port=cfg.pull.port,
                                                              token=token)
            log.info("pull API on %s:%d", cfg.pull.host, port)

        if cfg.api.enabled:
            from .api import DiagnosticsApi

            self.api = DiagnosticsApi(self, cfg.api.host, cfg.api.port)
            try:
                await self.api.start()
            except OSError as exc:
                # Diagnostics are for people; monitoring the plant goes on without them.
                log.error("diagnostics API not started: cannot listen on %s:%d (%s); change [api] port "
                          "or stop what uses it", cfg.api.host, cfg.api.port, exc.strerror or exc)
                self.api = None

    def _make_uploader(self) -> None:
        u = self.config.uplink
        assert self.buffer is not None
        if u.url:
            self.uploader = Uploader(self.buffer, u.url, gateway=self.config.gateway_id, batch_size=u.batch_size,
                                     timeout_s=u.timeout_s, backoff_initial_s=u.backoff_initial_s,
                                     backoff_max_s=u.backoff_max_s, token_file=u.token_file, ca_file=u.ca_file,
                                     client_cert=u.client_cert, client_key=u.client_key,
                                     retry_after_max_s=u.retry_after_max_s)
        else:
            self.uploader = None
            log.warning("no uplink url configured; summaries stay in the buffer")

    async def _restart_uplink(self) -> None:
        if self._uplink_task is not None:
            self._uplink_task.cancel()
            await asyncio.gather(self._uplink_task, return_exceptions=True)
            self._uplink_task = None
        if self.uploader is not None:
            await self.uploader.aclose()
        self._make_uploader()
        if self.uploader is not None:
            self._uplink_task = asyncio.create_task(self.uploader.run(self.stop_event), name="uplink")

    def _start_service_tasks(self) -> None:
        self._window_start_mono = time.monotonic()
        self._tasks.append(asyncio.create_task(self._summary_loop(), name="summaries"))
        if self.uploader is not None:
            self._uplink_task = asyncio.create_task(self.uploader.run(self.stop_event), name="uplink")
        if self.notifier.watchdog_interval_s:
            self._tasks.append(asyncio.create_task(self._watchdog_loop(), name="watchdog"))

    # -- sources -----------------------------------------------------------------------

    def _start_sources(self) -> None:
        loop = asyncio.get_running_loop()
        self._sources_stop = asyncio.Event()
        self.sources = {}
        for vcfg in self.config.vibration:
            source = VibrationSource(vcfg)
            reader = SerialFrameReader(vcfg.id, vcfg.port, self._frame_callback(loop, source),
                                       baudrate=vcfg.baudrate)
            state = SourceState(vcfg.id, "vibration", source, reader)
            self.sources[vcfg.id] = state
            reader.start()
            state.tasks.append(self._supervise(state, "analyse", lambda s=source: s.run_analysis(self._sources_stop)))
        point_drivers = [make_modbus_driver(m) for m in self.config.modbus] + [F70Driver(f) for f in self.config.f70]
        for driver in point_drivers:
            source_id = driver.config.id
            state = SourceState(source_id, "points", PointsSource(source_id), driver)
            self.sources[source_id] = state
            state.tasks.append(self._supervise(state, "poll", lambda st=state: self._poll_loop(st)))
        for state in self.sources.values():
            configs = [k for k in self.config.kpis if k.source == state.id]
            state.kpi = KpiTracker(state.id, configs)
            if self.state_store is not None:
                state.kpi.restore(self.state_store.load(f"kpi/{state.id}") or {})
        log.info("started %d sources: %s", len(self.sources), ", ".join(self.sources) or "none")

    async def _stop_sources(self) -> None:
        self._sources_stop.set()
        for state in self.sources.values():
            if isinstance(state.driver, SerialFrameReader):
                await asyncio.to_thread(state.driver.stop)
        for state in self.sources.values():
            if isinstance(state.source, VibrationSource):
                await state.source.analyse_pending()
        tasks = [t for state in self.sources.values() for t in state.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for state in self.sources.values():
            close = getattr(state.driver, "close", None)
            if close is not None and asyncio.iscoroutinefunction(close):
                try:
                    await asyncio.wait_for(close(), timeout=2.0)
                except Exception as exc:  # noqa: BLE001 - closing must go on for the others
                    log.warning("%s: closing the driver failed: %s", state.id, exc)

    def _supervise(self, state: SourceState, what: str, factory: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """Run `factory()` and restart it with backoff whenever it fails, until stopped."""

        async def supervise() -> None:
            delay = RESTART_BACKOFF_S[0]
            while not self._sources_stop.is_set():
                started = time.monotonic()
                try:
                    await factory()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one source's failure must not stop the agent
                    state.restarts += 1
                    state.last_error = f"{type(exc).__name__}: {exc}"
                    state.last_error_at = time.time()
                    self._errors.log(logging.ERROR, f"{state.id}:{what}",
                                     "%s: %s task failed (%s); restarting in %.1f s",
                                     state.id, what, state.last_error, delay)
                else:
                    if self._sources_stop.is_set():
                        return
                    state.restarts += 1
                    log.warning("%s: %s task ended by itself; restarting in %.1f s", state.id, what, delay)
                if time.monotonic() - started > 10 * RESTART_BACKOFF_S[1]:
                    delay = RESTART_BACKOFF_S[0]  # it had run well for a long time
                try:
                    await asyncio.wait_for(self._sources_stop.wait(), timeout=delay * random.uniform(0.8, 1.2))
                    return
                except TimeoutError:
                    pass
                delay = min(delay * 2, RESTART_BACKOFF_S[1])

        return asyncio.create_task(supervise(), name=f"{what}:{state.id}")

    @staticmethod
    def _frame_callback(loop: asyncio.AbstractEventLoop, source: VibrationSource) -> Callable[[Frame], None]:
        def on_frame(frame: Frame) -> None:
            # Called in the reader's thread: hand the frame to the event loop thread.
            try:
                loop.call_soon_threadsafe(source.add_frame, frame)
            except RuntimeError:
                pass  # the loop closed during shutdown; the frame is outside every window
        return on_frame

    async def _poll_loop(self, state: SourceState) -> None:
        source: PointsSource = state.source
        driver = state.driver
        interval = driver.config.poll_interval_s
        # open() returns False while the device is down; later polls keep reconnecting.
        if not await driver.open():
            log.warning("%s: device not reachable at start; retrying with backoff", state.id)
        next_poll = time.monotonic()
        while not self._sources_stop.is_set():
            readings = await driver.poll()
            source.add_readings(readings)
            if state.kpi is not None and state.kpi.scans:
                for r in readings:
                    if r.quality == "good" and isinstance(r.value, (int, float)):
                        state.kpi.add_reading(r.point, r.t_mono, float(r.value))
            if any(r.quality != "good" for r in readings) or getattr(driver, "last_errors", None):
                source.add_error()
            next_poll += interval
            delay = next_poll - time.monotonic()
            if delay < 0:
                next_poll = time.monotonic()
                delay = 0
            try:
                await asyncio.wait_for(self._sources_stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    # -- summaries ---------------------------------------------------------------------

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
            period = self.config.summary_period_s  # a reload may change it
            next_emit = max(next_emit + period, time.monotonic())

    def emit_summaries(self, *, partial: bool) -> None:
        """Close the current window: write one summary per source to the buffer."""
        now_wall = time.time()
        now_mono = time.monotonic()
        duration = now_mono - self._window_start_mono
        t_start = now_wall - duration
        # Detectors need strictly increasing times; a wall clock stepped backwards (NTP
        # after a boot without RTC) skips rule evaluation until it passes the last time.
        evaluate = now_wall > self._last_eval_t
        if not evaluate:
            self._errors.log(logging.WARNING, "clock", "wall clock went back to %.0f (last evaluation %.0f); "
                             "alarm rules wait until it passes that time", now_wall, self._last_eval_t)
        else:
            self._last_eval_t = now_wall
        batch: list[tuple[SourceState, dict[str, Any]]] = []
        for state in self.sources.values():
            events: list[tuple[str, dict]] = []
            counters = self._counter_delta(state.id, getattr(state.driver, "counters", {}))
            features, quality, alarms = state.source.take_summary(counters)
            if partial and not quality.get("frames") and not quality.get("polls"):
                continue  # nothing arrived since the last summary, so the window carries no information
            if partial:
                quality["partial_window"] = True
            quality["restarts"] = state.restarts
            if features:
                events = self._builtin_events(state, alarms)
            if evaluate and features:
                active, rule_events = self.alarms.evaluate(state.id, now_wall, features)
                alarms = alarms + active
                events += rule_events
            for kind, alarm in events:
                self.alarm_events += 1
                level = logging.WARNING if kind == "raised" else logging.INFO
                log.log(level, "%s: alarm %s %s (%s): %s", state.id, alarm["name"], kind, alarm["grade"],
                        alarm["message"])
            if state.kpi is not None:
                kpis, episodes = state.kpi.summarise(features, alarms, t_start, now_wall, duration)
                features = {**features, **kpis}
                for episode in episodes:
                    log.info("%s: fault episode from %s to %s (%.0f s)", state.id,
                             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(episode["start"])),
                             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(episode["end"])), episode["duration_s"])
                if episodes:
                    features["fault_episode_start"] = episodes[-1]["start"]
                    features["fault_episode_end"] = episodes[-1]["end"]
            summary = {
                "v": SCHEMA_VERSION,
                "gateway": self.config.gateway_id,
                "source": state.id,
                "kind": state.kind,
                "t_start": t_start,
                "t_end": now_wall,
                "duration_s": duration,
                "features": features,
                "quality": quality,
                "alarms": alarms,
            }
            batch.append((state, summary))
            for kind, alarm in events:
                # An alarm event is a summary of its own, so the buffer keeps it with the
                # alarms (evicted last) and the central side receives it as soon as possible.
                batch.append((state, {
                    "v": SCHEMA_VERSION, "gateway": self.config.gateway_id, "source": state.id,
                    "kind": "alarm", "t_start": now_wall, "t_end": now_wall, "duration_s": 0.0,
                    "features": {"event": kind}, "quality": {}, "alarms": [alarm],
                }))
        self._append(batch)
        if self.uploader is not None:
            self.uploader.notify()
        self._window_start_mono = now_mono
        self._save_state()

    def _builtin_events(self, state: SourceState, alarms: list[dict]) -> list[tuple[str, dict]]:
        """Turn the source's own alarms (severity zone, bearing defect) into raise and clear
        events by comparing them with the previous window's."""
        current = {a["name"]: a for a in alarms}
        previous = state.builtin_alarms
        events = [("raised", a) for name, a in current.items() if name not in previous]
        for name, alarm in previous.items():
            if name not in current:
                events.append(("cleared", {**alarm, "message": f"cleared: {alarm['message']}"}))
        state.builtin_alarms = current
        return events

    def _append(self, batch: list[tuple[SourceState, dict[str, Any]]]) -> None:
        """Store one period's summaries in one transaction (one SD-card flush)."""
        assert self.buffer is not None
        if not batch:
            return
        try:
            self.buffer.append_many([summary for _, summary in batch])
        except SchemaError as exc:
            # A bug, not bad input: store the others and report the one that failed.
            self.summaries_rejected += 1
            bad = batch[exc.index][1]["source"] if exc.index is not None else "?"
            log.error("%s: summary rejected by the schema and not stored: %s", bad, exc)
            if exc.index is not None:
                del batch[exc.index]
                self._append(batch)
            return
        except (ValueError, sqlite3.Error) as exc:
            self._errors.log(logging.ERROR, "append", "writing %d summaries to the buffer failed: %s",
                             len(batch), exc)
            return
        for state, summary in batch:
            self.summaries_written += 1
            if summary["kind"] != "alarm":
                state.last_summary = summary
            if self.on_summary is not None:
                self.on_summary(summary)
        if self.clock_monitor is not None:
            try:
                self.clock_monitor.check()
            except sqlite3.Error as exc:
                self._errors.log(logging.ERROR, "clock", "correcting buffered summary times failed: %s", exc)

    def _save_state(self) -> None:
        if self.state_store is None:
            return
        try:
            self.state_store.save("alarms", self.alarms.state())
            for state in self.sources.values():
                if state.kpi is not None:
                    self.state_store.save(f"kpi/{state.id}", state.kpi.state_dict())
        except (ValueError, OSError) as exc:
            self._errors.log(logging.ERROR, "state", "saving detector state failed: %s", exc)

    def reset_baseline(self, source: str) -> int:
        """Forget what the alarm rules of `source` learned (after maintenance)."""
        count = self.alarms.reset_source(source)
        self._save_state()
        log.info("%s: baseline reset for %d alarm rules", source, count)
        return count

    def _counter_delta(self, key: str, counters: dict[str, Any]) -> dict[str, int]:
        """Return how much each integer driver counter grew since the last summary."""
        current = {k: v for k, v in dict(counters).items() if isinstance(v, int) and not isinstance(v, bool)}
        previous = self._last_driver_counters.get(key, {})
        self._last_driver_counters[key] = current
        return {k: max(0, v - previous.get(k, 0)) for k, v in current.items()}

    # -- health ------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        """Return whether the uplink task is alive (the loop is, if this runs at all)."""
        if self.uploader is not None and (self._uplink_task is None or self._uplink_task.done()):
            return False, "uplink task is not running"
        return True, "ok"

    async def _watchdog_loop(self) -> None:
        interval = (self.notifier.watchdog_interval_s or 10.0) / 3.0
        while not self.stop_event.is_set():
            ok, reason = self.healthy()
            if ok:
                if self.notifier.watchdog():
                    self.watchdog_pings += 1
            else:
                self._errors.log(logging.ERROR, "watchdog", "not feeding the watchdog: %s", reason)
            try:
                await asyncio.wait_for(self.stop_event.wait(), timeout=interval)
            except TimeoutError:
                pass

    async def _stall(self, seconds: float) -> None:
        await asyncio.sleep(1.0)
        log.warning("test hook %s: blocking the event loop for %.1f s", STALL_ENV, seconds)
        time.sleep(seconds)  # deliberately blocks the loop

    def _status_line(self) -> str:
        depth = self.buffer.depth() if self.buffer is not None else 0
        return f"{len(self.sources)} sources, {depth} summaries buffered"

    # -- stop --------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.stop_event.set()
        self.notifier.stopping()
        await self._stop_sources()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

        if self.buffer is not None and self.sources:
            self.emit_summaries(partial=True)
        if self._uplink_task is not None:
            await asyncio.gather(self._uplink_task, return_exceptions=True)
        if self.uploader is not None:
            timeout = self.config.uplink.drain_timeout_s
            delivered = await self.uploader.drain(timeout)
            if not delivered:
                log.warning("uplink not drained within %g s; %d summaries stay buffered for the next start",
                            timeout, self.buffer.depth() if self.buffer else -1)
            await self.uploader.aclose()
        if self.api is not None:
            await self.api.stop()
        if self._pull_runner is not None:
            await self._pull_runner.cleanup()
        if self.state_store is not None:
            self.state_store.close()
        if self.buffer is not None:
            log.info("stopping with %d undelivered summaries in the buffer", self.buffer.depth())
            self.buffer.close()
        self.notifier.close()
        log.info("agent stopped after writing %d summaries", self.summaries_written)
