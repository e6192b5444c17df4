"""Driver for the RS-232 protocol of the Sumitomo (SHI) F-70 helium compressor.

The compressor replies to one request at a time and never sends anything by itself. A request
is `$` + a 3-character mnemonic + a CRC of 4 uppercase hex digits + CR, 9 bytes in all. A
reply echoes the mnemonic, then comma-separated fields, a comma, a CRC and CR::

    host:       $TEAA4B9<CR>
    compressor: $TEA,086,040,031,000,3798<CR>

The CRC is CRC-16/MODBUS (polynomial 0x8005 reflected, initial value 0xFFFF, no final XOR),
written most significant hex digit first. It covers a request from `$` through the mnemonic,
and a reply from `$` through the comma before the CRC. SHI documents this protocol for the
F-70H, F-70L and F-70LP with firmware 1.6 and later.

Where SHI's documentation and other clients disagree, `F70Config` makes the behaviour a
setting: the `$ID1` reply's unexplained third field, replies whose CRC leaves out the last
comma, field widths outside the documented 3 digits, the alarm bits that count as an
alarm, and the T4 and P2 channels that most variants do not use.

Blocking serial I/O runs in one worker thread per driver, so the asyncio loop never waits
on the port. Every read and write has a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import serial

from agent.config_errors import ConfigError, Section
from agent.drivers.base import Reading
from agent.logutil import RateLimitedLog

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Read commands, in SHI's order.
READ_COMMANDS = ("TEA", "TE1", "TE2", "TE3", "TE4", "PRA", "PR1", "PR2", "STA", "ID1")
# Operating commands. The compressor echoes each with no fields, even when it takes no action.
CONTROL_COMMANDS = ("ON1", "OFF", "RS1", "CHR", "CHP", "POF")
DEFAULT_COMMANDS = ("TEA", "PRA", "STA", "ID1")
ERROR_MNEMONIC = "???"

TEMPERATURE_POINTS = (
    "helium_discharge_temperature",  # T1, compressor capsule helium discharge
    "water_outlet_temperature",  # T2
    "water_inlet_temperature",  # T3
    "temperature_4",  # T4, unused on most variants (reads 000)
)
PRESSURE_POINTS = (
    "return_pressure",  # P1, compressor return (low side) helium pressure
    "pressure_2",  # P2, unused on most variants (reads 000)
)

# Operating state, bits 11..9 of the status word.
STATE_NAMES = (
    "local_off",
    "local_on",
    "remote_off",
    "remote_on",
    "cold_head_run",
    "cold_head_pause",
    "fault_off",
    "oil_fault_off",
)
# Alarm bits of the status word, most significant first.
ALARM_BITS = (
    (0x0080, "pressure"),
    (0x0040, "oil_level"),
    (0x0020, "water_flow"),
    (0x0010, "water_temperature"),
    (0x0008, "helium_temperature"),
    (0x0004, "phase_sequence_fuse"),
    (0x0002, "motor_temperature"),
)
ALL_ALARMS_MASK = 0x00FE
CONFIG_2_BIT = 0x8000  # DB-25 configuration 2: the compressor accepts only read commands
SOLENOID_BIT = 0x0100
SYSTEM_ON_BIT = 0x0001

ID1_THIRD_FIELD = ("optional", "required", "absent")
REPLY_CRC_COVERAGE = ("either", "with_comma", "without_comma")
FIELD_FORMATS = ("strict", "lenient")
PARITIES = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}
STOPBITS = (1, 1.5, 2)

# The worker waits at most this long in one read call, so that close() and reply deadlines
# are noticed within this time.
READ_SLICE_S = 0.05
# A reply is at most about 30 bytes. A longer run without CR cannot be a reply.
MAX_LINE_BYTES = 128

COUNTER_NAMES = (
    "polls",  # poll() calls
    "commands",  # requests written, polls and control commands together
    "replies",  # valid replies to the request sent
    "errors",  # requests that produced no valid reply, for any reason below
    "timeouts",  # no valid reply within reply_timeout_s
    "crc_errors",  # frames whose CRC did not match or could not be read
    "crc_without_comma",  # frames accepted with a CRC that leaves out the last comma
    "error_replies",  # $??? replies: the compressor rejected the request
    "late_replies",  # valid frames for another mnemonic, discarded
    "malformed_replies",  # valid CRC and mnemonic, but wrong field count or format
    "garbage_bytes",  # received bytes that belonged to no frame
    "echoed_requests",  # the driver's own request received back (TX looped to RX)
    "port_errors",  # read or write failures that closed the port
    "open_failures",  # failed attempts to open the port
    "reopens",  # successful opens after the first
    "control_commands",  # operating commands sent (never by poll)
)


# --------------------------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------------------------

def crc16_modbus(data: bytes) -> int:
    """Return the CRC-16/MODBUS of `data` (0x4B37 for b"123456789")."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xA001
            else:
                crc >>= 1
    return crc


