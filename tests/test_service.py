"""The agent's real entry point under a service manager: notify socket, reload, stop, watchdog."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from agent.config import parse_config
from agent.demo import build_agent_config
from agent.service import Agent
from agent.uplink.collector import CollectorStore

from .test_end_to_end import ROOT, _stop, running_chain


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifySocket:
    """A real datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def collect(self, until, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                data = None
            if data is not None:
                self.messages.append((time.monotonic(), data))
            if until(self):
                return True
        return False

    def has(self, text: str, after: int = 0) -> bool:
        return any(text in m for _, m in self.messages[after:])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sims(tmp_path):
    with running_chain(tmp_path, speed=2) as (port, manifest, collector):
        template = tomllib.loads((ROOT / "examples" / "demo.toml").read_text())
        config = build_agent_config(template, manifest, port, tmp_path)
        config["summary"]["period_s"] = 1.0
        config["api"]["port"] = _free_port()
        yield tmp_path, config, collector


def _start_agent(tmp_path: Path, config: dict, notify: NotifySocket, extra_env: dict | None = None):
    config_file = tmp_path / "agent.toml"
    config_file.write_text(tomli_w.dumps(config))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000", PYTHONUNBUFFERED="1",
               **(extra_env or {}))
    env.pop("WATCHDOG_PID", None)
    out = (tmp_path / "agent.out").open("w")
    err = (tmp_path / "agent.err").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", str(config_file), "--echo", "jsonl"],
                            stdout=out, stderr=err, env=env)
    return proc, config_file


def _produced(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "agent.out").read_text().splitlines() if line.strip()]


def test_notify_reload_and_stop(sims):
    tmp_path, config, _ = sims
    notify = NotifySocket(tmp_path / "notify.sock")
    proc, config_file = _start_agent(tmp_path, config, notify)
    try:
        assert notify.collect(lambda n: n.has("READY=1")), (tmp_path / "agent.err").read_text()[-2000:]
        assert notify.collect(lambda n: sum("WATCHDOG=1" in m for _, m in n.messages) >= 2)

        # A valid change is applied: the summary period becomes 2 s.
        config["summary"]["period_s"] = 2.0
        config_file.write_text(tomli_w.dumps(config))
        mark = len(notify.messages)
        proc.send_signal(signal.SIGHUP)
        assert notify.collect(lambda n: n.has("READY=1", mark + 1))
        assert notify.has("RELOADING=1", mark)
        assert not notify.has("reload rejected", mark)

        # An invalid file is rejected and the agent keeps running on the old configuration.
        config_file.write_text("gateway_id = 5\n")
        mark = len(notify.messages)
        proc.send_signal(signal.SIGHUP)
        assert notify.collect(lambda n: n.has("reload rejected", mark))
        assert proc.poll() is None
        assert notify.collect(lambda n: sum("WATCHDOG=1" in m for _, m in n.messages[mark:]) >= 2)

        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert notify.collect(lambda n: n.has("STOPPING=1"), timeout_s=2)
    finally:
        _stop(proc)
        notify.close()

    produced = _produced(tmp_path)
    store = CollectorStore(tmp_path / "collector.sqlite")
    try:
        stored = {s["seq"] for s in store.summaries()}
    finally:
        store.close()
    assert produced
    assert {s["seq"] for s in produced} == stored
    assert "reload rejected" in (tmp_path / "agent.err").read_text()


def test_sigterm_keeps_undelivered_summaries(sims):
    tmp_path, config, collector = sims
    _stop(collector)  # the central side is down: summaries stay in the buffer
    config["uplink"]["drain_timeout_s"] = 0.5
    notify = NotifySocket(tmp_path / "notify.sock")
    proc, config_file = _start_agent(tmp_path, config, notify)
    try:
        assert notify.collect(lambda n: n.has("READY=1"))
        time.sleep(2.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        _stop(proc)
        notify.close()
    produced = _produced(tmp_path)
    assert produced
    from agent.uplink.buffer import SummaryBuffer

    buffer = SummaryBuffer(Path(config["buffer"]["path"]))
    try:
        pending = {seq for seq, _ in buffer.pending(10_000)}
    finally:
        buffer.close()
    assert pending == {s["seq"] for s in produced}


def test_stuck_loop_stops_watchdog(sims):
    tmp_path, config, _ = sims
    notify = NotifySocket(tmp_path / "notify.sock")
    proc, _ = _start_agent(tmp_path, config, notify, {"EDGE_AGENT_TEST_STALL_S": "3"})
    try:
        assert notify.collect(lambda n: n.has("READY=1"))
        assert notify.collect(lambda n: sum("WATCHDOG=1" in m for _, m in n.messages) >= 6, timeout_s=30)
    finally:
        _stop(proc)
        notify.close()
    pings = [t for t, m in notify.messages if "WATCHDOG=1" in m]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    # Pings come every third of the 1 s watchdog interval, except across the 3 s stall.
    assert max(gaps) > 2.5
    assert sorted(gaps)[len(gaps) // 2] < 0.6


def test_failing_driver_isolated(sims, monkeypatch):
    tmp_path, config, _ = sims
    config["api"]["enabled"] = False
    from agent.drivers import modbus

    original = modbus.ModbusTcpDriver.poll

    async def poll(self):
        if self.config.id == "power":
            raise RuntimeError("driver bug")
        return await original(self)

    monkeypatch.setattr(modbus.ModbusTcpDriver, "poll", poll)
    monkeypatch.setattr("agent.service.RESTART_BACKOFF_S", (0.2, 1.0))
    cfg = parse_config(config, str(tmp_path / "agent.toml"), tmp_path)
    summaries: list[dict] = []
    agent = Agent(cfg, on_summary=summaries.append)
    asyncio.run(agent.run(duration_s=4.0))

    compressor = [s for s in summaries if s["source"] == "compressor" and s["features"]]
    motor = [s for s in summaries if s["source"] == "compressor-motor" and s["features"]]
    power = [s for s in summaries if s["source"] == "power"]
    assert compressor, "the healthy Modbus device stopped"
    assert motor, "the vibration channel stopped"
    assert power and all("voltage_l1" not in s["features"] for s in power)
    assert max(s["quality"]["restarts"] for s in power) >= 2
