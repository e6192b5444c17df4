"""`edge-sim`: start simulated scanner-side devices and print where each listens."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .frame_stream import DEFAULT_HEADROOM, PtyVibrationSensor
from .modbus_sdm630 import CT_SCANNER_LOAD
from .scenario import Offsets, Scenario, ScenarioRunner, list_scenarios, load_scenario
from .vibration import FAULTS, Recording, SyntheticBearing

log = logging.getLogger("firmware_sim")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-sim",
        description="Simulated scanner-side devices: an accelerometer streaming frames over a "
                    "pseudo-terminal and Modbus TCP servers for an Eastron SDM630 meter and a "
                    "Cryomech CPA compressor.")
    p.add_argument("--vibration", default="synthetic",
                   help="'synthetic' (bearing-defect model, default), 'none', or the path of a CWRU .mat recording")
    p.add_argument("--fault", choices=FAULTS, default="inner", help="synthetic bearing defect (default inner)")
    p.add_argument("--sample-rate", type=int, default=None,
                   help="sample rate in Hz: of the synthetic stream (default 25600), or of a recording whose "
                        "rate is not in the built-in list of CWRU files")
    p.add_argument("--file-number", type=int, default=None,
                   help="CWRU file number of a recording whose name does not start with it (e.g. 105)")
    p.add_argument("--shaft-rpm", type=float, default=1797.0, help="synthetic shaft speed in rpm (default 1797)")
    p.add_argument("--samples-per-frame", type=int, default=256, help="samples per stream frame (default 256)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="playback and process speed factor: 10 runs ten times faster than real time")
    p.add_argument("--link", default=None, help="also make this path a symlink to the pty (a stable port name)")
    p.add_argument("--sdm630", action="store_true", help="start the SDM630 power meter")
    p.add_argument("--sdm630-load", choices=("compressor", "ct-scanner"), default="compressor",
                   help="what the SDM630 meters: a compressor (default) or a CT scanner whose scans show as "
                        "40-90 kW bursts")
    p.add_argument("--cpa", action="store_true", help="start the Cryomech CPA compressor")
    p.add_argument("--chiller", action="store_true", help="start the generic chiller (Modbus TCP)")
    p.add_argument("--room", action="store_true", help="start the generic room-environment sensor (Modbus TCP)")
    p.add_argument("--qm30vt2", action="store_true", help="start the Banner QM30VT2 vibration sensor (Modbus TCP)")
    p.add_argument("--rtu-bus", default=None, metavar="LINK",
                   help="serve the selected Modbus devices as RTU slaves on one pty RS-485 bus, with a stable "
                        "symlink at LINK, instead of one Modbus TCP server each")
    p.add_argument("--f70", action="store_true", help="start the Sumitomo F-70 compressor on a pty (RS-232)")
    p.add_argument("--f70-link", default=None, help="also make this path a symlink to the F-70's pty")
    p.add_argument("--vibration-speed", type=float, default=None,
                   help="pace of the accelerometer stream (default: --speed); lets a scenario run "
                        "hours per second while the stream stays at a rate the pty and the agent sustain")
    p.add_argument("--host", default="127.0.0.1", help="address the Modbus servers bind (default 127.0.0.1)")
    p.add_argument("--sdm630-port", type=int, default=0, help="SDM630 TCP port (default: ephemeral)")
    p.add_argument("--cpa-port", type=int, default=0, help="CPA TCP port (default: ephemeral)")
    p.add_argument("--seed", type=int, default=0, help="random seed of every simulated signal")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until SIGTERM)")
    p.add_argument("--manifest", default=None, help="write the endpoints as JSON to this file once all devices listen")
    p.add_argument("--scenario", default=None,
                   help="run a scenario: a built-in name (see --list-scenarios) or a TOML file; "
                        "its seed replaces --seed and --speed compresses its timeline")
    p.add_argument("--list-scenarios", action="store_true", help="print the built-in scenarios and exit")
    return p


def _peak_with_scenario(source: Any, scenario: Scenario | None) -> float:
    """Return the source's expected peak in g at the scenario's end, so growth does not clip."""
    peak = float(source.peak_g)
    if scenario is None or not hasattr(source, "offsets"):
        return peak
    growth = Offsets(("defect_g", "noise_g"))
    for step in scenario.steps:
        if step.device == "vibration" and step.action in ("ramp", "set"):
            growth.apply(step)
    extra = max(growth.at("defect_g", t) for t in (0.0, scenario.duration_s))
    noise = max(growth.at("noise_g", t) for t in (0.0, scenario.duration_s))
    return peak + max(0.0, extra) + 5.0 * max(0.0, noise)


def _make_source(args: argparse.Namespace) -> tuple[Any, float, str]:
    if args.vibration == "synthetic":
        shaft_hz = args.shaft_rpm / 60.0
        source = SyntheticBearing(sample_rate=args.sample_rate or 25600, shaft_hz=shaft_hz, fault=args.fault,
                                  seed=args.seed)
        return source, args.shaft_rpm, f"synthetic bearing, {args.fault} defect"
    source = Recording(args.vibration, sample_rate=args.sample_rate, file_number=args.file_number)
    if source.rpm is None:
        raise ValueError(f"{args.vibration} has no shaft speed variable; it cannot drive the demo analysis")
    return source, source.rpm, f"recording {Path(args.vibration).name} ({source.variable})"


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, path)


async def _run(args: argparse.Namespace) -> int:
    from .modbus_devices import start_modbus_device

    devices: list[dict[str, Any]] = []
    targets: dict[str, Any] = {}
    runner: ScenarioRunner | None = None
    scenario = load_scenario(args.scenario) if args.scenario else None
    seed = scenario.seed if scenario else args.seed
    args.seed = seed
    sensor: PtyVibrationSensor | None = None
    serial_devices: list[Any] = []
    modbus: list[Any] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    try:
        if args.vibration != "none":
            source, rpm, description = _make_source(args)
            full_scale = DEFAULT_HEADROOM * _peak_with_scenario(source, scenario)
            vibration_speed = args.vibration_speed or args.speed
            sensor = PtyVibrationSensor(source, samples_per_frame=args.samples_per_frame, speed=vibration_speed,
                                        full_scale_g=full_scale, link=args.link, seed=seed)
            sensor.start()
            targets["vibration"] = sensor
            devices.append({"name": "vibration", "kind": "vibration", "path": sensor.path, "link": args.link,
                            "sample_rate": sensor.sample_rate, "shaft_rpm": rpm, "scale_g": sensor.scale,
                            "description": description})
        selected = [(kind, port) for kind, enabled, port in (
            ("sdm630", args.sdm630, args.sdm630_port), ("cpa", args.cpa, args.cpa_port),
            ("chiller", args.chiller, 0), ("room", args.room, 0), ("qm30vt2", args.qm30vt2, 0)) if enabled]
        if args.rtu_bus and selected:
            from .modbus_devices import start_modbus_rtu_bus

            bus = await start_modbus_rtu_bus([{"kind": kind, "name": kind} for kind, _ in selected],
                                             transport="rtu", link=args.rtu_bus, seed=seed, speed=args.speed)
            modbus.append(bus)
            for kind, _ in selected:
                device = bus.devices[kind]
                targets[kind] = device
                devices.append({"name": kind, "kind": kind, "transport": "rtu", "path": bus.path,
                                "link": args.rtu_bus, "baudrate": bus.baudrate, "unit_id": device.unit_id})
            selected = []
        for kind, port in selected:
            options = dict(CT_SCANNER_LOAD) if kind == "sdm630" and args.sdm630_load == "ct-scanner" else {}
            device = await start_modbus_device(kind, host=args.host, port=port, seed=args.seed, speed=args.speed,
                                               **options)
            modbus.append(device)
            targets[kind] = device
            devices.append({"name": kind, "kind": kind, "transport": "tcp", "host": device.host,
                            "port": device.port, "unit_id": device.unit_id})
        if args.f70:
            from .sumitomo_f70 import start_f70

            f70 = start_f70(link=args.f70_link, seed=seed, speed=args.speed)
            serial_devices.append(f70)
            targets["f70"] = f70
            devices.append({"name": "f70", "kind": "f70", "path": f70.path, "link": args.f70_link})
        if not devices:
            print("error: no device selected; pass --vibration, --sdm630, --cpa, --chiller, --room, --qm30vt2 "
                  "or --f70", file=sys.stderr)
            return 2

        for d in devices:
            if d["kind"] == "vibration":
                where = d["path"] + (f" (link {d['link']})" if d["link"] else "")
                print(f"{d['name']:<10} pty {where}  {d['sample_rate']} Hz  shaft {d['shaft_rpm']:g} rpm  "
                      f"{d['description']}", flush=True)
            elif d.get("transport") == "rtu":
                print(f"{d['name']:<10} modbus rtu {d['path']} (link {d['link']})  {d['baudrate']} 8N1  "
                      f"unit {d['unit_id']}", flush=True)
            elif d["kind"] == "f70":
                where = d["path"] + (f" (link {d['link']})" if d["link"] else "")
                print(f"{d['name']:<10} pty {where}  9600 8N1  Sumitomo F-70 protocol", flush=True)
            else:
                print(f"{d['name']:<10} modbus tcp {d['host']}:{d['port']}  unit {d['unit_id']}", flush=True)
        if scenario is not None:
            runner = ScenarioRunner(scenario, targets, speed=args.speed)
            runner.start()
            print(f"scenario {scenario.name}: {len(scenario.steps)} steps over {scenario.duration_s / 3600:g} h "
                  f"simulated, {scenario.duration_s / args.speed:g} s real at speed {args.speed:g}", flush=True)
        if args.manifest:
            _write_manifest(Path(args.manifest), {"devices": devices, "speed": args.speed, "pid": os.getpid(),
                                                  "scenario": scenario.name if scenario else None})

        try:
            await asyncio.wait_for(stop.wait(), timeout=args.duration)
        except TimeoutError:
            pass
        return 0
    finally:
        if runner is not None:
            runner.stop()
            for error in runner.errors:
                log.error("scenario step failed: %s", error)
        if sensor is not None:
            sensor.stop()
            log.info("vibration stream stopped: %d frames sent, %d dropped", sensor.frames_sent, sensor.frames_dropped)
        for device in modbus:
            await device.stop()
        for device in serial_devices:
            device.stop()
        if args.link and Path(args.link).is_symlink():
            Path(args.link).unlink()
        if args.manifest:
            Path(args.manifest).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_scenarios:
        for name in list_scenarios():
            scenario = load_scenario(name)
            first_sentence = " ".join(scenario.description.split()).split(". ")[0].rstrip(".")
            print(f"{name:<24} {first_sentence}")
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.speed > 0:
        print(f"error: --speed {args.speed} is invalid; pass a positive factor such as 1 or 10", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
