"""Poll Modbus TCP devices and decode their registers into readings.

One `[[modbus]]` table of the agent's TOML configuration describes one device: where it is,
how fast it may be polled, and its points (register, type, byte and word order, scale). A
`profile` key loads default points and request limits from a register-map file in
`agent/drivers/samples/`. The driver groups the points into as few read requests as the
device's limits allow and decodes each point from the reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import struct
import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException

from agent.config_errors import ConfigError, Section
from agent.drivers.base import Reading

logger = logging.getLogger(__name__)

FUNCTIONS = ("input", "holding")  # FC04 read input registers, FC03 read holding registers
TYPE_FORMATS = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
TYPE_REGISTERS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
# Each letter is one byte of the value, A the most significant. The string lists the bytes in
# the order they travel on the wire: "CDAB" puts the low 16-bit word first.
WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
# The Modbus application protocol caps FC03 and FC04 at 125 registers per request.
PROTOCOL_MAX_REGISTERS = 125

# Names of the Modbus exception codes, as the Modbus application protocol spells them.
EXCEPTION_NAMES = {
    1: "ILLEGAL_FUNCTION",
    2: "ILLEGAL_DATA_ADDRESS",
    3: "ILLEGAL_DATA_VALUE",
    4: "SERVER_DEVICE_FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER_DEVICE_BUSY",
    7: "NEGATIVE_ACKNOWLEDGE",
    8: "MEMORY_PARITY_ERROR",
    10: "GATEWAY_PATH_UNAVAILABLE",
    11: "GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND",
}

# Extra time allowed beyond timeout_s before the driver abandons a pymodbus call itself. pymodbus
# applies timeout_s to connects and replies, so this guard fires only if the library hangs.
LIBRARY_GUARD_S = 0.5


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def decode_registers(registers: list[int], type: str, word_order: str = "ABCD") -> int | float:
    """Decode one value from its registers as received, in wire order.

    `type` is one of int16, uint16, int32, uint32, float32. For 32-bit types `word_order`
    names the wire order of the value's bytes (ABCD = big-endian, CDAB = low word first, BADC
    = bytes swapped in each word, DCBA = little-endian). For 16-bit types, BADC and DCBA swap
    the two bytes and ABCD and CDAB do not. Raises ValueError for an unknown type or order, a
    wrong register count, or a register outside 0..65535.
    """
    if type not in TYPE_FORMATS:
        raise ValueError(f"unknown register type {type!r}: use one of {', '.join(TYPE_FORMATS)}")
    if word_order not in WORD_ORDERS:
        raise ValueError(f"unknown word order {word_order!r}: use one of {', '.join(WORD_ORDERS)}")
    expected = TYPE_REGISTERS[type]
    if len(registers) != expected:
        raise ValueError(f"{type} needs {expected} register(s), got {len(registers)}: {registers!r}")
    for register in registers:
        if isinstance(register, bool) or not isinstance(register, int) or not 0 <= register <= 0xFFFF:
            raise ValueError(f"register value {register!r} is not a 16-bit unsigned integer (0..65535)")

    wire = b"".join(register.to_bytes(2, "big") for register in registers)
    if expected == 1:
        ordered = wire[::-1] if word_order in ("BADC", "DCBA") else wire
    else:
        # Wire byte i is the value byte named word_order[i]. Put the bytes back in ABCD order.
        ordered = bytes(wire[word_order.index(letter)] for letter in "ABCD")
    return struct.unpack(TYPE_FORMATS[type], ordered)[0]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PointConfig:
    """One value of a device: where it lives and how to decode it.

    `address` is the PDU address sent on the wire. The engineering value is
    raw * scale + offset, in `unit`.
    """

    name: str
    function: str
    address: int
    type: str
    word_order: str
    scale: float
    offset: float
    unit: str

    @property
    def count(self) -> int:
        return TYPE_REGISTERS[self.type]


@dataclass(frozen=True, slots=True)
class ModbusDeviceConfig:
    """Validated settings of one Modbus TCP device and its points.

    `max_gap_registers` is the largest run of unused registers a request may span to join two
    points. `even_alignment` keeps each request's start address and count even.
    """

    id: str
    host: str
    port: int
    unit_id: int
    poll_interval_s: float
    timeout_s: float
    max_registers: int
    min_gap_s: float
    even_alignment: bool
    max_gap_registers: int
    reconnect_min_s: float
    reconnect_max_s: float
    points: tuple[PointConfig, ...]
    profile: str | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    """Register map and request limits of one device model, loaded from a TOML file.

    Points whose file sets no word order keep `word_order=None` here, so a device table can
    still choose one for them.
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


