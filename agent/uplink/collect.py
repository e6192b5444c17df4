"""Collector side of the pull API, and queries over what the collector stored.

`poll_gateways` pulls from several gateways concurrently: for each, it fetches
`GET /v1/summaries?after=<cursor>&limit=N`, stores the page and advances the cursor in one
transaction, and only then acknowledges with `POST /v1/ack {"upto": <last seq>}`. A crash
between the commit and the acknowledgement leaves the rows on the gateway. The stored
cursor is already past them, so the next round acknowledges them without fetching them
again, and nothing is stored twice.

`export_summaries` writes stored summaries as JSON lines or CSV; `list_sources` and
`collector.format_table` summarise the store per gateway and source.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import httpx
import msgpack

from agent import __version__
from agent.uplink.collector import CollectorStore
from agent.uplink.schema import SchemaError, validate_summary

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/msgpack"
EXPORT_FORMATS = ("jsonl", "csv")
# Columns that every CSV export starts with, before the selected features.
CSV_BASE_COLUMNS = ("gateway", "source", "seq", "kind", "t_start", "t_end", "duration_s", "clock_synced", "alarms")


@dataclass(frozen=True)
class PollTarget:
    """A gateway's pull API: `url` is its base, such as http://10.0.0.5:8701 (paths are appended)."""

    url: str
    token: str | None = None

    def __post_init__(self) -> None:
        try:
            parsed = httpx.URL(self.url)
        except (TypeError, httpx.InvalidURL) as exc:
            raise ValueError(f"invalid gateway URL {self.url!r}: {exc}; expected http://host:port") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"invalid gateway URL {self.url!r}; expected http://host:port or https://host:port")

    def endpoint(self, path: str) -> str:
        return self.url.rstrip("/") + path


class PollError(RuntimeError):
    """One poll round failed; nothing from it was acknowledged."""


