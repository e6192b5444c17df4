"""Modbus RTU slave side: request framing, replies, a pseudo-terminal port and a TCP gateway.

`RtuResponder` takes the bytes a master sends on an RS-485 bus, cuts them into request
frames, drops any frame whose CRC is wrong (a real slave stays silent then), and hands each
valid request to the unit it addresses. Units that are not on the bus, and broadcasts to
unit 0, get no reply. The unit's reply, possibly delayed or damaged by a fault, goes back
through the `write` callable.

`PtyPort` carries a bus on a pseudo-terminal: the agent opens the slave side like a USB
serial adapter, and the simulator reads and writes the master side. `RtuGatewayServer`
carries the same frames over TCP, as a serial-to-Ethernet gateway in transparent mode does.

This module shares no code with the agent: the CRC and the frame rules are written here from
the Modbus over serial line specification.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from firmware_sim.modbus_faults import FaultDecision
from firmware_sim.pty_port import open_raw_pty, point_link

logger = logging.getLogger(__name__)

# Request frame lengths by function code, for the functions with a fixed length:
# unit, function, four bytes of address and count or value, two CRC bytes.
FIXED_REQUEST_LENGTH = {1: 8, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8, 8: 8}
# Functions whose length follows from the byte count in byte 6 (unit, function, address,
# quantity, byte count, data, CRC).
COUNTED_REQUESTS = (15, 16)
# Frames kept for inspection by tests.
FRAME_LOG_LENGTH = 200


def crc16(data: bytes) -> int:
    """Return the Modbus RTU CRC-16: reflected polynomial 0xA001, initial value 0xFFFF."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xA001
            else:
                crc >>= 1
    return crc


def with_crc(body: bytes) -> bytes:
    """Append the CRC to a frame body, low byte first."""
    return body + struct.pack("<H", crc16(body))


def character_time_s(baudrate: int, bits_per_character: int = 11) -> float:
    return bits_per_character / baudrate


class RtuUnit(Protocol):
    """A slave on the bus, as the responder uses it."""

    unit_id: int

    def serve_pdu(self, pdu: bytes) -> tuple[bytes | None, FaultDecision]:
        """Return the reply PDU (None: no reply) and the faults to apply to it."""
        ...


