"""Summary schema: validation and the msgpack codec.

A summary is a msgpack map with string keys. `validate_summary` checks every field,
`encode_summary` and `decode_summary` convert between dicts and bytes, and
`encode_batch` and `decode_batch` handle the msgpack array that one push or pull
response carries. The decoder reads the versions in SUPPORTED_VERSIONS and rejects any
other `v` with an error that names it. The field reference is in docs/uplink.md.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
KINDS = ("vibration", "points", "alarm")

# Quality keys with a fixed meaning and type (see docs/uplink.md, "Clock quality flags").
# clock_synced: False when t_start and t_end come from a wall clock that was not synchronised.
CLOCK_SYNCED = "clock_synced"
# clock_correction_s: seconds added to t_start and t_end after the clock was synchronised;
# present only on summaries made before synchronisation, 0.0 until they are corrected.
CLOCK_CORRECTION = "clock_correction_s"

# Integer range that msgpack can encode and SQLite can store as a key.
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1

_TOP_FIELDS = (
    "v",
    "gateway",
    "source",
    "seq",
    "kind",
    "t_start",
    "t_end",
    "duration_s",
    "features",
    "quality",
    "alarms",
)
_ALARM_FIELDS = ("name", "grade", "value", "limit", "message")


class SchemaError(ValueError):
    """A summary, or the bytes that should hold one, does not match a supported schema version.

    `field` is the dotted path of the bad field ("features.rms.mean", "alarms[0].value"),
    or "" when the whole object is wrong. `index` is the item's position in a batch, or None.
    """

    def __init__(self, field: str, value: Any, problem: str, index: int | None = None) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        self.index = index
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"summary {self.index}: " if self.index is not None else ""
        subject = f"field '{self.field}'" if self.field else "summary"
        value_text = repr(self.value)
        if len(value_text) > 80:
            value_text = value_text[:77] + "..."
        return f"{where}invalid {subject}: {value_text}; {self.problem}"

    def at_index(self, index: int) -> SchemaError:
        """Return a copy of this error that names the item's position in a batch."""
        return SchemaError(self.field, self.value, self.problem, index)


def validate_summary(obj: Any) -> dict[str, Any]:
    """Check a summary against the schema version in its `v` field and return a normalised copy.

    Integers given for float fields become floats, so the encoded form always carries
    float64 there. Unknown keys are rejected at the top level and in alarms, because a
    misspelt field would otherwise be dropped silently.

    Raises:
        SchemaError: names the first bad field, its value and the expected form.
    """
    if not isinstance(obj, dict):
        raise SchemaError("", obj, "expected a map with string keys")
    # The version is checked first, so a newer summary gets a version error, not an unknown-field error.
    if "v" not in obj:
        raise SchemaError("v", None, "missing required field")
    version = obj["v"]
    if not _is_int(version):
        raise SchemaError("v", version, "expected an integer schema version")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise SchemaError(
            "v",
            version,
            f"unsupported schema version; this decoder reads version {supported}, "
            "so upgrade the imaging-edge-agent package on the receiving side",
        )
    return _validate_v1(obj)


def _validate_v1(obj: dict[str, Any]) -> dict[str, Any]:
    for key in obj:
        if key not in _TOP_FIELDS:
            raise SchemaError(str(key), obj[key], "unknown field; schema v1 has " + ", ".join(_TOP_FIELDS))
    for name in _TOP_FIELDS:
        if name not in obj:
            raise SchemaError(name, None, "missing required field")

    version = obj["v"]
    seq = obj["seq"]
    if not _is_int(seq) or not 1 <= seq <= _INT_MAX:
        raise SchemaError("seq", seq, f"expected an integer from 1 to {_INT_MAX}")
    kind = obj["kind"]
    if kind not in KINDS:
        raise SchemaError("kind", kind, "expected one of " + ", ".join(KINDS))

    out: dict[str, Any] = {
        "v": version,
        "gateway": _text(obj["gateway"], "gateway", allow_empty=False),
        "source": _text(obj["source"], "source", allow_empty=False),
        "seq": seq,
        "kind": kind,
        "t_start": _real(obj["t_start"], "t_start"),
        "t_end": _real(obj["t_end"], "t_end"),
        "duration_s": _real(obj["duration_s"], "duration_s"),
        "features": _features(obj["features"]),
        "quality": _quality(obj["quality"]),
        "alarms": _alarms(obj["alarms"]),
    }
    if out["duration_s"] < 0:
        raise SchemaError("duration_s", obj["duration_s"], "expected a window length >= 0 seconds")
    return out


def encode_summary(summary: dict[str, Any]) -> bytes:
    """Validate a summary and encode it as msgpack, with floats as float64.

    Raises:
        SchemaError: the summary does not match its schema version.
    """
    checked = validate_summary(summary)
    return msgpack.packb(checked, use_bin_type=True, use_single_float=False)


