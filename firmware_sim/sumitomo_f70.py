"""Simulated Sumitomo (SHI) F-70 helium compressor that serves its RS-232 protocol on a pty.

It is written from the protocol description alone and shares no code with the agent's driver.
The protocol in short:

- request: `$` + 3-character mnemonic + CRC as 4 uppercase hex digits + CR, for example
  `$TEAA4B9<CR>`. The CRC covers `$` and the mnemonic.
- reply: `$` + mnemonic + `,` + fields each followed by `,` + CRC + CR, for example
  `$TEA,086,040,031,000,3798<CR>`. The CRC covers everything before it, the last comma
  included.
- anything else (no `$`, unknown mnemonic, wrong length, bad CRC) gets `$???,3278<CR>`.

The CRC is CRC-16/MODBUS: reflected polynomial 0xA001, initial value 0xFFFF, no final XOR.

`F70Model` contains the physical state and turns request lines into reply bytes without
any I/O. `RunningF70` puts a model on a pseudo-terminal, runs its clock at `speed` times real
time and injects transport faults. `start_f70` builds and starts both.
"""

from __future__ import annotations

import logging
import math
import os
import random
import select
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .pty_port import open_raw_pty, point_link
from .scenario import Offsets, Step

logger = logging.getLogger(__name__)

READ_MNEMONICS = ("TEA", "TE1", "TE2", "TE3", "TE4", "PRA", "PR1", "PR2", "STA", "ID1")
OPERATING_MNEMONICS = ("ON1", "OFF", "RS1", "CHR", "CHP", "POF")
REQUEST_LENGTH = 8  # '$', 3-character mnemonic, 4 CRC digits; CR not counted

LOCAL_OFF, LOCAL_ON, REMOTE_OFF, REMOTE_ON = 0, 1, 2, 3
COLD_HEAD_RUN, COLD_HEAD_PAUSE, FAULT_OFF, OIL_FAULT_OFF = 4, 5, 6, 7
STATE_NAMES = ("local_off", "local_on", "remote_off", "remote_on", "cold_head_run",
               "cold_head_pause", "fault_off", "oil_fault_off")
COMPRESSOR_STATES = (LOCAL_ON, REMOTE_ON, COLD_HEAD_PAUSE)
SYSTEM_ON_STATES = (LOCAL_ON, REMOTE_ON, COLD_HEAD_RUN, COLD_HEAD_PAUSE)

ALARMS = {
    "pressure": 0x0080,
    "oil_level": 0x0040,
    "water_flow": 0x0020,
    "water_temperature": 0x0010,
    "helium_temperature": 0x0008,
    "phase_sequence_fuse": 0x0004,
    "motor_temperature": 0x0002,
}
# Trip points as SHI specifies them for the F-70.
HELIUM_TRIP_C = 93.0  # discharge thermistor, shutdown
WATER_WARNING_C = 35.0  # cooling water temperature, warning only
WATER_FLOW_OUTLET_C = 46.0  # low flow is inferred from the outlet temperature, warning only
LOW_RETURN_PSIG = 15.0  # loss of helium charge, shutdown
COLD_HEAD_RUN_LIMIT_S = 1800.0  # $CHR stops by itself after 30 minutes

QUANTITIES = ("t1_c", "t2_c", "t3_c", "p1_psig")
SERVED = ("t1_c", "t2_c", "t3_c", "t4_c", "p1_psig", "p2_psig")
EVENTS = ("trip", "power_cycle")
FAULT_KINDS = ("corrupt", "bad_crc", "no_reply", "slow_reply", "garbage", "corrupt_commands",
               "port_removed")


def _crc_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        value = index
        for _ in range(8):
            value = (value >> 1) ^ 0xA001 if value & 1 else value >> 1
        table.append(value)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Return the CRC-16/MODBUS of `data`, computed byte-wise from a table."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def reply_frame(mnemonic: str, fields: tuple[str, ...] | list[str] = (), crc_without_comma: bool = False) -> bytes:
    """Return a reply frame with its CRC and CR, for example b"$ON1,8936\\r".

    With `crc_without_comma` the CRC leaves out the comma before it, as SHI's
    `$PR1,079,2EBD` example does.
    """
    body = ("$" + mnemonic + "," + "".join(field + "," for field in fields)).encode("ascii")
    covered = body[:-1] if crc_without_comma else body
    return body + f"{crc16(covered):04X}".encode("ascii") + b"\r"