class RtuResponder:
    """Cut a byte stream into RTU requests and reply for the units on the bus.

    `units()` returns the units currently on the bus by unit id. A frame is complete when
    its length, known from the function code, has arrived, or when the line has been quiet
    for 3.5 character times. Bytes that do not form a frame with a valid CRC are dropped.
    """

    def __init__(self, units: Callable[[], dict[int, RtuUnit]], write: Callable[[bytes], None],
                 loop: asyncio.AbstractEventLoop, baudrate: int = 9600) -> None:
        self._units = units
        self._write = write
        self._loop = loop
        self._silence_s = max(3.5 * character_time_s(baudrate), 0.002)
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.TimerHandle] = set()
        self.received: collections.deque[bytes] = collections.deque(maxlen=FRAME_LOG_LENGTH)
        self.sent: collections.deque[bytes] = collections.deque(maxlen=FRAME_LOG_LENGTH)
        self.dropped_bytes = 0

    def feed(self, data: bytes) -> None:
        """Take bytes from the line."""
        self._buffer += data
        self._cut_frames()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            self._timer = self._loop.call_later(self._silence_s, self._on_silence)

    def cancel(self) -> None:
        """Forget buffered bytes and replies not yet sent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        self._buffer = b""

    def _cut_frames(self) -> None:
        while len(self._buffer) >= 2:
            function = self._buffer[1]
            if function in FIXED_REQUEST_LENGTH:
                length = FIXED_REQUEST_LENGTH[function]
            elif function in COUNTED_REQUESTS:
                if len(self._buffer) < 7:
                    return
                length = 9 + self._buffer[6]
            else:
                return  # unknown length: the silence timer ends the frame
            if len(self._buffer) < length:
                return
            frame, self._buffer = self._buffer[:length], self._buffer[length:]
            if not self._handle_frame(frame):
                # A bad frame means the framing is lost: drop the rest until the line is quiet.
                self.dropped_bytes += len(self._buffer)
                self._buffer = b""

    def _on_silence(self) -> None:
        self._timer = None
        frame, self._buffer = self._buffer, b""
        if frame:
            self._handle_frame(frame)

    def _handle_frame(self, frame: bytes) -> bool:
        """Reply to one frame; return False if its CRC is wrong."""
        if len(frame) < 4 or crc16(frame[:-2]) != struct.unpack("<H", frame[-2:])[0]:
            self.dropped_bytes += len(frame)
            logger.debug("RTU bus: dropped a frame with a bad CRC: %s", frame.hex(" "))
            return False
        self.received.append(frame)
        unit = self._units().get(frame[0])
        if unit is None:
            return True  # another slave's request, a broadcast, or a unit that is absent
        reply, decision = unit.serve_pdu(frame[1:-2])
        if reply is None or decision.drop:
            return True
        data = bytearray(with_crc(bytes([frame[0]]) + reply))
        if decision.corrupt:
            # Flip bits of a data byte, not of the byte count, so the length stays readable.
            data[3 if len(data) > 5 else 2] ^= 0x5A
        if decision.bad_crc:
            data[-1] ^= 0xFF
        if decision.delay_s > 0:
            handle = self._loop.call_later(decision.delay_s, self._send_later, bytes(data))
            self._pending.add(handle)
        else:
            self._send(bytes(data))
        return True

    def _send_later(self, data: bytes) -> None:
        now = self._loop.time()
        self._pending = {handle for handle in self._pending if handle.when() > now}
        self._send(data)

    def _send(self, data: bytes) -> None:
        self.sent.append(data)
        self._write(data)


class PtyPort:
    """A pseudo-terminal that plays a serial port; `path` is the slave side the agent opens.

    With `link`, a symlink at that path points to the current slave, as a udev rule gives a
    USB adapter a stable name. `close()` removes the port the way an unplugged adapter
    disappears, and `open()` brings up a new one (usually with another /dev/pts number) and
    moves the symlink to it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_data: Callable[[bytes], None],
                 link: str | None = None) -> None:
        self._loop = loop
        self._on_data = on_data
        self.link = link
        self.path: str | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self.write_failures = 0

    @property
    def is_open(self) -> bool:
        return self._master is not None

    def open(self) -> str:
        """Create the pseudo-terminal and return its slave path."""
        if self._master is not None:
            raise RuntimeError(f"pty port {self.path} is already open; close() it first")
        self._master, self._slave, self.path = open_raw_pty()
        self._loop.add_reader(self._master, self._readable)
        if self.link:
            point_link(self.link, self.path)
        return self.path

    def close(self, remove_link: bool = True) -> None:
        """Close both sides: an open slave then reads and writes with errors, like a vanished port."""
        if self._master is not None:
            self._loop.remove_reader(self._master)
            os.close(self._master)
            self._master = None
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None
        if remove_link and self.link:
            with contextlib.suppress(FileNotFoundError):
                Path(self.link).unlink()

    def write(self, data: bytes) -> None:
        if self._master is None:
            return
        try:
            os.write(self._master, data)
        except (BlockingIOError, OSError) as exc:
            self.write_failures += 1
            logger.debug("pty %s: reply of %d bytes not written: %r", self.path, len(data), exc)

    def _readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            logger.debug("pty %s: read failed: %r", self.path, exc)
            return
        if data:
            self._on_data(data)


class RtuGatewayServer:
    """A TCP server that passes RTU frames to and from the bus, like a serial gateway.

    Every connection gets its own responder, so a reply goes back to the connection that
    asked. `stop()` closes the listener and every connection.
    """

    def __init__(self, units: Callable[[], dict[int, RtuUnit]], host: str, port: int,
                 baudrate: int = 9600) -> None:
        self._units = units
        self.host = host
        self.port = port
        self.baudrate = baudrate
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.responders: list[RtuResponder] = []

    async def start(self, timeout_s: float = 5.0) -> None:
        server = await asyncio.wait_for(asyncio.start_server(self._serve, self.host, self.port), timeout_s)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self, timeout_s: float = 5.0) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in list(self._writers):
            writer.close()
        for responder in self.responders:
            responder.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout_s)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        responder = RtuResponder(self._units, writer.write, loop, self.baudrate)
        self.responders.append(responder)
        self._writers.add(writer)
        try:
            while data := await reader.read(4096):
                responder.feed(data)
        except ConnectionError:
            pass
        finally:
            responder.cancel()
            self._writers.discard(writer)
            self.responders.remove(responder)
            writer.close()
