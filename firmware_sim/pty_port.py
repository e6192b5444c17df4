"""Pseudo-terminals that stand in for serial ports, and their stable link names."""

from __future__ import annotations

import os
import termios
import tty


def open_raw_pty() -> tuple[int, int, str]:
    """Open a pty pair in raw mode; return (master fd, slave fd, slave path).

    Raw mode keeps the line discipline from translating or echoing any byte, and the
    master is non-blocking so a full pty buffer never stalls the simulator.
    """
    master, slave = os.openpty()
    try:
        tty.setraw(slave, termios.TCSANOW)
        os.set_blocking(master, False)
        path = os.ttyname(slave)
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    return master, slave, path


def point_link(link: str, path: str) -> None:
    """Point the symlink `link` at `path` in one step, as udev does for a
    /dev/serial/by-id name when a USB adapter is plugged in."""
    temporary = f"{link}.{os.getpid()}.tmp"
    if os.path.lexists(temporary):
        os.unlink(temporary)
    os.symlink(path, temporary)
    os.replace(temporary, link)