class GatewayPoller:
    """Pulls one gateway: fetch a page, store it with the cursor, acknowledge it."""

    def __init__(self, store: CollectorStore, target: PollTarget, client: httpx.AsyncClient, *, limit: int = 500) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"invalid poll limit {limit!r}; expected an integer from 1 to 1000")
        self.store = store
        self.target = target
        self.limit = limit
        self._client = client
        self._acked = 0

    async def poll_once(self) -> int:
        """Fetch, store and acknowledge one page; return the number of items it held.

        Raises:
            PollError: the request failed, the gateway returned an error status, or the
                page could not be parsed; nothing was stored or acknowledged.
        """
        after = await asyncio.to_thread(self.store.cursor, self.target.url)
        if after > self._acked:
            # A previous acknowledgement was lost, or the collector restarted.
            await self._ack(after)
        response = await self._request("GET", "/v1/summaries", params={"after": after, "limit": self.limit})
        items = _split_page(response.content, self.target.url)
        if not items:
            return 0
        try:
            last_seq = int(response.headers.get("X-Last-Seq", ""))
        except ValueError:
            last_seq = max((seq for _, seq, _ in items if seq is not None), default=after)

        summaries, bodies, rejected = [], [], []
        for obj, seq, raw in items:
            try:
                summaries.append(validate_summary(obj))
                bodies.append(raw)
            except SchemaError as exc:
                rejected.append((seq, str(exc), raw))
        stored, duplicates = await asyncio.to_thread(
            self.store.insert_pulled, self.target.url, summaries, bodies, rejected, last_seq
        )
        if rejected:
            log.error(
                "gateway %s served %d invalid summaries (first: %s); kept them in the rejected table",
                self.target.url,
                len(rejected),
                rejected[0][1],
            )
        log.debug("pulled %d from %s: %d stored, %d duplicates", len(items), self.target.url, stored, duplicates)
        await self._ack(last_seq)
        return len(items)

    async def run(self, stop: asyncio.Event, *, interval_s: float, backoff_max_s: float = 300.0) -> None:
        """Poll until `stop` is set: again at once after a full page, after `interval_s` otherwise."""
        failures = 0
        while not stop.is_set():
            try:
                count = await self.poll_once()
            except PollError as exc:
                failures += 1
                delay = min(backoff_max_s, interval_s * 2.0 ** min(failures - 1, 16))
                delay = delay / 2 + random.uniform(0.0, delay / 2)
                if failures == 1 or math.log2(failures).is_integer():
                    log.warning("polling %s failed %d times in a row: %s", self.target.url, failures, exc)
                await _wait(stop, delay)
                continue
            if failures:
                log.info("polling %s recovered after %d failures", self.target.url, failures)
            failures = 0
            if count < self.limit:
                await _wait(stop, interval_s)

    async def _ack(self, upto: int) -> None:
        response = await self._request(
            "POST", "/v1/ack", content=json.dumps({"upto": upto}).encode(), headers={"Content-Type": "application/json"}
        )
        del response
        self._acked = max(self._acked, upto)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if self.target.token is not None:
            headers["Authorization"] = f"Bearer {self.target.token}"
        try:
            response = await self._client.request(method, self.target.endpoint(path), headers=headers, **kwargs)
        except httpx.TimeoutException as exc:
            raise PollError(f"{method} {path} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise PollError(f"{method} {path} failed: {type(exc).__name__}: {exc}") from exc
        if not response.is_success:
            excerpt = " ".join(response.text[:200].split())
            raise PollError(f"{method} {path} returned HTTP {response.status_code}: {excerpt}")
        return response


async def poll_gateways(
    store: CollectorStore,
    targets: Sequence[PollTarget],
    *,
    stop: asyncio.Event,
    interval_s: float = 10.0,
    limit: int = 500,
    timeout_s: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Poll every target concurrently until `stop` is set; one failing gateway does not hold up the others.

    `timeout_s` bounds every phase of each request. `ssl_context` verifies https gateways
    (default: the system CA store).
    """
    if not targets:
        raise ValueError("no gateways to poll; pass at least one PollTarget")
    if not (isinstance(interval_s, (int, float)) and math.isfinite(interval_s) and interval_s > 0):
        raise ValueError(f"invalid poll interval {interval_s!r}; expected seconds > 0")
    urls = [target.url for target in targets]
    if len(set(urls)) != len(urls):
        raise ValueError(f"gateway URLs repeat in {urls!r}; list each gateway once")
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        trust_env=False,
        verify=ssl_context if ssl_context is not None else True,
        headers={"User-Agent": f"imaging-edge-agent-collector/{__version__}"},
    ) as client:
        pollers = [GatewayPoller(store, target, client, limit=limit) for target in targets]
        log.info("polling %d gateways every %g s: %s", len(pollers), interval_s, ", ".join(urls))
        await asyncio.gather(*(poller.run(stop, interval_s=interval_s) for poller in pollers))
    log.info("polling stopped")


def _split_page(data: bytes, url: str) -> list[tuple[Any, int | None, bytes]]:
    """Split a msgpack array into (object, seq or None, exact bytes) without validating the objects."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        count = unpacker.read_array_header()
        items = []
        for _ in range(count):
            start = unpacker.tell()
            obj = unpacker.unpack()
            seq = obj.get("seq") if isinstance(obj, dict) else None
            items.append((obj, seq if isinstance(seq, int) and not isinstance(seq, bool) else None, data[start : unpacker.tell()]))
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData) as exc:
        raise PollError(f"gateway {url} sent a page that is not a msgpack array of maps: {exc}") from exc
    return items


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


# -- queries -------------------------------------------------------------------------


def list_sources(store: CollectorStore) -> list[dict[str, Any]]:
    """Return one row per (gateway, source) with count, time range and bytes; render with format_table."""
    return store.table()


def export_summaries(
    store: CollectorStore,
    out: TextIO,
    *,
    fmt: str = "jsonl",
    gateway: str | None = None,
    source: str | None = None,
    since: float | None = None,
    until: float | None = None,
    features: Sequence[str] | None = None,
) -> int:
    """Write stored summaries to `out` as JSON lines or CSV; return how many were written.

    `features` selects features by name, with a dot for a nested value
    ("helium_pressure.mean"). JSON lines carry whole summaries, with only the selected
    features if `features` is given. CSV has the CSV_BASE_COLUMNS and then one column per
    feature: the selected ones, else every scalar feature name in the selection (this reads
    the selection twice). A missing value is an empty cell. `since`/`until` select by t_end.

    Raises:
        ValueError: `fmt` is not "jsonl" or "csv", or a feature name is empty.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"invalid export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    selected = list(features) if features is not None else None
    if selected is not None and not all(isinstance(name, str) and name.strip(".") for name in selected):
        raise ValueError(f"invalid feature names {selected!r}; expected names such as 'accel_rms' or 'helium_pressure.mean'")
    query = {"gateway": gateway, "source": source, "since": since, "until": until}

    written = 0
    if fmt == "jsonl":
        for summary in store.iter_summaries(**query):
            if selected is not None:
                summary = dict(summary, features={name: _feature(summary, name) for name in selected})
            out.write(json.dumps(summary, sort_keys=True, allow_nan=False) + "\n")
            written += 1
        return written

    columns = selected if selected is not None else _scalar_feature_names(store.iter_summaries(**query))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_BASE_COLUMNS, *columns])
    for summary in store.iter_summaries(**query):
        clock_synced = summary["quality"].get("clock_synced")
        base = [
            summary["gateway"], summary["source"], summary["seq"], summary["kind"], repr(summary["t_start"]),
            repr(summary["t_end"]), repr(summary["duration_s"]), "" if clock_synced is None else str(clock_synced).lower(),
            len(summary["alarms"]),
        ]  # fmt: skip
        writer.writerow([*base, *(_cell(_feature(summary, name)) for name in columns)])
        written += 1
    return written


def _feature(summary: dict[str, Any], name: str) -> Any:
    value: Any = summary["features"]
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _scalar_feature_names(summaries: Any) -> list[str]:
    names: dict[str, None] = {}
    for summary in summaries:
        for key, value in summary["features"].items():
            if isinstance(value, dict):
                for inner in value:
                    names[f"{key}.{inner}"] = None
            else:
                names[key] = None
    return sorted(names)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)