def build_command(mnemonic: str) -> bytes:
    """Return the request bytes for `mnemonic`, for example b"$TEAA4B9\\r"."""
    if mnemonic not in READ_COMMANDS and mnemonic not in CONTROL_COMMANDS:
        raise ValueError(
            f"unknown F-70 command {mnemonic!r}; use one of {', '.join(READ_COMMANDS + CONTROL_COMMANDS)}"
        )
    body = b"$" + mnemonic.encode("ascii")
    return body + f"{crc16_modbus(body):04X}".encode("ascii") + b"\r"


class FrameError(ValueError):
    """A received line that is not a frame with a valid CRC."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply frame whose CRC matched.

    `crc_without_comma` is True when the CRC matched only over the bytes before the last
    comma, the form that SHI's `$PR1` example uses.
    """

    mnemonic: str
    fields: tuple[str, ...]
    crc_without_comma: bool = False


_CRC_FIELD = re.compile(rb",([0-9A-Fa-f]{4})\Z")


def parse_frame(line: bytes, crc_coverage: str = "either") -> Reply:
    """Check the CRC of one reply line (without its CR) and split it into fields.

    `crc_coverage` selects which bytes the CRC may cover: "with_comma" (SHI's rule,
    through the comma before the CRC), "without_comma" (up to that comma) or "either".
    Raises FrameError when the line is not `$`, a mnemonic, fields and a matching CRC.
    """
    if not line.startswith(b"$"):
        raise FrameError(f"line does not start with '$': {line[:40]!r}")
    if any(byte < 0x20 or byte > 0x7E for byte in line):
        raise FrameError(f"line contains bytes that are not printable ASCII: {line[:40]!r}")
    match = _CRC_FIELD.search(line)
    if match is None:
        raise FrameError(f"line does not end with ',' and a 4-digit hex CRC: {line[:40]!r}")
    received = int(match.group(1), 16)
    with_comma = crc16_modbus(line[:-4])
    without_comma = crc16_modbus(line[:-5])
    if crc_coverage != "without_comma" and received == with_comma:
        alternate = False
    elif crc_coverage != "with_comma" and received == without_comma:
        alternate = True
    else:
        raise FrameError(
            f"CRC mismatch in {line[:40]!r}: received {received:04X}, expected {with_comma:04X} "
            f"(with the last comma) or {without_comma:04X} (without it)"
        )
    parts = line[1:-5].decode("ascii").split(",")
    mnemonic = parts[0]
    if len(mnemonic) != 3:
        raise FrameError(f"mnemonic {mnemonic!r} in {line[:40]!r} is not 3 characters long")
    return Reply(mnemonic, tuple(parts[1:]), alternate)


@dataclass(frozen=True, slots=True)
class F70Status:
    """The status word decoded: operating state, flags and the names of the set alarm bits."""

    word: int
    state: int
    state_name: str
    config_2: bool
    solenoid_on: bool
    system_on: bool
    alarms: tuple[str, ...]


def decode_status(word: int) -> F70Status:
    """Decode the 16-bit `$STA` status word; bit 15 is the first hex digit's high bit."""
    if not 0 <= word <= 0xFFFF:
        raise ValueError(f"invalid status word {word!r}: expected 0..0xFFFF")
    state = (word >> 9) & 7
    alarms = tuple(name for mask, name in ALARM_BITS if word & mask)
    return F70Status(
        word=word,
        state=state,
        state_name=STATE_NAMES[state],
        config_2=bool(word & CONFIG_2_BIT),
        solenoid_on=bool(word & SOLENOID_BIT),
        system_on=bool(word & SYSTEM_ON_BIT),
        alarms=alarms,
    )


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class F70Config:
    """Settings of one F-70 on one serial port; see `parse_f70_device` for each key."""

    id: str
    port: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "none"
    stopbits: float = 1
    reply_timeout_s: float = 1.0
    poll_interval_s: float = 5.0
    command_gap_s: float = 0.05
    commands: tuple[str, ...] = DEFAULT_COMMANDS
    reopen_min_s: float = 0.5
    reopen_max_s: float = 30.0
    id1_third_field: str = "optional"
    reply_crc_coverage: str = "either"
    field_format: str = "strict"
    alarm_mask: int = ALL_ALARMS_MASK
    report_t4: bool = False
    report_p2: bool = False