def decode_summary(data: bytes) -> dict[str, Any]:
    """Decode one msgpack summary and validate it.

    Raises:
        SchemaError: the bytes are not one msgpack map, or the map does not match a
            supported schema version.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError("", data, "expected bytes holding one msgpack map")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SchemaError("", _preview(data), f"not valid msgpack ({exc})") from exc
    return validate_summary(obj)


def encode_batch(bodies: list[bytes]) -> bytes:
    """Join encoded summaries into one msgpack array without decoding them again."""
    count = len(bodies)
    if count < 16:
        header = bytes([0x90 | count])
    elif count < 2**16:
        header = b"\xdc" + struct.pack(">H", count)
    else:
        header = b"\xdd" + struct.pack(">I", count)
    return header + b"".join(bodies)


def decode_batch(data: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """Split a msgpack array of summaries into validated dicts and their exact encoded bytes.

    Raises:
        SchemaError: the bytes are not one msgpack array, or an item is invalid. For an
            invalid item, `index` is its position in the array.
    """
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        count = unpacker.read_array_header()
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData) as exc:
        raise SchemaError("", _preview(data), "expected a msgpack array of summaries") from exc

    items: list[tuple[dict[str, Any], bytes]] = []
    for index in range(count):
        start = unpacker.tell()
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData as exc:
            raise SchemaError("", count, f"array is truncated after {index} of {count} items", index) from exc
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise SchemaError("", _preview(data[start:]), f"not valid msgpack ({exc})", index) from exc
        try:
            summary = validate_summary(obj)
        except SchemaError as exc:
            raise exc.at_index(index) from None
        items.append((summary, bytes(data[start : unpacker.tell()])))

    if unpacker.tell() != len(data):
        extra = len(data) - unpacker.tell()
        raise SchemaError("", extra, "unexpected bytes after the array; send exactly one array per request")
    return items


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but True is never a valid count or sequence number.
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise SchemaError(field, value, "expected a string")
    if not allow_empty and not value:
        raise SchemaError(field, value, "expected a non-empty string")
    return value


def _real(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SchemaError(field, value, "expected a number")
    result = float(value)
    if not math.isfinite(result):
        raise SchemaError(field, value, "expected a finite number (NaN and infinity are not allowed)")
    return result


def _scalar(value: Any, field: str) -> int | float | str | bool | None:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise SchemaError(field, value, f"expected an integer from {_INT_MIN} to {_INT_MAX}")
        return value
    if isinstance(value, float):
        return _real(value, field)
    raise SchemaError(field, value, "expected an int, float, str, bool or None")


def _key(key: Any, parent: str) -> str:
    if not isinstance(key, str) or not key:
        raise SchemaError(parent, key, "expected non-empty string keys")
    return key


def _features(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError("features", value, "expected a map")
    out: dict[str, Any] = {}
    for key, item in value.items():
        path = f"features.{_key(key, 'features')}"
        if isinstance(item, dict):
            nested: dict[str, Any] = {}
            for inner_key, inner in item.items():
                inner_path = f"{path}.{_key(inner_key, path)}"
                if isinstance(inner, (dict, list, tuple)):
                    raise SchemaError(inner_path, inner, "expected a scalar; features nest one level only")
                nested[inner_key] = _scalar(inner, inner_path)
            out[key] = nested
        else:
            out[key] = _scalar(item, path)
    return out


def _quality(value: Any) -> dict[str, int | float | bool]:
    if not isinstance(value, dict):
        raise SchemaError("quality", value, "expected a map")
    out: dict[str, int | float | bool] = {}
    for key, item in value.items():
        path = f"quality.{_key(key, 'quality')}"
        if item is None or isinstance(item, str):
            raise SchemaError(path, item, "expected an int, float or bool")
        if key == CLOCK_SYNCED and not isinstance(item, bool):
            raise SchemaError(path, item, "expected true or false")
        if key == CLOCK_CORRECTION:
            out[key] = _real(item, path)
            continue
        out[key] = _scalar(item, path)  # type: ignore[assignment]
    return out


def _alarms(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)):
        raise SchemaError("alarms", value, "expected a list of maps")
    out = []
    for index, alarm in enumerate(value):
        path = f"alarms[{index}]"
        if not isinstance(alarm, dict):
            raise SchemaError(path, alarm, "expected a map with " + ", ".join(_ALARM_FIELDS))
        for key in alarm:
            if key not in _ALARM_FIELDS:
                raise SchemaError(f"{path}.{key}", alarm[key], "unknown field; an alarm has " + ", ".join(_ALARM_FIELDS))
        for name in _ALARM_FIELDS:
            if name not in alarm:
                raise SchemaError(f"{path}.{name}", None, "missing required field")
        out.append(
            {
                "name": _text(alarm["name"], f"{path}.name", allow_empty=False),
                "grade": _text(alarm["grade"], f"{path}.grade", allow_empty=False),
                "value": _real(alarm["value"], f"{path}.value"),
                "limit": _real(alarm["limit"], f"{path}.limit"),
                "message": _text(alarm["message"], f"{path}.message"),
            }
        )
    return out


def _preview(data: Any) -> bytes:
    return bytes(data[:32]) if isinstance(data, (bytes, bytearray, memoryview)) else data
