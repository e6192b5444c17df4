"""Modbus device configuration: `[[modbus]]` tables and the register-map profiles.

One `[[modbus]]` table of the agent's TOML configuration describes one device: how it is
reached (`transport` = "tcp", "rtu" or "rtu-over-tcp"), how fast it may be polled, and its
points. A `profile` key loads default points, request limits and serial settings from a
register-map file in `agent/drivers/samples/`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from agent.config_errors import ConfigError, Section
from agent.drivers.modbus_points import (
    BITFIELD_OUTPUTS,
    FUNCTION_CODES,
    FUNCTIONS,
    POINT_TYPES,
    PROTOCOL_MAX_REGISTERS,
    TYPE_FORMATS,
    TYPE_REGISTERS,
    WORD_ORDERS,
    PointConfig,
    aligned_end,
    aligned_start,
)

TRANSPORTS = ("tcp", "rtu", "rtu-over-tcp")
PARITIES = ("N", "E", "O")
BAUDRATES = (1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
SERIAL_KEYS = ("baudrate", "parity", "stopbits", "bytesize")


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """Line settings of a serial port: baud rate, parity ("N", "E", "O"), stop and data bits."""

    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def bits_per_character(self) -> int:
        return 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits

    def describe(self) -> str:
        return f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


@dataclass(frozen=True, slots=True)
class ModbusDeviceConfig:
    """Validated settings of one Modbus device and its points.

    `port` is the TCP port for "tcp" and "rtu-over-tcp", and the serial device path or
    pyserial URL for "rtu" (then `host` is None and `serial` contains the line settings).
    `max_gap_registers` is the largest run of unused registers a request may span to join
    two points. `even_alignment` keeps each request's start address and count even.
    `backoff_min_s` and `backoff_max_s` bound the wait before reconnecting and before
    polling again a device that stopped replying.
    """

    id: str
    host: str | None
    port: int | str
    unit_id: int
    poll_interval_s: float
    timeout_s: float
    max_registers: int
    min_gap_s: float
    even_alignment: bool
    max_gap_registers: int
    backoff_min_s: float
    backoff_max_s: float
    points: tuple[PointConfig, ...]
    profile: str | None = None
    transport: str = "tcp"
    serial: SerialSettings | None = None
    busy_retries: int = 1
    busy_retry_delay_s: float = 0.1

    @property
    def endpoint(self) -> str:
        """Where the device is, for messages: "tcp 10.0.0.5:502 unit 1" and the like."""
        if self.transport == "rtu":
            settings = self.serial.describe() if self.serial else ""
            return f"rtu {self.port} {settings} unit {self.unit_id}"
        return f"{self.transport} {self.host}:{self.port} unit {self.unit_id}"


@dataclass(frozen=True, slots=True)
class Profile:
    """Register map, request limits and serial defaults of one device model, from a TOML file.

    Points whose file sets no word order keep `word_order=None` here, so a device table can
    still choose one for them. `rtu_unit_id` and `serial` are the defaults for the RTU
    transports, from the profile's `[rtu]` table.
    """

    name: str
    path: str
    description: str
    unit_id: int
    even_alignment: bool
    max_registers: int
    min_gap_s: float
    max_gap_registers: int | None
    word_order: str
    points: tuple[PointConfig, ...]
    timeout_s: float | None = None
    rtu_unit_id: int | None = None
    serial: SerialSettings | None = None


def samples_dir() -> Path:
    """Return the folder of the bundled register-map profiles and sample configurations."""
    return Path(str(resources.files("agent.drivers").joinpath("samples")))


def list_profiles() -> list[str]:
    """Return the names of the bundled profiles (file names without .toml).

    The samples folder also contains example agent configurations, for Modbus and for other
    drivers. Only a file with a top-level `points` array is a profile. A file that is not valid
    TOML is listed, so that loading it reports the error.
    """
    names = []
    for path in sorted(samples_dir().glob("*.toml")):
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            table = {"points": None}
        if "points" in table:
            names.append(path.stem)
    return names


def _string_or_empty(section: Section, name: str, default: str) -> str:
    value = section.raw(name, default)
    if not isinstance(value, str):
        raise ConfigError(section.file, section.key(name), value, "a string")
    return value


def _parse_bits(section: Section, raw_type: str) -> tuple[tuple[str, int], ...]:
    """Parse the `bits` table of a bitfield: bit name = bit index, 0 the least significant."""
    table = section.raw("bits", None)
    if not isinstance(table, dict) or not table:
        raise ConfigError(section.file, section.key("bits"), table,
                          "a table of bit name = bit index, e.g. bits = { alarm = 0, fault = 3 }")
    width = 16 * TYPE_REGISTERS[raw_type]
    bits = []
    for name, index in table.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < width:
            raise ConfigError(section.file, f"{section.key('bits')}.{name}", index,
                              f"a bit index from 0 to {width - 1} ({raw_type} holds {width} bits)")
        if not name or any(character in name for character in ",. "):
            raise ConfigError(section.file, f"{section.key('bits')}.{name}", name,
                              "a bit name without commas, dots or spaces")
        bits.append((name, index))
    return tuple(sorted(bits, key=lambda item: (item[1], item[0])))


def _parse_function(section: Section) -> str:
    """Parse a point's register table: "input" or "holding", or the read function code 4 or 3."""
    value = section.raw("function", "input")
    codes = {code: name for name, code in FUNCTION_CODES.items()}
    if isinstance(value, int) and not isinstance(value, bool) and value in codes:
        return codes[value]
    if value not in FUNCTIONS:
        raise ConfigError(section.file, section.key("function"), value,
                          "\"input\" (function 4) or \"holding\" (function 3)")
    return value