def samples_dir() -> Path:
    """Return the folder of the bundled register-map profiles."""
    return Path(str(resources.files("agent.drivers").joinpath("samples")))


def list_profiles() -> list[str]:
    """Return the names of the bundled profiles (file names without .toml).

    The samples folder may also hold example agent configurations. A file with a top-level
    `modbus` table is one of those and is not listed. A file that is not valid TOML is listed,
    so that loading it reports the error.
    """
    names = []
    for path in sorted(samples_dir().glob("*.toml")):
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            table = {}
        if "modbus" not in table:
            names.append(path.stem)
    return names


def _string_or_empty(section: Section, name: str, default: str) -> str:
    value = section.raw(name, default)
    if not isinstance(value, str):
        raise ConfigError(section.file, section.key(name), value, "a string")
    return value


def _parse_point(section: Section, register_base: int | None, word_order: str | None) -> PointConfig:
    """Parse one [[points]] table. With `word_order` None, a point without its own order keeps None."""
    name = section.string("name")
    function = section.string("function", "input", choices=FUNCTIONS)
    type_name = section.string("type", choices=tuple(TYPE_FORMATS))

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
    if address + TYPE_REGISTERS[type_name] > 65536:
        raise ConfigError(section.file, section.key("address"), address,
                          f"an address that leaves room for the {TYPE_REGISTERS[type_name]} registers of {type_name}")

    order = section.string("word_order", choices=WORD_ORDERS) if section.has("word_order") else word_order
    scale = section.number("scale", 1.0)
    if scale == 0.0 or math.isinf(scale):
        raise ConfigError(section.file, section.key("scale"), scale, "a finite, non-zero number")
    offset = section.number("offset", 0.0)
    if math.isinf(offset):
        raise ConfigError(section.file, section.key("offset"), offset, "a finite number")
    unit = _string_or_empty(section, "unit", "")
    section.finish()
    return PointConfig(name, function, address, type_name, order, scale, offset, unit)  # type: ignore[arg-type]


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
    register_base = section.integer("register_base", lo=0, hi=499999) if section.has("register_base") else None
    word_order = section.string("word_order", "ABCD", choices=WORD_ORDERS)
    points = _parse_points(section, register_base, None)
    if not points:
        raise ConfigError(str(path), "points", [], "at least one [[points]] table")
    section.finish()
    return Profile(path.stem, str(path), description, unit_id, even_alignment, max_registers,
                   min_gap_s, max_gap_registers, word_order, tuple(points))


