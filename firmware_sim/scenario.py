"""Scriptable scenarios: timed changes to simulated devices, reproducible from a seed.

A scenario is a TOML file with a name, a seed and a list of steps::

    name = "helium_leak"
    description = "Helium charge leaks out over two days until the compressor trips."
    seed = 7
    duration_s = 172800          # simulated seconds; speed compresses them

    [[step]]
    at_s = 3600                  # simulated time of the step
    device = "cpa"               # device name as started by edge-sim
    action = "ramp"              # ramp, set, event or fault
    quantity = "helium_charge_psi"
    rate_per_h = -4.0

Actions every device understands:

- `ramp`: from `at_s` on, add `rate_per_h` per simulated hour to `quantity`
  (optionally until `until_s`);
- `set`: add the offset `value` to `quantity` at `at_s` (a step change);
- `event`: a named device event (`name`), for example a compressor trip;
- `fault`: a transport fault (`kind`, and `duration_s`, `probability` where they
  apply), for example dropped replies or a server restart.

Each device model defines its quantities, events and faults. A device raises ValueError
for one it does not have, naming the ones it has.
"""

from __future__ import annotations

import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ACTIONS = ("ramp", "set", "event", "fault")
BUILTIN_DIR = Path(__file__).with_name("scenarios")


class ScenarioTarget(Protocol):
    """Interface a simulated device implements to take part in scenarios."""

    def apply_step(self, step: "Step") -> None: ...


@dataclass(frozen=True)
class Step:
    at_s: float
    device: str
    action: str
    params: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str, kind: type | tuple[type, ...] = (int, float), default: Any = ...) -> Any:
        """Return a parameter of the step, checking its type; raise ValueError if missing or wrong."""
        if name not in self.params:
            if default is ...:
                raise ValueError(f"scenario step at {self.at_s} s for {self.device!r} ({self.action}) "
                                 f"is missing '{name}'")
            return default
        value = self.params[name]
        if isinstance(value, bool) and kind != bool or not isinstance(value, kind):
            raise ValueError(f"scenario step at {self.at_s} s: '{name}' = {value!r} has the wrong type")
        return value


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    duration_s: float
    steps: tuple[Step, ...]


def load_scenario(name_or_path: str) -> Scenario:
    """Load a scenario by built-in name (see `list_scenarios`) or from a TOML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = BUILTIN_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"scenario {name_or_path!r} not found; use a file path or one of: "
                         f"{', '.join(list_scenarios()) or 'none'}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"scenario file {path} is not valid TOML: {exc}") from exc
    return parse_scenario(data, str(path))


def list_scenarios() -> list[str]:
    """Return the names of the built-in scenarios."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def parse_scenario(data: dict[str, Any], source: str = "<scenario>") -> Scenario:
    """Validate a parsed scenario document."""
    known = {"name", "description", "seed", "duration_s", "step"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key '{unknown[0]}'; allowed: {', '.join(sorted(known))}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: 'name' must be a non-empty string")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{source}: 'seed' = {seed!r} must be an integer")
    duration = data.get("duration_s", 0.0)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration < 0:
        raise ValueError(f"{source}: 'duration_s' = {duration!r} must be a number >= 0")
    steps = []
    for i, raw in enumerate(data.get("step", [])):
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: step[{i}] must be a table ([[step]])")
        params = dict(raw)
        at_s = params.pop("at_s", None)
        device = params.pop("device", None)
        action = params.pop("action", None)
        if isinstance(at_s, bool) or not isinstance(at_s, (int, float)) or at_s < 0:
            raise ValueError(f"{source}: step[{i}].at_s = {at_s!r} must be a number of seconds >= 0")
        if not isinstance(device, str) or not device:
            raise ValueError(f"{source}: step[{i}].device = {device!r} must name a device")
        if action not in ACTIONS:
            raise ValueError(f"{source}: step[{i}].action = {action!r}; use one of {', '.join(ACTIONS)}")
        steps.append(Step(float(at_s), device, action, params))
    steps.sort(key=lambda s: s.at_s)
    return Scenario(name, str(data.get("description", "")), seed, float(duration), tuple(steps))


class ScenarioRunner:
    """Fire a scenario's steps on simulated time: `speed` simulated seconds per real second.

    Runs in its own thread so that it drives devices on threads (the pty sensor) and on
    an event loop alike; each device's `apply_step` must be safe to call from that thread.
    """

    def __init__(self, scenario: Scenario, devices: dict[str, ScenarioTarget], speed: float = 1.0) -> None:
        missing = sorted({s.device for s in scenario.steps} - set(devices))
        if missing:
            raise ValueError(f"scenario {scenario.name!r} drives {', '.join(missing)}, which "
                             f"{'is' if len(missing) == 1 else 'are'} not started; start "
                             f"{' and '.join('--' + m for m in missing)} or edit the scenario")
        if not speed > 0:
            raise ValueError(f"speed {speed!r} is invalid; use a positive factor")
        self.scenario = scenario
        self.devices = devices
        self.speed = speed
        self.fired: list[Step] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def simulated_time(self) -> float:
        return (time.monotonic() - self._started) * self.speed

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"scenario {self.scenario.name}", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait until every step has fired; return True if they all have."""
        if self._thread is None:
            return False
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        for step in self.scenario.steps:
            delay = (step.at_s - self.simulated_time()) / self.speed
            if delay > 0 and self._stop.wait(delay):
                return
            try:
                self.devices[step.device].apply_step(step)
            except ValueError as exc:
                self.errors.append(str(exc))
            self.fired.append(step)


class Offsets:
    """Ramps and step changes that scenario steps add to a device's quantities.

    A device keeps one `Offsets`, passes `ramp` and `set` steps to `apply`, and adds
    `at(quantity, t_s)` to its physical value, with `t_s` its own simulated time in
    seconds (the same time base as the steps' `at_s`).
    """

    def __init__(self, quantities: tuple[str, ...]) -> None:
        self.quantities = quantities
        self._lock = threading.Lock()
        self._ramps: dict[str, list[tuple[float, float | None, float]]] = {}
        self._steps: dict[str, list[tuple[float, float]]] = {}

    def apply(self, step: Step) -> None:
        quantity = step.param("quantity", str)
        if quantity not in self.quantities:
            raise ValueError(f"{step.device} has no quantity {quantity!r}; it has {', '.join(self.quantities)}")
        with self._lock:
            if step.action == "ramp":
                until = step.param("until_s", (int, float), None)
                self._ramps.setdefault(quantity, []).append(
                    (step.at_s, None if until is None else float(until), float(step.param("rate_per_h")) / 3600.0))
            elif step.action == "set":
                self._steps.setdefault(quantity, []).append((step.at_s, float(step.param("value"))))
            else:
                raise ValueError(f"Offsets take ramp and set steps, not {step.action!r}")

    def at(self, quantity: str, t_s: float) -> float:
        """Return the total offset of `quantity` at simulated time `t_s`."""
        total = 0.0
        with self._lock:
            for start, until, rate in self._ramps.get(quantity, ()):
                if t_s > start:
                    total += rate * ((min(t_s, until) if until is not None else t_s) - start)
            for start, value in self._steps.get(quantity, ()):
                if t_s >= start:
                    total += value
        return total