def _check_port(file: str, key: str, port: str) -> None:
    if "://" in port or port.startswith("/"):
        return
    raise ConfigError(
        file, key, port,
        "an absolute device path such as /dev/serial/by-id/usb-FTDI_..._port0 or /dev/ttyUSB0, "
        "or a pyserial URL such as rfc2217://host:port",
    )


def _parse_commands(section: Section) -> tuple[str, ...]:
    value = section.raw("commands", list(DEFAULT_COMMANDS))
    key = section.key("commands")
    allowed = f"a non-empty list of read commands from {', '.join(READ_COMMANDS)}"
    if not isinstance(value, list) or not value:
        raise ConfigError(section.file, key, value, allowed)
    for command in value:
        if command in CONTROL_COMMANDS:
            raise ConfigError(section.file, key, command,
                              "read commands only; operating commands are never polled")
        if command not in READ_COMMANDS:
            raise ConfigError(section.file, key, command, allowed)
    if len(set(value)) != len(value):
        raise ConfigError(section.file, key, value, "a list without repeated commands")
    return tuple(value)


def parse_f70_device(section: Section) -> F70Config:
    """Parse one [[f70]] table into a validated configuration; raise ConfigError naming the key.

    Keys and defaults:

    - `id` and `port`: required;
    - `baudrate` 9600, `bytesize` 8, `parity` "none", `stopbits` 1: the compressor's
      fixed line settings;
    - `reply_timeout_s` 1.0, `poll_interval_s` 5.0 and `command_gap_s` 0.05 (silence
      between two requests), in seconds;
    - `commands` ["TEA", "PRA", "STA", "ID1"];
    - `reopen_min_s` 0.5 and `reopen_max_s` 30: backoff between attempts to reopen a
      lost port;
    - `id1_third_field`, `reply_crc_coverage`, `field_format`, `alarm_mask`, `report_t4`
      and `report_p2`: options for the protocol's uncertain points, described in
      docs/drivers_f70.md.
    """
    device_id = section.string("id")
    port = section.string("port")
    _check_port(section.file, section.key("port"), port)
    baudrate = section.integer("baudrate", 9600, 50, 4_000_000)
    bytesize = section.integer("bytesize", 8, 5, 8)
    parity = section.string("parity", "none", choices=tuple(PARITIES))
    stopbits = section.number("stopbits", 1)
    if stopbits not in STOPBITS:
        raise ConfigError(section.file, section.key("stopbits"), stopbits, "1, 1.5 or 2")
    reply_timeout_s = section.number("reply_timeout_s", 1.0, 0.05, 30.0)
    poll_interval_s = section.number("poll_interval_s", 5.0, 0.1, 86400.0)
    command_gap_s = section.number("command_gap_s", 0.05, 0.0, 10.0)
    commands = _parse_commands(section)
    reopen_min_s = section.number("reopen_min_s", 0.5, 0.01, 3600.0)
    reopen_max_s = section.number("reopen_max_s", max(30.0, reopen_min_s), reopen_min_s, 86400.0)
    id1_third_field = section.string("id1_third_field", "optional", choices=ID1_THIRD_FIELD)
    reply_crc_coverage = section.string("reply_crc_coverage", "either", choices=REPLY_CRC_COVERAGE)
    field_format = section.string("field_format", "strict", choices=FIELD_FORMATS)
    alarm_mask = section.integer("alarm_mask", ALL_ALARMS_MASK, 0, 0xFFFF)
    if alarm_mask & ~ALL_ALARMS_MASK:
        raise ConfigError(section.file, section.key("alarm_mask"), alarm_mask,
                          f"a mask of the alarm bits only (a subset of 0x{ALL_ALARMS_MASK:04X})")
    report_t4 = section.boolean("report_t4", False)
    report_p2 = section.boolean("report_p2", False)
    section.finish()

    for command, flag, enabled in (("TE4", "report_t4", report_t4), ("PR2", "report_p2", report_p2)):
        if command in commands and not enabled:
            raise ConfigError(section.file, section.key("commands"), command,
                              f"no {command} unless '{flag}' is true (set {flag} = true or remove {command})")

    return F70Config(
        id=device_id, port=port, baudrate=baudrate, bytesize=bytesize, parity=parity,
        stopbits=stopbits, reply_timeout_s=reply_timeout_s, poll_interval_s=poll_interval_s,
        command_gap_s=command_gap_s, commands=commands, reopen_min_s=reopen_min_s,
        reopen_max_s=reopen_max_s, id1_third_field=id1_third_field,
        reply_crc_coverage=reply_crc_coverage, field_format=field_format,
        alarm_mask=alarm_mask, report_t4=report_t4, report_p2=report_p2,
    )


