"""Local diagnostics API for field engineers: status, spectra and Prometheus metrics.

Served by aiohttp inside the agent's event loop, on loopback only (the configuration
rejects other addresses because the API has no authentication).

- `GET /v1/status`: JSON with sources (state, last values, error counts), active alarms,
  buffer depth and the age of the oldest undelivered summary, uptime and versions;
- `GET /v1/spectrum/{source}`: JSON with the latest averaged spectrum and envelope
  spectrum of a vibration source and its bearing defect frequencies;
- `GET /metrics`: Prometheus text format.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__

if TYPE_CHECKING:
    from .service import Agent

log = logging.getLogger(__name__)


def _last_error(state: Any) -> tuple[str | None, float | None]:
    """Return the newer of the supervisor's and the source's last error, with its time."""
    candidates = [(state.last_error_at, state.last_error),
                  (getattr(state.source, "last_error_at", None), getattr(state.source, "last_error", None))]
    candidates = [(t, e) for t, e in candidates if t is not None]
    if not candidates:
        return None, None
    t, error = max(candidates, key=lambda c: c[0])
    return error, t


def _source_state(state: Any) -> str:
    driver = state.driver
    connected = getattr(driver, "connected", None)
    if connected is False:
        return "disconnected"
    source = state.source
    if state.kind == "vibration" and source.analyzer is None and source.counters.get("frames", 0) > 0:
        return "not analysing"
    _, at = _last_error(state)
    if at is not None and time.time() - at < 60:
        return "failing"
    return "ok"


def build_status(agent: Agent) -> dict[str, Any]:
    """Return the status document of `GET /v1/status`."""
    import numba
    import numpy

    buffer = agent.buffer
    oldest = buffer.oldest_created() if buffer is not None else None
    sources = []
    alarms = []
    for state in agent.sources.values():
        summary = state.last_summary or {}
        counters = {k: v for k, v in dict(getattr(state.driver, "counters", {})).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
        entry: dict[str, Any] = {
            "id": state.id,
            "kind": state.kind,
            "state": _source_state(state),
            "restarts": state.restarts,
            "last_error": _last_error(state)[0],
            "counters": counters,
            "last_summary_end": summary.get("t_end"),
        }
        if state.kind == "vibration":
            entry["features"] = {k: v for k, v in summary.get("features", {}).items()
                                 if k in ("velocity_rms_mm_s", "severity_zone", "accel_rms", "kurtosis",
                                          "crest_factor", "dominant_defect", "shaft_hz")}
        else:
            entry["values"] = {name: point.get("last") for name, point in summary.get("features", {}).items()
                               if isinstance(point, dict)}
            entry["units"] = {name: point.get("unit") for name, point in summary.get("features", {}).items()
                              if isinstance(point, dict)}
        sources.append(entry)
        for alarm in summary.get("alarms", []):
            alarms.append({"source": state.id, **alarm})
    uploader = agent.uploader
    return {
        "gateway": agent.config.gateway_id,
        "version": __version__,
        "versions": {"python": platform.python_version(), "numpy": numpy.__version__, "numba": numba.__version__},
        "uptime_s": time.monotonic() - agent.started_mono,
        "sources": sources,
        "alarms": alarms,
        "buffer": {
            "depth": buffer.depth() if buffer is not None else 0,
            "oldest_undelivered_age_s": (time.time() - oldest) if oldest is not None else None,
        },
        "uplink": {
            "url": agent.config.uplink.url,
            "summaries_sent": getattr(getattr(uploader, "counters", None), "summaries_sent", 0),
            "failures": getattr(getattr(uploader, "counters", None), "failures", 0),
            "last_error": getattr(getattr(uploader, "counters", None), "last_error", None),
        },
        "summaries_written": agent.summaries_written,
        "reloads": agent.reloads,
        "reload_failures": agent.reload_failures,
    }


class _AgentMetrics:
    """Prometheus collector that reads the agent's counters at scrape time."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        agent = self.agent
        reads = CounterMetricFamily("edge_device_polls", "Polls or frames received per source", labels=["source"])
        errors = CounterMetricFamily("edge_device_errors", "Errors per source (timeouts, bad CRC, exceptions)",
                                     labels=["source"])
        reconnects = CounterMetricFamily("edge_device_reconnects", "Reconnects or port reopens per source",
                                         labels=["source"])
        dropped = CounterMetricFamily("edge_frames_missing", "Stream frames missing from sequence gaps",
                                      labels=["source"])
        restarts = CounterMetricFamily("edge_source_restarts", "Supervisor restarts of a source task",
                                       labels=["source"])
        dsp = GaugeMetricFamily("edge_dsp_seconds_per_frame", "Analysis time per frame in the last window",
                                labels=["source"])
        for state in agent.sources.values():
            c = dict(getattr(state.driver, "counters", {}))
            reads.add_metric([state.id], c.get("frames", c.get("polls", 0)))
            source_errors = getattr(state.source, "counters", {}).get("invalid_frames", 0)
            errors.add_metric([state.id], source_errors + sum(c.get(k, 0) for k in (
                "errors", "bad_crc", "bad_header", "timeouts", "read_errors", "crc_errors")))
            reconnects.add_metric([state.id], c.get("reconnects", c.get("reopens", 0)))
            dropped.add_metric([state.id], c.get("missing_frames", 0))
            restarts.add_metric([state.id], state.restarts)
            features = (state.last_summary or {}).get("features", {})
            if "dsp_ms_per_frame" in features and features["dsp_ms_per_frame"] is not None:
                dsp.add_metric([state.id], features["dsp_ms_per_frame"] / 1000.0)
        yield from (reads, errors, reconnects, dropped, restarts, dsp)

        buffer = agent.buffer
        depth = GaugeMetricFamily("edge_buffer_depth", "Summaries waiting in the buffer")
        depth.add_metric([], buffer.depth() if buffer is not None else 0)
        yield depth
        size = GaugeMetricFamily("edge_buffer_bytes", "Size of the buffer file and its WAL in bytes")
        size.add_metric([], _buffer_bytes(agent))
        yield size
        written = CounterMetricFamily("edge_summaries_written", "Summaries written to the buffer")
        written.add_metric([], agent.summaries_written)
        yield written
        events = CounterMetricFamily("edge_alarm_events", "Alarm rule events (raised or cleared)")
        events.add_metric([], agent.alarm_events)
        yield events
        counters = getattr(agent.uploader, "counters", None)
        sent = CounterMetricFamily("edge_uplink_summaries_sent", "Summaries acknowledged by the collector")
        sent.add_metric([], getattr(counters, "summaries_sent", 0))
        yield sent
        failures = CounterMetricFamily("edge_uplink_failures", "Failed upload attempts")
        failures.add_metric([], getattr(counters, "failures", 0))
        yield failures
        latency = getattr(counters, "last_latency_s", None)
        if latency is not None:
            gauge = GaugeMetricFamily("edge_uplink_latency_seconds", "Duration of the last successful upload")
            gauge.add_metric([], latency)
            yield gauge


