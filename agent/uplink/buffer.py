"""Durable SQLite buffer of encoded summaries waiting for upload, within a disk budget.

The buffer assigns each summary its sequence number (`seq`) at append. Numbers increase
strictly and are never reused: not after rows leave the buffer, not after a restart, and
not after a damaged file is replaced (see agent.uplink.recovery). Every read returns rows
in seq order. Rows leave the buffer in four ways: `release`/`release_upto` after the
collector stored them, `quarantine` after the collector rejected them, eviction when the
disk budget is reached, and clock correction rewrites them in place.

Summaries with alarms and routine summaries live in two tables with the same columns.
The oldest rows of either class are then at the front of their own B-tree, so eviction
needs no scan and evicting routine rows leaves no half-empty pages around alarm rows.
Eviction order: quarantined rows, then routine rows, then alarm rows, each oldest first.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

from agent.uplink import recovery
from agent.uplink.clock import Clock, ClockStatus, SystemClock
from agent.uplink.schema import CLOCK_CORRECTION, CLOCK_SYNCED, SchemaError, decode_summary, encode_summary

log = logging.getLogger(__name__)

SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_S = 5.0
DEFAULT_BUDGET_BYTES = 256 * 2**20
MIN_BUDGET_BYTES = 2**20
PAGE_SIZE = 4096
LAYOUT_VERSION = 2  # stored in PRAGMA user_version; files written before budgets existed have 0
# A warning about evictions is repeated at most this often, with the totals since the last one.
EVICTION_LOG_INTERVAL_S = 300.0

# Names in the persistent `counters` table.
EVICTED_ROUTINE = "evicted_routine"
EVICTED_ALARM = "evicted_alarm"
EVICTED_QUARANTINED = "evicted_quarantined"
QUARANTINED = "quarantined"
CORRUPT_FILES = "corrupt_files"
SALVAGED = "salvaged"

_QUEUE_TABLES = ("routine", "alarm")
_EVICTION_ORDER = (("quarantine", EVICTED_QUARANTINED), ("routine", EVICTED_ROUTINE), ("alarm", EVICTED_ALARM))

# The two queue tables have the same columns. `mono` and `boot` are set only on rows made
# while the wall clock was unsynchronised. An index on them would cost a page write per
# append, so instead meta key 'unsynced_from' stores the lowest seq that may need a
# correction. It is written once, when the clock is first seen unsynchronised.
_LAYOUT_SQL = """
CREATE TABLE IF NOT EXISTS routine (
    seq INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    mono REAL,
    boot TEXT,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS alarm (
    seq INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    mono REAL,
    boot TEXT,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY,
    alarm INTEGER NOT NULL,
    created REAL NOT NULL,
    quarantined REAL NOT NULL,
    status INTEGER,
    reason TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE VIEW IF NOT EXISTS summaries AS
    SELECT seq, 0 AS alarm, created, body FROM routine
    UNION ALL
    SELECT seq, 1 AS alarm, created, body FROM alarm;
"""

T = TypeVar("T")


class BufferBudgetError(RuntimeError):
    """A write does not fit in the disk budget even after evicting every evictable row."""


class BufferBusyError(RuntimeError):
    """The WAL cannot be checkpointed because another connection has an open read transaction."""


@dataclass(frozen=True)
class BufferStats:
    """Counts of one buffer; `counters` are the persistent totals since the file was created."""

    pending: int
    pending_alarm: int
    quarantined: int
    next_seq: int
    counters: dict[str, int]
    disk_bytes: int
    budget_bytes: int


@dataclass(frozen=True)
class QuarantinedSummary:
    """A row the collector rejected; it stays until requeued or evicted."""

    seq: int
    status: int | None
    reason: str
    quarantined_at: float
    body: bytes


@dataclass(frozen=True)
class _Limits:
    """Byte and page limits derived from the budget; see `_limits_for`."""

    wal_limit: int  # the WAL file never grows past this
    checkpoint_at: int  # checkpoint (TRUNCATE) once the WAL is larger than this
    txn_bytes: int  # body bytes one transaction may add, move or delete
    shm_bytes: int
    sidecar_bytes: int
    hard_pages: int  # page limit of the main file during deletes
    soft_pages: int  # page limit of the main file during inserts


class SummaryBuffer:
    """Queue of encoded summaries in one SQLite file in WAL mode, within `budget_bytes`.

    Each method runs short transactions and blocks on disk I/O: with synchronous="FULL",
    every commit waits for an fsync. The buffer is built for one thread at a time, the
    service's event loop thread. A lock serialises calls that overlap anyway, so a call
    from a worker thread (such as the pull API's) is safe but waits for the others.

    `synchronous` is the SQLite setting. With "FULL" (default) SQLite syncs the WAL at
    each commit, so every append that returned survives a power loss. With "NORMAL" it
    syncs only at checkpoints: the file stays consistent, but the last appends before a
    power loss can roll back. "EXTRA" behaves like "FULL" in WAL mode. "OFF" is rejected
    because an OS crash or power loss can corrupt the file.

    `budget_bytes` bounds the buffer file, its -wal, -shm and .seq files and any
    moved-aside damaged copies together. See docs/uplink.md for how it is split.

    `clock` supplies wall and monotonic time and the synchronisation state (default: the
    system's). Summaries appended while it reports UNSYNCED get `quality.clock_synced =
    false` and can be corrected later by `correct_clock`.

    Raises (constructor):
        ValueError: an argument is invalid.
        sqlite3.Error: the file cannot be opened or created (damaged files are moved
            aside instead, see agent.uplink.recovery).
    """

    def __init__(
        self,
        path: str | PathLike[str],
        *,
        synchronous: str = "FULL",
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        clock: Clock | None = None,
    ) -> None:
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"invalid synchronous mode {synchronous!r}; use one of {', '.join(SYNCHRONOUS_MODES)}"
            )
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < MIN_BUDGET_BYTES:
            raise ValueError(f"invalid budget_bytes {budget_bytes!r}; expected an integer >= {MIN_BUDGET_BYTES} (1 MiB)")
        self.path = str(path)
        self._path = Path(path)
        self.synchronous = mode
        self.budget_bytes = budget_bytes
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._lock = threading.Lock()
        self._closed = False
        self._counts = {"routine": 0, "alarm": 0, "quarantine": 0}
        self._next_seq = 1
        self._meta_next_seq = 0
        self._reserved_seq = 0
        self._unsynced_from: int | None = None
        self._evicted_unlogged: dict[str, int] = {}
        self._evictions_logged_at = -math.inf
        self._checkpoint_warned_at = -math.inf

        if not self._path.parent.is_dir():
            raise sqlite3.OperationalError(
                f"cannot open summary buffer {self.path!r}: the directory does not exist; "
                "check that the directory exists and is writable"
            )
        # Damaged copies count against the budget; keep them to half of it at most.
        self._copies_bytes = recovery.trim_copies(self._path, budget_bytes // 2)
        self._limits = _limits_for(budget_bytes - self._copies_bytes, PAGE_SIZE)

        reason = recovery.check_header(self._path)
        self._db: sqlite3.Connection | None = None
        if reason is None:
            reason = self._open_and_check()
        moved_to = None
        if reason is not None:
            moved_to = recovery.move_aside(self._path)
            self._copies_bytes = recovery.trim_copies(self._path, budget_bytes // 2)
            self._limits = _limits_for(budget_bytes - self._copies_bytes, PAGE_SIZE)
            reason_again = self._open_and_check()
            if reason_again is not None:
                raise sqlite3.DatabaseError(
                    f"summary buffer {self.path!r}: a new file failed the integrity check too ({reason_again}); "
                    "check the storage device"
                )
        try:
            self._setup(moved_to, reason)
        except BaseException:
            self._connection().close()
            raise
        log.info(
            "summary buffer %s opened: %d pending (%d with alarms), %d quarantined, next seq %d, "
            "synchronous=%s, budget %d bytes, %d bytes on disk",
            self.path,
            self._counts["routine"] + self._counts["alarm"],
            self._counts["alarm"],
            self._counts["quarantine"],
            self._next_seq,
            self.synchronous,
            self.budget_bytes,
            self._disk_usage(),
        )

    # -- opening ---------------------------------------------------------------------

    def _open_and_check(self) -> str | None:
        """Open and configure the file; return why it is damaged, or None if it passed quick_check."""
        try:
            db = sqlite3.connect(
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
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect only in a new file
            journal = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(journal).lower() != "wal":
                raise sqlite3.OperationalError(
                    f"summary buffer {self.path!r}: SQLite could not switch to WAL mode (journal_mode is {journal!r}); "
                    "put the buffer on a local file system"
                )
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            # Checkpoints run from _after_write, so the WAL size stays within the budget.
            db.execute("PRAGMA wal_autocheckpoint = 0")
            result = [row[0] for row in db.execute("PRAGMA quick_check(5)").fetchall()]
        except sqlite3.DatabaseError as exc:
            db.close()
            if recovery.is_corruption(exc):
                return str(exc)
            raise
        except BaseException:
            db.close()
            raise
        if result != ["ok"]:
            db.close()
            return "quick_check: " + "; ".join(str(line) for line in result)
        self._db = db
        return None

    def _setup(self, moved_to: Path | None, reason: str | None) -> None:
        db = self._connection()
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        self._limits = _limits_for(self.budget_bytes - self._copies_bytes, page_size)
        self._page_size = page_size
        had_meta = _has_table(db, "meta") and db.execute("SELECT 1 FROM meta WHERE key = 'next_seq'").fetchone()
        if int(db.execute("PRAGMA user_version").fetchone()[0]) < LAYOUT_VERSION:
            self._create_layout()
        # Inserts (salvage included) stay below the soft limit; a larger file cannot grow until _fit_budget.
        self._set_page_limit(self._limits.soft_pages)
        self._refresh_counts()

        reserved = recovery.read_reserved_seq(self._path)
        candidates = [self._max_seq() + 1, self._read_meta_next_seq()]
        if not had_meta and reserved is not None:
            # A new file beside an old reservation: the previous file was lost or deleted.
            candidates.append(reserved + 1)
        if moved_to is not None:
            candidates.append(self._recover_from(moved_to, reason or "", reserved))
        self._next_seq = max(candidates)
        self._reserved_seq = reserved or 0
        row = db.execute("SELECT value FROM meta WHERE key = 'unsynced_from'").fetchone()
        self._unsynced_from = None if row is None else int(row[0])
        with self._transaction():
            self._write_meta_next_seq()
        self._reserve_seqs(self._next_seq)
        self._fit_budget()
        self._set_page_limit(self._limits.soft_pages)

    def _create_layout(self) -> None:
        """Create the tables, converting a file written before budgets existed."""
        db = self._connection()
        with self._transaction():
            old = db.execute("SELECT type FROM sqlite_master WHERE name = 'summaries'").fetchone()
            legacy = old is not None and old[0] == "table"
            if legacy:
                db.execute("ALTER TABLE summaries RENAME TO summaries_v0")
            # executescript() would commit, so the statements run one by one inside the transaction.
            for statement in _LAYOUT_SQL.split(";"):
                if statement.strip():
                    db.execute(statement)
            if legacy:
                moved = 0
                for seq, created, body in db.execute("SELECT seq, created, body FROM summaries_v0").fetchall():
                    table = "alarm" if _has_alarms(body) else "routine"
                    db.execute(
                        f"INSERT INTO {table} (seq, created, body) VALUES (?, ?, ?)", (seq, float(created), bytes(body))
                    )
                    moved += 1
                db.execute("DROP TABLE summaries_v0")
                log.info("summary buffer %s: converted %d rows to layout %d", self.path, moved, LAYOUT_VERSION)
            db.execute(f"PRAGMA user_version = {LAYOUT_VERSION}")

    def _recover_from(self, copy: Path, reason: str, reserved: int | None) -> int:
        """Carry what is readable from a damaged copy into the new file; return the lowest safe next seq."""
        found = recovery.salvage(copy)
        db = self._connection()
        salvaged = 0
        for table, seq, created, body in found.rows:
            try:
                summary = decode_summary(body)
            except SchemaError:
                continue
            alarm = bool(summary["alarms"])
            if table == "quarantine":
                status, detail, when = found.quarantine_info.get(seq, (None, "salvaged from a damaged buffer", time.time()))
                insert = (
                    "INSERT OR IGNORE INTO quarantine (seq, alarm, created, quarantined, status, reason, body)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, int(alarm), created, when, status, detail, body),
                )
            else:
                insert = (
                    f"INSERT OR IGNORE INTO {'alarm' if alarm else 'routine'} (seq, created, body) VALUES (?, ?, ?)",
                    (seq, created, body),
                )

            def work(insert: tuple[str, tuple[Any, ...]] = insert) -> int:
                return db.execute(*insert).rowcount

            salvaged += self._write(work, len(body))
        with self._transaction():
            for name, value in found.counters.items():
                self._add_counter(name, value)
            self._add_counter(CORRUPT_FILES, 1)
            self._add_counter(SALVAGED, salvaged)
        self._refresh_counts()

        floors = [max((seq for _, seq, _, _ in found.rows), default=0) + 1]
        sources = []
        if found.next_seq is not None:
            floors.append(found.next_seq)
            sources.append("the damaged file's meta table")
        if reserved is not None:
            floors.append(reserved + 1)
            sources.append(f"the reservation file {recovery.sidecar_path(self._path)}")
        if not sources:
            # Salvaged rows alone are not enough: rows past a damaged page may have been delivered.
            floors.append(recovery.time_based_seq())
            sources.append("the wall clock in microseconds, because neither the meta table nor the reservation file could be read")
        floor = max(floors)
        source = " and ".join(sources)
        log.error(
            "summary buffer %s is damaged (%s); moved it to %s and started a new file: %d summaries salvaged, "
            "seq continues at %d or above, taken from %s%s",
            self.path,
            reason,
            copy,
            salvaged,
            floor,
            source,
            f"; read errors: {'; '.join(found.errors[:3])}" if found.errors else "",
        )
        return floor

    def _fit_budget(self) -> None:
        """Shrink a file that is larger than the budget allows, after the budget was lowered."""
        db = self._connection()
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        if pages <= self._limits.soft_pages:
            return
        log.warning(
            "summary buffer %s has %d pages, more than the %d that budget_bytes=%d allows; evicting and compacting",
            self.path,
            pages,
            self._limits.soft_pages,
            self.budget_bytes,
        )
        self._set_page_limit(pages)
        while True:
            used = pages - int(db.execute("PRAGMA freelist_count").fetchone()[0])
            if used <= self._limits.soft_pages - 16 or self._evict(self._limits.txn_bytes) == 0:
                break
        self._checkpoint()
        # NOTE: VACUUM rewrites the file through the WAL, so during this one-time step the
        # files take up to about twice the old file size on disk.
        db.execute("VACUUM")
        self._checkpoint()

    # -- writing ---------------------------------------------------------------------

    def append(self, summary: dict[str, Any]) -> tuple[int, bytes]:
        """Assign the next seq to a summary, encode it and store it durably.

        See `append_many`. Returns the seq and the encoded body.
        """
        return self.append_many([summary])[0]

    def append_many(self, summaries: Sequence[dict[str, Any]]) -> list[tuple[int, bytes]]:
        """Assign consecutive seqs to summaries and store them in one transaction.

        One transaction (one fsync with synchronous="FULL") for all sources of a period
        keeps SD-card writes low. The clock state is stamped into each summary's quality
        (`clock_synced`, and `clock_correction_s` = 0.0 while unsynchronised) unless the
        clock reports UNKNOWN. After the commit, each dict gets its `seq` and the stamped
        `quality`. When the budget is reached, older rows are evicted first (see the
        module docstring).

        Returns (seq, body) per summary, in the order given.

        Raises:
            SchemaError: a summary is invalid (`index` names it); nothing is stored, no seq is used.
            ValueError: the encoded batch is larger than one transaction may write.
            BufferBudgetError: the batch does not fit even in an empty buffer.
            sqlite3.Error: the write failed (for example, the file system is full).
        """
        items = list(summaries)
        if not items:
            return []
        with self._lock:
            db = self._connection()
            status = self.clock.status()
            wall = self.clock.wall()
            mono = self.clock.monotonic()
            first = self._next_seq
            prepared: list[tuple[int, bytes, str, dict[str, Any] | None]] = []
            for index, summary in enumerate(items):
                candidate = dict(summary)
                candidate["seq"] = first + index
                quality = candidate.get("quality")
                if isinstance(quality, dict) and status is not ClockStatus.UNKNOWN:
                    quality = dict(quality)
                    quality[CLOCK_SYNCED] = status is ClockStatus.SYNCED
                    if status is ClockStatus.UNSYNCED:
                        quality[CLOCK_CORRECTION] = 0.0
                    candidate["quality"] = quality
                try:
                    body = encode_summary(candidate)
                except SchemaError as exc:
                    raise (exc.at_index(index) if len(items) > 1 else exc) from None
                table = "alarm" if candidate["alarms"] else "routine"
                prepared.append((first + index, body, table, quality if isinstance(quality, dict) else None))

            total = sum(len(body) for _, body, _, _ in prepared)
            if total > self._limits.txn_bytes:
                raise ValueError(
                    f"batch of {len(items)} summaries encodes to {total} bytes, more than the {self._limits.txn_bytes} "
                    f"bytes one append may write with budget_bytes={self.budget_bytes}; "
                    "append fewer summaries per call or raise budget_bytes"
                )
            last = first + len(items) - 1
            self._reserve_seqs(last)
            unsynced = status is ClockStatus.UNSYNCED
            mono_value = mono if unsynced else None
            boot_value = self.clock.boot_id if unsynced else None
            mark_unsynced = unsynced and self._unsynced_from is None

            def work() -> None:
                for seq, body, table, _ in prepared:
                    db.execute(
                        f"INSERT INTO {table} (seq, created, mono, boot, body) VALUES (?, ?, ?, ?, ?)",
                        (seq, wall, mono_value, boot_value, body),
                    )
                if mark_unsynced:
                    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('unsynced_from', ?)", (first,))

            self._write(work, total)
            if mark_unsynced:
                self._unsynced_from = first
            self._next_seq = last + 1
            for _, _, table, _ in prepared:
                self._counts[table] += 1

        for summary, (seq, _, _, quality) in zip(items, prepared):
            summary["seq"] = seq
            if quality is not None:
                summary["quality"] = quality
        return [(seq, body) for seq, body, _, _ in prepared]

    def release(self, seqs: Iterable[int]) -> int:
        """Delete the rows with these seqs after the collector stored them; return how many existed."""
        requested = sorted({int(seq) for seq in seqs})
        if not requested:
            return 0
        with self._lock:
            db = self._connection()
            keys = set(requested)
            released = 0
            for table in _QUEUE_TABLES:
                rows = [
                    (seq, size)
                    for seq, size in db.execute(
                        f"SELECT seq, length(body) FROM {table} WHERE seq BETWEEN ? AND ? ORDER BY seq",
                        (requested[0], requested[-1]),
                    )
                    if seq in keys
                ]
                released += self._delete_rows(table, rows, contiguous=False)
            return released

    def release_upto(self, upto: int) -> int:
        """Delete every pending row with seq <= `upto`; return how many were deleted. Repeating it is harmless."""
        if isinstance(upto, bool) or not isinstance(upto, int) or upto < 0:
            raise ValueError(f"invalid upto {upto!r}; expected an integer seq >= 0")
        with self._lock:
            db = self._connection()
            released = 0
            for table in _QUEUE_TABLES:
                rows = db.execute(f"SELECT seq, length(body) FROM {table} WHERE seq <= ? ORDER BY seq", (upto,)).fetchall()
                released += self._delete_rows(table, rows, contiguous=True)
            return released

    def quarantine(self, seqs: Iterable[int], *, status: int | None, reason: str) -> int:
        """Move pending rows the collector rejected to the quarantine table; return how many moved.

        Quarantined rows are not sent again until `requeue_quarantined`. They are evicted
        before any pending row when the budget is reached.
        """
        requested = sorted({int(seq) for seq in seqs})
        if not requested:
            return 0
        now = time.time()
        keys = set(requested)
        with self._lock:
            db = self._connection()
            moved = 0
            for table in _QUEUE_TABLES:
                alarm = int(table == "alarm")
                rows = [
                    (seq, size)
                    for seq, size in db.execute(
                        f"SELECT seq, length(body) FROM {table} WHERE seq BETWEEN ? AND ? ORDER BY seq",
                        (requested[0], requested[-1]),
                    )
                    if seq in keys
                ]
                for chunk, size in self._chunks(rows):

                    def work(chunk: list[int] = chunk, table: str = table, alarm: int = alarm) -> int:
                        count = 0
                        for seq in chunk:
                            cursor = db.execute(
                                "INSERT INTO quarantine (seq, alarm, created, quarantined, status, reason, body)"
                                f" SELECT seq, ?, created, ?, ?, ?, body FROM {table} WHERE seq = ?",
                                (alarm, now, status, reason, seq),
                            )
                            if cursor.rowcount:
                                db.execute(f"DELETE FROM {table} WHERE seq = ?", (seq,))
                                count += 1
                        self._add_counter(QUARANTINED, count)
                        return count

                    count = self._write(work, size)
                    self._counts[table] -= count
                    self._counts["quarantine"] += count
                    moved += count
            return moved

    def requeue_quarantined(self, seqs: Iterable[int] | None = None) -> int:
        """Move quarantined rows (all, or these seqs) back to the queue under new seqs; return how many.

        New seqs put them after every row appended so far. Keeping the old seqs would hide
        them from a pull poller, whose cursor is already past them, and an `upto`
        acknowledgement could release them unsent. Rows whose body no longer decodes stay
        in quarantine.
        """
        with self._lock:
            db = self._connection()
            rows = db.execute("SELECT seq, length(body) FROM quarantine ORDER BY seq").fetchall()
            if seqs is not None:
                keys = {int(seq) for seq in seqs}
                rows = [(seq, size) for seq, size in rows if seq in keys]
            moved = 0
            for chunk, size in self._chunks(rows):
                renumbered: list[tuple[int, int, str, float, bytes]] = []
                for old_seq in chunk:
                    alarm, created, body = db.execute(
                        "SELECT alarm, created, body FROM quarantine WHERE seq = ?", (old_seq,)
                    ).fetchone()
                    try:
                        summary = decode_summary(body)
                    except SchemaError as exc:
                        log.error("summary buffer %s: quarantined seq %d cannot be decoded, so it stays: %s", self.path, old_seq, exc)
                        continue
                    summary["seq"] = self._next_seq + len(renumbered)
                    table = "alarm" if alarm else "routine"
                    renumbered.append((old_seq, summary["seq"], table, created, encode_summary(summary)))
                if not renumbered:
                    continue
                self._reserve_seqs(renumbered[-1][1])

                def work(renumbered: list[tuple[int, int, str, float, bytes]] = renumbered) -> list[str]:
                    tables = []
                    for old_seq, new_seq, table, created, body in renumbered:
                        # An eviction while retrying this write may have removed the quarantined row.
                        if db.execute("DELETE FROM quarantine WHERE seq = ?", (old_seq,)).rowcount:
                            db.execute(f"INSERT INTO {table} (seq, created, body) VALUES (?, ?, ?)", (new_seq, created, body))
                            tables.append(table)
                    return tables

                tables = self._write(work, size)
                self._next_seq = renumbered[-1][1] + 1
                for table in tables:
                    self._counts[table] += 1
                    self._counts["quarantine"] -= 1
                moved += len(tables)
                log.info(
                    "summary buffer %s: requeued quarantined seqs %s as %s",
                    self.path,
                    ", ".join(str(item[0]) for item in renumbered),
                    ", ".join(str(item[1]) for item in renumbered),
                )
            return moved

    def correct_clock(self, boot_id: str | None, offset_s: float) -> int:
        """Correct the times of rows appended while the clock was unsynchronised; return how many.

        `offset_s` is the current wall time minus the current monotonic time, read while
        the clock is synchronised. A row from the boot `boot_id` gets t_start and t_end
        shifted by offset_s - (created - mono), `clock_synced` true and the shift in
        `clock_correction_s`. Rows from another boot cannot be corrected: they keep
        `clock_synced` false and are no longer considered.
        """
        corrected = 0
        abandoned = 0
        with self._lock:
            db = self._connection()
            if self._unsynced_from is None:
                return 0
            for table in _QUEUE_TABLES:
                start = self._unsynced_from
                while True:
                    rows = db.execute(
                        f"SELECT seq, created, mono, boot, body FROM {table} WHERE seq >= ? AND boot IS NOT NULL"
                        " ORDER BY seq LIMIT 200",
                        (start,),
                    ).fetchall()
                    if not rows:
                        break
                    rows = _within_bytes(rows, self._limits.txn_bytes, lambda row: len(row[4]))
                    start = rows[-1][0] + 1
                    updates: list[tuple[Any, ...]] = []
                    for seq, created, mono, boot, body in rows:
                        if boot != boot_id or mono is None:
                            updates.append((None, None, seq))
                            abandoned += 1
                            continue
                        shift = offset_s - (created - mono)
                        try:
                            summary = decode_summary(body)
                        except SchemaError as exc:
                            log.error("summary buffer %s: seq %d cannot be decoded for clock correction: %s", self.path, seq, exc)
                            updates.append((None, None, seq))
                            continue
                        summary["t_start"] += shift
                        summary["t_end"] += shift
                        summary["quality"][CLOCK_SYNCED] = True
                        summary["quality"][CLOCK_CORRECTION] = shift
                        updates.append((encode_summary(summary), created + shift, seq))

                    def work(updates: list[tuple[Any, ...]] = updates) -> int:
                        count = 0
                        for body, created, seq in updates:
                            if body is None:
                                db.execute(f"UPDATE {table} SET mono = NULL, boot = NULL WHERE seq = ?", (seq,))
                            else:
                                db.execute(
                                    f"UPDATE {table} SET body = ?, created = ?, mono = NULL, boot = NULL WHERE seq = ?",
                                    (body, created, seq),
                                )
                                count += 1
                        return count

                    corrected += self._write(work, sum(len(row[4]) for row in rows))
            with self._transaction():
                db.execute("DELETE FROM meta WHERE key = 'unsynced_from'")
            self._unsynced_from = None
        if corrected:
            log.info("summary buffer %s: corrected the times of %d summaries made before clock synchronisation", self.path, corrected)
        if abandoned:
            log.warning(
                "summary buffer %s: %d summaries were made before synchronisation in an earlier boot; "
                "their times cannot be corrected and they keep clock_synced = false",
                self.path,
                abandoned,
            )
        return corrected

    # -- reading ---------------------------------------------------------------------

    def pending(self, limit: int, after: int = 0) -> list[tuple[int, bytes]]:
        """Return up to `limit` pending rows with seq > `after` as (seq, body), lowest seq first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"invalid limit {limit!r}; expected an integer >= 1")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"invalid after {after!r}; expected an integer seq >= 0")
        with self._lock:
            db = self._connection()
            streams = [
                db.execute(f"SELECT seq, body FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)).fetchall()
                for table in _QUEUE_TABLES
            ]
        merged = heapq.merge(*streams)
        return [(int(seq), bytes(body)) for seq, body in list(merged)[:limit]]

    def quarantined(self, limit: int = 100) -> list[QuarantinedSummary]:
        """Return up to `limit` quarantined rows, lowest seq first."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT seq, status, reason, quarantined, body FROM quarantine ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [QuarantinedSummary(seq, status, reason, when, bytes(body)) for seq, status, reason, when, body in rows]

    def depth(self) -> int:
        """Return the number of rows waiting for upload (quarantined rows not included)."""
        with self._lock:
            self._connection()
            return self._counts["routine"] + self._counts["alarm"]

    @property
    def next_seq(self) -> int:
        """The seq the next appended summary gets."""
        with self._lock:
            return self._next_seq

    def oldest_created(self) -> float | None:
        """Return the wall time at which the lowest pending seq was appended, or None if empty."""
        with self._lock:
            db = self._connection()
            rows = [
                db.execute(f"SELECT seq, created FROM {table} ORDER BY seq LIMIT 1").fetchone() for table in _QUEUE_TABLES
            ]
        present = [row for row in rows if row is not None]
        return None if not present else float(min(present)[1])

    def counters(self) -> dict[str, int]:
        """Return the persistent counters (evictions by class, quarantined, damaged files, salvaged)."""
        with self._lock:
            rows = self._connection().execute("SELECT name, value FROM counters ORDER BY name").fetchall()
        return {name: int(value) for name, value in rows}

    def stats(self) -> BufferStats:
        """Return counts, counters and the bytes on disk."""
        counters = self.counters()
        with self._lock:
            self._connection()
            return BufferStats(
                pending=self._counts["routine"] + self._counts["alarm"],
                pending_alarm=self._counts["alarm"],
                quarantined=self._counts["quarantine"],
                next_seq=self._next_seq,
                counters=counters,
                disk_bytes=self._disk_usage(),
                budget_bytes=self.budget_bytes,
            )

    def disk_usage(self) -> int:
        """Return the bytes the buffer's files take: the file, -wal, -shm, .seq and damaged copies."""
        with self._lock:
            return self._disk_usage()

    def close(self) -> None:
        """Close the database; later calls raise sqlite3.ProgrammingError. Closing twice is allowed."""
        with self._lock:
            if self._db is not None and not self._closed:
                self._db.close()
            self._closed = True

    def __enter__(self) -> SummaryBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._closed or self._db is None:
            raise sqlite3.ProgrammingError(f"summary buffer {self.path!r} is closed")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock at once, so reads and writes in the block cannot
        # interleave with another writer on the same file.
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself after some errors, such as SQLITE_FULL.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _write(self, work: Callable[[], T], need_bytes: int) -> T:
        """Run `work` in one transaction, evicting by policy while it does not fit in the budget."""
        self._ensure_wal_room()
        while True:
            try:
                with self._transaction():
                    result = work()
                break
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                    raise
                if not self._at_page_limit(need_bytes):
                    raise sqlite3.OperationalError(
                        f"summary buffer {self.path!r}: the file system is full ({exc}) although the buffer is "
                        "within its budget; free space on the device or lower budget_bytes"
                    ) from exc
                if self._evict(need_bytes) == 0:
                    raise BufferBudgetError(
                        f"summary buffer {self.path!r}: a write of {need_bytes} bytes does not fit in budget_bytes="
                        f"{self.budget_bytes} even with every older row evicted; raise budget_bytes"
                    ) from exc
        self._after_write()
        return result

    def _at_page_limit(self, need_bytes: int) -> bool:
        db = self._connection()
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        needed = -(-need_bytes // self._page_size) + 8  # bodies plus B-tree interior pages
        return pages + needed > self._limits.soft_pages

    def _evict(self, need_bytes: int) -> int:
        """Delete the first rows by eviction order, about `need_bytes` of bodies; return how many."""
        db = self._connection()
        target = min(max(need_bytes, 4 * self._page_size), self._limits.txn_bytes)
        plan: list[tuple[str, str, int, int]] = []
        total = 0
        for table, counter in _EVICTION_ORDER:
            if total >= target:
                break
            count = 0
            last = None
            for seq, size in db.execute(f"SELECT seq, length(body) FROM {table} ORDER BY seq LIMIT 1000"):
                if total >= target:
                    break
                total += size
                count += 1
                last = seq
            if count:
                plan.append((table, counter, int(last), count))
        if not plan:
            return 0

        # Deletes may need a page for the free list, so they run with the reserve opened.
        self._set_page_limit(self._limits.hard_pages)
        try:
            with self._transaction():
                for table, counter, last, count in plan:
                    db.execute(f"DELETE FROM {table} WHERE seq <= ?", (last,))
                    self._add_counter(counter, count)
                self._write_meta_next_seq()
        finally:
            self._set_page_limit(self._limits.soft_pages)
        self._after_write()

        for table, _, _, count in plan:
            self._counts[table] -= count
        evicted = 0
        for _, counter, _, count in plan:
            self._evicted_unlogged[counter] = self._evicted_unlogged.get(counter, 0) + count
            evicted += count
        self._log_evictions()
        return evicted

    def _log_evictions(self) -> None:
        now = time.monotonic()
        if now - self._evictions_logged_at < EVICTION_LOG_INTERVAL_S:
            return
        parts = ", ".join(f"{count} {name.removeprefix('evicted_')}" for name, count in sorted(self._evicted_unlogged.items()))
        log.warning(
            "summary buffer %s reached its budget of %d bytes: evicted %s summaries, oldest first, "
            "since the last report; totals are in the counters table",
            self.path,
            self.budget_bytes,
            parts,
        )
        self._evicted_unlogged = {}
        self._evictions_logged_at = now

    def _delete_rows(self, table: str, rows: list[tuple[int, int]], *, contiguous: bool) -> int:
        db = self._connection()
        deleted = 0
        for chunk, _ in self._chunks(rows):
            self._set_page_limit(self._limits.hard_pages)
            try:
                self._ensure_wal_room()
                with self._transaction():
                    before = db.total_changes
                    if contiguous:
                        db.execute(f"DELETE FROM {table} WHERE seq BETWEEN ? AND ?", (chunk[0], chunk[-1]))
                    else:
                        db.executemany(f"DELETE FROM {table} WHERE seq = ?", [(seq,) for seq in chunk])
                    deleted += db.total_changes - before
                    self._write_meta_next_seq()
            finally:
                self._set_page_limit(self._limits.soft_pages)
            self._after_write()
        self._counts[table] -= deleted
        return deleted

    def _chunks(self, rows: Iterable[tuple[int, int]]) -> Iterator[tuple[list[int], int]]:
        """Split (seq, body size) rows into chunks of at most txn_bytes of bodies each."""
        chunk: list[int] = []
        size = 0
        for seq, length in rows:
            if chunk and size + length > self._limits.txn_bytes:
                yield chunk, size
                chunk, size = [], 0
            chunk.append(int(seq))
            size += int(length)
        if chunk:
            yield chunk, size

    def _ensure_wal_room(self) -> None:
        if self._wal_size() > self._limits.checkpoint_at:
            self._checkpoint()
            if self._wal_size() > self._limits.checkpoint_at:
                raise BufferBusyError(
                    f"summary buffer {self.path!r}: the WAL cannot be checkpointed because another connection "
                    "holds a read transaction; close other programs that have the buffer open"
                )

    def _after_write(self) -> None:
        if self._wal_size() > self._limits.checkpoint_at:
            self._checkpoint()

    def _checkpoint(self) -> None:
        busy, _, _ = self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            now = time.monotonic()
            if now - self._checkpoint_warned_at >= EVICTION_LOG_INTERVAL_S:
                log.warning(
                    "summary buffer %s: WAL checkpoint blocked by another connection; the WAL is %d bytes",
                    self.path,
                    self._wal_size(),
                )
                self._checkpoint_warned_at = now

    def _set_page_limit(self, pages: int) -> None:
        # SQLite keeps the limit at the current page count when asked for less.
        self._connection().execute(f"PRAGMA max_page_count = {int(pages)}")

    def _refresh_counts(self) -> None:
        db = self._connection()
        for table in self._counts:
            self._counts[table] = int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def _max_seq(self) -> int:
        db = self._connection()
        return max(
            int(db.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {table}").fetchone()[0])
            for table in ("routine", "alarm", "quarantine")
        )

    def _read_meta_next_seq(self) -> int:
        row = self._connection().execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        return int(row[0]) if row else 1

    def _write_meta_next_seq(self) -> None:
        """Persist next_seq inside the caller's transaction, so a deleted top row is never handed out again."""
        if self._meta_next_seq >= self._next_seq:
            return
        self._connection().execute(
            "INSERT INTO meta (key, value) VALUES ('next_seq', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (self._next_seq,),
        )
        self._meta_next_seq = self._next_seq

    def _add_counter(self, name: str, amount: int) -> None:
        if amount:
            self._connection().execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, amount),
            )

    def _reserve_seqs(self, last: int) -> None:
        if last <= self._reserved_seq:
            return
        reserved = last + recovery.SEQ_RESERVE_BLOCK
        try:
            recovery.write_reserved_seq(self._path, reserved)
        except OSError as exc:
            # The meta table still protects the numbering; only recovery from a damaged file relies on this.
            log.error("summary buffer %s: cannot write the seq reservation file: %s", self.path, exc)
            return
        self._reserved_seq = reserved

    def _wal_size(self) -> int:
        return _file_size(Path(f"{self.path}-wal"))

    def _disk_usage(self) -> int:
        own = sum(_file_size(Path(f"{self.path}{suffix}")) for suffix in ("", "-wal", "-shm", ".seq"))
        return own + sum(recovery.copy_size(copy) for copy in recovery.corrupt_copies(self._path))


def _limits_for(budget: int, page_size: int) -> _Limits:
    """Split a byte budget between the main file, the WAL and the small files.

    The WAL is checkpointed (TRUNCATE) once it passes half of its share, and one
    transaction writes at most an eighth of the share in bodies. Measured deletes write
    about 1.6 bytes of WAL per byte of body and inserts about 1.3, plus a few pages of
    B-tree overhead, so the WAL stays below its share.
    """
    frame = page_size + 24
    wal_limit = min(max(budget // 16, 256 * 1024), 4 * 2**20)
    shm_bytes = 32 * 1024 * (1 + wal_limit // (frame * 4062))
    sidecar_bytes = 4096
    main = budget - wal_limit - shm_bytes - sidecar_bytes
    hard_pages = max(main // page_size, 32)
    return _Limits(
        wal_limit=wal_limit,
        checkpoint_at=wal_limit // 2,
        txn_bytes=wal_limit // 8,
        shm_bytes=shm_bytes,
        sidecar_bytes=sidecar_bytes,
        hard_pages=hard_pages,
        soft_pages=hard_pages - 16,
    )


def _within_bytes(rows: list[T], limit: int, size: Callable[[T], int]) -> list[T]:
    """Return the longest prefix of rows whose sizes add up to at most `limit`, and at least one row."""
    total = 0
    for index, row in enumerate(rows):
        total += size(row)
        if total > limit and index > 0:
            return rows[:index]
    return rows


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _has_alarms(body: bytes) -> bool:
    try:
        return bool(decode_summary(bytes(body))["alarms"])
    except SchemaError:
        return False


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
