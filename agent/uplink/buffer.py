"""Durable SQLite buffer of encoded summaries waiting for upload.

The buffer assigns each summary its sequence number (`seq`) at append. Numbers increase
strictly and are never reused, also after rows are released and after a restart, because
the next number is kept in a meta table that is updated in the same transaction as the insert.
Rows leave the buffer only through `release`, after the collector has acknowledged them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from os import PathLike
from typing import Any

from agent.uplink.schema import encode_summary

log = logging.getLogger(__name__)

SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_S = 5.0

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS summaries (
    seq INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1);
"""


class SummaryBuffer:
    """Queue of encoded summaries in one SQLite file, in WAL mode.

    Each method runs one short transaction and blocks on disk I/O: with
    synchronous="FULL", every append and release waits for an fsync. The buffer is built
    for one thread at a time, the service's event loop thread. A lock serialises calls
    that overlap anyway, so a call from a worker thread is safe but waits for the others.

    `synchronous` is the SQLite setting. With "FULL" (default) SQLite syncs the WAL at
    each commit, so every append that returned survives a power loss. With "NORMAL" it syncs
    only at checkpoints: the file stays consistent, but the last appends before a power loss
    can roll back. "EXTRA" differs from "FULL" only in rollback-journal modes, so here it
    behaves like "FULL". "OFF" is rejected because an OS crash or power loss can corrupt
    the file.
    """

    def __init__(self, path: str | PathLike[str], *, synchronous: str = "FULL") -> None:
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"invalid synchronous mode {synchronous!r}; use one of {', '.join(SYNCHRONOUS_MODES)}"
            )
        self.path = str(path)
        self.synchronous = mode
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # transactions are opened explicitly with BEGIN
                check_same_thread=False,  # access is serialised by self._lock instead
            )
        except sqlite3.Error as exc:
            raise sqlite3.OperationalError(
                f"cannot open summary buffer {self.path!r}: {exc}; check that the directory exists and is writable"
            ) from exc
        try:
            self._configure()
        except BaseException:
            self._db.close()
            raise
        log.info(
            "summary buffer %s opened: %d pending, next seq %d, synchronous=%s",
            self.path,
            self.depth(),
            self._next_seq(),
            self.synchronous,
        )

    def _configure(self) -> None:
        self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        journal = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(journal).lower() != "wal":
            raise sqlite3.OperationalError(
                f"summary buffer {self.path!r}: SQLite could not switch to WAL mode (journal_mode is {journal!r}); "
                "put the buffer on a local file system"
            )
        self._db.execute(f"PRAGMA synchronous = {self.synchronous}")
        self._db.executescript(_SCHEMA_SQL)
        # Repair a meta row that lags the table, so a number in the table is never handed out again.
        with self._transaction():
            top = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM summaries").fetchone()[0]
            self._db.execute(
                "UPDATE meta SET value = ? WHERE key = 'next_seq' AND value <= ?", (top + 1, top)
            )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _next_seq(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])

    def append(self, summary: dict[str, Any]) -> tuple[int, bytes]:
        """Assign the next seq to a summary, encode it and store it durably.

        Sets `summary["seq"]` only after the commit. Returns the seq and the encoded body.

        Raises:
            SchemaError: the summary is invalid; nothing is stored and no seq is used.
            sqlite3.Error: the write failed (for example, the disk is full).
        """
        with self._lock, self._transaction():
            seq = self._next_seq()
            candidate = dict(summary)
            candidate["seq"] = seq
            body = encode_summary(candidate)
            self._db.execute(
                "INSERT INTO summaries (seq, source, created, body) VALUES (?, ?, ?, ?)",
                (seq, candidate["source"], time.time(), body),
            )
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
        summary["seq"] = seq
        return seq, body

    def pending(self, limit: int) -> list[tuple[int, bytes]]:
        """Return up to `limit` stored rows as (seq, body), lowest seq first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"invalid limit {limit!r}; expected an integer >= 1")
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body FROM summaries ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(int(seq), bytes(body)) for seq, body in rows]

    def release(self, seqs: Iterable[int]) -> int:
        """Delete the rows with these seqs in one transaction; return how many existed."""
        keys = [(int(seq),) for seq in seqs]
        if not keys:
            return 0
        with self._lock, self._transaction():
            before = self._db.total_changes
            self._db.executemany("DELETE FROM summaries WHERE seq = ?", keys)
            return self._db.total_changes - before

    def depth(self) -> int:
        """Return the number of rows waiting for upload."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM summaries").fetchone()[0])

    def oldest_created(self) -> float | None:
        """Return the wall time at which the lowest pending seq was appended, or None if empty."""
        with self._lock:
            row = self._db.execute("SELECT created FROM summaries ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        """Close the database; later calls raise sqlite3.ProgrammingError. Closing twice is allowed."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SummaryBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Transaction:
    """Context manager that wraps a block in BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock at once, so the seq read and the insert cannot
        # interleave with another writer on the same file.
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
