"""Configuration error type and small readers shared by every config section."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, has the wrong type, or is out of range."""

    def __init__(self, file: str, key: str, value: Any, allowed: str) -> None:
        self.file = file
        self.key = key
        self.value = value
        self.allowed = allowed
        shown = "missing" if value is _MISSING else repr(value)
        super().__init__(f"{file}: invalid value for '{key}': {shown}; expected {allowed}")


_MISSING = object()


class Section:
    """Typed reader over one TOML table that records which keys were used.

    Every getter takes the key, a default (or nothing for a required key) and the allowed
    range. `finish()` raises for any key that no getter read, so typos are errors.
    """

    def __init__(self, file: str, prefix: str, table: dict[str, Any]) -> None:
        if not isinstance(table, dict):
            raise ConfigError(file, prefix or "<root>", table, "a table")
        self.file = file
        self.prefix = prefix
        self.table = table
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def has(self, name: str) -> bool:
        return name in self.table

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self._used.add(name)
        if name in self.table:
            return self.table[name]
        if default is _MISSING:
            raise ConfigError(self.file, self.key(name), _MISSING, "a value (this key is required)")
        return default

    def string(self, name: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(self.file, self.key(name), value, "a non-empty string")
        if choices is not None and value not in choices:
            raise ConfigError(self.file, self.key(name), value, "one of " + ", ".join(choices))
        return value

    def integer(self, name: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.file, self.key(name), value, "an integer")
        self._check_range(name, value, lo, hi)
        return value

    def number(self, name: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ConfigError(self.file, self.key(name), value, "a number")
        self._check_range(name, value, lo, hi)
        return float(value)

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.file, self.key(name), value, "true or false")
        return value

    def table_list(self, name: str) -> list["Section"]:
        value = self.raw(name, [])
        if not isinstance(value, list):
            raise ConfigError(self.file, self.key(name), value, "an array of tables ([[...]])")
        return [Section(self.file, f"{self.key(name)}[{i}]", item) for i, item in enumerate(value)]

    def sub(self, name: str) -> "Section":
        return Section(self.file, self.key(name), self.raw(name, {}))

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self._used)
        if unknown:
            raise ConfigError(self.file, self.key(unknown[0]), self.table[unknown[0]],
                              "no such key here (unknown keys are errors; check the spelling)")

    def _check_range(self, name: str, value: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and value < lo or hi is not None and value > hi:
            bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (
                f"at least {lo}" if lo is not None else f"at most {hi}")
            raise ConfigError(self.file, self.key(name), value, f"a value {bounds}")
