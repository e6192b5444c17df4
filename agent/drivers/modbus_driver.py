"""Poll one Modbus device and turn its registers into readings.

`ModbusDriver` works the same over every transport: it plans the read requests once, sends
them through the device's link (see `modbus_links`), checks each reply against its request
and decodes the points. A failed request does not raise from `poll()`: its points are left out
of the result, and the failure goes to `last_errors`, to `counters` and, once per cause and
then rate-limited, to the log.

A device that does not reply costs one timeout per poll, because the rest of that poll is
skipped. Later polls are skipped for a wait that starts at `backoff_min_s` and doubles up
to `backoff_max_s` (each wait drawn within +-20 %), until a reply arrives. So a dead device on a
shared RS-485 bus takes one timeout per wait from the others, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from agent.drivers.base import Reading
from agent.drivers.modbus_config import ModbusDeviceConfig
from agent.drivers.modbus_frames import (
    BUSY_CODES,
    BadReply,
    CrcError,
    ExceptionReply,
    LinkError,
    ModbusError,
    NoResponse,
    ReplyStats,
    Request,
    check_reply,
    read_request,
    write_request,
)
from agent.drivers.modbus_links import ModbusLink, acquire_link, release_link
from agent.drivers.modbus_points import FUNCTION_CODES, DecodeError, ReadBlock, decode_point, plan_requests
from agent.logutil import RateLimitedLog

logger = logging.getLogger(__name__)

# Interval of repeated error messages, per device and cause.
LOG_REPEAT_S = 60.0
JITTER = 0.2

COUNTER_NAMES = (
    "polls",            # poll() calls
    "skipped_polls",    # polls not sent because the device is waiting after silence
    "requests",         # request frames sent
    "replies",          # replies that matched their request, exception replies included
    "errors",           # requests that produced no values, for any reason
    "timeouts",         # NO_RESPONSE: no complete reply before the timeout
    "crc_errors",       # RTU replies with a wrong CRC
    "bad_replies",      # replies that do not fit their request
    "stray_replies",    # replies to another unit or an earlier request, dropped
    "exceptions",       # Modbus exception replies; exception_<NAME> counts each code
    "busy_retries",     # requests repeated after SERVER_DEVICE_BUSY or ACKNOWLEDGE
    "decode_errors",    # points whose registers did not decode
    "connects",         # link opened by a request of this device
    "reconnects",       # ... after it had been open before
    "connect_failures",
    "link_errors",      # connection or serial port lost
    "discarded_bytes",  # stale input dropped before a request or after a failed one
    "backoffs",         # times the device went silent and polls started to be skipped
)


@dataclass(frozen=True, slots=True)
class RequestError:
    """A read request that produced no values, and why.

    `reason` is a Modbus exception name (e.g. ILLEGAL_DATA_ADDRESS) or one of NO_RESPONSE,
    CRC_ERROR, BAD_REPLY, DECODE_ERROR, NOT_CONNECTED, CONNECT_FAILED, CONNECTION_LOST,
    PORT_LOST, SKIPPED (not sent after a silent request in the same poll) and BACKOFF (not
    sent because the device is waiting after silence).
    """

    function: str
    address: int
    count: int
    points: tuple[str, ...]
    reason: str
    detail: str


class ModbusDriver:
    """Poll one Modbus device over TCP, RTU on a serial port, or RTU through a TCP gateway.

    Devices on one serial port, or behind one RTU-over-TCP gateway, share one link and take
    turns on it. `counters` contains the integer counters named in COUNTER_NAMES, plus
    `exception_<NAME>` per Modbus exception code seen.
    """

    def __init__(self, config: ModbusDeviceConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.plan = plan_requests(config.points, config.max_registers, config.even_alignment,
                                  config.max_gap_registers)
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.last_errors: list[RequestError] = []
        self._rng = rng or random.Random()
        self._link: ModbusLink | None = None
        self._closed = True
        self._lock = asyncio.Lock()
        self._log = RateLimitedLog(logger, LOG_REPEAT_S)
        self._failing: dict[str, str] = {}
        self._skip_until = 0.0
        self._backoff_s = config.backoff_min_s

    def __repr__(self) -> str:
        return f"ModbusDriver(id={self.config.id!r}, {self.config.endpoint}, points={len(self.config.points)})"

    @property
    def connected(self) -> bool:
        """True while the device's connection or serial port is open."""
        return self._link is not None and self._link.is_open

    def backoff_remaining_s(self) -> float:
        """Seconds until the device is polled again after it stopped replying (0 if now)."""
        return max(self._skip_until - time.monotonic(), 0.0)

    async def open(self) -> bool:
        """Open the device's connection or serial port and return whether it worked.

        A failure is logged and retried by later polls, so a device that is down at start-up
        does not stop the caller. Raises ValueError if the device's serial settings differ
        from those of another device already open on the same port.
        """
        self._closed = False
        if self._link is None:
            try:
                self._link = acquire_link(self.config)
            except ValueError as exc:
                logger.error("%s", exc)
                raise
        stats = ReplyStats()
        try:
            await self._link.ensure_open(self.config.timeout_s, stats)
        except LinkError as exc:
            self._count_error(exc)
            for block in self.plan:
                self._failing[f"{block.function}:{block.address}"] = exc.reason
            self._log.log(logging.WARNING, f"link:{exc.reason}", "Modbus device '%s' (%s): %s (%s)",
                          self.config.id, self.config.endpoint, exc.reason, exc.detail)
            return False
        finally:
            self._count_stats(stats)
        return True

    async def close(self) -> None:
        """Release the connection or port (closed once no device uses it).

        `poll()` raises until `open()` is called again.
        """
        self._closed = True
        if self._link is not None:
            link, self._link = self._link, None
            await release_link(link, self.config.id)

    async def poll(self) -> list[Reading]:
        """Read every point once and return the readings of the requests that succeeded.

        Raises RuntimeError only if the driver is not open. Device, line and network failures
        go to `last_errors`, `counters` and the log instead.
        """
        async with self._lock:
            self._require_open()
            self.counters["polls"] += 1
            if time.monotonic() < self._skip_until:
                self.counters["skipped_polls"] += 1
                detail = f"device did not reply; next poll in {self.backoff_remaining_s():.2f} s"
                self.last_errors = [_error(block, "BACKOFF", detail) for block in self.plan]
                return []

            readings: list[Reading] = []
            errors: list[RequestError] = []
            answered = silent = False
            stop: RequestError | None = None
            for block in self.plan:
                if stop is not None:
                    errors.append(_error(block, stop.reason, stop.detail))
                    continue
                request = read_request(self.config.unit_id, block.function_code, block.address, block.count)
                try:
                    registers = await self._execute(request)
                except ExceptionReply as exc:
                    answered = True
                    errors.append(self._fail(block, exc))
                    continue
                except LinkError as exc:
                    errors.append(self._fail(block, exc))
                    stop = _error(block, exc.reason, exc.detail)
                    continue
                except NoResponse as exc:
                    silent = True
                    errors.append(self._fail(block, exc))
                    stop = _error(block, "SKIPPED", "not sent: the device did not reply to an earlier request")
                    continue
                except (CrcError, BadReply) as exc:
                    errors.append(self._fail(block, exc))
                    continue
                answered = True
                self._recovered(block)
                readings.extend(self._decode(block, registers, errors))

            if answered:
                self._leave_backoff()
            elif silent:
                self._enter_backoff()
            self.last_errors = errors
            return readings

    async def read_registers(self, function: str, address: int, count: int) -> list[int]:
        """Read `count` registers from PDU `address` of the "input" or "holding" table.

        Raises a ModbusError subclass (ExceptionReply, NoResponse, LinkError, ...) on failure.
        """
        async with self._lock:
            self._require_open()
            if function not in FUNCTION_CODES:
                raise ValueError(f"unknown register table {function!r}: use 'input' or 'holding'")
            return await self._execute(read_request(self.config.unit_id, FUNCTION_CODES[function], address, count))

    async def write_registers(self, address: int, values: list[int], single: bool | None = None) -> None:
        """Write holding registers from PDU `address`: FC06 for one value, FC16 for several.

        `single` True forces FC06, False forces FC16. Raises a ModbusError subclass on failure.
        """
        async with self._lock:
            self._require_open()
            await self._execute(write_request(self.config.unit_id, address, values, single))

    # -- requests ----------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed or self._link is None:
            raise RuntimeError(f"Modbus device '{self.config.id}': poll() before open() or after close()")

    async def _execute(self, request: Request) -> list[int]:
        """Send a request, repeating it after a busy reply, and return the registers read."""
        assert self._link is not None
        config = self.config
        attempt = 0
        while True:
            stats = ReplyStats()
            try:
                pdu = await self._link.transact(request, config.timeout_s, config.min_gap_s, stats)
            except ModbusError as exc:
                self._count_error(exc)
                raise
            finally:
                self._count_stats(stats)
            self.counters["replies"] += 1
            try:
                return check_reply(request, pdu)
            except ExceptionReply as exc:
                if exc.code in BUSY_CODES and attempt < config.busy_retries:
                    attempt += 1
                    self.counters["busy_retries"] += 1
                    await asyncio.sleep(config.busy_retry_delay_s)
                    continue
                self._count_error(exc)
                raise
            except BadReply as exc:
                self._count_error(exc)
                raise

    def _count_stats(self, stats: ReplyStats) -> None:
        counters = self.counters
        if stats.sent:
            counters["requests"] += 1
        counters["stray_replies"] += stats.stray_replies
        counters["discarded_bytes"] += stats.discarded_bytes
        if stats.opened:
            counters["connects"] += 1
            counters["reconnects"] += stats.reopened

    def _count_error(self, exc: ModbusError) -> None:
        counters = self.counters
        counters["errors"] += 1
        if isinstance(exc, NoResponse):
            counters["timeouts"] += 1
        elif isinstance(exc, CrcError):
            counters["crc_errors"] += 1
        elif isinstance(exc, BadReply):
            counters["bad_replies"] += 1
        elif isinstance(exc, ExceptionReply):
            counters["exceptions"] += 1
            key = f"exception_{exc.reason}"
            counters[key] = counters.get(key, 0) + 1
        elif isinstance(exc, LinkError):
            if exc.reason == "CONNECT_FAILED":
                counters["connect_failures"] += 1
            elif exc.reason in ("CONNECTION_LOST", "PORT_LOST"):
                counters["link_errors"] += 1

    # -- decoding ----------------------------------------------------------------------------

    def _decode(self, block: ReadBlock, registers: list[int], errors: list[RequestError]) -> list[Reading]:
        t_mono, t_wall = time.monotonic(), time.time()
        readings = []
        for point in block.points:
            offset = point.address - block.address
            try:
                decoded = decode_point(point, registers[offset:offset + point.count])
            except DecodeError as exc:
                self.counters["decode_errors"] += 1
                error = RequestError(block.function, point.address, point.count, (point.name,),
                                     "DECODE_ERROR", str(exc))
                errors.append(error)
                self._log.log(logging.WARNING, f"decode:{point.name}", "Modbus device '%s': %s",
                              self.config.id, exc)
                continue
            for name, value in decoded:
                unit = point.unit if name == point.name and point.type != "bitfield" else ""
                readings.append(Reading(self.config.id, name, value, unit, "good", t_mono, t_wall))
        return readings

    # -- backoff and logging -----------------------------------------------------------------

    def _enter_backoff(self) -> None:
        wait_s = self._backoff_s * self._rng.uniform(1.0 - JITTER, 1.0 + JITTER)
        self._skip_until = time.monotonic() + wait_s
        self._backoff_s = min(self._backoff_s * 2.0, self.config.backoff_max_s)
        self.counters["backoffs"] += 1
        self._log.log(logging.WARNING, "backoff", "Modbus device '%s' (%s): no reply; skipping polls for %.2f s",
                      self.config.id, self.config.endpoint, wait_s)

    def _leave_backoff(self) -> None:
        if self._backoff_s != self.config.backoff_min_s:
            logger.info("Modbus device '%s' (%s): replies again", self.config.id, self.config.endpoint)
            self._log.clear("backoff")
        self._backoff_s = self.config.backoff_min_s
        self._skip_until = 0.0

    def _fail(self, block: ReadBlock, exc: ModbusError) -> RequestError:
        error = _error(block, exc.reason, exc.detail)
        block_key = f"{block.function}:{block.address}"
        self._failing[block_key] = exc.reason
        if isinstance(exc, LinkError):
            # A link failure affects every request of the device: one message for all.
            key = f"link:{exc.reason}"
            message = "Modbus device '%s' (%s): %s (%s)"
            args: tuple[object, ...] = (self.config.id, self.config.endpoint, exc.reason, exc.detail)
        else:
            key = f"{block_key}:{exc.reason}"
            message = "Modbus device '%s' (%s): %s read of %d registers at address %d failed: %s (%s)"
            args = (self.config.id, self.config.endpoint, block.function, block.count, block.address,
                    exc.reason, exc.detail)
        self._log.log(logging.WARNING, key, message, *args)
        return error

    def _recovered(self, block: ReadBlock) -> None:
        block_key = f"{block.function}:{block.address}"
        reason = self._failing.pop(block_key, None)
        if reason is None:
            return
        self._log.clear(f"{block_key}:{reason}")
        self._log.clear(f"link:{reason}")
        logger.info("Modbus device '%s': %s read at address %d succeeded again after %s",
                    self.config.id, block.function, block.address, reason)


def _error(block: ReadBlock, reason: str, detail: str) -> RequestError:
    return RequestError(block.function, block.address, block.count,
                        tuple(point.name for point in block.points), reason, detail)
