"""Simulated scanner-side Modbus devices over Modbus TCP, RTU on a pty, or RTU through TCP.

Device models (one module each) encode their registers from the devices' protocol
descriptions and share no code with the agent's Modbus driver, so a test that polls a
simulator with the agent checks both sides:

| kind      | model                                   | TCP unit ids     | RTU unit id |
|-----------|-----------------------------------------|------------------|-------------|
| "sdm630"  | Eastron SDM630 power meter              | 1 (others: 0x0B) | 1           |
| "cpa"     | Cryomech CPA helium compressor          | any              | 16          |
| "qm30vt2" | Banner QM30VT2 vibration sensor         | 1 (others: 0x0B) | 1           |
| "chiller" | generic chiller (not a vendor map)      | 1 (others: 0x0B) | 2           |
| "room"    | generic room sensor (not a vendor map)  | 1 (others: 0x0B) | 3           |

`start_modbus_device()` serves one device: on its own pymodbus TCP server, or alone on an
RTU bus. `start_modbus_rtu_bus()` serves several devices with distinct unit ids on one RTU
bus, carried by a pseudo-terminal (like a USB RS-485 adapter) or by a TCP gateway.

Physical values drift with seeded noise and follow simple first-order dynamics. An asyncio
task advances each model in simulated time, which runs `speed` times faster than real time.
Each device takes scenario steps (`apply_step`) and transport faults (`faults`, `restart`,
and for an RTU bus `remove_port` / `restore_port`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import struct
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_sim.modbus_cpa import CryomechCpa
from firmware_sim.modbus_encoding import (
    DIAGNOSTICS,
    READ_HOLDING_REGISTERS,
    READ_INPUT_REGISTERS,
    WRITE_MULTIPLE_REGISTERS,
    WRITE_SINGLE_REGISTER,
    check_integer,
    check_range,
)
from firmware_sim.modbus_faults import FAULT_KINDS, REPLY_FAULTS, FaultDecision, FaultState
from firmware_sim.modbus_generic import GenericChiller, GenericRoom
from firmware_sim.modbus_qm30vt2 import Qm30vt2
from firmware_sim.modbus_rtu import PtyPort, RtuGatewayServer, RtuResponder
from firmware_sim.modbus_sdm630 import Sdm630
from firmware_sim.scenario import Offsets, Step

logger = logging.getLogger(__name__)

KINDS = ("sdm630", "cpa", "qm30vt2", "chiller", "room")
TRANSPORTS = ("tcp", "rtu", "rtu-over-tcp")
MODEL_CLASSES: dict[str, type] = {
    "sdm630": Sdm630, "cpa": CryomechCpa, "qm30vt2": Qm30vt2, "chiller": GenericChiller, "room": GenericRoom,
}
# Unit id of each kind on an RTU bus when none is given: the profiles' defaults.
RTU_UNIT_IDS = {"sdm630": 1, "cpa": 16, "qm30vt2": 1, "chiller": 2, "room": 3}

# Simulated time is integrated in steps of at most this many seconds, so a fast `speed` does not
# turn one update into a single huge step. At most MAX_SUBSTEPS are taken per update.
MAX_STEP_S = 5.0
MAX_SUBSTEPS = 1000
# Starting or stopping a local listener takes milliseconds. This bounds the wait if it hangs.
SERVER_CALL_TIMEOUT_S = 5.0


class DeviceModel(Protocol):
    kind: str
    unit_id: int
    overrides: dict[str, float]
    offsets: Offsets
    quantities: tuple[str, ...]
    events: tuple[str, ...]

    def advance(self, dt_s: float) -> None: ...

    def values(self) -> dict[str, float]: ...

    def event(self, step: Step) -> None: ...

    def handle(self, function_code: int, address: int, count: int,
               written: list[int] | None) -> list[int] | ExcCodes: ...


def make_model(kind: str, seed: int, options: dict[str, Any]) -> DeviceModel:
    """Build a device model, checking the kind and the option names."""
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown Modbus device kind {kind!r}: expected one of {', '.join(KINDS)}")
    model_class = MODEL_CLASSES[kind]
    accepted = [name for name in inspect.signature(model_class).parameters if name != "rng"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown {kind} option {unknown[0]!r}: expected one of {', '.join(accepted)}")
    return model_class(random.Random(seed), **options)


def _exception_pdu(function_code: int, code: int) -> bytes:
    return bytes([function_code | 0x80, code])


def serve_pdu(model: DeviceModel, pdu: bytes) -> bytes:
    """Serve one request PDU with a model and return the reply PDU (RTU framing is not added)."""
    function = pdu[0]
    try:
        if function in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
            address, count = struct.unpack(">HH", pdu[1:5])
            if not 1 <= count <= 125:
                return _exception_pdu(function, ExcCodes.ILLEGAL_VALUE)
            result = model.handle(function, address, count, None)
            if isinstance(result, ExcCodes):
                return _exception_pdu(function, result)
            return bytes([function, 2 * count]) + struct.pack(f">{count}H", *result)
        if function == WRITE_SINGLE_REGISTER:
            address, value = struct.unpack(">HH", pdu[1:5])
            result = model.handle(function, address, 1, [value])
            return _exception_pdu(function, result) if isinstance(result, ExcCodes) else pdu[:5]
        if function == WRITE_MULTIPLE_REGISTERS:
            address, count, byte_count = struct.unpack(">HHB", pdu[1:6])
            if not 1 <= count <= 123 or byte_count != 2 * count or len(pdu) != 6 + byte_count:
                return _exception_pdu(function, ExcCodes.ILLEGAL_VALUE)
            values = list(struct.unpack(f">{count}H", pdu[6:]))
            result = model.handle(function, address, count, values)
            return _exception_pdu(function, result) if isinstance(result, ExcCodes) else pdu[:5]
        if function == DIAGNOSTICS and getattr(model, "diagnostics", False):
            # Sub-function 0 (return query data) echoes the request. No other one is served.
            if pdu[1:3] == b"\x00\x00":
                return pdu
            return _exception_pdu(function, ExcCodes.ILLEGAL_VALUE)
    except struct.error:
        return _exception_pdu(function, ExcCodes.ILLEGAL_VALUE)
    return _exception_pdu(function, ExcCodes.ILLEGAL_FUNCTION)


def full_range_blocks() -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
    """Build pymodbus blocks that accept every address, so the model decides every reply.

    pymodbus 3.16 checks a request against its own blocks before it calls the device action,
    and replies ILLEGAL_ADDRESS for anything outside them. With blocks that cover the whole
    16-bit address space, every request that fits reaches the model.
    """
    return (
        [SimData(0, values=[False] * 65536, datatype=DataType.BITS)],
        [SimData(0, values=[False] * 65536, datatype=DataType.BITS)],
        [SimData(0, count=65536, values=0, datatype=DataType.REGISTERS)],
        [SimData(0, count=65536, values=0, datatype=DataType.REGISTERS)],
    )


async def reject_other_unit(function_code: int, start_address: int, address: int, count: int,
                            registers: list[int], written: list[int] | list[bool] | None) -> ExcCodes:
    """Reject a request to an absent unit id as a Modbus TCP gateway does (exception 0x0B)."""
    return ExcCodes.GATEWAY_NO_RESPONSE


def bound_port(server: ModbusTcpServer) -> int:
    """Return the TCP port a listening pymodbus server is bound to.

    In pymodbus 3.16 the listening server's `transport` is the asyncio.Server created by
    loop.create_server, whose sockets report the real port when port 0 was requested.
    """
    sockets = getattr(server.transport, "sockets", None)
    if not sockets:
        raise RuntimeError("cannot find the bound port: the pymodbus server has no listening socket")
    return int(sockets[0].getsockname()[1])


class RunningDevice:
    """One simulated device, served over TCP on its own server or as one unit of an RTU bus.

    `unit_id` is the id the device responds to (the TCP CPA responds to every id and reports
    its configured one). `host` and `port` are where a TCP device or an RTU gateway listens.
    For a device on a pty bus, `host` is None and `port` is the serial path to open (the
    symlink if the bus has one). `values()` returns the true values in engineering units.
    `faults` contains the reply faults (see FaultState).
    """

    def __init__(self, model: DeviceModel, name: str, speed: float, update_interval_s: float,
                 seed: int = 0) -> None:
        self.model = model
        self.kind = model.kind
        self.name = name
        self.unit_id = model.unit_id
        self.speed = speed
        self.update_interval_s = update_interval_s
        self.transport = "tcp"
        self.host: str | None = None
        self.port: int | str = 0
        self.frozen = False
        self.faults = FaultState(random.Random(seed + 1))
        self.bus: RunningBus | None = None
        self._server: ModbusTcpServer | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task | Any] = set()
        self._down_until = 0.0
        self._pending_drop = 0
        self._pending_corrupt = 0
        self.restarts = 0

    # -- model -------------------------------------------------------------------------------

    def values(self) -> dict[str, float]:
        return self.model.values()

    def freeze(self) -> None:
        """Stop the update task from advancing the model. Requests still get replies."""
        self.frozen = True

    def resume(self) -> None:
        self.frozen = False

    def step(self, seconds: float) -> None:
        """Advance the model by `seconds` of simulated time, in bounded sub-steps."""
        if seconds < 0:
            raise ValueError(f"cannot step a simulated device by a negative time: {seconds} s")
        if seconds == 0:
            return
        steps = min(MAX_SUBSTEPS, max(1, math.ceil(seconds / MAX_STEP_S)))
        for _ in range(steps):
            self.model.advance(seconds / steps)

    def override(self, name: str, value: float) -> None:
        """Serve `value` for quantity `name` until cleared. Other quantities are not recomputed."""
        known = self.model.values()
        if name not in known:
            raise KeyError(f"unknown {self.kind} quantity {name!r}; known: {', '.join(sorted(known))}")
        self.model.overrides[name] = value

    def clear_overrides(self) -> None:
        self.model.overrides.clear()

    def start_updates(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = asyncio.create_task(self._run_updates(), name=f"{self.name} simulator updates")

    async def _run_updates(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.update_interval_s)
            now = loop.time()
            elapsed = now - last
            last = now
            if self.frozen:
                continue
            try:
                self.step(elapsed * self.speed)
            except Exception:
                logger.exception("%s simulator: model update failed, updates stop", self.name)
                raise

    # -- scenarios ---------------------------------------------------------------------------

    def apply_step(self, step: Step) -> None:
        """Apply one scenario step; safe to call from any thread.

        ramp and set go to the model's offsets. event runs a model event by `name`. fault
        starts a transport fault by `kind`, one of: drop, delay (`delay_s`, real seconds),
        corrupt, bad_crc (RTU only), exception (`code`, default 4), busy, restart and
        port_loss. A restart takes the server or the device down for `duration_s`, and a
        port_loss takes away the port of an RTU pty bus for `duration_s`. `duration_s` is simulated time like `at_s`; without it a reply fault
        lasts until cleared and a restart takes 1 s. `probability` (default 1) applies to
        reply faults. Raises ValueError for an unknown quantity, event or fault.
        """
        if step.action in ("ramp", "set"):
            self.model.offsets.apply(step)
        elif step.action == "event":
            name = step.param("name", str)
            if name not in self.model.events:
                raise ValueError(f"{self.name} has no event {name!r}; it has {', '.join(self.model.events) or 'none'}")
            self._call_in_loop(self.model.event, step)
        elif step.action == "fault":
            self._apply_fault(step)
        else:
            raise ValueError(f"{self.name} cannot apply a {step.action!r} step; use ramp, set, event or fault")

    def _apply_fault(self, step: Step) -> None:
        kind = step.param("kind", str)
        if kind not in FAULT_KINDS:
            raise ValueError(f"{self.name} has no fault {kind!r}; use one of {', '.join(FAULT_KINDS)}")
        duration = step.param("duration_s", (int, float), None)
        real_s = None
        if duration is not None:
            real_s = float(duration) / self.speed if self.speed > 0 else float(duration)
        if kind in REPLY_FAULTS:
            if kind == "bad_crc" and self.transport == "tcp":
                raise ValueError(f"{self.name} is served over Modbus TCP, which has no CRC; use corrupt")
            self.faults.add(kind, duration_s=real_s, probability=float(step.param("probability", (int, float), 1.0)),
                            delay_s=float(step.param("delay_s", (int, float), 0.0)),
                            code=int(step.param("code", int, 4)))
        elif kind == "restart":
            self._run_coroutine(self.restart, 1.0 if real_s is None else real_s)
        else:
            if self.bus is None or self.bus.transport != "rtu":
                raise ValueError(f"{self.name} is not on a pty RTU bus, so it has no port to lose; use restart")
            self._run_coroutine(self.bus.port_loss, 1.0 if real_s is None else real_s)

    def _in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _call_in_loop(self, function: Callable[..., Any], *args: Any) -> None:
        if self._loop is None or self._in_loop_thread():
            function(*args)
        else:
            self._loop.call_soon_threadsafe(function, *args)

    def _run_coroutine(self, function: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._loop is None:
            raise RuntimeError(f"{self.name} is not running; start it before applying a fault")
        if self._in_loop_thread():
            task: Any = self._loop.create_task(function(*args))
        else:
            task = asyncio.run_coroutine_threadsafe(function(*args), self._loop)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- serving -----------------------------------------------------------------------------

    def is_down(self) -> bool:
        return self._loop is not None and self._loop.time() < self._down_until

    def serve_pdu(self, pdu: bytes) -> tuple[bytes | None, FaultDecision]:
        """Serve one RTU request PDU: the reply PDU (None while rebooting) and its faults."""
        if self.is_down():
            return None, FaultDecision()
        decision = self.faults.decide()
        if decision.exception_code is not None:
            return _exception_pdu(pdu[0], decision.exception_code), decision
        return serve_pdu(self.model, pdu), decision

    async def _tcp_action(self, function_code: int, start_address: int, address: int, count: int,
                          registers: list[int], written: list[int] | list[bool] | None) -> ExcCodes | None:
        # pymodbus builds a FC06 echo by reading the register back: that read is no request.
        if not (function_code == WRITE_SINGLE_REGISTER and written is None):
            decision = self.faults.decide()
            if decision.delay_s > 0:
                await asyncio.sleep(decision.delay_s)
            if decision.drop:
                self._pending_drop += 1
            elif decision.corrupt:
                self._pending_corrupt += 1
            if decision.exception_code is not None:
                code = decision.exception_code
                return ExcCodes(code) if code in set(ExcCodes) else ExcCodes.DEVICE_FAILURE
        written_registers = None if written is None else [int(value) for value in written]
        result = self.model.handle(function_code, address, count, written_registers)
        if isinstance(result, ExcCodes):
            return result
        if written is None:
            offset = address - start_address
            registers[offset:offset + len(result)] = result
        return None

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            return data
        if self._pending_drop > 0:
            self._pending_drop -= 1
            return b""
        if self._pending_corrupt > 0:
            self._pending_corrupt -= 1
            # A protocol id other than 0 makes every Modbus TCP client reject the frame.
            return data[:2] + b"\xde\xad" + data[4:]
        return data

    async def _start_tcp_server(self, host: str, port: int) -> None:
        if self.kind == "cpa":
            # The panel appears to ignore the unit id on TCP: id 0 in pymodbus serves every id.
            devices = [SimDevice(0, simdata=full_range_blocks(), action=self._tcp_action)]
        else:
            devices = [
                SimDevice(self.unit_id, simdata=full_range_blocks(), action=self._tcp_action),
                SimDevice(0, simdata=full_range_blocks(), action=reject_other_unit),
            ]
        server = ModbusTcpServer(devices, address=(host, port), trace_packet=self._trace_packet)
        try:
            await asyncio.wait_for(server.serve_forever(background=True), SERVER_CALL_TIMEOUT_S)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {host}:{port} for the {self.name} simulator "
                          "(port in use or address not local); choose another port or 0") from exc
        self._server = server
        self.host = host
        self.port = bound_port(server)

    async def restart(self, downtime_s: float = 1.0) -> None:
        """Restart the device, which serves again on the same port after `downtime_s`.

        A TCP server stops listening and drops every connection. A unit on an RTU bus stops
        replying.
        """
        check_range(self.name, "downtime_s", downtime_s, 0.0, 3600.0)
        self.restarts += 1
        loop = asyncio.get_running_loop()
        if self.transport != "tcp":
            self._down_until = loop.time() + downtime_s
            logger.info("%s simulator: restarting, silent for %.2f s", self.name, downtime_s)
            return
        assert self.host is not None
        port = int(self.port)
        await self._stop_tcp_server()
        logger.info("%s simulator: server stopped for a restart of %.2f s", self.name, downtime_s)
        await asyncio.sleep(downtime_s)
        await self._start_tcp_server(self.host, port)
        logger.info("%s simulator: listening again on %s:%d", self.name, self.host, port)

    async def _stop_tcp_server(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.wait_for(server.shutdown(), SERVER_CALL_TIMEOUT_S)

    async def stop(self) -> None:
        """Stop the updates and the server (for a device alone on an RTU bus, the bus too)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for task in list(self._background):
            task.cancel()
        await self._stop_tcp_server()
        if self.bus is not None and self.bus.owner is self:
            await self.bus.stop()
        logger.info("%s simulator stopped", self.name)


