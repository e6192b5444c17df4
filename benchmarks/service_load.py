"""Measure the CPU share and memory of the running agent on an example configuration.

    python benchmarks/service_load.py examples/mri-room.toml --seconds 600

Starts the simulators for every device the configuration names (on ptys and loopback
ports), a collector, and `edge-agent run` with the configuration's endpoints replaced by
the simulators'. Every 5 s it reads the agent's CPU time (utime + stime from
/proc/PID/stat) and memory (VmRSS, VmHWM), and at the end prints the CPU share as a
percentage of one core, the mean and peak RSS, and the summaries delivered.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Device profile in the agent's config -> edge-sim flag of its simulator.
SIM_FLAGS = {"sdm630": "--sdm630", "cryomech_cpa": "--cpa", "generic_chiller": "--chiller",
             "generic_room": "--room", "banner_qm30vt2": "--qm30vt2"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before writing {path}")
        time.sleep(0.1)
    raise RuntimeError(f"{path} not written within {timeout_s} s")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _memory_kib(pid: int) -> tuple[int, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="example agent configuration")
    parser.add_argument("--seconds", type=float, default=600.0, help="measurement length (default 600)")
    args = parser.parse_args()
    template = tomllib.loads(Path(args.config).read_text())
    work = Path(tempfile.mkdtemp(prefix="edge-load-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    sim_args = ["--manifest", str(work / "sim.json"), "--vibration", "none"]
    # One accelerometer simulator per channel: two readers on one pty would split its bytes.
    vibration_sims = [
        subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", "--vibration", "synthetic", "--seed", str(i),
                          "--link", str(work / f"vib{i}"), "--manifest", str(work / f"vib{i}.json")],
                         stdout=(work / f"vib{i}.log").open("w"), stderr=subprocess.STDOUT, env=dict(os.environ))
        for i, _ in enumerate(template.get("vibration", []))
    ]
    profiles = {m.get("profile") for m in template.get("modbus", [])}
    for profile, flag in SIM_FLAGS.items():
        if profile in profiles:
            sim_args.append(flag)
    if template.get("f70"):
        sim_args += ["--f70", "--f70-link", str(work / "f70")]
    sim = subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", *sim_args],
                           stdout=(work / "sim.log").open("w"), stderr=subprocess.STDOUT, env=env)
    collector = subprocess.Popen([sys.executable, "-m", "agent.cli", "collect", "serve", "--db",
                                  str(work / "collector.sqlite"), "--port", "0", "--port-file",
                                  str(work / "collector.port")],
                                 stdout=(work / "collector.log").open("w"), stderr=subprocess.STDOUT, env=env)
    agent = None
    try:
        manifest = json.loads(_wait_for(work / "sim.json", sim))
        for i, proc in enumerate(vibration_sims):
            _wait_for(work / f"vib{i}.json", proc)
        port = int(_wait_for(work / "collector.port", collector))
        devices = {d["kind"]: d for d in manifest["devices"]}
        config = json.loads(json.dumps(template))
        config["buffer"] = {"path": str(work / "buffer.sqlite")}
        config["uplink"] = {"url": f"http://127.0.0.1:{port}/v1/summaries"}
        config["api"] = {"enabled": False}
        config.setdefault("dsp", {})["cache_dir"] = str(Path.home() / ".cache" / "edge-agent-numba")
        for i, channel in enumerate(config.get("vibration", [])):
            channel["port"] = str(work / f"vib{i}")
        kind_of = {profile: flag[2:] for profile, flag in SIM_FLAGS.items()}
        for device in config.get("modbus", []):
            sim_device = devices.get(kind_of.get(device.get("profile"), ""))
            if sim_device is None:
                device["host"], device["port"] = "127.0.0.1", 9  # nothing listens: a dead device
                continue
            device["transport"] = "tcp"
            device["host"], device["port"] = sim_device["host"], sim_device["port"]
            device["unit_id"] = sim_device["unit_id"]
            for key in ("baudrate", "parity", "stopbits", "bytesize"):
                device.pop(key, None)
        for device in config.get("f70", []):
            device["port"] = str(work / "f70")
        for channel in config.get("vibration", []):
            # The simulated motor turns at 1797 rpm; keep a configured search band around it.
            if "shaft_search_hz" in channel:
                channel["shaft_search_hz"] = [28.0, 31.0]
        config_file = work / "agent.toml"
        config_file.write_text(tomli_w.dumps(config))

        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", str(config_file)],
                                 stdout=(work / "agent.log").open("w"), stderr=subprocess.STDOUT, env=env)
        time.sleep(10.0)  # start-up (kernel cache load) is not part of the steady load
        cpu0, t0 = _cpu_seconds(agent.pid), time.monotonic()
        rss = []
        while time.monotonic() - t0 < args.seconds:
            if agent.poll() is not None:
                raise RuntimeError(f"agent exited with {agent.returncode}; see {work / 'agent.log'}")
            rss.append(_memory_kib(agent.pid))
            time.sleep(5.0)
        cpu1, t1 = _cpu_seconds(agent.pid), time.monotonic()
        peak = _memory_kib(agent.pid)[1]
    finally:
        if agent is not None:
            _stop(agent)
        _stop(sim)
        _stop(collector)
        for proc in vibration_sims:
            _stop(proc)

    share = 100.0 * (cpu1 - cpu0) / (t1 - t0)
    mean_rss = sum(r for r, _ in rss) / len(rss) / 1024
    print(f"config {args.config}: {len(template.get('vibration', []))} accelerometer channels, "
          f"{len(template.get('modbus', []))} Modbus and {len(template.get('f70', []))} F-70 devices")
    print(f"measured {t1 - t0:.0f} s: CPU {share:.1f} % of one core, RSS mean {mean_rss:.0f} MiB, "
          f"peak (VmHWM) {peak / 1024:.0f} MiB")
    print(f"files in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
