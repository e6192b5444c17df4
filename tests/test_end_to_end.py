"""The whole chain in separate processes: simulators, agent and collector on loopback."""

from __future__ import annotations

import contextlib
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

from agent.demo import build_agent_config
from agent.uplink.collector import CollectorStore

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        assert proc.poll() is None, f"process exited with {proc.returncode} before writing {path}"
        time.sleep(0.05)
    raise AssertionError(f"{path} not written within {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_chain(tmp_path: Path, speed: float):
    """Start a collector and the simulators (accelerometer, SDM630, CPA) as processes.

    Yields (collector port, simulator manifest, collector process).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("collector", "sim")}
    collector = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "collect", "serve", "--db", str(tmp_path / "collector.sqlite"),
         "--port", "0", "--port-file", str(tmp_path / "collector.port")],
        stdout=logs["collector"], stderr=subprocess.STDOUT, env=env)
    sim = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim.cli", "--manifest", str(tmp_path / "sim.json"),
         "--vibration", "synthetic", "--fault", "inner", "--sdm630", "--cpa", "--speed", str(speed)],
        stdout=logs["sim"], stderr=subprocess.STDOUT, env=env)
    try:
        port = int(_wait_for(tmp_path / "collector.port", collector))
        manifest = json.loads(_wait_for(tmp_path / "sim.json", sim))
        yield port, manifest, collector
    finally:
        _stop(sim)
        _stop(collector)
        for f in logs.values():
            f.close()


@pytest.fixture
def chain(tmp_path):
    with running_chain(tmp_path, speed=4) as (port, manifest, _):
        yield tmp_path, port, manifest


def test_chain_delivers_every_summary_once(chain):
    tmp_path, port, manifest = chain
    template = tomllib.loads((ROOT / "examples" / "demo.toml").read_text())
    config = build_agent_config(template, manifest, port, tmp_path)
    config["summary"]["period_s"] = 1.0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        config["api"]["port"] = probe.getsockname()[1]
    config_file = tmp_path / "agent.toml"
    config_file.write_text(tomli_w.dumps(config))

    agent = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", str(config_file), "--duration", "6", "--echo", "jsonl"],
        capture_output=True, text=True, timeout=120)
    assert agent.returncode == 0, agent.stderr[-3000:]
    produced = [json.loads(line) for line in agent.stdout.splitlines() if line.strip()]

    store = CollectorStore(tmp_path / "collector.sqlite")
    try:
        stored = store.summaries()
    finally:
        store.close()

    assert len(produced) >= 3 * 5, agent.stderr[-3000:]
    seqs = [s["seq"] for s in produced]
    assert len(set(seqs)) == len(seqs)
    assert sorted(s["seq"] for s in stored) == sorted(seqs)
    by_seq = {s["seq"]: s for s in stored}
    for summary in produced:
        assert by_seq[summary["seq"]] == summary, summary["seq"]

    sources = {s["source"] for s in produced}
    assert sources == {"compressor-motor", "compressor", "power"}

    vibration = [s for s in produced if s["source"] == "compressor-motor" and "velocity_rms_mm_s" in s["features"]]
    assert vibration, "no vibration summary carried features"
    assert all(s["quality"]["bad_crc"] == 0 for s in vibration)
    full = [s for s in vibration if not s["quality"].get("partial_window")]
    assert full and all(s["features"]["dominant_defect"] == "bpfi" for s in full)

    power = [s for s in produced if s["source"] == "power" and "voltage_l1" in s["features"]]
    assert power and 200.0 < power[-1]["features"]["voltage_l1"]["last"] < 260.0


def test_demo_prints_collector_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--duration", "4", "--workdir", str(tmp_path / "demo"),
         "--config", str(ROOT / "examples" / "demo.toml")],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "What the collector holds:" in result.stdout
    table = result.stdout.split("What the collector holds:")[1]
    for source in ("compressor-motor", "compressor", "power"):
        assert source in table
