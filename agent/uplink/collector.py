"""Reference central collector: stores summaries once per (gateway, seq).

`create_app` builds the aiohttp application with `POST /v1/summaries` (push) and
`GET /v1/health`; `serve` runs it and, optionally, pollers that pull from gateways
(agent.uplink.collect). `format_table` renders what the store holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent.uplink.auth import bearer_matches
from agent.uplink.schema import SchemaError, decode_batch, decode_summary

if TYPE_CHECKING:
    from agent.uplink.collect import PollTarget

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/msgpack"
MAX_BODY_BYTES = 16 * 2**20
# Time allowed to receive a whole request body, so a stalled client cannot hold a handler.
READ_TIMEOUT_S = 60.0
BUSY_TIMEOUT_S = 5.0

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS summaries (
    gateway TEXT NOT NULL,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    t_start REAL NOT NULL,
    t_end REAL NOT NULL,
    received REAL NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (gateway, seq)
);
CREATE INDEX IF NOT EXISTS summaries_by_source ON summaries (source, t_end);
-- Pull cursor per polled URL: every seq <= after has been stored (or evicted on the gateway).
CREATE TABLE IF NOT EXISTS cursors (
    url TEXT PRIMARY KEY,
    after INTEGER NOT NULL,
    updated REAL NOT NULL
);
-- Items a gateway served that fail validation, kept as received so nothing is dropped silently.
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,
    seq INTEGER,
    error TEXT NOT NULL,
    received REAL NOT NULL,
    body BLOB NOT NULL
);
"""