def _with_word_order(points: list[PointConfig] | tuple[PointConfig, ...], word_order: str) -> tuple[PointConfig, ...]:
    return tuple(point if point.word_order is not None else dataclasses.replace(point, word_order=word_order)
                 for point in points)


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
    host = section.string("host")
    port = section.integer("port", 502, 1, 65535)
    unit_id = section.integer("unit_id", profile.unit_id if profile else 1, 0, 255)
    poll_interval_s = section.number("poll_interval_s", 1.0, 0.01, 86400.0)
    timeout_s = section.number("timeout_s", 1.0, 0.01, 60.0)
    max_registers = section.integer("max_registers", profile.max_registers if profile else PROTOCOL_MAX_REGISTERS,
                                    1, PROTOCOL_MAX_REGISTERS)
    min_gap_s = section.number("min_gap_s", profile.min_gap_s if profile else 0.0, 0.0, 10.0)
    even_alignment = section.boolean("even_alignment", profile.even_alignment if profile else False)
    default_gap = max_registers
    if profile and profile.max_gap_registers is not None:
        default_gap = profile.max_gap_registers
    max_gap_registers = section.integer("max_gap_registers", default_gap, 0, PROTOCOL_MAX_REGISTERS)
    reconnect_min_s = section.number("reconnect_min_s", 1.0, 0.01, 3600.0)
    reconnect_max_s = section.number("reconnect_max_s", max(60.0, reconnect_min_s), reconnect_min_s, 86400.0)
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
        span = _aligned_end(point.address + point.count, even_alignment) - _aligned_start(point.address, even_alignment)
        if span > max_registers:
            raise ConfigError(section.file, section.key("max_registers"), max_registers,
                              f"at least {span} so that point '{point.name}' fits in one request")

    return ModbusDeviceConfig(
        id=device_id, host=host, port=port, unit_id=unit_id, poll_interval_s=poll_interval_s,
        timeout_s=timeout_s, max_registers=max_registers, min_gap_s=min_gap_s,
        even_alignment=even_alignment, max_gap_registers=max_gap_registers,
        reconnect_min_s=reconnect_min_s, reconnect_max_s=reconnect_max_s, points=points,
        profile=profile.name if profile else None,
    )


