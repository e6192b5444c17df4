"""Modbus links: one TCP connection or serial port, shared by the devices behind it.

A `ModbusLink` owns one byte stream (a TCP socket or a pyserial port), one worker thread
that does all blocking I/O on it with a deadline, and one asyncio lock. The lock makes the
devices on an RS-485 bus or behind one RTU gateway take turns. Every device of a link sends its requests
through `transact()`, which waits for the line gap, drops stale input, sends the frame and
reads the matching reply.

After a request fails on an RTU link, the link reads and drops input until the line has
been quiet for `DRAIN_QUIET_S`, so a late reply cannot be read as the next reply. A Modbus
TCP link closes the connection instead. A link that cannot be opened is retried after a
wait that doubles from the first device's `backoff_min_s` up to its `backoff_max_s`, drawn
within +-20 % so that gateways restarting together are not hit in step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import random
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import serial

from agent.drivers.modbus_config import ModbusDeviceConfig, SerialSettings
from agent.drivers.modbus_frames import (
    BadReply,
    CrcError,
    LinkError,
    NoResponse,
    ReplyStats,
    Request,
    mbap_frame,
    read_mbap_reply,
    read_rtu_reply,
    rtu_frame,
)
from agent.logutil import RateLimitedLog

logger = logging.getLogger(__name__)

# After a failed RTU request, input is dropped until the line has been quiet this long.
DRAIN_QUIET_S = 0.05
# Extra time the event loop waits for the worker thread beyond the I/O deadlines. Every
# blocking call has its own deadline, so this fires only if a library call hangs.
THREAD_GUARD_S = 1.0
# Interval of repeated link error messages, per link and reason.
LOG_REPEAT_S = 60.0
JITTER = 0.2
# Longest Modbus frame: 253 bytes of PDU plus the MBAP header or the RTU unit id and CRC.
MAX_FRAME_BYTES = 260

T = TypeVar("T")


class ByteLink(Protocol):
    """Blocking byte stream with deadlines; used only from its link's worker thread."""

    name: str

    @property
    def is_open(self) -> bool: ...

    def open(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...

    def write(self, data: bytes, deadline: float) -> None: ...

    def read(self, count: int, deadline: float) -> bytes: ...

    def discard_input(self) -> int: ...

    def drain_until_quiet(self, quiet_s: float, deadline: float) -> int: ...

    def transmit_s(self, byte_count: int) -> float: ...


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


class SerialByteLink:
    """A serial port opened with pyserial: a device path or a `serial_for_url` URL."""

    def __init__(self, url: str, settings: SerialSettings) -> None:
        self.url = url
        self.settings = settings
        self.name = f"serial port {url}"
        self._port: serial.SerialBase | None = None

    @property
    def is_open(self) -> bool:
        return self._port is not None

    def open(self, timeout_s: float) -> None:
        s = self.settings
        try:
            port = serial.serial_for_url(self.url, do_not_open=True, baudrate=s.baudrate, bytesize=s.bytesize,
                                         parity=s.parity, stopbits=s.stopbits, timeout=0,
                                         write_timeout=timeout_s, exclusive=True)
            port.open()
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkError("CONNECT_FAILED", f"cannot open {self.url}: {exc}") from exc
        self._port = port

    def close(self) -> None:
        if self._port is not None:
            port, self._port = self._port, None
            try:
                port.close()
            except (serial.SerialException, OSError) as exc:
                logger.debug("closing %s raised %r", self.url, exc)

    def _lost(self, exc: BaseException) -> LinkError:
        self.close()
        return LinkError("PORT_LOST", f"{self.url} failed: {exc}")

    def write(self, data: bytes, deadline: float) -> None:
        assert self._port is not None
        try:
            self._port.write_timeout = max(_remaining(deadline), 0.001)
            self._port.write(data)
        except (serial.SerialException, OSError) as exc:
            raise self._lost(exc) from exc

    def read(self, count: int, deadline: float) -> bytes:
        assert self._port is not None
        received = b""
        try:
            while len(received) < count:
                remaining = _remaining(deadline)
                if remaining <= 0:
                    break
                self._port.timeout = remaining
                received += self._port.read(count - len(received))
        except (serial.SerialException, OSError) as exc:
            raise self._lost(exc) from exc
        return received

    def discard_input(self) -> int:
        assert self._port is not None
        try:
            waiting = self._port.in_waiting
            self._port.timeout = 0
            dropped = len(self._port.read(waiting)) if waiting else 0
            self._port.reset_input_buffer()
        except (serial.SerialException, OSError) as exc:
            raise self._lost(exc) from exc
        return dropped

    def drain_until_quiet(self, quiet_s: float, deadline: float) -> int:
        assert self._port is not None
        dropped = 0
        try:
            while (remaining := _remaining(deadline)) > 0:
                self._port.timeout = min(quiet_s, remaining)
                chunk = self._port.read(256)
                if not chunk:
                    break
                dropped += len(chunk)
        except (serial.SerialException, OSError) as exc:
            raise self._lost(exc) from exc
        return dropped

    def transmit_s(self, byte_count: int) -> float:
        return byte_count * self.settings.bits_per_character / self.settings.baudrate


class SocketByteLink:
    """A TCP connection: to a Modbus TCP device, or to a gateway that passes RTU frames."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.name = f"TCP {host}:{port}"
        self._socket: socket.socket | None = None

    @property
    def is_open(self) -> bool:
        return self._socket is not None

    def open(self, timeout_s: float) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
        except OSError as exc:
            raise LinkError("CONNECT_FAILED", f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket = sock

    def close(self) -> None:
        if self._socket is not None:
            sock, self._socket = self._socket, None
            try:
                sock.close()
            except OSError as exc:
                logger.debug("closing %s raised %r", self.name, exc)

    def _lost(self, detail: str) -> LinkError:
        self.close()
        return LinkError("CONNECTION_LOST", f"{self.name}: {detail}")

    def write(self, data: bytes, deadline: float) -> None:
        assert self._socket is not None
        try:
            self._socket.settimeout(max(_remaining(deadline), 0.001))
            self._socket.sendall(data)
        except OSError as exc:
            raise self._lost(f"send failed: {exc}") from exc

    def read(self, count: int, deadline: float) -> bytes:
        assert self._socket is not None
        received = b""
        while len(received) < count:
            remaining = _remaining(deadline)
            if remaining <= 0:
                break
            try:
                self._socket.settimeout(remaining)
                chunk = self._socket.recv(count - len(received))
            except TimeoutError:
                break
            except OSError as exc:
                raise self._lost(f"receive failed: {exc}") from exc
            if not chunk:
                raise self._lost("connection closed by the peer")
            received += chunk
        return received

    def discard_input(self) -> int:
        assert self._socket is not None
        dropped = 0
        try:
            self._socket.setblocking(False)
            while True:
                try:
                    chunk = self._socket.recv(4096)
                except BlockingIOError:
                    return dropped
                if not chunk:
                    raise self._lost("connection closed by the peer")
                dropped += len(chunk)
        except OSError as exc:
            raise self._lost(f"receive failed: {exc}") from exc

    def drain_until_quiet(self, quiet_s: float, deadline: float) -> int:
        dropped = 0
        while (remaining := _remaining(deadline)) > 0:
            chunk = self.read(256, time.monotonic() + min(quiet_s, remaining))
            if not chunk:
                break
            dropped += len(chunk)
        return dropped

    def transmit_s(self, byte_count: int) -> float:
        return 0.0


class ModbusLink:
    """One connection or port, its worker thread, and the lock its devices share.

    `framing` is "mbap" for Modbus TCP or "rtu" for RTU frames (serial or through a TCP
    gateway). `frame_gap_s` is the minimum silence before each request (3.5 character
    times on a serial line).
    """

    def __init__(self, key: tuple[Any, ...], byte_link: ByteLink, framing: str, frame_gap_s: float,
                 backoff_min_s: float, backoff_max_s: float, settings: SerialSettings | None = None,
                 rng: random.Random | None = None) -> None:
        self.key = key
        self.name = byte_link.name
        self.framing = framing
        self.frame_gap_s = frame_gap_s
        self.settings = settings
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.devices: set[str] = set()
        self._byte_link = byte_link
        self._rng = rng or random.Random()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="modbus-link")
        self._lock = asyncio.Lock()
        self._log = RateLimitedLog(logger, LOG_REPEAT_S)
        self._transaction_id = 0
        self._last_end = -math.inf
        self._backoff_s = backoff_min_s
        self._next_open_at = 0.0
        self._open_failures = 0
        self._ever_opened = False
        self._closed = False

    @property
    def is_open(self) -> bool:
        return self._byte_link.is_open

    def reopen_in_s(self) -> float:
        """Seconds until the next open attempt is allowed (0 if allowed now)."""
        return max(self._next_open_at - time.monotonic(), 0.0)

    async def ensure_open(self, timeout_s: float, stats: ReplyStats) -> None:
        """Open the link unless it is open; raise LinkError if it cannot be opened now."""
        async with self._lock:
            self._check_can_open()
            if not self.is_open:
                await self._in_thread(timeout_s + THREAD_GUARD_S, self._open_blocking, timeout_s, stats)

    async def transact(self, request: Request, timeout_s: float, min_gap_s: float, stats: ReplyStats) -> bytes:
        """Send one request and return the PDU of its reply.

        Raises LinkError, NoResponse, CrcError or BadReply. `stats` collects what happened
        on the line (stray replies, dropped bytes, whether the link was opened).
        """
        async with self._lock:
            self._check_can_open()
            # Opening, the request and draining afterwards can each take up to timeout_s.
            line_s = self._byte_link.transmit_s(2 * MAX_FRAME_BYTES)
            guard_s = 3.0 * timeout_s + min_gap_s + line_s + THREAD_GUARD_S
            return await self._in_thread(guard_s, self._transact_blocking, request, timeout_s, min_gap_s, stats)

    async def close(self) -> None:
        """Close the connection or port and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            try:
                await self._in_thread(THREAD_GUARD_S, self._byte_link.close)
            finally:
                self._executor.shutdown(wait=False)

    def _check_can_open(self) -> None:
        if self._closed:
            raise LinkError("NOT_CONNECTED", f"{self.name} is closed")
        if not self.is_open and time.monotonic() < self._next_open_at:
            raise LinkError("NOT_CONNECTED", f"{self.name} is not open; next attempt in {self.reopen_in_s():.2f} s")

    async def _in_thread(self, guard_s: float, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(function, *args))
        try:
            return await asyncio.wait_for(future, guard_s)
        except TimeoutError:
            logger.error("%s: I/O thread did not return within %.1f s; a library call is hung", self.name, guard_s)
            raise NoResponse(f"I/O on {self.name} did not finish within {guard_s:.1f} s") from None

    # -- worker thread -------------------------------------------------------------------

    def _open_blocking(self, timeout_s: float, stats: ReplyStats) -> None:
        try:
            self._byte_link.open(timeout_s)
        except LinkError as exc:
            self._open_failures += 1
            wait_s = self._backoff_s * self._rng.uniform(1.0 - JITTER, 1.0 + JITTER)
            self._next_open_at = time.monotonic() + wait_s
            self._backoff_s = min(self._backoff_s * 2.0, self.backoff_max_s)
            self._log.log(logging.WARNING, "open", "%s (devices %s): %s; attempt %d, next in %.2f s",
                          self.name, ", ".join(sorted(self.devices)), exc.detail, self._open_failures, wait_s)
            raise
        stats.opened = True
        stats.reopened = self._ever_opened
        if self._ever_opened or self._open_failures:
            # A Modbus TCP link reopens after every timeout, so repeats are rate-limited too.
            self._log.log(logging.INFO, "reopened", "%s (devices %s): open again after %d failed attempts",
                          self.name, ", ".join(sorted(self.devices)), self._open_failures)
        self._log.clear("open")
        self._log.clear("lost")
        self._ever_opened = True
        self._open_failures = 0
        self._backoff_s = self.backoff_min_s
        self._last_end = -math.inf

    def _transact_blocking(self, request: Request, timeout_s: float, min_gap_s: float, stats: ReplyStats) -> bytes:
        if not self.is_open:
            self._open_blocking(timeout_s, stats)
        link = self._byte_link
        try:
            wait_s = self._last_end + max(min_gap_s, self.frame_gap_s) - time.monotonic()
            if wait_s > 0:
                time.sleep(wait_s)
            stats.discarded_bytes += link.discard_input()
            if self.framing == "mbap":
                self._transaction_id = self._transaction_id % 0xFFFF + 1
                frame = mbap_frame(self._transaction_id, request.unit_id, request.pdu)
            else:
                frame = rtu_frame(request.unit_id, request.pdu)
            stats.sent = frame
            # timeout_s runs from the end of the request to the end of the reply, so the time
            # both take on the wire at the port's baud rate is added.
            line_s = link.transmit_s(len(frame) + request.reply_length + 3)
            deadline = time.monotonic() + timeout_s + line_s
            link.write(frame, deadline)
            if self.framing == "mbap":
                return read_mbap_reply(link.read, request, self._transaction_id, deadline, stats)
            return read_rtu_reply(link.read, request, deadline, stats)
        except LinkError as exc:
            link.close()
            self._log.log(logging.WARNING, "lost", "%s (devices %s): %s; reopening", self.name,
                          ", ".join(sorted(self.devices)), exc.detail)
            raise
        except (NoResponse, CrcError, BadReply):
            if self.framing == "mbap":
                # A reply that is late or out of step must never meet the next request.
                link.close()
            else:
                try:
                    stats.discarded_bytes += link.drain_until_quiet(DRAIN_QUIET_S, time.monotonic() + timeout_s)
                except LinkError:
                    link.close()
            raise
        finally:
            self._last_end = time.monotonic()


# --------------------------------------------------------------------------------------------
# Links shared by the devices of one event loop
# --------------------------------------------------------------------------------------------

_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], ModbusLink]] = (
    weakref.WeakKeyDictionary())


