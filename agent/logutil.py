"""Logging helpers: one line per record, and rate-limited repeats."""

from __future__ import annotations

import logging
import sys
import time


class RateLimitedLog:
    """Log the first occurrence of each key at once, then at most one line per interval.

    The line after a quiet interval states how many repeats were suppressed, so no error
    goes uncounted.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)

    def clear(self, key: str) -> None:
        """Forget `key`, so its next occurrence is logged at once (call on recovery)."""
        self._last.pop(key, None)
        self._suppressed.pop(key, None)


def configure_logging(level: str = "INFO", stream=None) -> None:
    """Write one line per record, the form the systemd journal expects.

    Records go to stdout unless `stream` names another; commands that print data on
    stdout (`run --echo`) pass stderr so their output stays machine-readable.
    """
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=stream or sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; the uploader logs failures and recoveries itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
