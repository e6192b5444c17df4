"""Serial reader for streaming vibration sensors.

Blocking pyserial reads run in a dedicated thread, so the asyncio loop never waits on the
port. Each decoded frame goes to `on_frame` from that thread; a service hands it to its
loop with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import serial

from agent.drivers.base import Frame
from agent.drivers.frames import FrameDecoder, max_frame_size

logger = logging.getLogger(__name__)

READ_CHUNK = 4096  # max bytes per read call


class SerialFrameReader:
    """Read frames from a serial port or pyserial URL and hand them to `on_frame`.

    `port` is a device path (/dev/ttyUSB0, /dev/pts/3) or any URL that
    `serial.serial_for_url` accepts. Every read waits at most `read_timeout_s`. When the
    port cannot be opened, vanishes or a read fails, the reader logs it once, closes the
    port and retries with exponential backoff from `reopen_backoff[0]` to
    `reopen_backoff[1]` seconds until the port is back. Frames carry the monotonic time
    at which their last byte was read.
    """

    def __init__(
        self,
        device: str,
        port: str,
        on_frame: Callable[[Frame], None],
        *,
        baudrate: int = 921600,
        read_timeout_s: float = 0.2,
        reopen_backoff: tuple[float, float] = (0.5, 10.0),
        max_samples: int = 4096,
        max_channels: int = 8,
    ) -> None:
        if not port:
            raise ValueError(f"invalid port {port!r} for {device}: give a device path or URL")
        if not 0 < read_timeout_s <= 10:
            raise ValueError(f"invalid read_timeout_s {read_timeout_s!r}: use 0 < t <= 10 seconds")
        first_delay, max_delay = reopen_backoff
        if not 0 < first_delay <= max_delay:
            raise ValueError(
                f"invalid reopen_backoff {reopen_backoff!r}: use (first, max) seconds, "
                f"0 < first <= max"
            )
        self.device = device
        self.port = port
        self.baudrate = baudrate
        self.read_timeout_s = read_timeout_s
        self.reopen_backoff = (float(first_delay), float(max_delay))
        self._on_frame = on_frame
        self._decoder = FrameDecoder(device, max_samples=max_samples, max_channels=max_channels)
        self._read_size = min(READ_CHUNK, max_frame_size(max_samples, max_channels))
        self._serial: serial.SerialBase | None = None
        # Guards closing against stop() cancelling a read, so the cancel never writes to
        # a closed (and possibly reused) descriptor.
        self._port_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        self.opens = 0
        self.reopens = 0
        self.open_failures = 0
        self.read_errors = 0
        self.callback_errors = 0

    @property
    def connected(self) -> bool:
        """True while the port is open."""
        return self._serial is not None

    @property
    def counters(self) -> dict[str, int]:
        """Snapshot of the decoder counters plus the port's reopens and errors."""
        counters = self._decoder.counters
        counters.update(
            reopens=self.reopens,
            read_errors=self.read_errors,
            open_failures=self.open_failures,
            callback_errors=self.callback_errors,
        )
        return counters

    def start(self) -> None:
        """Start the reader thread; it opens the port itself."""
        if self._thread is not None:
            raise RuntimeError(f"reader for {self.device} on {self.port} was already started")
        self._thread = threading.Thread(
            target=self._run, name=f"serial-frames {self.device}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> bool:
        """Stop the thread and close the port; return False if it did not exit in time.

        A blocked read returns within `read_timeout_s`, sooner where pyserial can cancel it.
        """
        self._stop.set()
        with self._port_lock:
            port = self._serial
            if port is not None and hasattr(port, "cancel_read"):
                try:
                    port.cancel_read()
                except (serial.SerialException, OSError, ValueError):
                    pass  # the read still ends at its timeout
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning(
                "%s: reader thread for %s did not stop within %.1f s",
                self.device, self.port, timeout_s,
            )
            return False
        return True

    def _run(self) -> None:
        delay = self.reopen_backoff[0]
        outage_logged = False
        try:
            while not self._stop.is_set():
                if self._serial is None:
                    try:
                        self._open()
                    except (serial.SerialException, OSError, ValueError) as error:
                        self.open_failures += 1
                        if not outage_logged:
                            logger.warning(
                                "%s: cannot open %s: %s; retrying with backoff up to %.1f s",
                                self.device, self.port, error, self.reopen_backoff[1],
                            )
                            outage_logged = True
                        self._stop.wait(delay)
                        delay = min(delay * 2, self.reopen_backoff[1])
                        continue
                    if outage_logged:
                        logger.info("%s: %s is back", self.device, self.port)
                    outage_logged = False
                    delay = self.reopen_backoff[0]

                try:
                    data = self._read()
                except (serial.SerialException, OSError) as error:
                    self.read_errors += 1
                    if not outage_logged:
                        logger.warning(
                            "%s: read from %s failed: %s; reopening", self.device, self.port, error
                        )
                        outage_logged = True
                    self._close()
                    self._stop.wait(delay)
                    continue
                if data:
                    self._deliver(self._decoder.feed(data, time.monotonic()))
        finally:
            self._close()

    def _open(self) -> None:
        port = serial.serial_for_url(
            self.port, baudrate=self.baudrate, timeout=self.read_timeout_s
        )
        if self.opens:
            self.reopens += 1
            # Bytes from before the outage cannot complete a frame any more.
            self._decoder.clear()
        self.opens += 1
        self._serial = port
        logger.info("%s: opened %s at %d baud", self.device, self.port, self.baudrate)

    def _read(self) -> bytes:
        port = self._serial
        assert port is not None
        # Wait (up to the timeout) for one byte, then take whatever else has arrived.
        waiting = port.in_waiting
        return port.read(min(max(waiting, 1), self._read_size))

    def _close(self) -> None:
        with self._port_lock:
            port, self._serial = self._serial, None
            if port is not None:
                try:
                    port.close()
                except (serial.SerialException, OSError) as error:
                    logger.debug("%s: closing %s failed: %s", self.device, self.port, error)

    def _deliver(self, frames: list[Frame]) -> None:
        for frame in frames:
            try:
                self._on_frame(frame)
            except Exception:  # a faulty consumer must not stop the stream
                self.callback_errors += 1
                if self.callback_errors == 1 or self.callback_errors % 1000 == 0:
                    logger.exception(
                        "%s: on_frame failed (%d times so far)", self.device, self.callback_errors
                    )