def frame_gap_s(settings: SerialSettings) -> float:
    """Return 3.5 character times at the port's settings (1.75 ms above 19200 baud)."""
    if settings.baudrate > 19200:
        return 0.00175
    return 3.5 * settings.bits_per_character / settings.baudrate


def acquire_link(config: ModbusDeviceConfig) -> ModbusLink:
    """Return the link for a device, shared with the other devices on the same port or gateway.

    A Modbus TCP device gets a connection of its own. RTU devices on one serial port, and
    devices behind one RTU-over-TCP gateway, share one link. Raises ValueError if a device
    requests other serial settings than the devices already on its port.
    """
    if config.transport == "tcp":
        link = ModbusLink(("tcp", config.id), SocketByteLink(str(config.host), int(config.port)), "mbap", 0.0,
                          config.backoff_min_s, config.backoff_max_s)
        link.devices.add(config.id)
        return link

    links = _SHARED.setdefault(asyncio.get_running_loop(), {})
    if config.transport == "rtu":
        assert config.serial is not None
        key: tuple[Any, ...] = ("rtu", str(config.port))
    else:
        key = ("rtu-over-tcp", config.host, config.port)
    link = links.get(key)
    if link is not None and config.serial is not None and link.settings != config.serial:
        raise ValueError(
            f"Modbus device '{config.id}': serial port {config.port} is already in use by "
            f"{', '.join(sorted(link.devices))} at {link.settings.describe() if link.settings else '?'}, "
            f"not {config.serial.describe()}; give every device on one port the same baudrate, "
            "parity, stopbits and bytesize")
    if link is None:
        if config.transport == "rtu":
            assert config.serial is not None
            link = ModbusLink(key, SerialByteLink(str(config.port), config.serial), "rtu",
                              frame_gap_s(config.serial), config.backoff_min_s, config.backoff_max_s,
                              settings=config.serial)
        else:
            link = ModbusLink(key, SocketByteLink(str(config.host), int(config.port)), "rtu", 0.0,
                              config.backoff_min_s, config.backoff_max_s)
        links[key] = link
    link.devices.add(config.id)
    return link


async def release_link(link: ModbusLink, device_id: str) -> None:
    """Let go of a device's link, and close it once no device uses it."""
    link.devices.discard(device_id)
    if link.devices:
        return
    links = _SHARED.get(asyncio.get_running_loop(), {})
    if links.get(link.key) is link:
        del links[link.key]
    await link.close()
