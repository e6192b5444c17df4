"""Agent configuration: one TOML file parsed into typed, validated objects."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .alarms import RuleConfig, parse_grades, parse_rule
from .config_errors import ConfigError, Section
from .drivers.modbus import ModbusDeviceConfig, parse_modbus_device
from .drivers.sumitomo_f70 import F70Config, parse_f70_device
from .kpi import KpiConfig, check_sources, parse_kpi
from .dsp import DefectOrders, ZONE_LIMITS_MM_S, orders_from_geometry

# Defect orders of an SKF 6205 deep-groove ball bearing (9 balls, 7.94 mm balls on a
# 39.04 mm pitch circle, 0 degree contact angle), a common motor bearing.
SKF_6205_ORDERS = {"bpfo": 3.5848, "bpfi": 5.4152, "bsf": 2.3568, "ftf": 0.39828}


@dataclass(frozen=True)
class VibrationConfig:
    id: str
    port: str
    baudrate: int
    channel: int
    frame_length: int
    overlap: float
    input_unit: str
    velocity_band_hz: tuple[float, float]
    envelope_band_hz: tuple[float, float] | None  # None: chosen from the first frames
    shaft_hz: float | None  # None: estimated from the spectrum within shaft_search_hz
    shaft_search_hz: tuple[float, float] | None
    shaft_harmonics: int
    bands_hz: tuple[tuple[float, float], ...]
    peaks: int
    zone_limits_mm_s: tuple[float, float, float]
    orders: DefectOrders
    defect_threshold: float
    defect_harmonics: int
    defect_tolerance: float


@dataclass(frozen=True)
class UplinkConfig:
    url: str | None
    token_file: Path | None
    ca_file: Path | None
    client_cert: Path | None
    client_key: Path | None
    retry_after_max_s: float
    batch_size: int
    timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    drain_timeout_s: float


@dataclass(frozen=True)
class PullConfig:
    enabled: bool
    host: str
    port: int
    token_file: Path | None


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool
    host: str
    port: int


@dataclass(frozen=True)
class AgentConfig:
    path: str
    gateway_id: str
    summary_period_s: float
    buffer_path: Path
    buffer_synchronous: str
    buffer_budget_bytes: int
    uplink: UplinkConfig
    pull: PullConfig
    dsp_cache_dir: Path | None
    api: ApiConfig
    vibration: list[VibrationConfig] = field(default_factory=list)
    modbus: list[ModbusDeviceConfig] = field(default_factory=list)
    f70: list[F70Config] = field(default_factory=list)
    alarms: list[RuleConfig] = field(default_factory=list)
    alarm_response_s: dict[str, float] = field(default_factory=dict)
    kpis: list[KpiConfig] = field(default_factory=list)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate the agent's TOML file. Raises ConfigError on any invalid value."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "<file>", str(path), f"a readable file ({exc.strerror})") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), "<file>", str(path), f"valid UTF-8 TOML ({exc})") from exc
    return parse_config(data, str(path), base_dir=path.parent)


def parse_config(data: dict[str, Any], file: str, base_dir: Path) -> AgentConfig:
    """Validate an already parsed TOML document. Relative paths resolve against base_dir."""
    root = Section(file, "", data)
    gateway_id = root.string("gateway_id")

    summary = root.sub("summary")
    period = summary.number("period_s", 10.0, lo=0.5, hi=3600.0)
    summary.finish()

    buffer = root.sub("buffer")
    buffer_path = base_dir / buffer.string("path", "state/buffer.sqlite")
    synchronous = buffer.string("synchronous", "FULL", choices=("FULL", "NORMAL", "EXTRA"))
    budget = buffer.integer("budget_bytes", 256 * 1024 * 1024, lo=1024 * 1024)
    buffer.finish()

    uplink = _parse_uplink(root.sub("uplink"), base_dir)
    pull = _parse_pull(root.sub("pull"), base_dir)
    dsp = root.sub("dsp")
    cache_dir = dsp.string("cache_dir", None) if dsp.raw("cache_dir", None) is not None else None
    dsp.finish()
    api_section = root.sub("api")
    api = ApiConfig(
        enabled=api_section.boolean("enabled", True),
        host=api_section.string("host", "127.0.0.1"),
        port=api_section.integer("port", 8780, lo=0, hi=65535),
    )
    api_section.finish()
    if api.enabled and api.host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(file, "api.host", api.host,
                          "a loopback address (127.0.0.1 or ::1): the diagnostics API has no authentication")
    vibration = [_parse_vibration(s) for s in root.table_list("vibration")]
    modbus = [parse_modbus_device(s) for s in root.table_list("modbus")]
    f70 = [parse_f70_device(s) for s in root.table_list("f70")]
    alarms = [parse_rule(s) for s in root.table_list("alarm")]
    response_s = parse_grades(root.sub("alarm_grades"))
    kpis = [parse_kpi(s) for s in root.table_list("kpi")]
    root.finish()

    ids = [v.id for v in vibration] + [m.id for m in modbus] + [f.id for f in f70]
    for source_id in ids:
        if ids.count(source_id) > 1:
            raise ConfigError(file, "id", source_id,
                              "a source id used by only one [[vibration]], [[modbus]] or [[f70]] entry")
    check_sources(file, "alarm", alarms, set(ids))
    check_sources(file, "kpi", kpis, set(ids))
    _check_metrics(file, vibration, modbus, f70, alarms, kpis)
    names = [f"{a.source}/{a.name}" for a in alarms]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            raise ConfigError(file, f"alarm[{i}].name", alarms[i].name, "a name used once per source")
    return AgentConfig(file, gateway_id, period, buffer_path, synchronous, budget, uplink, pull,
                       base_dir / cache_dir if cache_dir else None, api, vibration, modbus, f70, alarms,
                       response_s, kpis)


def _path(s: Section, name: str, base_dir: Path, must_exist: bool = True) -> Path | None:
    value = s.raw(name, None)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(s.file, s.key(name), value, "a file path")
    path = base_dir / Path(value).expanduser()
    if must_exist and not path.is_file():
        raise ConfigError(s.file, s.key(name), value, f"an existing, readable file ({path} not found)")
    return path


# Features the KPI tables add to a source's summaries; alarm rules may watch them too.
KPI_METRICS = {"energy_kwh", "energy_kwh_per_h", "scans", "scan_energy_kwh", "energy_per_scan_kwh",
               "operating_hours", "time_normal_s", "time_degraded_s", "time_fault_s"}


def _source_metrics(vibration, modbus, f70) -> dict[str, set[str]]:
    from .drivers.sumitomo_f70 import ALARM_BITS, PRESSURE_POINTS, TEMPERATURE_POINTS
    from .sources import vibration_metric_names

    metrics: dict[str, set[str]] = {v.id: vibration_metric_names(v) for v in vibration}
    for m in modbus:
        names = set()
        for point in m.points:
            names.add(point.name)
            if point.type == "bitfield":
                names |= {f"{point.name}.{bit}" for bit, _ in point.bits}
                names.add(f"{point.name}.active")
        metrics[m.id] = names
    f70_names = set(TEMPERATURE_POINTS) | set(PRESSURE_POINTS) | {f"alarm_{name}" for _, name in ALARM_BITS}
    f70_names |= {"status_word", "operating_state", "system_on", "solenoid_on", "db25_config_2", "alarm_active",
                  "operating_hours"}
    for f in f70:
        metrics[f.id] = f70_names
    return metrics


def _check_metrics(file: str, vibration, modbus, f70, alarms, kpis) -> None:
    """Reject alarm metrics and KPI points that the source never reports (a typo would
    silently disable the alarm)."""
    metrics = _source_metrics(vibration, modbus, f70)
    for kind, items, attribute, extra in (("kpi", kpis, "point", set()), ("alarm", alarms, "metric", KPI_METRICS)):
        for i, item in enumerate(items):
            known = metrics.get(item.source, set()) | extra
            value = getattr(item, attribute)
            if value not in known:
                close = sorted(name for name in known if name[:4] == value[:4]) or sorted(known)[:12]
                raise ConfigError(file, f"{kind}[{i}].{attribute}", value,
                                  f"a metric that source {item.source!r} reports, such as " + ", ".join(close[:12]))


def _parse_uplink(s: Section, base_dir: Path) -> UplinkConfig:
    url = s.raw("url", None)
    if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
        raise ConfigError(s.file, s.key("url"), url, "an http:// or https:// URL, or no key to keep summaries on the gateway")
    cfg = UplinkConfig(
        url=url,
        token_file=_path(s, "token_file", base_dir),
        ca_file=_path(s, "ca_file", base_dir),
        client_cert=_path(s, "client_cert", base_dir),
        client_key=_path(s, "client_key", base_dir),
        retry_after_max_s=s.number("retry_after_max_s", 3600.0, lo=1.0, hi=86400.0),
        batch_size=s.integer("batch_size", 100, lo=1, hi=10000),
        timeout_s=s.number("timeout_s", 10.0, lo=0.1, hi=300.0),
        backoff_initial_s=s.number("backoff_initial_s", 1.0, lo=0.01, hi=600.0),
        backoff_max_s=s.number("backoff_max_s", 60.0, lo=0.1, hi=3600.0),
        drain_timeout_s=s.number("drain_timeout_s", 5.0, lo=0.0, hi=300.0),
    )
    s.finish()
    return cfg


def _parse_pull(s: Section, base_dir: Path) -> PullConfig:
    from .uplink.auth import read_token_file
    from .uplink.pull import check_pull_binding

    cfg = PullConfig(
        enabled=s.boolean("enabled", False),
        host=s.string("host", "127.0.0.1"),
        port=s.integer("port", 8701, lo=0, hi=65535),
        token_file=_path(s, "token_file", base_dir),
    )
    s.finish()
    if cfg.enabled:
        try:
            token = read_token_file(cfg.token_file) if cfg.token_file else None
            check_pull_binding(cfg.host, token)
        except (OSError, ValueError) as exc:
            raise ConfigError(s.file, s.key("host"), cfg.host, f"a loopback address or a token_file ({exc})") from exc
    return cfg


def _band(s: Section, name: str, default: tuple[float, float]) -> tuple[float, float]:
    value = s.raw(name, list(default))
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not 0 < value[0] < value[1]):
        raise ConfigError(s.file, s.key(name), value, "[low, high] in Hz with 0 < low < high")
    return float(value[0]), float(value[1])


def _parse_vibration(s: Section) -> VibrationConfig:
    source_id = s.string("id")
    port = s.string("port")
    baudrate = s.integer("baudrate", 921600, lo=1200, hi=12_000_000)
    channel = s.integer("channel", 0, lo=0, hi=7)
    frame_length = s.integer("frame_length", 4096, lo=64, hi=1 << 20)
    if frame_length & (frame_length - 1):
        raise ConfigError(s.file, s.key("frame_length"), frame_length, "a power of two such as 4096 or 16384")
    overlap = s.number("overlap", 0.5, lo=0.0, hi=0.9)
    input_unit = s.string("input_unit", "g", choices=("g", "m/s2"))
    if s.has("envelope_band_hz") and s.raw("envelope_band_hz") == "auto":
        envelope_band = None
    else:
        envelope_band = _band(s, "envelope_band_hz", (2000.0, 5000.0))

    given = [k for k in ("shaft_hz", "shaft_rpm", "shaft_search_hz") if s.has(k)]
    if len(given) != 1:
        raise ConfigError(s.file, s.key("shaft_hz"), given or None,
                          "exactly one of shaft_hz, shaft_rpm (a fixed speed) or shaft_search_hz "
                          "(a [low, high] Hz band in which to estimate the speed from the spectrum)")
    shaft_search = None
    if s.has("shaft_rpm"):
        shaft_hz = s.number("shaft_rpm", lo=1.0, hi=200_000.0) / 60.0
    elif s.has("shaft_hz"):
        shaft_hz = s.number("shaft_hz", lo=0.05, hi=3500.0)
    else:
        shaft_hz = None
        shaft_search = _band(s, "shaft_search_hz", (5.0, 100.0))
    shaft_harmonics = s.integer("shaft_harmonics", 1, lo=1, hi=5)
    low_speed = (shaft_hz if shaft_hz is not None else shaft_search[1]) < 10.0
    velocity_band = _band(s, "velocity_band_hz", (2.0, 1000.0) if low_speed else (10.0, 1000.0))

    bands_raw = s.raw("bands_hz", [])
    if not isinstance(bands_raw, list):
        raise ConfigError(s.file, s.key("bands_hz"), bands_raw, "a list of [low, high] bands in Hz")
    bands = []
    for i, band in enumerate(bands_raw):
        if (not isinstance(band, list) or len(band) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in band)
                or not 0 <= band[0] < band[1]):
            raise ConfigError(s.file, s.key(f"bands_hz[{i}]"), band, "[low, high] in Hz with 0 <= low < high")
        bands.append((float(band[0]), float(band[1])))
    peaks = s.integer("peaks", 5, lo=0, hi=50)

    machine_class = s.string("machine_class", "rigid", choices=tuple(ZONE_LIMITS_MM_S))
    limits = s.raw("zone_limits_mm_s", list(ZONE_LIMITS_MM_S[machine_class]))
    if (not isinstance(limits, list) or len(limits) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limits)
            or not 0 < limits[0] < limits[1] < limits[2]):
        raise ConfigError(s.file, s.key("zone_limits_mm_s"), limits,
                          "three increasing velocity RMS limits in mm/s for A/B, B/C and C/D")

    bearing = s.sub("bearing")
    orders = _parse_bearing(bearing)
    threshold = bearing.number("defect_threshold", 4.0, lo=1.0, hi=1000.0)
    harmonics = bearing.integer("harmonics", 3, lo=1, hi=10)
    tolerance = bearing.number("tolerance", 0.02, lo=0.001, hi=0.15)
    bearing.finish()
    s.finish()

    return VibrationConfig(
        id=source_id, port=port, baudrate=baudrate, channel=channel,
        frame_length=frame_length, overlap=overlap, input_unit=input_unit,
        velocity_band_hz=velocity_band, envelope_band_hz=envelope_band, shaft_hz=shaft_hz,
        shaft_search_hz=shaft_search, shaft_harmonics=shaft_harmonics, bands_hz=tuple(bands), peaks=peaks,
        zone_limits_mm_s=(float(limits[0]), float(limits[1]), float(limits[2])),
        orders=orders, defect_threshold=threshold, defect_harmonics=harmonics,
        defect_tolerance=tolerance,
    )


def _parse_bearing(s: Section) -> DefectOrders:
    geometry_keys = ("balls", "ball_diameter", "pitch_diameter")
    if any(s.has(k) for k in geometry_keys):
        if s.has("orders"):
            raise ConfigError(s.file, s.key("orders"), s.raw("orders"), "either orders or geometry (balls, diameters), not both")
        balls = s.integer("balls", lo=3, hi=100)
        ball_d = s.number("ball_diameter", lo=0.0)
        pitch_d = s.number("pitch_diameter", lo=0.0)
        angle = s.number("contact_angle_deg", 0.0, lo=0.0, hi=89.0)
        try:
            return orders_from_geometry(balls, ball_d, pitch_d, angle)
        except ValueError as exc:
            raise ConfigError(s.file, s.key("ball_diameter"), ball_d, str(exc)) from exc

    orders = s.raw("orders", dict(SKF_6205_ORDERS))
    if not isinstance(orders, dict) or set(orders) != set(SKF_6205_ORDERS):
        raise ConfigError(s.file, s.key("orders"), orders,
                          "a table with exactly bpfo, bpfi, bsf and ftf as multiples of shaft speed")
    for name, value in orders.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(s.file, s.key(f"orders.{name}"), value, "a positive number (multiple of shaft speed)")
    return DefectOrders(**{k: float(v) for k, v in orders.items()})
