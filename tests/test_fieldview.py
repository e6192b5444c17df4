"""Field diagnostics against a running agent's real HTTP API."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import pytest
from rich.console import Console

from agent.fieldview import ApiError, fetch, print_spectrum, print_status

from .test_service import sims  # noqa: F401 - fixture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_agent(sims):  # noqa: F811
    from agent.config import parse_config
    from agent.service import Agent

    tmp_path, config, _ = sims
    port = _free_port()
    config["api"]["port"] = port
    cfg = parse_config(config, str(tmp_path / "agent.toml"), tmp_path)
    agent = Agent(cfg)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(agent.run(duration_s=30.0),), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            fetch(url, "/v1/status", timeout_s=1.0)
            break
        except ApiError:
            time.sleep(0.2)
    try:
        yield url, agent
    finally:
        loop.call_soon_threadsafe(agent.stop)
        thread.join(30)


def _wait_for_summary(url: str, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = fetch(url, "/v1/status")
        except ApiError:
            status = None
        if status and all(s["last_summary_end"] for s in status["sources"]):
            return status
        time.sleep(0.3)
    raise AssertionError("no summary from every source")


def test_status_lists_sources(running_agent):
    url, _ = running_agent
    status = _wait_for_summary(url)
    assert {s["id"] for s in status["sources"]} == {"compressor-motor", "compressor", "power"}
    power = next(s for s in status["sources"] if s["id"] == "power")
    assert 200 < power["values"]["voltage_l1"] < 260
    out = io.StringIO()
    print_status(url, Console(file=out, width=160))
    assert "compressor-motor" in out.getvalue()
    assert "buffer" in out.getvalue()


def test_spectrum_view_and_png(running_agent, tmp_path):
    url, _ = running_agent
    _wait_for_summary(url)
    out = io.StringIO()
    png = tmp_path / "spectrum.png"
    print_spectrum(url, "compressor-motor", png=str(png), console=Console(file=out, width=100))
    assert "I: BPFI" in out.getvalue()
    assert png.stat().st_size > 10_000


def test_spectrum_unknown_source(running_agent):
    url, _ = running_agent
    with pytest.raises(ApiError, match="no vibration source 'pump'"):
        fetch(url, "/v1/spectrum/pump")


def test_metrics_exposed(running_agent):
    import httpx

    url, _ = running_agent
    _wait_for_summary(url)
    text = httpx.get(url + "/metrics", timeout=5).text
    assert 'edge_device_polls_total{source="power"}' in text
    assert "edge_buffer_depth" in text
    assert "edge_dsp_seconds_per_frame" in text


def test_status_unreachable_agent():
    with pytest.raises(ApiError, match="cannot reach the agent"):
        fetch(f"http://127.0.0.1:{_free_port()}", "/v1/status", timeout_s=1.0)