class RunningBus:
    """Several simulated devices on one RTU bus: a pty (like a USB RS-485 adapter) or a TCP gateway.

    `devices` maps each device's name to its RunningDevice, `units` its unit id. For a pty
    bus, `path` is the current slave path and `link` the stable symlink, if any. `port` is
    the link, or the path when there is no link. For a gateway, `host` and `port` are where
    it listens.
    `received` and `sent` keep the last request and reply frames seen on the line.
    """

    def __init__(self, transport: str, devices: dict[str, RunningDevice], baudrate: int, link: str | None) -> None:
        self.transport = transport
        self.devices = devices
        self.units = {device.unit_id: device for device in devices.values()}
        self.baudrate = baudrate
        self.link = link
        self.path: str | None = None
        self.host: str | None = None
        self.port: int | str = 0
        self.owner: RunningDevice | None = None
        self.port_losses = 0
        self._pty: PtyPort | None = None
        self._responder: RtuResponder | None = None
        self._gateway: RtuGatewayServer | None = None

    def _live_units(self) -> dict[int, Any]:
        return self.units

    @property
    def received(self) -> list[bytes]:
        if self._responder is not None:
            return list(self._responder.received)
        if self._gateway is not None:
            return [frame for responder in self._gateway.responders for frame in responder.received]
        return []

    @property
    def sent(self) -> list[bytes]:
        if self._responder is not None:
            return list(self._responder.sent)
        if self._gateway is not None:
            return [frame for responder in self._gateway.responders for frame in responder.sent]
        return []

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        if self.transport == "rtu":
            self._responder = RtuResponder(self._live_units, self._write_pty, loop, self.baudrate)
            self._pty = PtyPort(loop, self._responder.feed, self.link)
            self.path = self._pty.open()
            self.port = self.link or self.path
        else:
            self._gateway = RtuGatewayServer(self._live_units, host, port, self.baudrate)
            try:
                await self._gateway.start(SERVER_CALL_TIMEOUT_S)
            except OSError as exc:
                raise OSError(f"cannot listen on {host}:{port} for the RTU gateway simulator: {exc}; "
                              "choose another port or 0") from exc
            self.host = host
            self.port = self._gateway.port
        for device in self.devices.values():
            device.transport = self.transport
            device.host = self.host
            device.port = self.port

    def _write_pty(self, data: bytes) -> None:
        if self._pty is not None:
            self._pty.write(data)

    async def remove_port(self) -> None:
        """Take the serial port away, as when a USB adapter is unplugged (pty bus only)."""
        if self._pty is None:
            raise RuntimeError("only a pty bus has a port to remove; restart() a gateway instead")
        if self._responder is not None:
            self._responder.cancel()
        self._pty.close()
        self.port_losses += 1
        logger.info("RTU bus: port %s removed", self.path)

    async def restore_port(self) -> None:
        """Bring up a new pty (usually another /dev/pts number) and point the link at it."""
        if self._pty is None:
            raise RuntimeError("only a pty bus has a port to restore")
        self.path = self._pty.open()
        logger.info("RTU bus: port restored as %s%s", self.path, f" (link {self.link})" if self.link else "")
        if not self.link:
            self.port = self.path
            for device in self.devices.values():
                device.port = self.path

    async def port_loss(self, duration_s: float) -> None:
        """Remove the port, wait `duration_s` seconds, and restore it."""
        await self.remove_port()
        await asyncio.sleep(duration_s)
        await self.restore_port()

    async def restart(self, downtime_s: float = 1.0) -> None:
        """Restart the gateway (listener and connections), or silence every unit of a pty bus."""
        if self._gateway is None:
            for device in self.devices.values():
                await device.restart(downtime_s)
            return
        await self._gateway.stop(SERVER_CALL_TIMEOUT_S)
        await asyncio.sleep(downtime_s)
        await self._gateway.start(SERVER_CALL_TIMEOUT_S)

    async def stop(self) -> None:
        """Stop the devices' updates and close the port or the gateway."""
        for device in self.devices.values():
            if device is not self.owner:
                await device.stop()
        if self._responder is not None:
            self._responder.cancel()
        if self._pty is not None:
            self._pty.close()
        if self._gateway is not None:
            await self._gateway.stop(SERVER_CALL_TIMEOUT_S)
        logger.info("RTU bus %s stopped", self.port)


