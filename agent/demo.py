"""`edge-agent demo`: simulators, agent and collector together for a bounded time.

The simulators run as a separate `firmware_sim` process, so the agent reaches them only
through a pty and TCP, as it would reach real devices.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from .uplink.collector import CollectorStore, format_table
from .dsp import frame_length_for

STARTUP_TIMEOUT_S = 60.0
# The compressor's helium leaks 120 times faster than in the scenario's real time, so the
# forecast alarm and the warning it foresees both fall inside a one-minute demo.
SCENARIO = "helium_pressure_loss"
SCENARIO_SPEED = 120.0


def _wait_for_file(path: Path, proc: subprocess.Popen, what: str, log_path: Path) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if text.strip():
                return text
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready; see {log_path}")
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready within {STARTUP_TIMEOUT_S:.0f} s; see {log_path}")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _default_config() -> Path:
    candidates = [Path.cwd() / "examples" / "demo.toml", Path(__file__).resolve().parents[1] / "examples" / "demo.toml"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError("examples/demo.toml not found; run the demo from the repository or pass --config")


def build_agent_config(template: dict[str, Any], manifest: dict[str, Any], collector_port: int,
                       workdir: Path) -> dict[str, Any]:
    """Return the demo config with the simulators' endpoints and the collector's URL filled in."""
    config = json.loads(json.dumps(template))  # deep copy of plain TOML data
    devices = {d["kind"]: d for d in manifest["devices"]}
    config["buffer"]["path"] = str((workdir / "buffer.sqlite").resolve())
    config["uplink"]["url"] = f"http://127.0.0.1:{collector_port}/v1/summaries"
    vib = devices["vibration"]
    for channel in config.get("vibration", []):
        channel["port"] = vib["path"]
        channel["frame_length"] = frame_length_for(vib["sample_rate"])
        channel["shaft_rpm"] = vib["shaft_rpm"]
        channel.pop("shaft_hz", None)
        band = channel.get("envelope_band_hz", [2000.0, 5000.0])
        if band != "auto":
            channel["envelope_band_hz"] = [band[0], min(band[1], 0.45 * vib["sample_rate"])]
    api = config.setdefault("api", {})
    if api.get("enabled", True) and not _port_free(api.get("host", "127.0.0.1"), api.get("port", 8780)):
        api["port"] = _free_port()
    profile_to_kind = {"cryomech_cpa": "cpa", "sdm630": "sdm630"}
    for device in config.get("modbus", []):
        sim = devices[profile_to_kind[device["profile"]]]
        device["host"] = sim["host"]
        device["port"] = sim["port"]
    return config


def _stop(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def run_demo(duration_s: float, recording: str | None, workdir: Path, config_path: Path | None) -> int:
    """Run the demo and print one line per summary, then the collector's table."""
    if duration_s <= 0:
        print(f"error: --duration {duration_s} is invalid; pass a positive number of seconds", file=sys.stderr)
        return 2
    if recording is not None and not Path(recording).is_file():
        print(f"error: recording {recording} not found; pass the path of a CWRU .mat file", file=sys.stderr)
        return 2
    template = tomllib.loads((config_path or _default_config()).read_text())
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    collector = sim = agent = None
    collector_log = workdir / "collector.log"
    sim_log = workdir / "sim.log"
    agent_log = workdir / "agent.log"
    try:
        collector = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "collect", "serve", "--db", str(workdir / "collector.sqlite"),
             "--port", "0", "--port-file", str(workdir / "collector.port")],
            stdout=collector_log.open("w"), stderr=subprocess.STDOUT, env=env)
        sim_cmd = [sys.executable, "-m", "firmware_sim.cli", "--manifest", str(workdir / "sim.json"),
                   "--vibration", recording or "synthetic", "--sdm630", "--cpa",
                   "--scenario", SCENARIO, "--speed", str(SCENARIO_SPEED), "--vibration-speed", "1"]
        sim_endpoints = workdir / "sim.out"
        sim = subprocess.Popen(sim_cmd, stdout=sim_endpoints.open("w"), stderr=sim_log.open("w"), env=env)

        port = int(_wait_for_file(workdir / "collector.port", collector, "collector", collector_log))
        manifest = json.loads(_wait_for_file(workdir / "sim.json", sim, "simulator", sim_log))
        print(sim_endpoints.read_text().rstrip())
        print(f"collector listening on 127.0.0.1:{port}, database {workdir / 'collector.sqlite'}")

        config = build_agent_config(template, manifest, port, workdir)
        config_file = workdir / "agent.toml"
        config_file.write_text(tomli_w.dumps(config))
        api = config.get("api", {})
        status_hint = (f"; while it runs: edge-agent status --url http://127.0.0.1:{api.get('port', 8780)}"
                       if api.get("enabled", True) else "")
        print(f"agent config {config_file}; agent log {agent_log}; running for {duration_s:g} s{status_hint}\n",
              flush=True)

        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", str(config_file), "--duration", str(duration_s),
             "--echo", "line"], stdout=subprocess.PIPE, stderr=agent_log.open("w"), env=env, text=True)
        assert agent.stdout is not None
        for line in agent.stdout:
            print(line.rstrip(), flush=True)
        code = agent.wait(timeout=60)
        if code != 0:
            print(f"error: agent exited with code {code}; see {agent_log}", file=sys.stderr)
            return 1
    except (RuntimeError, KeyError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(agent)
        _stop(sim)
        _stop(collector)

    store = CollectorStore(workdir / "collector.sqlite")
    try:
        print("\nWhat the collector holds:")
        print(format_table(store.table()))
        report = forecast_report(store.summaries())
        if report:
            print("\n" + report)
    finally:
        store.close()
    return 0


def forecast_report(summaries: list[dict[str, Any]]) -> str:
    """Describe each forecast alarm and how long before its limit alarm it came."""
    raised: dict[str, float] = {}
    for s in summaries:
        if s["kind"] == "alarm" and s["features"].get("event") == "raised":
            for alarm in s["alarms"]:
                raised.setdefault(alarm["name"], s["t_end"])
    lines = []
    for name, t in sorted(raised.items(), key=lambda item: item[1]):
        if not name.endswith("_forecast"):
            continue
        limit_name = name[: -len("_forecast")]
        if limit_name in raised:
            lead = raised[limit_name] - t
            lines.append(f"Forecast alarm {name} came {lead:.0f} s before {limit_name} "
                         f"({lead * SCENARIO_SPEED / 60:.0f} min of simulated time at {SCENARIO_SPEED:g}x).")
        else:
            lines.append(f"Forecast alarm {name} raised; {limit_name} had not happened when the demo ended.")
    return "\n".join(lines)
