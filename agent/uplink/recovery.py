"""Checks and repairs for the summary buffer file: corruption, moved-aside copies, seq reservation.

A buffer file that fails the header check or SQLite's quick_check is renamed to
`<file>.corrupt-<UTC time>` and the buffer starts a new file. What can still be read from
the copy (rows, counters, the next seq) is carried into the new file by the buffer.

Sequence numbers must never repeat, because the collector stores each (gateway, seq)
once and would drop a new summary that reuses an old number. The buffer therefore
reserves numbers ahead in a sidecar file `<file>.seq`, written atomically (temporary file,
fsync, rename) before any seq above the previous reservation is committed. When the
buffer file is lost or unreadable, numbering resumes above the reservation. When the
sidecar is lost too, numbering starts from the wall clock in microseconds, which is above
every earlier seq unless the clock is behind the time those were handed out.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"
# Primary result codes that mean the file content is damaged, not that it is busy or unreadable.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
# Seqs reserved per sidecar write: at 3 summaries per 10 s, one write every 9 hours.
SEQ_RESERVE_BLOCK = 10_000
CORRUPT_MARKER = ".corrupt-"


def is_corruption(exc: sqlite3.Error) -> bool:
    """Return True if an SQLite error reports a damaged file (SQLITE_CORRUPT or SQLITE_NOTADB)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def check_header(path: Path) -> str | None:
    """Check the SQLite header and file size; return what is wrong, or None if it looks sound.

    A missing or empty file passes, because SQLite treats it as a new database.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    if size < 100:
        return f"the file is {size} bytes, shorter than the 100-byte SQLite header"
    with open(path, "rb") as file:
        header = file.read(100)
    if header[:16] != SQLITE_HEADER:
        return "the file does not start with the SQLite header string"
    page_size = int.from_bytes(header[16:18], "big")
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return f"the header gives an invalid page size {page_size}"
    if size % page_size:
        return f"the file size {size} is not a multiple of the page size {page_size}, so the file is truncated"
    # The page count in the header is valid when the "version-valid-for" field equals the
    # change counter. With frames in the WAL the file can lag the header during a checkpoint,
    # so the count is compared only when no WAL file has content.
    wal = Path(f"{path}-wal")
    wal_empty = not wal.exists() or wal.stat().st_size == 0
    if wal_empty and header[24:28] == header[92:96]:
        pages = int.from_bytes(header[28:32], "big")
        if pages * page_size > size:
            return f"the header counts {pages} pages but the file holds {size // page_size}, so the file is truncated"
    return None


def move_aside(path: Path) -> Path:
    """Rename a damaged buffer file and its WAL to `<file>.corrupt-<UTC time>`; delete its -shm.

    Returns the new path of the database file.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}{CORRUPT_MARKER}{stamp}")
    suffix = 1
    while target.exists():
        target = path.with_name(f"{path.name}{CORRUPT_MARKER}{stamp}-{suffix}")
        suffix += 1
    os.replace(path, target)
    wal = Path(f"{path}-wal")
    if wal.exists():
        os.replace(wal, Path(f"{target}-wal"))
    Path(f"{path}-shm").unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return target


def corrupt_copies(path: Path) -> list[Path]:
    """Return the moved-aside copies of a buffer file, oldest first (by modification time)."""
    copies = [
        candidate
        for candidate in path.parent.glob(f"{path.name}{CORRUPT_MARKER}*")
        if not candidate.name.endswith(("-wal", "-shm", "-journal"))
    ]
    return sorted(copies, key=lambda item: (item.stat().st_mtime, item.name))


def copy_size(copy: Path) -> int:
    """Return the bytes a moved-aside copy takes on disk, with its -wal and -shm files."""
    return sum(_size(Path(f"{copy}{suffix}")) for suffix in ("", "-wal", "-shm"))


def trim_copies(path: Path, max_bytes: int) -> int:
    """Delete the oldest moved-aside copies until they total at most `max_bytes`; return what is left."""
    copies = corrupt_copies(path)
    total = sum(copy_size(copy) for copy in copies)
    for copy in copies:
        if total <= max_bytes:
            break
        size = copy_size(copy)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
        total -= size
        log.warning(
            "deleted the damaged buffer copy %s (%d bytes) to keep copies within half of the disk budget (%d bytes)",
            copy,
            size,
            max_bytes,
        )
    return total


