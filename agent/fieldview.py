"""Terminal views for field engineers: `edge-agent status`, `tail` and `spectrum`.

They read the agent's local diagnostics API, so they work beside a running service
without touching its files.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:8780"
MARKER_LETTERS = {"bpfo": "O", "bpfi": "I", "bsf": "B", "ftf": "C", "shaft": "S"}


class ApiError(RuntimeError):
    """The diagnostics API could not be reached or returned an error."""


def fetch(url: str, path: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """GET a JSON document from the agent's diagnostics API."""
    try:
        response = httpx.get(url.rstrip("/") + path, timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as exc:
        raise ApiError(f"cannot reach the agent at {url} ({exc}); is it running, and is [api] enabled "
                       "on this host and port?") from exc
    if response.status_code != 200:
        try:
            detail = response.json().get("error", response.text)
        except ValueError:
            detail = response.text
        raise ApiError(f"{path} returned {response.status_code}: {detail}")
    return response.json()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _value(value: Any, unit: str | None = None) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return f"{text} {unit}" if unit else text


def render_status(status: dict[str, Any]) -> Group:
    """Build the rich renderable of one status document."""

    head = Text(f"gateway {status['gateway']}  agent {status['version']}  up {_age(status['uptime_s'])}  "
                f"buffer {status['buffer']['depth']} undelivered (oldest {_age(status['buffer']['oldest_undelivered_age_s'])})  "
                f"uplink sent {status['uplink']['summaries_sent']}, failures {status['uplink']['failures']}")

    sources = Table(title="sources", expand=True)
    for column in ("source", "kind", "state", "current values", "errors", "restarts"):
        sources.add_column(column)
    for s in status["sources"]:
        counters = s.get("counters", {})
        errors = sum(v for k, v in counters.items() if k in ("errors", "bad_crc", "timeouts", "read_errors",
                                                             "crc_errors", "bad_header"))
        if s["kind"] == "vibration":
            f = s.get("features", {})
            values = (f"v_rms {_value(f.get('velocity_rms_mm_s'), 'mm/s')} zone {f.get('severity_zone', '-')}  "
                      f"kurt {_value(f.get('kurtosis'))}  defect {f.get('dominant_defect') or 'none'}") if f else "-"
        else:
            units = s.get("units", {})
            values = ", ".join(f"{k}={_value(v, units.get(k))}" for k, v in list(s.get("values", {}).items())[:6]) or "-"
        style = {"ok": "green", "failing": "red", "disconnected": "yellow", "not analysing": "red"}.get(s["state"], "")
        sources.add_row(s["id"], s["kind"], Text(s["state"], style=style), values, str(errors), str(s["restarts"]))

    alarms = Table(title="active alarms", expand=True)
    for column in ("source", "alarm", "grade", "message"):
        alarms.add_column(column)
    for a in status["alarms"]:
        alarms.add_row(a["source"], a["name"], a["grade"], a.get("message", ""))

    errors = [f"{s['id']}: {s['last_error']}" for s in status["sources"] if s.get("last_error")]
    if status["uplink"].get("last_error"):
        errors.append(f"uplink: {status['uplink']['last_error']}")
    tail = Text("last errors: " + ("; ".join(errors) if errors else "none"))
    return Group(head, sources, alarms, tail)


def print_status(url: str, console: Console | None = None) -> None:
    (console or Console()).print(render_status(fetch(url, "/v1/status")))


def tail(url: str, interval_s: float = 2.0, count: int | None = None, console: Console | None = None) -> None:
    """Redraw the status every `interval_s` until interrupted (or `count` refreshes)."""
    console = console or Console()
    refreshes = 0
    with Live(Text("connecting..."), console=console, refresh_per_second=4, screen=False) as live:
        while count is None or refreshes < count:
            try:
                live.update(render_status(fetch(url, "/v1/status")))
            except ApiError as exc:
                live.update(Text(f"{exc} (retrying)", style="red"))
            refreshes += 1
            if count is None or refreshes < count:
                time.sleep(interval_s)


def _bars(values: list[float], bin_hz: float, max_hz: float, width: int, height: int,
          markers: dict[str, float]) -> list[str]:
    """Draw a spectrum as a block chart: one column per frequency slice, peak per slice."""
    top_bin = min(len(values) - 1, int(max_hz / bin_hz))
    columns = []
    for c in range(width):
        lo = 1 + int(c * top_bin / width)
        hi = max(lo + 1, 1 + int((c + 1) * top_bin / width))
        columns.append(max(values[lo:hi]) if lo < len(values) else 0.0)
    peak = max(columns) or 1.0
    rows = []
    for r in range(height, 0, -1):
        level = peak * r / height
        rows.append("".join("█" if v >= level else " " for v in columns))
    axis = [" "] * width
    labels = []
    for name, freq in sorted(markers.items(), key=lambda item: item[1]):
        c = int(freq / max_hz * width) if math.isfinite(freq) else -1
        if 0 <= c < width:
            axis[c] = MARKER_LETTERS.get(name, "?")
            labels.append(f"{MARKER_LETTERS.get(name, '?')}: {name.upper() if name != 'shaft' else '1x'} {freq:.1f} Hz")
    rows.append("".join(axis))
    rows.append(f"0 Hz{' ' * max(1, width - 14)}{max_hz:.0f} Hz   peak {peak:.3g}")
    rows.append("markers: " + ", ".join(labels) if labels else "markers: none (shaft speed unknown)")
    return rows


def print_spectrum(url: str, source: str, png: str | None = None, console: Console | None = None) -> None:
    """Draw the latest spectrum and envelope spectrum of `source`, with defect markers."""
    data = fetch(url, f"/v1/spectrum/{source}")
    console = console or Console()
    width = max(40, min(120, console.width - 2))
    markers = dict(data.get("defect_hz") or {})
    if data.get("shaft_hz"):
        markers["shaft"] = data["shaft_hz"]
    console.print(f"[bold]{source}[/bold]: velocity RMS {data['velocity_rms_mm_s']:.3f} mm/s, zone "
                  f"{data['severity_zone']}, dominant defect {data.get('dominant_defect') or 'none'}")
    console.print(f"spectrum (peak amplitude, {data['unit']}), 0-2000 Hz:")
    for row in _bars(data["spectrum"], data["bin_hz"], 2000.0, width, 10, {"shaft": markers.get("shaft", math.nan)}):
        console.print(row, highlight=False)
    top = min(len(data["envelope_spectrum"]) * data["bin_hz"], max(markers.values(), default=100.0) * 4)
    console.print(f"envelope spectrum ({data['envelope_band_hz'][0]:.0f}-{data['envelope_band_hz'][1]:.0f} Hz band), "
                  f"0-{top:.0f} Hz:")
    for row in _bars(data["envelope_spectrum"], data["bin_hz"], top, width, 10, markers):
        console.print(row, highlight=False)
    if png:
        save_png(data, markers, png)
        console.print(f"saved {png}")


def save_png(data: dict[str, Any], markers: dict[str, float], path: str) -> None:
    """Plot both spectra with defect markers into a PNG file (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ApiError("--png needs matplotlib: pip install 'imaging-edge-agent[plots]'") from exc
    import numpy as np

    spectrum = np.asarray(data["spectrum"])
    envelope = np.asarray(data["envelope_spectrum"])
    f = np.arange(spectrum.size) * data["bin_hz"]
    fe = np.arange(envelope.size) * data["bin_hz"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7))
    a1.plot(f, spectrum, lw=0.7)
    a1.set_xlim(0, min(f[-1], 2000))
    a1.set_xlabel("Hz")
    a1.set_ylabel(f"amplitude ({data['unit']})")
    a1.set_title(f"{data['source']}: spectrum, velocity RMS {data['velocity_rms_mm_s']:.2f} mm/s "
                 f"(zone {data['severity_zone']})")
    top = min(fe[-1], max(markers.values(), default=100.0) * 4)
    a2.plot(fe, envelope, lw=0.7)
    a2.set_xlim(0, top)
    for name, freq in markers.items():
        for h in (1, 2, 3):
            if h * freq < top:
                a2.axvline(h * freq, ls="--", lw=0.6, color="C1" if name != "shaft" else "0.6")
        a2.text(freq, a2.get_ylim()[1] * 0.95, name.upper() if name != "shaft" else "1x", fontsize=8)
    a2.set_xlabel("Hz")
    a2.set_ylabel(f"envelope amplitude ({data['unit']})")
    band = data["envelope_band_hz"]
    a2.set_title(f"envelope spectrum, band {band[0]:.0f}-{band[1]:.0f} Hz, dominant defect "
                 f"{data.get('dominant_defect') or 'none'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
