"""Detector and KPI state kept beside the summary buffer, so a restart resumes it."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StateStore:
    """Small JSON documents by key in a SQLite file (WAL, synchronous NORMAL).

    The state is rewritten every summary period, so losing the last write on power loss
    costs one period of learning, never the buffer's summaries.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("state file %s is unreadable (%s); moved aside to %s, detectors start learning again",
                      self.path, exc, aside)
            self.path.rename(aside)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL)")
        db.execute("SELECT count(*) FROM state").fetchone()
        return db

    def load(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:
            log.error("state %r is not valid JSON; ignoring it", key)
            return None
        return value if isinstance(value, dict) else None

    def save(self, key: str, value: dict[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO state (key, value, updated) VALUES (?, ?, ?)",
                         (key, json.dumps(value, allow_nan=False), time.time()))

    def close(self) -> None:
        self._db.close()
