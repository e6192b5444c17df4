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

from .frame_stream import PtyVibrationSensor
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
    p.add_argument("--sample-rate", type=int, default=25600, help="synthetic stream sample rate in Hz (default 25600)")
    p.add_argument("--shaft-rpm", type=float, default=1797.0, help="synthetic shaft speed in rpm (default 1797)")
    p.add_argument("--samples-per-frame", type=int, default=256, help="samples per stream frame (default 256)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="playback and process speed factor: 10 runs ten times faster than real time")
    p.add_argument("--link", default=None, help="also make this path a symlink to the pty (a stable port name)")
    p.add_argument("--sdm630", action="store_true", help="start the SDM630 power meter")
    p.add_argument("--cpa", action="store_true", help="start the Cryomech CPA compressor")
    p.add_argument("--host", default="127.0.0.1", help="address the Modbus servers bind (default 127.0.0.1)")
    p.add_argument("--sdm630-port", type=int, default=0, help="SDM630 TCP port (default: ephemeral)")
    p.add_argument("--cpa-port", type=int, default=0, help="CPA TCP port (default: ephemeral)")
    p.add_argument("--seed", type=int, default=0, help="random seed of every simulated signal")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until SIGTERM)")
    p.add_argument("--manifest", default=None, help="write the endpoints as JSON to this file once all devices listen")
    return p


def _make_source(args: argparse.Namespace) -> tuple[Any, float, str]:
    if args.vibration == "synthetic":
        shaft_hz = args.shaft_rpm / 60.0
        source = SyntheticBearing(sample_rate=args.sample_rate, shaft_hz=shaft_hz, fault=args.fault, seed=args.seed)
        return source, args.shaft_rpm, f"synthetic bearing, {args.fault} defect"
    source = Recording(args.vibration)
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
    sensor: PtyVibrationSensor | None = None
    modbus: list[Any] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    try:
        if args.vibration != "none":
            source, rpm, description = _make_source(args)
            sensor = PtyVibrationSensor(source, samples_per_frame=args.samples_per_frame, speed=args.speed)
            if args.link:
                link = Path(args.link)
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(sensor.path)
            sensor.start()
            devices.append({"name": "vibration", "kind": "vibration", "path": sensor.path, "link": args.link,
                            "sample_rate": sensor.sample_rate, "shaft_rpm": rpm, "scale_g": sensor.scale,
                            "description": description})
        for kind, enabled, port in (("sdm630", args.sdm630, args.sdm630_port), ("cpa", args.cpa, args.cpa_port)):
            if enabled:
                device = await start_modbus_device(kind, host=args.host, port=port, seed=args.seed, speed=args.speed)
                modbus.append(device)
                devices.append({"name": kind, "kind": kind, "host": device.host, "port": device.port,
                                "unit_id": device.unit_id})
        if not devices:
            print("error: no device selected; pass --vibration, --sdm630 or --cpa", file=sys.stderr)
            return 2

        for d in devices:
            if d["kind"] == "vibration":
                where = d["path"] + (f" (link {d['link']})" if d["link"] else "")
                print(f"{d['name']:<10} pty {where}  {d['sample_rate']} Hz  shaft {d['shaft_rpm']:g} rpm  "
                      f"{d['description']}", flush=True)
            else:
                print(f"{d['name']:<10} modbus tcp {d['host']}:{d['port']}  unit {d['unit_id']}", flush=True)
        if args.manifest:
            _write_manifest(Path(args.manifest), {"devices": devices, "speed": args.speed, "pid": os.getpid()})

        try:
            await asyncio.wait_for(stop.wait(), timeout=args.duration)
        except TimeoutError:
            pass
        return 0
    finally:
        if sensor is not None:
            sensor.stop()
            log.info("vibration stream stopped: %d frames sent, %d dropped", sensor.frames_sent, sensor.frames_dropped)
        for device in modbus:
            await device.stop()
        if args.link:
            Path(args.link).unlink(missing_ok=True)
        if args.manifest:
            Path(args.manifest).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