# --------------------------------------------------------------------------------------------
# Request planning
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request and the points decoded from its reply."""

    function: str
    address: int
    count: int
    points: tuple[PointConfig, ...]


def _aligned_start(address: int, even: bool) -> int:
    return address - address % 2 if even else address


def _aligned_end(end: int, even: bool) -> int:
    return end + end % 2 if even else end


def plan_requests(points: tuple[PointConfig, ...] | list[PointConfig], max_registers: int,
                  even_alignment: bool = False, max_gap_registers: int | None = None) -> list[ReadBlock]:
    """Group points into the fewest read requests that respect the device's limits.

    Points of one function are taken in address order. Each joins the current request while
    the request stays within `max_registers` and the run of unused registers before the point
    is at most `max_gap_registers` (default: no limit beyond `max_registers`). Without a
    tighter gap limit, extending each request as far as possible gives the minimum number of
    requests. With `even_alignment`, every request starts and ends on an even address.
    """
    max_gap = max_registers if max_gap_registers is None else max_gap_registers
    blocks: list[ReadBlock] = []
    for function in FUNCTIONS:
        selected = sorted((point for point in points if point.function == function),
                          key=lambda point: (point.address, point.count))
        start = end = 0
        members: list[PointConfig] = []
        for point in selected:
            point_start = _aligned_start(point.address, even_alignment)
            point_end = _aligned_end(point.address + point.count, even_alignment)
            if members and point.address - end <= max_gap and max(end, point_end) - start <= max_registers:
                end = max(end, point_end)
                members.append(point)
                continue
            if members:
                blocks.append(ReadBlock(function, start, end - start, tuple(members)))
            start, end, members = point_start, point_end, [point]
        if members:
            blocks.append(ReadBlock(function, start, end - start, tuple(members)))
    return blocks


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RequestError:
    """A read request that produced no values, and why.

    `reason` is a Modbus exception name (e.g. ILLEGAL_DATA_ADDRESS), or NO_RESPONSE (no
    matching reply within timeout_s), CONNECTION_LOST, NOT_CONNECTED (request skipped while
    disconnected) or SHORT_REPLY (fewer registers than requested).
    """

    function: str
    address: int
    count: int
    points: tuple[str, ...]
    reason: str
    detail: str


class ModbusTcpDriver:
    """Poll one Modbus TCP device over one connection.

    `poll()` reads every planned request in turn and returns the decoded readings. A failed
    request does not raise: its points are left out of the result, and the failure goes to
    `last_errors` (the current poll's failures) and `counters`. After a lost connection or a
    missing reply the driver closes the connection and reconnects on a later poll, waiting
    `reconnect_min_s` after the first failed connect and doubling the wait up to
    `reconnect_max_s`.

    `counters` holds: polls, requests (sent), errors (failed requests), timeouts (requests
    without a reply), connect_failures, reconnects (successful connects after the first) and
    exceptions (a dict from Modbus exception name to count).
    """

    def __init__(self, config: ModbusDeviceConfig) -> None:
        self.config = config
        self.plan = plan_requests(config.points, config.max_registers, config.even_alignment,
                                  config.max_gap_registers)
        self.counters: dict[str, Any] = {
            "polls": 0, "requests": 0, "errors": 0, "timeouts": 0,
            "connect_failures": 0, "reconnects": 0, "exceptions": {},
        }
        self.last_errors: list[RequestError] = []
        self._client: AsyncModbusTcpClient | None = None
        self._ever_connected = False
        self._failures_in_row = 0
        self._backoff_s = config.reconnect_min_s
        self._next_connect_at = 0.0
        self._last_request_end = -math.inf
        self._block_reasons: dict[int, str] = {}
        self._lock = asyncio.Lock()
        self._closed = True

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def open(self) -> bool:
        """Connect to the device and return whether it worked.

        A failed connect is logged and retried by later polls, so a device that is down at
        start-up does not stop the caller.
        """
        self._closed = False
        return await self._connect()

    async def close(self) -> None:
        """Close the connection. `poll()` raises until `open()` is called again."""
        self._closed = True
        self._drop_connection()

    async def poll(self) -> list[Reading]:
        """Read every point once and return the readings of the requests that succeeded.

        Raises RuntimeError only if the driver is not open. Device and network failures are
        recorded in `last_errors` and `counters` instead.
        """
        async with self._lock:
            if self._closed:
                raise RuntimeError(f"Modbus device '{self.config.id}': poll() before open() or after close()")
            self.counters["polls"] += 1
            errors: list[RequestError] = []
            readings: list[Reading] = []
            if not self.connected and time.monotonic() >= self._next_connect_at:
                await self._connect()
            for index, block in enumerate(self.plan):
                if not self.connected:
                    errors.append(self._error(block, "NOT_CONNECTED",
                                              f"no connection to {self.config.host}:{self.config.port}"))
                    continue
                result = await self._read_block(block)
                if isinstance(result, RequestError):
                    errors.append(result)
                    self._log_failure(index, result)
                    continue
                registers, t_mono, t_wall = result
                self._log_recovery(index, block)
                readings.extend(self._decode_block(block, registers, t_mono, t_wall))
            self.last_errors = errors
            return readings

    # -- connection ------------------------------------------------------------------------

    async def _connect(self) -> bool:
        self._drop_connection()
        config = self.config
        client = AsyncModbusTcpClient(
            config.host, port=config.port, timeout=config.timeout_s, retries=0,
            # 0 turns off pymodbus' own reconnect loop because this driver schedules reconnects.
            reconnect_delay=0, name=f"modbus:{config.id}",
        )

        try:
            connected = await asyncio.wait_for(client.connect(), config.timeout_s + LIBRARY_GUARD_S)
        except (asyncio.TimeoutError, OSError) as exc:
            logger.debug("Modbus device '%s': connect raised %r", config.id, exc)
            connected = False

        if not connected:
            client.close()
            self.counters["connect_failures"] += 1
            self._next_connect_at = time.monotonic() + self._backoff_s
            self._failures_in_row += 1
            # The first failure in a row goes out at WARNING, the repeats at DEBUG.
            level = logging.WARNING if self._failures_in_row == 1 else logging.DEBUG
            logger.log(level, "Modbus device '%s': connect to %s:%d failed (%d in a row), next attempt in %.2f s",
                       config.id, config.host, config.port, self._failures_in_row, self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2.0, config.reconnect_max_s)
            return False

        self._client = client
        self._backoff_s = config.reconnect_min_s
        if self._ever_connected:
            self.counters["reconnects"] += 1
        logger.info("Modbus device '%s': %s to %s:%d after %d failed attempts", config.id,
                    "reconnected" if self._ever_connected else "connected", config.host, config.port,
                    self._failures_in_row)
        self._ever_connected = True
        self._failures_in_row = 0
        return True

    def _drop_connection(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- requests --------------------------------------------------------------------------

    async def _read_block(self, block: ReadBlock) -> tuple[list[int], float, float] | RequestError:
        """Send one read request and return its registers and reply times, or the failure."""
        assert self._client is not None
        wait_s = self._last_request_end + self.config.min_gap_s - time.monotonic()
        if wait_s > 0.0:
            await asyncio.sleep(wait_s)
        read = (self._client.read_input_registers if block.function == "input"
                else self._client.read_holding_registers)
        self.counters["requests"] += 1
        try:
            response = await asyncio.wait_for(
                read(block.address, count=block.count, device_id=self.config.unit_id),
                self.config.timeout_s + LIBRARY_GUARD_S)
        except asyncio.TimeoutError:
            self.counters["timeouts"] += 1
            return self._fail(block, "NO_RESPONSE",
                              f"pymodbus did not return within {self.config.timeout_s + LIBRARY_GUARD_S} s", drop=True)
        except ConnectionException as exc:
            return self._fail(block, "CONNECTION_LOST", str(exc), drop=True)
        except ModbusIOException as exc:
            # pymodbus 3.16 raises this when no matching reply arrived within timeout_s. The
            # connection is dropped so that a late reply cannot be taken for the next request's.
            self.counters["timeouts"] += 1
            return self._fail(block, "NO_RESPONSE", str(exc), drop=True)
        finally:
            self._last_request_end = time.monotonic()

        if response.isError():
            code = getattr(response, "exception_code", 0)
            name = EXCEPTION_NAMES.get(code, f"EXCEPTION_{code}")
            exceptions = self.counters["exceptions"]
            exceptions[name] = exceptions.get(name, 0) + 1
            return self._fail(block, name, f"device replied with Modbus exception {code} ({name})")
        registers = list(response.registers)
        if len(registers) < block.count:
            return self._fail(block, "SHORT_REPLY", f"expected {block.count} registers, got {len(registers)}")
        return registers[:block.count], time.monotonic(), time.time()

    def _fail(self, block: ReadBlock, reason: str, detail: str, drop: bool = False) -> RequestError:
        self.counters["errors"] += 1
        if drop:
            self._drop_connection()
        return self._error(block, reason, detail)

    @staticmethod
    def _error(block: ReadBlock, reason: str, detail: str) -> RequestError:
        return RequestError(block.function, block.address, block.count,
                            tuple(point.name for point in block.points), reason, detail)

    def _decode_block(self, block: ReadBlock, registers: list[int], t_mono: float, t_wall: float) -> list[Reading]:
        readings = []
        for point in block.points:
            offset = point.address - block.address
            raw = decode_registers(registers[offset:offset + point.count], point.type, point.word_order)
            if point.scale == 1.0 and point.offset == 0.0:
                value: int | float = raw
            else:
                value = raw * point.scale + point.offset
            readings.append(Reading(self.config.id, point.name, value, point.unit, "good", t_mono, t_wall))
        return readings

    # -- logging (first failure of a request at WARNING, repeats at DEBUG) -------------------

    def _log_failure(self, index: int, error: RequestError) -> None:
        level = logging.DEBUG if self._block_reasons.get(index) == error.reason else logging.WARNING
        self._block_reasons[index] = error.reason
        logger.log(level, "Modbus device '%s': %s read of %d registers at address %d failed: %s (%s)",
                   self.config.id, error.function, error.count, error.address, error.reason, error.detail)

    def _log_recovery(self, index: int, block: ReadBlock) -> None:
        if self._block_reasons.pop(index, None) is not None:
            logger.info("Modbus device '%s': %s read at address %d succeeded again",
                        self.config.id, block.function, block.address)