def _parse_point(section: Section, register_base: int | None, word_order: str | None) -> PointConfig:
    """Parse one [[points]] table. With `word_order` None, a point without its own order keeps None."""
    name = section.string("name")
    if any(character in name for character in ", "):
        raise ConfigError(section.file, section.key("name"), name, "a point name without commas or spaces")
    function = _parse_function(section)
    type_name = section.string("type", choices=POINT_TYPES)

    raw_type = ""
    bits: tuple[tuple[str, int], ...] = ()
    output = ""
    if type_name == "string":
        count = section.integer("count", lo=1, hi=PROTOCOL_MAX_REGISTERS)
    elif type_name == "bitfield":
        raw_type = section.string("raw_type", "uint16", choices=tuple(TYPE_FORMATS))
        count = TYPE_REGISTERS[raw_type]
        bits = _parse_bits(section, raw_type)
        output = section.string("output", "bits", choices=BITFIELD_OUTPUTS)
    else:
        count = TYPE_REGISTERS[type_name]
    for key, allowed_for in (("count", "string"), ("raw_type", "bitfield"), ("bits", "bitfield"),
                             ("output", "bitfield")):
        if section.has(key) and type_name != allowed_for:
            raise ConfigError(section.file, section.key(key), section.table[key],
                              f"no '{key}' here: it applies only to type = \"{allowed_for}\"")

    if section.has("register") and section.has("address"):
        raise ConfigError(section.file, section.key("address"), section.table["address"],
                          "either 'register' (with 'register_base') or 'address', not both")
    if section.has("register"):
        if section.has("register_base"):
            register_base = section.integer("register_base", lo=0, hi=499999)
        if register_base is None:
            raise ConfigError(section.file, section.key("register_base"), section.table["register"],
                              "a 'register_base' on the point or the device when 'register' is used "
                              "(or give the PDU 'address' instead)")
        register = section.integer("register", lo=register_base, hi=register_base + 65535)
        address = register - register_base
    elif section.has("address"):
        address = section.integer("address", lo=0, hi=65535)
    else:
        raise ConfigError(section.file, section.key("register"), section.raw("register", None),
                          "a 'register' (vendor number) or an 'address' (PDU address)")
    if address + count > 65536:
        raise ConfigError(section.file, section.key("address"), address,
                          f"an address that leaves room for the {count} registers of this {type_name}")

    order = section.string("word_order", choices=WORD_ORDERS) if section.has("word_order") else word_order
    scale = section.number("scale", 1.0)
    if scale == 0.0 or math.isinf(scale):
        raise ConfigError(section.file, section.key("scale"), scale, "a finite, non-zero number")
    offset = section.number("offset", 0.0)
    if math.isinf(offset):
        raise ConfigError(section.file, section.key("offset"), offset, "a finite number")
    if type_name == "string" and (scale != 1.0 or offset != 0.0):
        raise ConfigError(section.file, section.key("scale"), scale, "no scale or offset on a string point")
    unit = _string_or_empty(section, "unit", "")
    section.finish()
    return PointConfig(name, function, address, type_name, order, scale, offset, unit, count,
                       raw_type, bits, output)