def sidecar_path(path: Path) -> Path:
    return Path(f"{path}.seq")


def read_reserved_seq(path: Path) -> int | None:
    """Return the highest reserved seq stored in the sidecar file, or None if it is missing or unreadable."""
    try:
        text = sidecar_path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        value = int(text)
    except ValueError:
        log.warning("ignoring the unreadable seq reservation file %s (content %r)", sidecar_path(path), text[:40])
        return None
    return value if value >= 0 else None


def write_reserved_seq(path: Path, value: int) -> None:
    """Store the highest reserved seq in the sidecar file durably (temporary file, fsync, rename)."""
    target = sidecar_path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="ascii") as file:
        file.write(f"{value}\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, target)
    _fsync_directory(target.parent)


def time_based_seq() -> int:
    """Return a starting seq from the wall clock in microseconds, for when no earlier number is known."""
    return int(time.time() * 1_000_000)


@dataclass
class Salvage:
    """Contents read back from a damaged buffer file."""

    next_seq: int | None = None
    counters: dict[str, int] = field(default_factory=dict)
    # (table, seq, created, body) with table "routine", "alarm" or "quarantine".
    rows: list[tuple[str, int, float, bytes]] = field(default_factory=list)
    quarantine_info: dict[int, tuple[int | None, str, float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def salvage(copy: Path) -> Salvage:
    """Read what is still readable from a damaged buffer file, opened read only.

    Each table is read by ascending seq until the first error and then by descending seq
    down to the last row read, so rows on both sides of one damaged page are kept.
    """
    result = Salvage()
    try:
        db = sqlite3.connect(f"file:{copy}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error as exc:
        result.errors.append(f"open: {exc}")
        return result
    try:
        tables = _read_or(db, "SELECT name FROM sqlite_master WHERE type = 'table'", result, [])
        names = {row[0] for row in tables}
        row = _read_or(db, "SELECT value FROM meta WHERE key = 'next_seq'", result, [])
        if row and isinstance(row[0][0], int):
            result.next_seq = row[0][0]
        if "counters" in names:
            for name, value in _read_or(db, "SELECT name, value FROM counters", result, []):
                if isinstance(name, str) and isinstance(value, int):
                    result.counters[name] = value
        for table in ("routine", "alarm", "quarantine", "summaries"):
            if table in names:
                for seq, created, body in _scan_both_ways(db, table, result):
                    target = "routine" if table == "summaries" else table
                    result.rows.append((target, seq, created, body))
        if "quarantine" in names:
            for seq, status, reason, when in _read_or(
                db, "SELECT seq, status, reason, quarantined FROM quarantine", result, []
            ):
                result.quarantine_info[seq] = (status, str(reason), float(when))
    finally:
        db.close()
    return result


def _scan_both_ways(db: sqlite3.Connection, table: str, result: Salvage) -> list[tuple[int, float, bytes]]:
    rows: dict[int, tuple[int, float, bytes]] = {}
    top = None
    for order in ("ASC", "DESC"):
        try:
            cursor = db.execute(f"SELECT seq, created, body FROM {table} ORDER BY seq {order}")
            for seq, created, body in cursor:
                if order == "DESC" and top is not None and seq <= top:
                    break
                if isinstance(seq, int) and isinstance(body, bytes):
                    created_value = float(created) if isinstance(created, (int, float)) else time.time()
                    rows[seq] = (seq, created_value, body)
                    if order == "ASC":
                        top = seq
        except sqlite3.Error as exc:
            result.errors.append(f"{table} {order}: {exc}")
    return sorted(rows.values())


def _read_or(db: sqlite3.Connection, query: str, result: Salvage, default: Any) -> Any:
    try:
        return db.execute(query).fetchall()
    except sqlite3.Error as exc:
        result.errors.append(f"{query.split(' FROM ')[-1].split()[0]}: {exc}")
        return default


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_directory(directory: Path) -> None:
    # Makes a rename durable on Linux file systems; not possible on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