def error_reply() -> bytes:
    """Return the reply to a malformed request, b"$???,3278\\r"."""
    return reply_frame("???")


class _Drift:
    """Mean-reverting random walk (Ornstein-Uhlenbeck) for slow noise on a quantity."""

    def __init__(self, rng: random.Random, mean: float, sigma: float, tau_s: float) -> None:
        self.rng = rng
        self.mean = mean
        self.sigma = sigma
        self.tau_s = tau_s
        self.value = mean

    def advance(self, dt_s: float) -> float:
        decay = math.exp(-dt_s / self.tau_s)
        spread = self.sigma * math.sqrt(1.0 - decay * decay)
        self.value = self.mean + (self.value - self.mean) * decay + self.rng.gauss(0.0, spread)
        return self.value


def _approach(value: float, target: float, dt_s: float, tau_s: float) -> float:
    return target + (value - target) * math.exp(-dt_s / tau_s)


def _check_number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"invalid F-70 option {name}={value!r}: expected a number from {low} to {high}")
    return float(value)


class F70Model:
    """Physical state of an F-70 and its replies; no I/O, time in simulated seconds.

    Running, the cooling water leaves `outlet_rise_c` above the inlet, the helium discharge
    (T1) settles `discharge_rise_c` above the inlet and the return pressure (P1) near
    `return_psig`. Stopped, temperatures fall back towards the inlet and P1 rises to the
    static charge `static_psig`. Operating hours count while the compressor runs.

    With `auto_alarms`, SHI's trip points act while the compressor runs: T1 above
    93 degC or P1 below 15 psig latch an alarm and shut down (Fault Off) until `$RS1`.
    Water inlet above 35 degC sets the water temperature alarm and outlet above 46 degC the
    water flow alarm. Both are warnings that clear with their cause.
    NOTE: the automatic restarts after a helium temperature trip (SHI specifies 5 tries
    20 minutes apart) are not modelled.

    Options for the protocol's uncertain points: `id1_third_field` sends the `000` field
    after the hours in `$ID1` (SHI's example CRC matches only with it);
    `crc_without_comma` lists mnemonics whose reply CRC leaves out the last comma (as in
    SHI's `$PR1` example); `config_2` sets status bit 15, in which the compressor echoes
    operating commands but ignores them.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        running: bool = True,
        hours: float | None = None,
        firmware: str = "1.6",
        water_inlet_c: float = 27.0,
        outlet_rise_c: float = 8.0,
        discharge_rise_c: float = 56.0,
        return_psig: float = 85.0,
        static_psig: float = 198.0,
        id1_third_field: bool = True,
        crc_without_comma: tuple[str, ...] | list[str] = (),
        config_2: bool = False,
        auto_alarms: bool = True,
    ) -> None:
        if not isinstance(firmware, str) or not firmware or "," in firmware or not firmware.isascii():
            raise ValueError(f"invalid F-70 option firmware={firmware!r}: expected a version such as '1.6'")
        unknown = sorted(set(crc_without_comma) - set(READ_MNEMONICS))
        if unknown:
            raise ValueError(f"invalid F-70 option crc_without_comma: {unknown[0]!r} is not a read "
                             f"command; use some of {', '.join(READ_MNEMONICS)}")
        self.rng = rng
        self.firmware = firmware
        self.water_inlet_c = _check_number("water_inlet_c", water_inlet_c, 0.0, 60.0)
        self.outlet_rise_c = _check_number("outlet_rise_c", outlet_rise_c, 0.0, 40.0)
        self.discharge_rise_c = _check_number("discharge_rise_c", discharge_rise_c, 0.0, 150.0)
        self.return_psig = _check_number("return_psig", return_psig, 0.0, 400.0)
        self.static_psig = _check_number("static_psig", static_psig, 0.0, 400.0)
        self.id1_third_field = bool(id1_third_field)
        self.crc_without_comma = frozenset(crc_without_comma)
        self.config_2 = bool(config_2)
        self.auto_alarms = bool(auto_alarms)
        self.hours = (_check_number("hours", hours, 0.0, 999999.9) if hours is not None
                      else round(rng.uniform(2000.0, 40000.0), 1))

        self.offsets = Offsets(QUANTITIES)
        self.overrides: dict[str, float] = {}
        self.lock = threading.RLock()
        self.t_s = 0.0
        self.state = LOCAL_ON if running else LOCAL_OFF
        self.latched = 0  # alarm bits that stay set until $RS1
        self.warnings = 0  # alarm bits that clear with their cause
        self.operating_commands = 0
        self._cold_head_run_left_s = 0.0
        self._powered_off_until_s: float | None = None

        self._inlet = _Drift(rng, water_inlet_c, 0.3, 900.0)
        self._t1_noise = _Drift(rng, 0.0, 0.25, 30.0)
        self._p1_noise = _Drift(rng, 0.0, 0.6, 20.0)
        self._t2 = water_inlet_c + (outlet_rise_c if running else 0.0)
        self._t1 = water_inlet_c + (discharge_rise_c if running else 2.0)
        self._p1 = return_psig if running else static_psig

    # -- state ---------------------------------------------------------------------------

    @property
    def compressor_running(self) -> bool:
        return self.state in COMPRESSOR_STATES

    @property
    def powered(self) -> bool:
        return self._powered_off_until_s is None

    def status_word(self) -> int:
        with self.lock:
            word = (self.state << 9) | self.latched | self.warnings
            if self.config_2:
                word |= 0x8000
            if self.compressor_running:
                word |= 0x0100  # solenoid
            if self.state in SYSTEM_ON_STATES:
                word |= 0x0001
            return word

    def override(self, name: str, value: float) -> None:
        """Serve `value` for `name` (one of SERVED) until `clear_overrides`."""
        if name not in SERVED:
            raise ValueError(f"F-70 has no served quantity {name!r}; it has {', '.join(SERVED)}")
        with self.lock:
            self.overrides[name] = float(value)

    def clear_overrides(self) -> None:
        with self.lock:
            self.overrides.clear()

    def physical(self) -> dict[str, float]:
        """Return the unrounded temperatures (degC) and pressures (psig), overrides applied."""
        with self.lock:
            t = self.t_s
            values = {
                "t1_c": self._t1 + self._t1_noise.value + self.offsets.at("t1_c", t),
                "t2_c": self._t2 + self.offsets.at("t2_c", t),
                "t3_c": self._inlet.value + self.offsets.at("t3_c", t),
                "t4_c": 0.0,
                "p1_psig": self._p1 + self._p1_noise.value + self.offsets.at("p1_psig", t),
                "p2_psig": 0.0,
            }
            values.update(self.overrides)
            return values

    def values(self) -> dict[str, object]:
        """Return what the compressor reports now: the served integers, status, hours, firmware."""
        with self.lock:
            served: dict[str, object] = {name: self._field_value(value) for name, value in self.physical().items()}
            word = self.status_word()
            served.update(
                status_word=word,
                state=self.state,
                state_name=STATE_NAMES[self.state],
                alarms=tuple(name for name, mask in ALARMS.items() if word & mask),
                hours=self._hours_tenths() / 10.0,
                firmware=self.firmware,
                powered=self.powered,
            )
            return served

    # -- time ----------------------------------------------------------------------------

    def advance(self, dt_s: float) -> None:
        """Advance the simulated time by `dt_s` seconds, in steps of at most 10 s."""
        if dt_s <= 0:
            return
        steps = min(10000, max(1, math.ceil(dt_s / 10.0)))
        with self.lock:
            for _ in range(steps):
                self._step(dt_s / steps)

    def _step(self, dt: float) -> None:
        self.t_s += dt
        if self._powered_off_until_s is not None and self.t_s >= self._powered_off_until_s:
            self._powered_off_until_s = None
            logger.info("f70: power back, state local_off")
        if self.state == COLD_HEAD_RUN:
            self._cold_head_run_left_s -= dt
            if self._cold_head_run_left_s <= 0:
                self.state = LOCAL_OFF
                logger.info("f70: cold head run ended after 30 min, state local_off")
        running = self.compressor_running
        if running:
            self.hours = min(999999.9, self.hours + dt / 3600.0)

        inlet = self._inlet.advance(dt) + self.offsets.at("t3_c", self.t_s)
        self._t1_noise.advance(dt)
        self._p1_noise.advance(dt)
        if running:
            self._t2 = _approach(self._t2, inlet + self.outlet_rise_c, dt, 60.0)
            self._t1 = _approach(self._t1, inlet + self.discharge_rise_c, dt, 300.0)
            # With the cold head paused, less helium returns and P1 sits a little higher.
            target = self.return_psig + (8.0 if self.state == COLD_HEAD_PAUSE else 0.0)
            self._p1 = _approach(self._p1, target, dt, 20.0)
        else:
            self._t2 = _approach(self._t2, inlet, dt, 120.0)
            self._t1 = _approach(self._t1, inlet + 2.0, dt, 600.0)
            self._p1 = _approach(self._p1, self.static_psig, dt, 120.0)
        if self.auto_alarms:
            self._check_alarms()

    def _check_alarms(self) -> None:
        values = self.physical()
        warnings = 0
        if values["t3_c"] > WATER_WARNING_C:
            warnings |= ALARMS["water_temperature"]
        if values["t2_c"] > WATER_FLOW_OUTLET_C:
            warnings |= ALARMS["water_flow"]
        self.warnings = warnings
        if self.compressor_running:
            if values["t1_c"] > HELIUM_TRIP_C:
                self._shut_down("helium_temperature", f"T1 {values['t1_c']:.1f} degC > {HELIUM_TRIP_C:g}")
            elif values["p1_psig"] < LOW_RETURN_PSIG:
                self._shut_down("pressure", f"P1 {values['p1_psig']:.1f} psig < {LOW_RETURN_PSIG:g}")

    def _shut_down(self, alarm: str, reason: str) -> None:
        self.latched |= ALARMS[alarm]
        if self.state not in (FAULT_OFF, OIL_FAULT_OFF):
            self.state = OIL_FAULT_OFF if alarm == "oil_level" else FAULT_OFF
            logger.info("f70: %s alarm (%s), state %s", alarm, reason, STATE_NAMES[self.state])

    # -- events --------------------------------------------------------------------------

    def trip(self, alarm: str) -> None:
        """Latch the named alarm and shut down, as the compressor does on a fault."""
        if alarm not in ALARMS:
            raise ValueError(f"F-70 has no alarm {alarm!r}; it has {', '.join(ALARMS)}")
        with self.lock:
            self._shut_down(alarm, "trip event")

    def power_cycle(self, off_s: float) -> None:
        """Cut the power for `off_s` simulated seconds: no replies, then Local Off, alarms clear."""
        _check_number("duration_s", off_s, 0.0, 86400.0)
        with self.lock:
            self._powered_off_until_s = self.t_s + off_s
            self.state = LOCAL_OFF
            self.latched = 0
            self.warnings = 0
            self._cold_head_run_left_s = 0.0
            logger.info("f70: power off for %.1f s", off_s)

    # -- protocol ------------------------------------------------------------------------

    def respond(self, line: bytes) -> bytes | None:
        """Return the reply bytes to one request line (without its CR), or None while unpowered."""
        with self.lock:
            if not self.powered:
                return None
            if len(line) != REQUEST_LENGTH or line[:1] != b"$":
                return error_reply()
            try:
                mnemonic = line[1:4].decode("ascii")
            except UnicodeDecodeError:
                return error_reply()
            if mnemonic not in READ_MNEMONICS and mnemonic not in OPERATING_MNEMONICS:
                return error_reply()
            if line[4:] != f"{crc16(line[:4]):04X}".encode("ascii"):
                return error_reply()
            if mnemonic in OPERATING_MNEMONICS:
                self._operate(mnemonic)
                return reply_frame(mnemonic)
            return reply_frame(mnemonic, self._read_fields(mnemonic), mnemonic in self.crc_without_comma)

    def _read_fields(self, mnemonic: str) -> list[str]:
        served = {name: f"{self._field_value(value):03d}" for name, value in self.physical().items()}
        if mnemonic == "TEA":
            return [served["t1_c"], served["t2_c"], served["t3_c"], served["t4_c"]]
        if mnemonic.startswith("TE"):
            return [served[f"t{mnemonic[2]}_c"]]
        if mnemonic == "PRA":
            return [served["p1_psig"], served["p2_psig"]]
        if mnemonic.startswith("PR"):
            return [served[f"p{mnemonic[2]}_psig"]]
        if mnemonic == "STA":
            return [f"{self.status_word():04X}"]
        tenths = self._hours_tenths()
        fields = [self.firmware, f"{tenths // 10:06d}.{tenths % 10}"]
        if self.id1_third_field:
            fields.append("000")
        return fields

    def _operate(self, mnemonic: str) -> None:
        self.operating_commands += 1
        if self.config_2:
            logger.info("f70: %s ignored in DB-25 configuration 2", mnemonic)
            return
        before = self.state
        shutdown_alarms = self.latched & ~(ALARMS["water_temperature"] | ALARMS["water_flow"])
        if mnemonic == "ON1":
            if self.state in (LOCAL_OFF, REMOTE_OFF, COLD_HEAD_RUN) and not shutdown_alarms:
                self.state = LOCAL_ON
        elif mnemonic == "OFF":
            if self.state in SYSTEM_ON_STATES:
                self.state = LOCAL_OFF
        elif mnemonic == "RS1":
            self.latched = 0
            self.warnings = 0
            if self.state in (FAULT_OFF, OIL_FAULT_OFF):
                self.state = LOCAL_OFF
        elif mnemonic == "CHR":
            if self.state in (LOCAL_OFF, REMOTE_OFF):
                self.state = COLD_HEAD_RUN
                self._cold_head_run_left_s = COLD_HEAD_RUN_LIMIT_S
        elif mnemonic == "CHP":
            if self.state in (LOCAL_ON, REMOTE_ON):
                self.state = COLD_HEAD_PAUSE
        elif mnemonic == "POF":
            if self.state == COLD_HEAD_PAUSE:
                self.state = LOCAL_ON
        logger.info("f70: %s, state %s -> %s", mnemonic, STATE_NAMES[before], STATE_NAMES[self.state])

    @staticmethod
    def _field_value(value: float) -> int:
        # NOTE: SHI describes neither negative values nor values above 999, so the
        # simulator clamps to what 3 digits can carry.
        return min(999, max(0, int(round(value))))

    def _hours_tenths(self) -> int:
        # The counter advances in whole tenths of an hour (6 minutes), so it truncates.
        return int(self.hours * 10.0 + 1e-6)


@dataclass
class _Fault:
    until: float  # time.monotonic() at which the fault ends
    probability: float
    delay_s: float = 0.0


class RunningF70:
    """An `F70Model` served on a pseudo-terminal, with its clock and transport faults.

    The agent opens `path` (the slave side, or `link`, a symlink kept pointing at it) like
    a serial port. A thread reads requests from the master side, replies in arrival order
    and advances the model's clock by `speed` simulated seconds per real second. It keeps
    its own slave descriptor open, so the line does not hang up when the agent closes and
    reopens the port.

    Scenario steps (`apply_step`):

    - `ramp` and `set` change t1_c, t2_c, t3_c or p1_psig;
    - event `trip` (with `alarm`, default "helium_temperature") latches an alarm and shuts
      down;
    - event `power_cycle` (with `duration_s`, default 5) silences the compressor. It then
      comes back in Local Off.

    Faults last `duration_s` simulated seconds and apply to each reply with `probability`
    (default 1):

    - corrupt: one byte of the reply replaced by another printable byte;
    - bad_crc: a wrong CRC;
    - no_reply: the request is read and ignored;
    - slow_reply: the reply is sent `delay_s` real seconds late (replies keep their order);
    - garbage: 1 to 16 random bytes written before the reply;
    - corrupt_commands: one byte of the request is changed on the way in, so the compressor
      replies `$???`;
    - port_removed: the pty is closed and `link` removed, as when a USB adapter is
      unplugged. Afterwards a new pty opens, usually under a new /dev/pts name, and `link`
      points at it.
    """

    def __init__(self, model: F70Model, *, link: str | None = None, speed: float = 1.0, seed: int = 0) -> None:
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed > 0 or math.isinf(speed):
            raise ValueError(f"invalid speed {speed!r}: use a positive factor (1.0 = real time)")
        self.model = model
        self.link = link
        self.speed = float(speed)
        self.counters = dict.fromkeys(
            ("requests", "replies", "dropped", "corrupted", "bad_crcs", "garbage_bytes",
             "corrupted_requests", "port_removals"), 0)
        self._rng = random.Random(seed * 7919 + 70)
        self._faults: dict[str, _Fault] = {}
        self._fault_lock = threading.Lock()
        self._clock_lock = threading.Lock()
        self._last_tick = time.monotonic()
        self._frozen = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._replies: deque[tuple[float, bytes]] = deque()
        self._last_due = 0.0
        self._out = b""
        self._line = bytearray()
        self._restore_at: float | None = None
        self._remove_request: float | None = None
        self._removed = threading.Event()
        self.error: BaseException | None = None
        self._master = self._slave = -1
        self.path = ""
        self._open_pty()

    # -- public API ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread that serves the pty."""
        if self._thread is not None:
            raise RuntimeError(f"F-70 simulator on {self.path} was already started")
        self._last_tick = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"f70-sim {self.path}", daemon=True)
        self._thread.start()
        logger.info("f70: serving %s%s at %gx real time", self.path,
                    f" (link {self.link})" if self.link else "", self.speed)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread, close the pty and remove `link`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("f70 simulator thread on %s did not stop within %.1f s", self.path, timeout_s)
                return
        self._close_pty()
        if self.link and Path(self.link).is_symlink():
            Path(self.link).unlink()

    def __enter__(self) -> RunningF70:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port_present(self) -> bool:
        """False while a port_removed fault has the pty closed."""
        return self._master >= 0

    def values(self) -> dict[str, object]:
        """Return what the compressor reports now (see `F70Model.values`)."""
        self._tick()
        return self.model.values()

    def sim_time(self) -> float:
        """Return the model's simulated time in seconds."""
        self._tick()
        return self.model.t_s

    def freeze(self) -> None:
        """Stop the simulated clock, so values stay put (noise included)."""
        self._tick()
        with self._clock_lock:
            self._frozen = True

    def resume(self) -> None:
        with self._clock_lock:
            self._frozen = False
            self._last_tick = time.monotonic()

    def apply_step(self, step: Step) -> None:
        """Apply one scenario step; raise ValueError for a quantity, event or fault it lacks."""
        if step.action in ("ramp", "set"):
            self.model.offsets.apply(step)
        elif step.action == "event":
            name = step.param("name", str)
            if name == "trip":
                self.model.trip(step.param("alarm", str, "helium_temperature"))
            elif name == "power_cycle":
                self.model.power_cycle(float(step.param("duration_s", (int, float), 5.0)))
            else:
                raise ValueError(f"f70 has no event {name!r}; it has {', '.join(EVENTS)}")
        elif step.action == "fault":
            self._apply_fault(step)
        else:
            raise ValueError(f"f70 takes ramp, set, event and fault steps, not {step.action!r}")

    # -- faults --------------------------------------------------------------------------

    def _apply_fault(self, step: Step) -> None:
        kind = step.param("kind", str)
        if kind not in FAULT_KINDS:
            raise ValueError(f"f70 has no fault {kind!r}; it has {', '.join(FAULT_KINDS)}")
        duration_s = float(step.param("duration_s"))
        if duration_s < 0:
            raise ValueError(f"fault {kind}: duration_s = {duration_s} must be >= 0 simulated seconds")
        real_s = duration_s / self.speed
        if kind == "port_removed":
            self._remove_port(real_s)
            return
        probability = float(step.param("probability", (int, float), 1.0))
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"fault {kind}: probability = {probability} must be from 0 to 1")
        delay_s = 0.0
        if kind == "slow_reply":
            delay_s = float(step.param("delay_s"))
            if not 0.0 <= delay_s <= 60.0:
                raise ValueError(f"fault slow_reply: delay_s = {delay_s} must be from 0 to 60 real seconds")
        with self._fault_lock:
            self._faults[kind] = _Fault(time.monotonic() + real_s, probability, delay_s)
        logger.info("f70: fault %s for %.3g s real", kind, real_s)

    def _fault(self, kind: str) -> _Fault | None:
        with self._fault_lock:
            fault = self._faults.get(kind)
            if fault is None:
                return None
            if time.monotonic() >= fault.until:
                del self._faults[kind]
                return None
        return fault if self._rng.random() < fault.probability else None

    def _remove_port(self, real_s: float) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._do_remove(time.monotonic() + real_s)
            return
        self._removed.clear()
        self._remove_request = time.monotonic() + real_s
        if not self._removed.wait(2.0):
            logger.warning("f70: the simulator thread did not remove the port within 2 s")

    def _do_remove(self, restore_at: float) -> None:
        old = self.path
        self._close_pty()
        if self.link and Path(self.link).is_symlink():
            Path(self.link).unlink()
        self._restore_at = restore_at
        self.counters["port_removals"] += 1
        logger.info("f70: port %s removed for %.3g s", old, restore_at - time.monotonic())

    # -- pty -----------------------------------------------------------------------------

    def _open_pty(self) -> None:
        self._master, self._slave, self.path = open_raw_pty()
        if self.link:
            point_link(self.link, self.path)

    def _close_pty(self) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        self._replies.clear()
        self._out = b""
        self._line.clear()

    # -- thread --------------------------------------------------------------------------

    def _tick(self) -> None:
        with self._clock_lock:
            now = time.monotonic()
            elapsed = now - self._last_tick
            self._last_tick = now
            if self._frozen:
                return
        self.model.advance(elapsed * self.speed)

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as error:  # the thread has no caller to raise to
            self.error = error
            logger.exception("f70 simulator thread failed")

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._tick()
            now = time.monotonic()
            if self._remove_request is not None:
                self._do_remove(self._remove_request)
                self._remove_request = None
                self._removed.set()
            if self._master < 0:
                if self._restore_at is not None and now >= self._restore_at:
                    self._restore_at = None
                    self._open_pty()
                    logger.info("f70: port restored as %s%s", self.path,
                                f" (link {self.link})" if self.link else "")
                else:
                    self._stop.wait(0.01)
                continue
            self._write_due(now)
            wait_s = 0.005 if (self._replies or self._out) else 0.05
            readable, _, _ = select.select([self._master], [], [], wait_s)
            if not readable:
                continue
            try:
                data = os.read(self._master, 1024)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as error:
                logger.debug("f70: read from the pty master failed: %s", error)
                self._stop.wait(0.01)
                continue
            self._receive(data)

    def _receive(self, data: bytes) -> None:
        for byte in data:
            if byte != 0x0D:
                self._line.append(byte)
                if len(self._line) > 256:
                    del self._line[:-256]  # still too long, so the reply is still $???
                continue
            line = bytes(self._line)
            self._line.clear()
            self._answer(line)

    def _answer(self, line: bytes) -> None:
        self.counters["requests"] += 1
        if line and self._fault("corrupt_commands"):
            line = self._replace_byte(line, 0, len(line))
            self.counters["corrupted_requests"] += 1
        reply = self.model.respond(line)
        if reply is None:
            return
        if self._fault("no_reply"):
            self.counters["dropped"] += 1
            return
        if self._fault("bad_crc"):
            wrong = int(reply[-5:-1], 16) ^ 0x0F0F
            reply = reply[:-5] + f"{wrong:04X}".encode("ascii") + b"\r"
            self.counters["bad_crcs"] += 1
        if self._fault("corrupt"):
            reply = self._replace_byte(reply, 1, len(reply) - 1)
            self.counters["corrupted"] += 1
        if self._fault("garbage"):
            noise = bytes(self._rng.randrange(256) for _ in range(self._rng.randint(1, 16)))
            reply = noise + reply
            self.counters["garbage_bytes"] += len(noise)
        slow = self._fault("slow_reply")
        due = time.monotonic() + (slow.delay_s if slow is not None else 0.0)
        # The compressor handles one request at a time, so a reply never overtakes an earlier one.
        due = max(due, self._last_due)
        self._last_due = due
        self._replies.append((due, reply))
        self.counters["replies"] += 1

    def _replace_byte(self, data: bytes, start: int, end: int) -> bytes:
        position = self._rng.randrange(start, end)
        choices = [value for value in range(0x21, 0x7F) if value not in (data[position], 0x24)]
        return data[:position] + bytes((self._rng.choice(choices),)) + data[position + 1:]

    def _write_due(self, now: float) -> None:
        while self._replies and self._replies[0][0] <= now:
            self._out += self._replies.popleft()[1]
        if not self._out:
            return
        try:
            written = os.write(self._master, self._out)
        except BlockingIOError:
            return
        except OSError as error:
            logger.warning("f70: write to %s failed: %s; dropping %d bytes", self.path, error, len(self._out))
            self._out = b""
            return
        self._out = self._out[written:]


def start_f70(link: str | None = None, seed: int = 0, speed: float = 1.0, **options: object) -> RunningF70:
    """Start a simulated F-70 on a new pty and return it.

    `options` go to `F70Model` (running, hours, firmware, water_inlet_c, outlet_rise_c,
    discharge_rise_c, return_psig, static_psig, id1_third_field, crc_without_comma,
    config_2, auto_alarms). `seed` fixes the physical noise and the fault choices. With
    `link`, that path is kept as a symlink to the current pty.
    """
    model = F70Model(random.Random(seed), **options)  # type: ignore[arg-type]
    device = RunningF70(model, link=link, speed=speed, seed=seed)
    device.start()
    return device