class CollectorStore:
    """SQLite file (WAL mode, synchronous=FULL) of received summaries, keyed by (gateway, seq).

    A lock serialises calls, so the HTTP handler can run inserts in a worker thread while
    other code reads from the event loop thread.
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise sqlite3.OperationalError(
                f"cannot open collector database {self.path!r}: {exc}; check that the directory exists and is writable"
            ) from exc
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            journal = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(journal).lower() != "wal":
                raise sqlite3.OperationalError(
                    f"collector database {self.path!r}: SQLite could not switch to WAL mode (journal_mode is {journal!r}); "
                    "put the database on a local file system"
                )
            # FULL, because after a 200 response the gateway deletes its copy, so the rows must be on disk first.
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(_SCHEMA_SQL)
        except BaseException:
            self._db.close()
            raise

    def insert_batch(self, summaries: list[dict[str, Any]], bodies: list[bytes]) -> tuple[int, int]:
        """Store validated summaries with their encoded bodies in one transaction.

        Returns (stored, duplicates): a summary whose (gateway, seq) is already stored,
        or repeats within the batch, counts as a duplicate and keeps the first copy.
        """
        received = time.time()
        rows = _summary_rows(summaries, bodies, received)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                stored = self._insert_rows(rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored, len(rows) - stored

    def _insert_rows(self, rows: list[tuple]) -> int:
        """Insert summary rows inside the caller's transaction; return how many were new."""
        before = self._db.total_changes
        self._db.executemany(
            "INSERT OR IGNORE INTO summaries"
            " (gateway, seq, source, kind, t_start, t_end, received, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return self._db.total_changes - before

    def insert_pulled(
        self,
        url: str,
        summaries: list[dict[str, Any]],
        bodies: list[bytes],
        rejected: list[tuple[int | None, str, bytes]],
        last_seq: int,
    ) -> tuple[int, int]:
        """Store one pulled page and advance the cursor of `url` to `last_seq`, in one transaction.

        `rejected` contains (seq or None, error, raw bytes) of items that failed validation.
        Returns (stored, duplicates) as `insert_batch` does.
        """
        received = time.time()
        rows = _summary_rows(summaries, bodies, received)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                stored = self._insert_rows(rows)
                self._db.executemany(
                    "INSERT INTO rejected (origin, seq, error, received, body) VALUES (?, ?, ?, ?, ?)",
                    [(url, seq, error, received, bytes(raw)) for seq, error, raw in rejected],
                )
                self._db.execute(
                    "INSERT INTO cursors (url, after, updated) VALUES (?, ?, ?)"
                    " ON CONFLICT (url) DO UPDATE SET after = MAX(after, excluded.after), updated = excluded.updated",
                    (url, last_seq, received),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored, len(rows) - stored

    def cursor(self, url: str) -> int:
        """Return the highest seq stored from a polled URL, or 0 if it was never polled."""
        with self._lock:
            row = self._db.execute("SELECT after FROM cursors WHERE url = ?", (url,)).fetchone()
        return 0 if row is None else int(row[0])

    def rejected(self) -> list[dict[str, Any]]:
        """Return the pulled items that failed validation: origin, seq, error, received time and raw bytes."""
        with self._lock:
            rows = self._db.execute("SELECT origin, seq, error, received, body FROM rejected ORDER BY id").fetchall()
        return [
            {"origin": origin, "seq": seq, "error": error, "received": received, "body": bytes(body)}
            for origin, seq, error, received, body in rows
        ]

    def iter_summaries(
        self,
        *,
        gateway: str | None = None,
        source: str | None = None,
        since: float | None = None,
        until: float | None = None,
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Yield stored summaries ordered by gateway then seq, reading `page_size` rows at a time.

        `since` and `until` select by t_end (UTC Unix seconds, inclusive start, exclusive end).
        """
        position: tuple[str, int] = ("", 0)
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT gateway, seq, body FROM summaries"
                    " WHERE (gateway > ? OR (gateway = ? AND seq > ?))"
                    " AND (? IS NULL OR gateway = ?) AND (? IS NULL OR source = ?)"
                    " AND (? IS NULL OR t_end >= ?) AND (? IS NULL OR t_end < ?)"
                    " ORDER BY gateway, seq LIMIT ?",
                    (
                        position[0], position[0], position[1],
                        gateway, gateway, source, source, since, since, until, until, page_size,
                    ),  # fmt: skip
                ).fetchall()
            if not rows:
                return
            for row_gateway, seq, body in rows:
                yield decode_summary(body)
            position = (rows[-1][0], rows[-1][1])

    def table(self) -> list[dict[str, Any]]:
        """Return one row per (gateway, source): count, first t_start, last t_end and total bytes."""
        with self._lock:
            rows = self._db.execute(
                "SELECT gateway, source, COUNT(*), MIN(t_start), MAX(t_end), SUM(LENGTH(body))"
                " FROM summaries GROUP BY gateway, source ORDER BY gateway, source"
            ).fetchall()
        return [
            {
                "gateway": gateway,
                "source": source,
                "count": count,
                "first_t_start": first,
                "last_t_end": last,
                "bytes": size,
            }
            for gateway, source, count, first, last, size in rows
        ]

    def summaries(self, gateway: str | None = None, source: str | None = None) -> list[dict[str, Any]]:
        """Return stored summaries, decoded, ordered by gateway then seq; filter by gateway or source if given."""
        query = "SELECT body FROM summaries WHERE (? IS NULL OR gateway = ?) AND (? IS NULL OR source = ?)"
        with self._lock:
            rows = self._db.execute(
                query + " ORDER BY gateway, seq", (gateway, gateway, source, source)
            ).fetchall()
        return [decode_summary(body) for (body,) in rows]

    def count(self) -> int:
        """Return the number of stored summaries."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM summaries").fetchone()[0])

    def close(self) -> None:
        """Close the database. Closing twice is allowed."""
        with self._lock:
            self._db.close()


STORE_KEY = web.AppKey("store", CollectorStore)


def create_app(
    store: CollectorStore,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    read_timeout_s: float = READ_TIMEOUT_S,
    token: str | None = None,
) -> web.Application:
    """Build the collector application: POST /v1/summaries and GET /v1/health.

    With `token`, a push must carry `Authorization: Bearer <token>`, else it gets 401
    and nothing is stored. The health check needs no token.
    """
    app = web.Application(client_max_size=max_body_bytes)
    app[STORE_KEY] = store

    async def post_summaries(request: web.Request) -> web.Response:
        if token is not None and not bearer_matches(request.headers.get("Authorization"), token):
            key = request.headers.get("Idempotency-Key", "-")
            response = _reject(request, key, 401, "missing or wrong bearer token; send Authorization: Bearer <token>")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await _handle_push(request, max_body_bytes, read_timeout_s)

    app.router.add_post("/v1/summaries", post_summaries)
    app.router.add_get("/v1/health", _handle_health)
    return app


async def _handle_push(request: web.Request, max_body_bytes: int, read_timeout_s: float) -> web.Response:
    key = request.headers.get("Idempotency-Key", "-")
    if request.content_type != CONTENT_TYPE:
        return _reject(request, key, 415, f"unsupported Content-Type {request.content_type!r}; send {CONTENT_TYPE}")
    if request.content_length is not None and request.content_length > max_body_bytes:
        return _reject(request, key, 413, f"body of {request.content_length} bytes exceeds the limit of {max_body_bytes}; send smaller batches")
    try:
        async with asyncio.timeout(read_timeout_s):
            data = await request.read()
    except TimeoutError:
        return _reject(request, key, 408, f"request body not received within {read_timeout_s:g} s")
    except web.HTTPRequestEntityTooLarge:
        return _reject(request, key, 413, f"body exceeds the limit of {max_body_bytes} bytes; send smaller batches")

    try:
        items = decode_batch(data)
    except SchemaError as exc:
        return _reject(request, key, 400, str(exc), index=exc.index, field=exc.field)

    store = request.app[STORE_KEY]
    summaries = [summary for summary, _ in items]
    bodies = [body for _, body in items]
    try:
        stored, duplicates = await asyncio.to_thread(store.insert_batch, summaries, bodies)
    except sqlite3.Error as exc:
        log.error("collector failed to store batch %s from %s: %s", key, request.remote, exc)
        return web.json_response({"error": f"storing the batch failed: {exc}; retry later"}, status=500)
    log.debug("batch %s from %s: %d stored, %d duplicates", key, request.remote, stored, duplicates)
    return web.json_response({"stored": stored, "duplicates": duplicates})


async def _handle_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _reject(
    request: web.Request, key: str, status: int, message: str, *, index: int | None = None, field: str | None = None
) -> web.Response:
    log.warning("collector rejected batch %s from %s with HTTP %d: %s", key, request.remote, status, message)
    payload: dict[str, Any] = {"error": message}
    if index is not None:
        payload["index"] = index
    if field is not None:
        payload["field"] = field
    return web.json_response(payload, status=status)


async def serve(
    db_path: str | PathLike[str],
    host: str = "127.0.0.1",
    port: int = 0,
    port_file: str | PathLike[str] | None = None,
    stop: asyncio.Event | None = None,
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    poll: Sequence[PollTarget] = (),
    poll_interval_s: float = 10.0,
    poll_limit: int = 500,
    poll_timeout_s: float = 10.0,
    poll_ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Run the collector until `stop` is set or the task is cancelled.

    Port 0 binds an ephemeral port. If `port_file` is given, the bound port is written
    there atomically (a temporary file renamed into place) once the server accepts
    connections, and the file is removed at shutdown. `token` requires a bearer token on
    pushes; `ssl_context` serves HTTPS. Each `poll` target is pulled concurrently every
    `poll_interval_s` (see agent.uplink.collect.poll_gateways).
    """
    from agent.uplink.collect import poll_gateways  # collect imports this module

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"invalid port {port!r}; expected 0 (ephemeral) to 65535")
    store = CollectorStore(db_path)
    runner = web.AppRunner(create_app(store, token=token), shutdown_timeout=5.0)
    stop_event = stop if stop is not None else asyncio.Event()
    pollers: asyncio.Task | None = None
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        if port_file is not None:
            _write_port_file(Path(port_file), bound_port)
        url_host = f"[{host}]" if ":" in host else host
        scheme = "https" if ssl_context is not None else "http"
        log.info("collector listening on %s://%s:%d/v1/summaries, database %s", scheme, url_host, bound_port, db_path)
        if poll:
            pollers = asyncio.create_task(
                poll_gateways(
                    store,
                    poll,
                    stop=stop_event,
                    interval_s=poll_interval_s,
                    limit=poll_limit,
                    timeout_s=poll_timeout_s,
                    ssl_context=poll_ssl_context,
                ),
                name="collector-pollers",
            )
        await stop_event.wait()
    finally:
        stop_event.set()
        if pollers is not None:
            await asyncio.gather(pollers, return_exceptions=True)
        await runner.cleanup()
        store.close()
        if port_file is not None:
            Path(port_file).unlink(missing_ok=True)
        log.info("collector stopped")


def _write_port_file(path: Path, port: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(f"{port}\n", encoding="ascii")
    os.replace(temporary, path)


def _summary_rows(summaries: list[dict[str, Any]], bodies: list[bytes], received: float) -> list[tuple]:
    if len(summaries) != len(bodies):
        raise ValueError(f"got {len(summaries)} summaries but {len(bodies)} bodies; pass one body per summary")
    return [
        (s["gateway"], s["seq"], s["source"], s["kind"], s["t_start"], s["t_end"], received, bytes(body))
        for s, body in zip(summaries, bodies)
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render `CollectorStore.table()` rows as a text table with UTC ISO 8601 times."""
    if not rows:
        return "no summaries stored"
    header = ("gateway", "source", "count", "first (UTC)", "last (UTC)", "bytes")
    lines = [header]
    for row in rows:
        lines.append(
            (
                str(row["gateway"]),
                str(row["source"]),
                str(row["count"]),
                _utc(row["first_t_start"]),
                _utc(row["last_t_end"]),
                str(row["bytes"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {2, 5}
    out = []
    for line in lines:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _utc(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        # A gateway without a synchronised clock can send times outside the datetime range.
        return f"{seconds:.0f}s"