def _check_common(name: str, transport: str, speed: float, update_interval_s: float, port: int) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} for {name}: use one of {', '.join(TRANSPORTS)}")
    check_range(name, "speed", speed, 0.0, 1e6)
    check_range(name, "update_interval_s", update_interval_s, 0.001, 3600.0)
    check_integer(name, "port", port, 0, 65535)


def _rtu_model_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    options.setdefault("unit_id", RTU_UNIT_IDS.get(kind, 1))
    return options


async def start_modbus_device(
    kind: str,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int = 0,
    speed: float = 1.0,
    update_interval_s: float = 0.25,
    transport: str = "tcp",
    link: str | None = None,
    name: str | None = None,
    baudrate: int = 9600,
    **options: Any,
) -> RunningDevice:
    """Start one simulated device and return it running.

    `kind` is one of KINDS. With transport "tcp" the device gets its own Modbus TCP server on
    `host`:`port` (0 binds an ephemeral port, which `.port` reports). With "rtu" it is alone
    on a new pty bus (`.port` is the path to open, `link` a symlink to keep stable), with
    "rtu-over-tcp" alone behind a simulated gateway on `host`:`port`. `seed` makes the noise
    reproducible. Simulated time runs `speed` times faster than real time, advanced every
    `update_interval_s` real seconds. `options` go to the device model (unit_id and the
    model's own, see its class). Raises ValueError for an invalid argument and OSError if the
    port cannot be bound.
    """
    name = name or kind
    _check_common(name, transport, speed, update_interval_s, port)
    if transport != "tcp":
        bus = await start_modbus_rtu_bus([{"kind": kind, "name": name, **options}], transport=transport,
                                         host=host, port=port, seed=seed, speed=speed,
                                         update_interval_s=update_interval_s, link=link, baudrate=baudrate)
        device = bus.devices[name]
        bus.owner = device
        return device

    model = make_model(kind, seed, options)
    device = RunningDevice(model, name, speed, update_interval_s, seed)
    await device._start_tcp_server(host, port)
    device.start_updates()
    logger.info("%s simulator listening on %s:%d (unit id %d, seed %d, speed %g)",
                name, host, device.port, model.unit_id, seed, speed)
    return device


