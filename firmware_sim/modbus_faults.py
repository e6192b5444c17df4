"""Transport faults of a simulated Modbus device, decided per request.

A `FaultState` contains the faults that act on each reply of one device: a dropped reply, a
delayed one, corrupted bytes, a wrong CRC, or an exception reply in place of the data. Each
fault lasts for a time, for a number of requests, or until cleared, and acts on a request
with a probability. The servers ask `decide()` once per request and apply the result.

Faults that act on the whole server, a restart or a removed serial port, are carried out by
the running device or bus (see `modbus_devices`), not here.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

# Faults that act on single replies.
REPLY_FAULTS = ("drop", "delay", "corrupt", "bad_crc", "exception", "busy")
# Faults that act on the server or the serial port.
SERVER_FAULTS = ("restart", "port_loss")
FAULT_KINDS = REPLY_FAULTS + SERVER_FAULTS
SERVER_DEVICE_FAILURE = 4
SERVER_DEVICE_BUSY = 6


@dataclass
class ActiveFault:
    """One fault in force: until a monotonic time and/or for a number of requests."""

    kind: str
    until: float | None
    remaining: int | None
    probability: float
    delay_s: float = 0.0
    code: int = SERVER_DEVICE_FAILURE


@dataclass
class FaultDecision:
    """The faults to apply to one reply."""

    drop: bool = False
    delay_s: float = 0.0
    corrupt: bool = False
    bad_crc: bool = False
    exception_code: int | None = None


class FaultState:
    """The reply faults of one device; safe to change from any thread.

    `applied` counts, per kind, the replies a fault acted on.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._faults: list[ActiveFault] = []
        self.applied: dict[str, int] = dict.fromkeys(REPLY_FAULTS, 0)

    def add(self, kind: str, *, duration_s: float | None = None, count: int | None = None,
            probability: float = 1.0, delay_s: float = 0.0, code: int = SERVER_DEVICE_FAILURE) -> None:
        """Put a reply fault in force for `duration_s` real seconds and/or `count` requests.

        With neither, the fault lasts until `clear()`. "delay" sends each reply `delay_s`
        late. "exception" replies with exception `code`, "busy" with code 6.
        """
        if kind not in REPLY_FAULTS:
            raise ValueError(f"unknown reply fault {kind!r}: use one of {', '.join(REPLY_FAULTS)}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"fault probability {probability!r} is invalid: use a number from 0 to 1")
        if duration_s is not None and duration_s < 0:
            raise ValueError(f"fault duration {duration_s!r} s is invalid: use a number >= 0")
        if count is not None and count < 1:
            raise ValueError(f"fault count {count!r} is invalid: use an integer >= 1")
        if kind == "delay" and not delay_s > 0:
            raise ValueError(f"delay fault needs delay_s > 0, got {delay_s!r}")
        if kind == "exception" and not 1 <= code <= 255:
            raise ValueError(f"exception code {code!r} is invalid: use 1..255 (4 = device failure)")
        until = None if duration_s is None else time.monotonic() + duration_s
        fault = ActiveFault(kind, until, count, probability, delay_s,
                            SERVER_DEVICE_BUSY if kind == "busy" else code)
        with self._lock:
            self._faults.append(fault)

    def clear(self, kind: str | None = None) -> None:
        """End every fault of `kind`, or every fault."""
        with self._lock:
            self._faults = [fault for fault in self._faults if kind is not None and fault.kind != kind]

    def active(self) -> list[str]:
        """Return the kinds of the faults in force."""
        with self._lock:
            self._expire(time.monotonic())
            return [fault.kind for fault in self._faults]

    def decide(self) -> FaultDecision:
        """Decide the faults of one reply, and count down the faults that acted."""
        decision = FaultDecision()
        with self._lock:
            self._expire(time.monotonic())
            for fault in self._faults:
                if self._rng.random() >= fault.probability:
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                self.applied[fault.kind] += 1
                if fault.kind == "drop":
                    decision.drop = True
                elif fault.kind == "delay":
                    decision.delay_s = max(decision.delay_s, fault.delay_s)
                elif fault.kind == "corrupt":
                    decision.corrupt = True
                elif fault.kind == "bad_crc":
                    decision.bad_crc = True
                elif decision.exception_code is None:
                    decision.exception_code = fault.code
            self._expire(time.monotonic())
        return decision

    def _expire(self, now: float) -> None:
        self._faults = [fault for fault in self._faults
                        if (fault.until is None or now < fault.until)
                        and (fault.remaining is None or fault.remaining > 0)]
