"""systemd service notifications (sd_notify) without libsystemd.

With `Type=notify` systemd passes NOTIFY_SOCKET, a Unix datagram socket (a path, or an
abstract name written with a leading "@"), and with `WatchdogSec=` it passes
WATCHDOG_USEC. The service sends newline-separated KEY=VALUE assignments to it.
Outside systemd (no NOTIFY_SOCKET) every call does nothing and returns False.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Send READY, STATUS, WATCHDOG, RELOADING and STOPPING to the service manager."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and (pid is None or pid == str(os.getpid())):
            try:
                value = int(usec)
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not an integer number of microseconds", usec)
            else:
                if value > 0:
                    self.watchdog_interval_s = value / 1e6
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send KEY=VALUE lines in one datagram; return False if not under systemd or on error."""
        if self.address is None:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.settimeout(1.0)
        try:
            self._socket.sendto("\n".join(assignments).encode("utf-8"), self.address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", "STATUS=reloading configuration")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