def _parse_points(section: Section, register_base: int | None, word_order: str | None) -> list[PointConfig]:
    points: list[PointConfig] = []
    seen: set[str] = set()
    for point_section in section.table_list("points"):
        point = _parse_point(point_section, register_base, word_order)
        if point.name in seen:
            raise ConfigError(point_section.file, point_section.key("name"), point.name,
                              "a name that no other point of this device uses")
        seen.add(point.name)
        points.append(point)
    return points


def _parse_serial(section: Section, defaults: SerialSettings) -> SerialSettings:
    baudrate = section.integer("baudrate", defaults.baudrate)
    if baudrate not in BAUDRATES:
        raise ConfigError(section.file, section.key("baudrate"), baudrate,
                          "one of " + ", ".join(str(rate) for rate in BAUDRATES))
    parity = section.string("parity", defaults.parity, choices=PARITIES)
    stopbits = section.integer("stopbits", defaults.stopbits, 1, 2)
    bytesize = section.integer("bytesize", defaults.bytesize, 7, 8)
    return SerialSettings(baudrate, parity, stopbits, bytesize)


def load_profile(name: str, config_file: str = "<config>", key: str = "profile") -> Profile:
    """Load a register-map profile: a bundled name, or a path to a .toml file.

    A relative path is taken from the folder of `config_file`. Raises ConfigError for a
    missing or invalid profile, naming `key` of `config_file` or the key inside the profile.
    """
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_absolute():
            path = Path(config_file).parent / path
    else:
        path = samples_dir() / f"{name}.toml"
        if name not in list_profiles():
            raise ConfigError(config_file, key, name,
                              f"one of {', '.join(list_profiles())}, or a path to a .toml file")
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(config_file, key, name, f"a readable profile file ({exc.strerror}: {path})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "<file>", name, f"valid TOML ({exc})") from exc

    section = Section(str(path), "", table)
    description = _string_or_empty(section, "description", "")
    unit_id = section.integer("unit_id", 1, 0, 255)
    even_alignment = section.boolean("even_alignment", False)
    max_registers = section.integer("max_registers", PROTOCOL_MAX_REGISTERS, 1, PROTOCOL_MAX_REGISTERS)
    min_gap_s = section.number("min_gap_s", 0.0, 0.0, 10.0)
    max_gap_registers = (section.integer("max_gap_registers", lo=0, hi=PROTOCOL_MAX_REGISTERS)
                         if section.has("max_gap_registers") else None)
    timeout_s = section.number("timeout_s", lo=0.01, hi=60.0) if section.has("timeout_s") else None
    register_base = section.integer("register_base", lo=0, hi=499999) if section.has("register_base") else None
    word_order = section.string("word_order", "ABCD", choices=WORD_ORDERS)
    rtu_unit_id = None
    serial = None
    if section.has("rtu"):
        rtu = section.sub("rtu")
        rtu_unit_id = rtu.integer("unit_id", unit_id, 1, 247)
        serial = _parse_serial(rtu, SerialSettings())
        rtu.finish()
    points = _parse_points(section, register_base, None)
    if not points:
        raise ConfigError(str(path), "points", [], "at least one [[points]] table")
    section.finish()
    return Profile(path.stem, str(path), description, unit_id, even_alignment, max_registers,
                   min_gap_s, max_gap_registers, word_order, tuple(points), timeout_s, rtu_unit_id, serial)


def _with_word_order(points: list[PointConfig] | tuple[PointConfig, ...], word_order: str) -> tuple[PointConfig, ...]:
    return tuple(point if point.word_order is not None else dataclasses.replace(point, word_order=word_order)
                 for point in points)


def _parse_endpoint(section: Section, transport: str,
                    profile: Profile | None) -> tuple[str | None, int | str, SerialSettings | None]:
    """Parse host, port and serial settings, which depend on the transport."""
    if transport == "rtu":
        if section.has("host"):
            raise ConfigError(section.file, section.key("host"), section.table["host"],
                              "no 'host' for transport = \"rtu\": set 'port' to the serial device "
                              "(or use transport = \"rtu-over-tcp\" for a TCP gateway)")
        port = section.raw("port")
        if not isinstance(port, str) or not port:
            raise ConfigError(section.file, section.key("port"), port,
                              "a serial device path such as \"/dev/ttyUSB0\" or a pyserial URL "
                              "for transport = \"rtu\"")
        defaults = profile.serial if profile and profile.serial else SerialSettings()
        return None, port, _parse_serial(section, defaults)

    for key in SERIAL_KEYS:
        if section.has(key):
            raise ConfigError(section.file, section.key(key), section.table[key],
                              f"no '{key}' for transport = \"{transport}\": serial settings apply only "
                              "to transport = \"rtu\" (set them on the gateway)")
    host = section.string("host")
    if transport == "rtu-over-tcp" and not section.has("port"):
        raise ConfigError(section.file, section.key("port"), section.raw("port", None),
                          "the gateway's TCP port for transport = \"rtu-over-tcp\" (gateways differ)")
    port = section.integer("port", 502, 1, 65535)
    return host, port, None


def parse_modbus_device(section: Section) -> ModbusDeviceConfig:
    """Parse one [[modbus]] table into a validated device configuration.

    Values the table leaves out come from its profile, if any, then from built-in defaults.
    Points given in the table replace the profile's points entirely. A `word_order` or
    `register_base` in the table is the default for the table's own points. `word_order` also
    applies to profile points whose file sets none. Raises ConfigError naming the key.
    """
    device_id = section.string("id")
    profile = None
    if section.has("profile"):
        profile = load_profile(section.string("profile"), section.file, section.key("profile"))
    transport = section.string("transport", "tcp", choices=TRANSPORTS)
    host, port, serial = _parse_endpoint(section, transport, profile)

    default_unit = 1
    if profile:
        default_unit = profile.unit_id
        if transport != "tcp" and profile.rtu_unit_id is not None:
            default_unit = profile.rtu_unit_id
    if transport == "tcp":
        unit_id = section.integer("unit_id", default_unit, 0, 255)
    else:
        # Address 0 is the RTU broadcast, to which no device replies.
        unit_id = section.integer("unit_id", default_unit, 1, 247)
    poll_interval_s = section.number("poll_interval_s", 1.0, 0.01, 86400.0)
    default_timeout = profile.timeout_s if profile and profile.timeout_s is not None else 1.0
    timeout_s = section.number("timeout_s", default_timeout, 0.01, 60.0)
    max_registers = section.integer("max_registers", profile.max_registers if profile else PROTOCOL_MAX_REGISTERS,
                                    1, PROTOCOL_MAX_REGISTERS)
    min_gap_s = section.number("min_gap_s", profile.min_gap_s if profile else 0.0, 0.0, 10.0)
    even_alignment = section.boolean("even_alignment", profile.even_alignment if profile else False)
    default_gap = max_registers
    if profile and profile.max_gap_registers is not None:
        default_gap = profile.max_gap_registers
    max_gap_registers = section.integer("max_gap_registers", default_gap, 0, PROTOCOL_MAX_REGISTERS)
    backoff_min_s = section.number("backoff_min_s", 1.0, 0.01, 3600.0)
    backoff_max_s = section.number("backoff_max_s", max(60.0, backoff_min_s), backoff_min_s, 86400.0)
    busy_retries = section.integer("busy_retries", 1, 0, 10)
    busy_retry_delay_s = section.number("busy_retry_delay_s", 0.1, 0.0, 10.0)
    register_base = section.integer("register_base", lo=0, hi=499999) if section.has("register_base") else None
    default_order = profile.word_order if profile else "ABCD"
    word_order = section.string("word_order", default_order, choices=WORD_ORDERS)

    own_points = _parse_points(section, register_base, word_order)
    if own_points:
        points = tuple(own_points)
    elif profile:
        points = _with_word_order(profile.points, word_order)
    else:
        raise ConfigError(section.file, section.key("points"), [],
                          "at least one [[modbus.points]] table, or a 'profile' that supplies points")
    section.finish()

    if even_alignment and max_registers < 2:
        raise ConfigError(section.file, section.key("max_registers"), max_registers,
                          "at least 2 when 'even_alignment' is true")
    for point in points:
        span = aligned_end(point.end, even_alignment) - aligned_start(point.address, even_alignment)
        if span > max_registers:
            raise ConfigError(section.file, section.key("max_registers"), max_registers,
                              f"at least {span} so that point '{point.name}' fits in one request")

    return ModbusDeviceConfig(
        id=device_id, host=host, port=port, unit_id=unit_id, poll_interval_s=poll_interval_s,
        timeout_s=timeout_s, max_registers=max_registers, min_gap_s=min_gap_s,
        even_alignment=even_alignment, max_gap_registers=max_gap_registers,
        backoff_min_s=backoff_min_s, backoff_max_s=backoff_max_s, points=points,
        profile=profile.name if profile else None, transport=transport, serial=serial,
        busy_retries=busy_retries, busy_retry_delay_s=busy_retry_delay_s,
    )

