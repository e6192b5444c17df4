"""Command line of the agent: `edge-agent run|check-config|warmup|collect|demo`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config_errors import ConfigError
from .jitcache import CacheDirError
from .logutil import configure_logging

log = logging.getLogger("agent")


# Points a person watching a compressor or a power meter looks at first.
DEMO_POINTS = ("operating_state", "low_pressure", "high_pressure", "helium_temperature", "total_power",
               "voltage_l1", "frequency", "return_pressure", "water_inlet_temperature",
               "helium_discharge_temperature")


def format_summary_line(summary: dict[str, Any]) -> str:
    """Render one summary as a line for a person watching the agent."""
    clock = time.strftime("%H:%M:%S", time.localtime(summary["t_end"]))
    head = f"{clock} #{summary.get('seq', '?'):<4} {summary['source']:<18}"
    if summary["quality"].get("partial_window"):
        head += " (last, partial window)"
    f = summary["features"]
    q = summary["quality"]
    if summary["kind"] == "alarm":
        alarm = summary["alarms"][0]
        return f"{head} ALARM {f.get('event', '?').upper()} [{alarm['grade']}] {alarm['name']}: {alarm['message']}"
    if summary["kind"] == "vibration" and "velocity_rms_mm_s" in f:
        dominant = f["dominant_defect"]
        if f.get("bpfo_score") is None:
            indicator = "shaft speed unknown, no defect scored"
        elif dominant is None:
            best = max(("bpfo", "bpfi", "bsf", "ftf"), key=lambda name: f[f"{name}_score"])
            indicator = f"no bearing defect (highest {best.upper()} score {f[f'{best}_score']:.1f})"
        else:
            indicator = f"{dominant.upper()} {f[f'{dominant}_hz']:.1f} Hz score {f[f'{dominant}_score']:.1f}"
        return (f"{head} v_rms {f['velocity_rms_mm_s']:6.3f} mm/s zone {f['severity_zone']}  "
                f"a_rms {f['accel_rms']:.3f} {f['unit']}  kurt {f['kurtosis']:.2f}  {indicator}")
    if summary["kind"] == "vibration":
        return f"{head} no analysis frames (frames received: {q.get('frames', 0)})"
    values = []
    points = [(name, point) for name, point in f.items() if isinstance(point, dict)]
    preferred = [p for p in points if p[0] in DEMO_POINTS] or points
    for name, point in preferred[:5]:
        last = point["last"]
        if isinstance(last, float):
            shown = f"{last:.0f}" if abs(last) >= 1e4 else f"{last:.4g}"
        else:
            shown = str(last)
        values.append(f"{name}={shown}{(' ' + point['unit']) if point.get('unit') else ''}")
    errors = q.get("poll_errors", 0)
    tail = f"  ({errors} poll errors)" if errors else ""
    return f"{head} " + ", ".join(values) + tail if values else f"{head} no values{tail}"


def _set_cache_dir(args: argparse.Namespace) -> None:
    """Apply --cache-dir, else the config's [dsp] cache_dir, before the DSP is imported."""
    from .jitcache import peek_cache_dir, use_cache_dir

    path = args.cache_dir
    if path is None and getattr(args, "config", None):
        path = peek_cache_dir(args.config)
    if path is not None:
        use_cache_dir(path)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .service import Agent

    config = load_config(args.config)

    def echo(summary: dict[str, Any]) -> None:
        if args.echo == "line":
            print(format_summary_line(summary), flush=True)
        elif args.echo == "jsonl":
            print(json.dumps(summary, sort_keys=True), flush=True)

    agent = Agent(config, on_summary=echo if args.echo != "none" else None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, agent.stop)
        reloads: set[asyncio.Task] = set()

        def reload() -> None:
            task = loop.create_task(agent.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        await agent.run(duration_s=args.duration)

    asyncio.run(main())
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: valid ({len(cfg.vibration)} vibration, {len(cfg.modbus)} Modbus and {len(cfg.f70)} F-70 "
          f"sources, {len(cfg.alarms)} alarm rules)")
    return 0


def _cmd_warmup(args: argparse.Namespace) -> int:
    import os

    started = time.perf_counter()
    from .dsp import warmup

    warmup()
    where = os.environ.get("NUMBA_CACHE_DIR") or "Numba's default location beside the package"
    print(f"analysis kernels compiled or loaded from cache in {time.perf_counter() - started:.2f} s; cache: {where}")
    return 0


def _cmd_collect_serve(args: argparse.Namespace) -> int:
    from .uplink import auth
    from .uplink.collect import PollTarget
    from .uplink.collector import serve

    try:
        token = auth.read_token_file(args.token_file) if args.token_file else None
        poll_token = auth.read_token_file(args.poll_token_file) if args.poll_token_file else None
        ssl_context = auth.server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        poll_ssl = auth.client_ssl_context(args.poll_ca_file) if args.poll_ca_file else None
        targets = [PollTarget(url, poll_token) for url in args.poll]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(args.db, host=args.host, port=args.port, port_file=args.port_file, stop=stop, token=token,
                    ssl_context=ssl_context, poll=targets, poll_interval_s=args.poll_interval,
                    poll_ssl_context=poll_ssl)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"error: collector cannot start: {exc.strerror or exc}; choose another --port or --db", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        print(f"error: {args.db} is not a collector database ({exc}); pass a new or existing collector file",
              file=sys.stderr)
        return 2
    return 0


def _open_store(db: str):
    """Open an existing collector database, or print why not and return None."""
    from .uplink.collector import CollectorStore

    if not Path(db).exists():
        print(f"error: collector database {db} not found; pass the --db used by 'edge-agent collect serve'",
              file=sys.stderr)
        return None
    try:
        return CollectorStore(db)
    except sqlite3.DatabaseError as exc:
        print(f"error: {db} is not a collector database ({exc})", file=sys.stderr)
        return None


def _cmd_collect_list(args: argparse.Namespace) -> int:
    from .uplink.collect import list_sources
    from .uplink.collector import format_table

    store = _open_store(args.db)
    if store is None:
        return 2
    try:
        if args.summaries:
            for summary in store.summaries(source=args.source):
                print(json.dumps(summary, sort_keys=True))
        else:
            print(format_table(list_sources(store)))
    finally:
        store.close()
    return 0


def _cmd_collect_export(args: argparse.Namespace) -> int:
    from .uplink.collect import export_summaries

    store = _open_store(args.db)
    if store is None:
        return 2
    try:
        out = open(args.output, "w", encoding="utf-8", newline="") if args.output != "-" else sys.stdout
        try:
            count = export_summaries(store, out, fmt=args.format, gateway=args.gateway, source=args.source,
                                     since=args.since, until=args.until,
                                     features=args.features.split(",") if args.features else None)
        finally:
            if out is not sys.stdout:
                out.close()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (head, less) closed the pipe early: not an error of the export.
        sys.stdout = None
        return 0
    finally:
        store.close()
    print(f"exported {count} summaries", file=sys.stderr)
    return 0


def _cmd_validate_cwru(args: argparse.Namespace) -> int:
    from .validation import diagnose_file, markdown_table

    folder = Path(args.folder)
    files = sorted(folder.glob("*.mat"), key=lambda p: (len(p.name), p.name))
    if not files:
        print(f"error: no .mat files in {folder}; pass the folder that holds the CWRU recordings", file=sys.stderr)
        return 2
    print(markdown_table([diagnose_file(path, automatic=args.automatic) for path in files]))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .fieldview import ApiError, fetch, print_status

    try:
        if args.json:
            print(json.dumps(fetch(args.url, "/v1/status"), indent=2, sort_keys=True))
        else:
            print_status(args.url)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    from .fieldview import tail

    tail(args.url, interval_s=args.interval, count=args.count)
    return 0


def _cmd_spectrum(args: argparse.Namespace) -> int:
    from .fieldview import ApiError, print_spectrum

    try:
        print_spectrum(args.url, args.source, png=args.png)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_baseline_reset(args: argparse.Namespace) -> int:
    import httpx

    try:
        response = httpx.post(args.url.rstrip("/") + "/v1/baseline/reset", json={"source": args.source},
                              timeout=5.0, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the agent at {args.url} ({exc}); is it running?", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"error: {response.json().get('error', response.text)}", file=sys.stderr)
        return 1
    print(f"{args.source}: {response.json()['rules_reset']} alarm rules start learning again")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(duration_s=args.duration, recording=args.recording, workdir=Path(args.workdir),
                    config_path=Path(args.config) if args.config else None)


def _timestamp(text: str) -> float:
    """Parse Unix seconds or an ISO 8601 date/time (UTC when it names no zone)."""
    from datetime import datetime, timezone

    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time; use Unix seconds or ISO 8601 such as "
                                         "2026-12-04 or 2026-12-04T10:30:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Edge agent for imaging-scanner plant.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--log-level", default="INFO", help="log level: DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--cache-dir", default=None,
                        help="directory for compiled analysis kernels (default: the config's [dsp] cache_dir, "
                             "else NUMBA_CACHE_DIR, else beside the package)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the agent with a configuration file")
    p.add_argument("config", help="agent TOML configuration file")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until SIGTERM)")
    p.add_argument("--echo", choices=("none", "line", "jsonl"), default="none",
                   help="print each summary written to the buffer: a readable line or one JSON object per line")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a configuration file without starting")
    p.add_argument("config")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("warmup", help="compile the analysis kernels into the Numba cache")
    p.add_argument("--config", default=None, help="take the cache directory from this config's [dsp] cache_dir")
    p.set_defaults(func=_cmd_warmup)

    collect = sub.add_parser("collect", help="reference central collector")
    csub = collect.add_subparsers(dest="collect_command", required=True)
    p = csub.add_parser("serve", help="accept summary batches over HTTP")
    p.add_argument("--db", default="collector.sqlite", help="SQLite file that stores the summaries")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8700, help="TCP port, 0 for an ephemeral port (default 8700)")
    p.add_argument("--port-file", default=None, help="write the bound port to this file once listening")
    p.add_argument("--token-file", default=None, help="require this bearer token on pushes")
    p.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="private key of --tls-cert, if not in the same file")
    p.add_argument("--poll", action="append", default=[], metavar="URL",
                   help="also poll this gateway's pull API (repeatable), e.g. http://10.0.0.5:8701")
    p.add_argument("--poll-token-file", default=None, help="bearer token for the gateways' pull APIs")
    p.add_argument("--poll-ca-file", default=None, help="CA file that signs the gateways' HTTPS certificates")
    p.add_argument("--poll-interval", type=float, default=10.0, help="seconds between polls (default 10)")
    p.set_defaults(func=_cmd_collect_serve)
    p = csub.add_parser("list", help="print the count, time range and bytes of stored summaries per source")
    p.add_argument("--db", default="collector.sqlite")
    p.add_argument("--summaries", action="store_true", help="print every stored summary as JSON instead of the table")
    p.add_argument("--source", default=None, help="with --summaries: only this source")
    p.set_defaults(func=_cmd_collect_list)
    p = csub.add_parser("export", help="write stored summaries as JSON lines or CSV")
    p.add_argument("--db", default="collector.sqlite")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--output", default="-", help="file to write (default: standard output)")
    p.add_argument("--gateway", default=None)
    p.add_argument("--source", default=None)
    p.add_argument("--since", type=_timestamp, default=None,
                   help="only windows ending at or after this time: Unix seconds or ISO 8601 (UTC if no zone)")
    p.add_argument("--until", type=_timestamp, default=None,
                   help="only windows starting before this time: Unix seconds or ISO 8601")
    p.add_argument("--features", default=None,
                   help="comma-separated features for CSV columns, e.g. velocity_rms_mm_s,low_pressure.mean")
    p.set_defaults(func=_cmd_collect_export)

    url_help = "the agent's diagnostics API (default http://127.0.0.1:8780, the [api] default)"
    p = sub.add_parser("status", help="print sources, alarms, buffer and uplink state of the running agent")
    p.add_argument("--url", default="http://127.0.0.1:8780", help=url_help)
    p.add_argument("--json", action="store_true", help="print the raw status document")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("tail", help="live view of the running agent, refreshed until Ctrl-C")
    p.add_argument("--url", default="http://127.0.0.1:8780", help=url_help)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    p.set_defaults(func=_cmd_tail)

    p = sub.add_parser("spectrum", help="draw the latest spectrum and envelope spectrum of a vibration source")
    p.add_argument("source", help="vibration source id from the config")
    p.add_argument("--url", default="http://127.0.0.1:8780", help=url_help)
    p.add_argument("--png", default=None, help="also save a plot to this PNG file (needs matplotlib)")
    p.set_defaults(func=_cmd_spectrum)

    baseline = sub.add_parser("baseline", help="manage learned baselines")
    bsub = baseline.add_subparsers(dest="baseline_command", required=True)
    p = bsub.add_parser("reset", help="after maintenance: forget what the alarm rules of a source learned")
    p.add_argument("source", help="source id from the config")
    p.add_argument("--url", default="http://127.0.0.1:8780", help=url_help)
    p.set_defaults(func=_cmd_baseline_reset)

    p = sub.add_parser("validate-cwru", help="diagnose every CWRU .mat recording in a folder (needs scipy)")
    p.add_argument("folder")
    p.add_argument("--automatic", action="store_true",
                   help="choose the envelope band from the data and estimate the shaft speed (20-40 Hz) "
                        "instead of using 2-5 kHz and the recorded speed")
    p.set_defaults(func=_cmd_validate_cwru)

    p = sub.add_parser("demo", help="run simulators, agent and collector together for a bounded time")
    p.add_argument("--duration", type=float, default=60.0, help="seconds the agent runs (default 60)")
    p.add_argument("--recording", default=None, help="stream this CWRU .mat recording instead of the synthetic bearing")
    p.add_argument("--workdir", default="demo-run", help="folder for the demo's databases, config and logs")
    p.add_argument("--config", default=None, help="demo agent config to start from (default examples/demo.toml)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Logs share stdout with nothing but the service's journal, except where a command
    # prints data there: then they go to stderr.
    service = (args.command == "run" and args.echo == "none"
               or args.command == "collect" and args.collect_command == "serve")
    data_on_stdout = not service
    configure_logging(args.log_level, sys.stderr if data_on_stdout else sys.stdout)
    try:
        _set_cache_dir(args)
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CacheDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