# --------------------------------------------------------------------------------------------
# Field decoding
# --------------------------------------------------------------------------------------------

_STRICT_NUMBER = re.compile(r"\d{3}\Z")
_LENIENT_NUMBER = re.compile(r"[+-]?\d{1,6}\Z")
_STATUS = re.compile(r"[0-9A-Fa-f]{4}\Z")
_STRICT_HOURS = re.compile(r"\d{6}\.\d\Z")
_LENIENT_HOURS = re.compile(r"\d{1,9}(\.\d{1,3})?\Z")
_STRICT_VERSION = re.compile(r"[0-9A-Za-z.]{3}\Z")
_LENIENT_VERSION = re.compile(r"[ -+\--~]{1,16}\Z")  # printable ASCII except ','

# Number of data fields in each read reply; ID1 is checked separately.
FIELD_COUNTS = {"TEA": 4, "TE1": 1, "TE2": 1, "TE3": 1, "TE4": 1, "PRA": 2, "PR1": 1, "PR2": 1, "STA": 1}


def _number(text: str, name: str, strict: bool) -> int:
    pattern = _STRICT_NUMBER if strict else _LENIENT_NUMBER
    if not pattern.match(text):
        hint = "3 digits" if strict else "an integer"
        raise FrameError(f"{name} field {text!r} is not {hint}"
                         + (" (set field_format = \"lenient\" to accept other widths)" if strict else ""))
    return int(text)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CommandError:
    """A request that produced no values, and why.

    `reason` is one of:

    - NO_REPLY: no valid reply within reply_timeout_s;
    - CRC_ERROR: a frame failed its CRC check and no valid reply followed in that time;
    - ERROR_REPLY: the compressor sent `$???`;
    - MALFORMED_REPLY: valid CRC and mnemonic, but the wrong field count or format;
    - PORT_LOST: a read or write failed, so the port was closed;
    - NOT_OPEN: the port is closed (the next attempt to reopen it is not due yet, or it
      failed), or the driver is closing.
    """

    command: str
    reason: str
    detail: str


class F70CommandError(RuntimeError):
    """An operating command that was not confirmed by its echo."""

    def __init__(self, device: str, error: CommandError) -> None:
        self.error = error
        super().__init__(f"F-70 '{device}': {error.command} failed: {error.reason} ({error.detail})")


class _PortLost(Exception):
    pass


