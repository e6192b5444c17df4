"""Input checks, the learning period and state helpers shared by the streaming trend detectors."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STATE_VERSION = 1


def check_number(name: str, value: Any, fix: str = "pass a finite number") -> float:
    """Return `value` as a finite float, or raise ValueError naming it and the `fix`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} is a {type(value).__name__}, not a number; {fix}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name}={value!r} is not finite; {fix}")
    return result


def check_value(x: Any) -> float:
    """Return the reading `x` as a finite float, or raise ValueError."""
    return check_number("x", x, "drop missing or invalid readings before they reach the detector")


def check_time(t: Any, last_t: float | None) -> float:
    """Return `t` as a float after checking that it is finite and later than `last_t`."""
    result = check_number("t", t, "pass the reading's time in seconds as a finite number")
    if last_t is not None and result <= last_t:
        raise ValueError(
            f"t={result!r} is not after the previous time {last_t!r}; times must strictly increase, "
            "so drop duplicate timestamps and sort the values by time"
        )
    return result


def check_positive(name: str, value: Any) -> float:
    result = check_number(name, value)
    if result <= 0.0:
        raise ValueError(f"{name}={value!r} is invalid; pass a number greater than 0")
    return result


def check_non_negative(name: str, value: Any) -> float:
    result = check_number(name, value)
    if result < 0.0:
        raise ValueError(f"{name}={value!r} is invalid; pass a number of 0 or more")
    return result


def check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} is a {type(value).__name__}; pass an integer of at least {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} is too small; pass an integer of at least {minimum}")
    return int(value)


def check_optional_positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    return check_positive(name, value)


class LearningPeriod:
    """Learning period: the first `samples` values and the first `duration` seconds.

    It starts at the first value after construction or a restart. A value belongs to the
    period while fewer than `samples` values came before it, or while it is less than
    `duration` seconds after the first one. A detector raises nothing for those values.
    """

    def __init__(self, duration: float, samples: int) -> None:
        self.duration = check_non_negative("learning_time", duration)
        self.samples = check_count("learning_samples", samples, 1)
        self.start: float | None = None
        self.count = 0

    def restart(self) -> None:
        self.start = None
        self.count = 0

    def observe(self, t: float) -> bool:
        """Count the value at time `t` and return True when it belongs to the period."""
        if self.start is None:
            self.start = t
        learning = self.count < self.samples or t - self.start < self.duration
        self.count += 1
        return learning

    def state(self) -> dict[str, Any]:
        return {"start": self.start, "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        self.start = state_optional_number(state, "start")
        self.count = int(state["count"])


def check_state(state: Any, kind: str) -> dict[str, Any]:
    """Return `state` after checking that it is a state dict of detector `kind` in this version."""
    if not isinstance(state, dict):
        raise ValueError(f"state is a {type(state).__name__}; pass the dict that {kind}.state() returned")
    if state.get("kind") != kind:
        raise ValueError(f"state kind {state.get('kind')!r} is invalid; pass the state of a {kind}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"state version {state.get('version')!r} is not supported; this code reads version {STATE_VERSION}"
        )
    return state


def state_number(state: dict[str, Any], key: str) -> float:
    """Return the finite number stored under `key` of a state dict, or raise ValueError."""
    return check_number(f"state field {key}", state[key], "pass the dict that state() returned")


def state_optional_number(state: dict[str, Any], key: str) -> float | None:
    return None if state[key] is None else state_number(state, key)


@contextmanager
def reading_state(kind: str) -> Iterator[None]:
    """Turn the KeyError or TypeError of a state dict with missing or unknown fields into ValueError."""
    try:
        yield
    except KeyError as error:
        raise ValueError(f"{kind} state has no field {error}; pass the dict that {kind}.state() returned") from None
    except TypeError as error:
        raise ValueError(f"{kind} state is invalid ({error}); pass the dict that {kind}.state() returned") from None
