"""Wall-clock state for gateways without a real-time clock.

A gateway without an RTC boots with a wrong wall clock and keeps it until NTP (or another
time source) synchronises it, which can take days when the network is down. This module
reports whether the kernel considers the clock synchronised, and `ClockMonitor` corrects
the times of buffered summaries that were made before synchronisation.

The correction uses the monotonic clock (CLOCK_MONOTONIC on Linux), which starts at boot
and is never stepped when the wall clock is set; NTP only slews its rate slightly. The buffer stores, for each summary made while unsynchronised, the wall
and monotonic times of the append and the boot id. After synchronisation the error of
that summary's wall time is

    (now_wall - now_mono) - (created_wall - created_mono)

which is exact while both readings come from the same boot. Summaries from an earlier boot
cannot be corrected and keep `quality.clock_synced = false`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.uplink.buffer import SummaryBuffer

log = logging.getLogger(__name__)

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
# A change of (wall - monotonic) larger than this between two checks counts as a step.
STEP_THRESHOLD_S = 1.0

# From <sys/timex.h> on Linux: adjtimex() returns TIME_ERROR and sets STA_UNSYNC in
# `status` while the kernel considers the clock unsynchronised.
_TIME_ERROR = 5
_STA_UNSYNC = 0x0040


class ClockStatus(enum.Enum):
    SYNCED = "synced"
    UNSYNCED = "unsynced"
    UNKNOWN = "unknown"  # not Linux, or adjtimex is unavailable


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """struct timex of the Linux adjtimex() call, with `long` fields as in the kernel ABI."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


_adjtimex = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _adjtimex = _libc.adjtimex
        _adjtimex.argtypes = [ctypes.POINTER(_Timex)]
        _adjtimex.restype = ctypes.c_int
    except (OSError, AttributeError) as exc:
        log.warning("adjtimex is not available (%s); clock synchronisation is reported as unknown", exc)
        _adjtimex = None


def system_clock_status() -> ClockStatus:
    """Ask the kernel whether the wall clock is synchronised (Linux adjtimex, read only).

    Returns UNKNOWN where adjtimex is unavailable or fails.
    """
    if _adjtimex is None:
        return ClockStatus.UNKNOWN
    timex = _Timex()  # modes = 0: read the state, change nothing
    state = _adjtimex(ctypes.byref(timex))
    if state < 0:
        return ClockStatus.UNKNOWN
    if state == _TIME_ERROR or timex.status & _STA_UNSYNC:
        return ClockStatus.UNSYNCED
    return ClockStatus.SYNCED


def read_boot_id(path: str = BOOT_ID_PATH) -> str | None:
    """Return the kernel's boot id (a new UUID at every boot), or None where it is unavailable."""
    try:
        with open(path, encoding="ascii") as file:
            value = file.read(64).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value or None


class Clock(Protocol):
    """Source of clock readings; SystemClock in production, a controllable one in tests."""

    boot_id: str | None

    def status(self) -> ClockStatus: ...

    def wall(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The gateway's real clocks: time.time, time.monotonic, adjtimex and the boot id."""

    def __init__(self) -> None:
        self.boot_id = read_boot_id()

    def status(self) -> ClockStatus:
        return system_clock_status()

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class ClockCheck:
    """Result of one `ClockMonitor.check` call."""

    status: ClockStatus
    step_s: float  # change of (wall - monotonic) since the previous check; 0.0 on the first
    corrected: int  # buffered summaries whose times were corrected by this check


class ClockMonitor:
    """Watches the wall clock and corrects buffered summaries once it is synchronised.

    The service calls `check()` periodically (every summary period is enough) from the
    thread that uses the buffer. A step of the wall clock is logged. Steps never reorder,
    drop or duplicate anything, because the buffer orders by seq.
    """

    def __init__(self, buffer: SummaryBuffer, clock: Clock | None = None, *, step_threshold_s: float = STEP_THRESHOLD_S) -> None:
        self._buffer = buffer
        self._clock: Clock = clock if clock is not None else buffer.clock
        self._step_threshold_s = step_threshold_s
        self._last_offset: float | None = None
        self._last_status: ClockStatus | None = None

    def check(self) -> ClockCheck:
        """Read the clock state, log changes and steps, and correct buffered summaries if synchronised.

        Raises:
            sqlite3.Error: the buffer could not be updated; the next check tries again.
        """
        status = self._clock.status()
        offset = self._clock.wall() - self._clock.monotonic()
        step = 0.0 if self._last_offset is None else offset - self._last_offset
        self._last_offset = offset
        if abs(step) >= self._step_threshold_s:
            log.warning("wall clock stepped by %+.3f s; buffered summaries keep their seq order", step)
        if status is not self._last_status:
            log.info("wall clock is %s", status.value)
            self._last_status = status

        corrected = 0
        if status is ClockStatus.SYNCED:
            corrected = self._buffer.correct_clock(self._clock.boot_id, offset)
        return ClockCheck(status, step, corrected)