class F70Driver:
    """Poll one F-70 compressor over one serial port.

    `poll()` sends each configured read command in turn and returns the decoded readings.
    A failed request does not raise: its points are left out, the failure goes to
    `last_errors` and `counters`, and it is logged once per command and reason, with
    repeats rate-limited. Before each request the driver discards any bytes already
    received, and it rejects a reply whose mnemonic differs from the request, so that a
    late reply is never decoded as the reply to another command.

    When a read or write fails (a USB adapter unplugged, a device file removed) the driver
    closes the port and reopens `config.port` on a later poll, waiting `reopen_min_s` after
    the first failed attempt and doubling up to `reopen_max_s`. A stable symlink such as a
    /dev/serial/by-id name therefore finds the adapter again under a new /dev/ttyUSBn name.

    Operating commands (`turn_on` and the others) are separate methods. `poll()` never
    sends them.
    """

    def __init__(self, config: F70Config) -> None:
        self.config = config
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.last_errors: list[CommandError] = []
        self.last_status: F70Status | None = None
        self._serial: serial.SerialBase | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._closed = True
        self._stop = threading.Event()
        self._ever_opened = False
        self._backoff_s = config.reopen_min_s
        self._next_open_at = 0.0
        self._last_exchange_end = -math.inf
        self._failing: dict[str, str] = {}
        self._log = RateLimitedLog(logger)

    @property
    def connected(self) -> bool:
        """True while the port is open."""
        return self._serial is not None

    # -- public API -------------------------------------------------------------------------

    async def open(self) -> bool:
        """Open the port and return whether it worked.

        A failed open is logged and retried by later polls, so a compressor that is
        unplugged at start-up does not stop the caller.
        """
        self._closed = False
        self._stop.clear()
        self._next_open_at = 0.0
        self._backoff_s = self.config.reopen_min_s
        async with self._lock:
            return await self._in_worker(self._try_open)

    async def close(self) -> None:
        """Close the port. `poll()` raises until `open()` is called again.

        A poll still running ends within about READ_SLICE_S, because close() interrupts
        its waits.
        """
        self._closed = True
        self._stop.set()
        async with self._lock:
            if self._executor is not None:
                await self._in_worker(self._close_port)
                self._executor.shutdown(wait=False)
                self._executor = None

    async def poll(self) -> list[Reading]:
        """Send every configured read command once and return the readings decoded.

        Raises RuntimeError only when the driver is not open. Device and port failures
        are recorded in `last_errors` and `counters` instead.
        """
        async with self._lock:
            self._check_open()
            return await self._in_worker(self._poll_blocking)

    async def turn_on(self) -> None:
        """Start the compressor and the cold head (`$ON1`); acts only when off without a fault."""
        await self.send_control("ON1")

    async def turn_off(self) -> None:
        """Stop the compressor and the cold head (`$OFF`)."""
        await self.send_control("OFF")

    async def reset_faults(self) -> None:
        """Clear fault indications (`$RS1`); from Fault Off the compressor goes to Off."""
        await self.send_control("RS1")

    async def run_cold_head(self) -> None:
        """Run the cold head alone while the compressor is off (`$CHR`); it stops after 30 min."""
        await self.send_control("CHR")

    async def pause_cold_head(self) -> None:
        """Stop only the cold head while the compressor runs (`$CHP`)."""
        await self.send_control("CHP")

    async def resume_cold_head(self) -> None:
        """Restart the cold head after a pause (`$POF`)."""
        await self.send_control("POF")

    async def send_control(self, mnemonic: str) -> None:
        """Send one operating command and check its echo; raise F70CommandError if it fails.

        The echo confirms only that the compressor received the command: it echoes even
        when the command has no effect in the current state, so check the state with a poll.
        """
        if mnemonic not in CONTROL_COMMANDS:
            raise ValueError(f"{mnemonic!r} is not an F-70 operating command; use one of "
                             f"{', '.join(CONTROL_COMMANDS)}")
        async with self._lock:
            self._check_open()
            error = await self._in_worker(self._control_blocking, mnemonic)
        if error is not None:
            raise F70CommandError(self.config.id, error)

    # -- worker-thread side -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"F-70 '{self.config.id}': poll or command before open() or after close()")

    async def _in_worker(self, function: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"f70-{self.config.id}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    def _poll_blocking(self) -> list[Reading]:
        self.counters["polls"] += 1
        readings: list[Reading] = []
        errors: list[CommandError] = []
        if self._serial is None:
            self._try_open()
        for command in self.config.commands:
            if self._stop.is_set():
                break
            result = self._request(command)
            if isinstance(result, CommandError):
                errors.append(result)
                continue
            readings.extend(result)
        self.last_errors = errors
        return readings

    def _control_blocking(self, mnemonic: str) -> CommandError | None:
        if self._serial is None:
            self._try_open()
        if self.last_status is not None and self.last_status.config_2:
            logger.warning("F-70 '%s': sending %s although the last status word showed DB-25 "
                           "configuration 2, in which the compressor ignores operating commands",
                           self.config.id, mnemonic)
        self.counters["control_commands"] += 1
        result = self._request(mnemonic)
        if isinstance(result, CommandError):
            return result
        logger.info("F-70 '%s': %s sent and echoed", self.config.id, mnemonic)
        return None

    def _request(self, command: str) -> list[Reading] | CommandError:
        """Send one request and decode its reply; count, log and return any failure.

        NOT_OPEN is neither counted nor logged here, because the failed open already is.
        PORT_LOST is logged once by `_drop_port`.
        """
        if self._serial is None:
            return CommandError(command, "NOT_OPEN", f"port {self.config.port} is not open")
        try:
            result = self._exchange(command)
        except _PortLost as lost:
            self.counters["errors"] += 1
            return CommandError(command, "PORT_LOST", str(lost))
        if self._stop.is_set():
            return CommandError(command, "NOT_OPEN", "the driver is closing")
        if isinstance(result, Reply):
            try:
                readings = self._decode(command, result, time.monotonic(), time.time())
            except FrameError as exc:
                self.counters["malformed_replies"] += 1
                result = CommandError(command, "MALFORMED_REPLY", str(exc))
            else:
                self.counters["replies"] += 1
                self._log_recovery(command)
                return readings
        self.counters["errors"] += 1
        self._log_failure(result)
        return result

    def _exchange(self, command: str) -> Reply | CommandError:
        """Write one request and wait for its reply; raise _PortLost if the port fails."""
        port = self._serial
        assert port is not None
        wait_s = self._last_exchange_end + self.config.command_gap_s - time.monotonic()
        if wait_s > 0 and self._stop.wait(wait_s):
            return CommandError(command, "NOT_OPEN", "the driver is closing")
        try:
            self._discard_input(port)
            port.write(build_command(command))
            self.counters["commands"] += 1
            return self._read_reply(port, command)
        except (serial.SerialException, OSError) as exc:
            # SerialTimeoutException (a write that did not finish) is a SerialException too.
            self._drop_port(exc)
            raise _PortLost(f"{self.config.port}: {exc}") from exc
        finally:
            self._last_exchange_end = time.monotonic()

    def _read_reply(self, port: serial.SerialBase, command: str) -> Reply | CommandError:
        """Wait up to reply_timeout_s for the reply to `command`.

        A line that fails its CRC may be a damaged reply or noise that happens to contain
        '$', so the wait goes on. If no valid reply follows, the CRC error is the result.
        """
        deadline = time.monotonic() + self.config.reply_timeout_s
        buffer = bytearray()
        crc_error: CommandError | None = None
        while time.monotonic() < deadline and not self._stop.is_set():
            chunk = port.read(max(1, port.in_waiting))
            if not chunk:
                continue
            buffer += chunk
            while (end := buffer.find(b"\r")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                outcome = self._judge_line(line, command)
                if outcome is None:
                    continue
                if isinstance(outcome, CommandError) and outcome.reason == "CRC_ERROR":
                    crc_error = outcome
                    continue
                if isinstance(outcome, Reply) and outcome.mnemonic != command:
                    # A reply to an earlier request: drop it and whatever followed it.
                    self.counters["late_replies"] += 1
                    self._log.log(logging.WARNING, f"late:{command}",
                                  "F-70 '%s': discarded a late $%s reply while waiting for %s",
                                  self.config.id, outcome.mnemonic, command)
                    self._count_garbage(len(buffer))
                    buffer.clear()
                    self._discard_input(port)
                    continue
                if isinstance(outcome, CommandError):
                    self._count_garbage(len(buffer))
                    self._discard_input(port)
                return outcome
            if len(buffer) > MAX_LINE_BYTES:
                self._count_garbage(len(buffer))
                buffer.clear()
        self._count_garbage(len(buffer))
        if crc_error is not None:
            return crc_error
        if self._stop.is_set():
            return CommandError(command, "NOT_OPEN", "the driver is closing")
        self.counters["timeouts"] += 1
        return CommandError(command, "NO_REPLY", f"no valid reply within {self.config.reply_timeout_s:g} s")

    def _judge_line(self, line: bytes, command: str) -> Reply | CommandError | None:
        """Classify one received line: a reply frame, a failure of `command`, or None for garbage."""
        start = line.rfind(b"$")
        if start < 0:
            self._count_garbage(len(line) + 1)
            return None
        # A reply never contains '$' after its first byte, so bytes before the last '$' are noise.
        self._count_garbage(start)
        if line[start:] == build_command(command)[:-1]:
            # Our own request came back: TX looped to RX, or an adapter that echoes. The
            # compressor's reply may still follow.
            self.counters["echoed_requests"] += 1
            self._log.log(logging.WARNING, "echo", "F-70 '%s': received the request $%s back; check "
                          "that TX and RX are crossed and the adapter does not echo", self.config.id, command)
            return None
        try:
            reply = parse_frame(line[start:], self.config.reply_crc_coverage)
        except FrameError as exc:
            self.counters["crc_errors"] += 1
            return CommandError(command, "CRC_ERROR", str(exc))
        if reply.crc_without_comma:
            self.counters["crc_without_comma"] += 1
            self._log.log(logging.INFO, f"crc-form:{reply.mnemonic}",
                          "F-70 '%s': the $%s reply CRC leaves out the last comma (accepted because "
                          "reply_crc_coverage = \"%s\")", self.config.id, reply.mnemonic,
                          self.config.reply_crc_coverage)
        if reply.mnemonic == ERROR_MNEMONIC:
            self.counters["error_replies"] += 1
            return CommandError(command, "ERROR_REPLY",
                                "the compressor replied $???: it rejected the request as "
                                "malformed, unknown or with a bad CRC")
        return reply

    def _discard_input(self, port: serial.SerialBase) -> None:
        """Read and count bytes already waiting, so that they cannot pass for the next reply."""
        waiting = port.in_waiting
        if not waiting:
            return
        data = port.read(waiting)
        *lines, tail = data.split(b"\r")
        garbage = len(tail)
        for line in lines:
            start = line.rfind(b"$")
            try:
                parse_frame(line[max(start, 0):], self.config.reply_crc_coverage)
            except FrameError:
                garbage += len(line) + 1
            else:
                self.counters["late_replies"] += 1
                garbage += start + 1  # the noise before '$' and the CR are not part of a frame
                self._log.log(logging.WARNING, "late:stale", "F-70 '%s': discarded a late reply "
                              "received before the next request", self.config.id)
        self._count_garbage(garbage)

    def _count_garbage(self, count: int) -> None:
        if count <= 0:
            return
        self.counters["garbage_bytes"] += count
        self._log.log(logging.WARNING, "garbage", "F-70 '%s': discarded %d received bytes that were not "
                      "part of a reply (line noise or a partial reply)", self.config.id, count)

    # -- decoding ---------------------------------------------------------------------------

    def _decode(self, command: str, reply: Reply, t_mono: float, t_wall: float) -> list[Reading]:
        """Turn one reply into readings; raise FrameError for a wrong field count or format."""
        fields = reply.fields
        strict = self.config.field_format == "strict"

        def reading(point: str, value: float | int | str, unit: str) -> Reading:
            return Reading(self.config.id, point, value, unit, "good", t_mono, t_wall)

        if command in CONTROL_COMMANDS:
            self._expect_fields(command, fields, (0,))
            return []
        if command in FIELD_COUNTS:
            self._expect_fields(command, fields, (FIELD_COUNTS[command],))
        if command == "STA":
            return self._decode_status(fields[0], reading)
        if command == "ID1":
            return self._decode_id(fields, strict, reading)

        if command.startswith("TE"):
            channels = range(4) if command == "TEA" else [int(command[2]) - 1]
            names, unit, label = TEMPERATURE_POINTS, "degC", "T"
        else:
            channels = range(2) if command == "PRA" else [int(command[2]) - 1]
            names, unit, label = PRESSURE_POINTS, "psig", "P"
        values = [_number(text, f"{label}{channel + 1}", strict) for text, channel in zip(fields, channels)]
        readings = []
        for value, channel in zip(values, channels):
            if (label, channel) == ("T", 3) and not self.config.report_t4:
                continue
            if (label, channel) == ("P", 1) and not self.config.report_p2:
                continue
            readings.append(reading(names[channel], value, unit))
        return readings

    def _expect_fields(self, command: str, fields: tuple[str, ...], counts: tuple[int, ...]) -> None:
        if len(fields) not in counts:
            expected = " or ".join(str(count) for count in counts)
            raise FrameError(f"${command} reply has {len(fields)} fields {list(fields)}, expected {expected}")

    def _decode_status(self, text: str, reading: Callable[..., Reading]) -> list[Reading]:
        if not _STATUS.match(text):
            raise FrameError(f"status field {text!r} is not 4 hex digits")
        status = decode_status(int(text, 16))
        self.last_status = status
        readings = [
            reading("status_word", status.word, ""),
            reading("operating_state", status.state, ""),
            reading("operating_state_name", status.state_name, ""),
            reading("system_on", int(status.system_on), ""),
            reading("solenoid_on", int(status.solenoid_on), ""),
            reading("db25_config_2", int(status.config_2), ""),
        ]
        readings.extend(reading(f"alarm_{name}", int(bool(status.word & mask)), "") for mask, name in ALARM_BITS)
        readings.append(reading("alarm_active", int(bool(status.word & self.config.alarm_mask)), ""))
        return readings

    def _decode_id(self, fields: tuple[str, ...], strict: bool, reading: Callable[..., Reading]) -> list[Reading]:
        # SHI documents two fields, but its example CRC only matches with a third "000".
        counts = {"optional": (2, 3), "required": (3,), "absent": (2,)}[self.config.id1_third_field]
        self._expect_fields("ID1", fields, counts)
        version, hours = fields[0], fields[1]
        if not (_STRICT_VERSION if strict else _LENIENT_VERSION).match(version):
            raise FrameError(f"firmware version field {version!r} is not 3 characters such as '1.6'")
        if not (_STRICT_HOURS if strict else _LENIENT_HOURS).match(hours):
            raise FrameError(f"hours field {hours!r} is not 8 characters such as '005842.1'")
        return [reading("firmware_version", version, ""), reading("operating_hours", float(hours), "h")]

    # -- port handling ----------------------------------------------------------------------

    def _try_open(self) -> bool:
        """Open the port unless the backoff delay has not passed; return whether it is open."""
        if self._serial is not None:
            return True
        now = time.monotonic()
        if now < self._next_open_at:
            return False
        config = self.config
        port: serial.SerialBase | None = None
        try:
            port = serial.serial_for_url(
                config.port, baudrate=config.baudrate, bytesize=config.bytesize,
                parity=PARITIES[config.parity], stopbits=config.stopbits,
                xonxoff=False, rtscts=False, dsrdtr=False,
                timeout=READ_SLICE_S, write_timeout=config.reply_timeout_s, exclusive=True,
            )
            port.reset_input_buffer()
        except (serial.SerialException, OSError, ValueError) as exc:
            if port is not None:
                port.close()
            self.counters["open_failures"] += 1
            self._next_open_at = now + self._backoff_s
            self._log.log(logging.WARNING, "open", "F-70 '%s': cannot open %s: %s; next attempt in %.3g s, "
                          "backing off up to %.3g s", config.id, config.port, exc, self._backoff_s,
                          config.reopen_max_s)
            self._backoff_s = min(self._backoff_s * 2.0, config.reopen_max_s)
            return False

        self._serial = port
        self._backoff_s = config.reopen_min_s
        target = os.path.realpath(config.port) if "://" not in config.port else config.port
        port_text = config.port if target == config.port else f"{config.port} (-> {target})"
        if self._ever_opened:
            self.counters["reopens"] += 1
            logger.info("F-70 '%s': reopened %s", config.id, port_text)
        else:
            logger.info("F-70 '%s': opened %s at %d baud", config.id, port_text, config.baudrate)
        self._ever_opened = True
        self._log.clear("open")
        self._log.clear("port")
        return True

    def _drop_port(self, error: BaseException) -> None:
        self.counters["port_errors"] += 1
        self._log.log(logging.WARNING, "port", "F-70 '%s': I/O on %s failed: %s; closing it and reopening "
                      "after %.3g s", self.config.id, self.config.port, error, self._backoff_s)
        self._close_port()
        self._next_open_at = time.monotonic() + self._backoff_s

    def _close_port(self) -> None:
        port, self._serial = self._serial, None
        if port is None:
            return
        try:
            port.close()
        except (serial.SerialException, OSError) as exc:
            logger.debug("F-70 '%s': closing %s failed: %s", self.config.id, self.config.port, exc)

    # -- logging ----------------------------------------------------------------------------

    def _log_failure(self, error: CommandError) -> None:
        self._failing[error.command] = error.reason
        self._log.log(logging.WARNING, f"{error.command}:{error.reason}", "F-70 '%s': %s failed: %s (%s)",
                      self.config.id, error.command, error.reason, error.detail)

    def _log_recovery(self, command: str) -> None:
        reason = self._failing.pop(command, None)
        if reason is None:
            return
        self._log.clear(f"{command}:{reason}")
        logger.info("F-70 '%s': %s succeeded again after %s", self.config.id, command, reason)