async def start_modbus_rtu_bus(
    devices: list[dict[str, Any]],
    transport: str = "rtu",
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int = 0,
    speed: float = 1.0,
    update_interval_s: float = 0.25,
    link: str | None = None,
    baudrate: int = 9600,
) -> RunningBus:
    """Start several simulated devices on one RTU bus and return the bus running.

    Each entry of `devices` is a dict with `kind`, optional `name` (default: the kind) and
    the model's options, `unit_id` among them (default: RTU_UNIT_IDS of the kind). Unit ids
    and names must be unique. transport "rtu" carries the bus on a new pty (`link` makes a
    stable symlink to it), "rtu-over-tcp" on a simulated gateway at `host`:`port`. Device i
    gets the seed `seed + i`. Raises ValueError for an invalid argument.
    """
    _check_common("RTU bus", transport, speed, update_interval_s, port)
    if transport == "tcp":
        raise ValueError("an RTU bus needs transport 'rtu' (pty) or 'rtu-over-tcp' (gateway), not 'tcp'")
    if not devices:
        raise ValueError("an RTU bus needs at least one device, e.g. [{'kind': 'sdm630'}]")
    running: dict[str, RunningDevice] = {}
    unit_ids: dict[int, str] = {}
    for index, spec in enumerate(devices):
        options = dict(spec)
        kind = options.pop("kind", None)
        name = options.pop("name", None) or kind
        if not isinstance(kind, str):
            raise ValueError(f"RTU bus device {index} has no 'kind': use one of {', '.join(KINDS)}")
        model = make_model(kind, seed + index, _rtu_model_options(kind, options))
        if name in running:
            raise ValueError(f"two devices on the RTU bus are named {name!r}; give each a unique 'name'")
        if model.unit_id in unit_ids:
            raise ValueError(f"{name} and {unit_ids[model.unit_id]} both use unit id {model.unit_id} "
                             "on one RTU bus; give each a unique 'unit_id'")
        unit_ids[model.unit_id] = name
        running[name] = RunningDevice(model, name, speed, update_interval_s, seed + index)
    bus = RunningBus(transport, running, baudrate, link)
    await bus.start(host, port)
    for device in running.values():
        device.bus = bus
        device.start_updates()
    logger.info("RTU bus on %s: %s", bus.port,
                ", ".join(f"{name} (unit {device.unit_id})" for name, device in running.items()))
    return bus


__all__ = [
    "KINDS", "MODEL_CLASSES", "RTU_UNIT_IDS", "TRANSPORTS",
    "CryomechCpa", "GenericChiller", "GenericRoom", "Qm30vt2", "RunningBus", "RunningDevice", "Sdm630",
    "make_model", "serve_pdu", "start_modbus_device", "start_modbus_rtu_bus",
]