def _buffer_bytes(agent: Agent) -> int:
    path = agent.config.buffer_path
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += path.with_name(path.name + suffix).stat().st_size
        except OSError:
            pass
    return total


class DiagnosticsApi:
    """The aiohttp server of the diagnostics API."""

    def __init__(self, agent: Agent, host: str, port: int) -> None:
        self.agent = agent
        self.host = host
        self.port = port
        self.registry = CollectorRegistry()
        self.registry.register(_AgentMetrics(agent))
        self.app = web.Application()
        self.app.router.add_get("/v1/status", self._status)
        self.app.router.add_get("/v1/spectrum/{source}", self._spectrum)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_post("/v1/baseline/reset", self._reset_baseline)
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.bound_port = int(self._runner.addresses[0][1])
        log.info("diagnostics API on http://%s:%d (status, spectrum, metrics)", self.host, self.bound_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(build_status(self.agent))

    async def _spectrum(self, request: web.Request) -> web.Response:
        name = request.match_info["source"]
        state = self.agent.sources.get(name)
        if state is None or state.kind != "vibration":
            vibration = [s.id for s in self.agent.sources.values() if s.kind == "vibration"]
            return web.json_response({"error": f"no vibration source {name!r}; sources: {vibration}"}, status=404)
        latest = state.source.latest_spectrum
        if latest is None:
            return web.json_response({"error": f"{name} has no analysed window yet; try again after one summary "
                                               "period"}, status=503)
        return web.json_response(latest)

    async def _reset_baseline(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be JSON: {\"source\": \"<source id>\"}"}, status=400)
        source = body.get("source") if isinstance(body, dict) else None
        if source not in self.agent.sources:
            return web.json_response({"error": f"no source {source!r}; sources: {sorted(self.agent.sources)}"},
                                     status=404)
        count = self.agent.reset_baseline(source)
        return web.json_response({"source": source, "rules_reset": count})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
