"""Simulated streaming accelerometer: frame encoder and a pseudo-terminal that carries it.

The wire format is the vibration frame of docs/protocols.md. This encoder is written from
that description alone and shares no code with the agent's decoder.
"""

from __future__ import annotations

import logging
import math
import os
import select
import struct
import threading
import time
import zlib
from collections import deque
from typing import Protocol

import numpy as np

from .pty_port import open_raw_pty, point_link
from .scenario import Step

logger = logging.getLogger(__name__)

SYNC_BYTES = bytes((0xA5, 0x5A))
VERSION = 1
# Fields between the sync and the samples: version, channel count, sequence, sample rate,
# samples per channel, flags, scale.
HEADER_AFTER_SYNC = struct.Struct("<BBIIHHf")
HEADER_LENGTH = len(SYNC_BYTES) + HEADER_AFTER_SYNC.size  # 20 bytes
FLAG_CLIPPED = 1 << 0
INT16_FULL_SCALE = 32767
# Full scale is this many times the source's expected peak, so rare peaks do not clip.
DEFAULT_HEADROOM = 1.5
FAULT_KINDS = ("corrupt", "garbage", "drop", "port_removed")


class SampleSource(Protocol):
    """Signal source read by the sensor; see firmware_sim.vibration."""

    sample_rate: int
    n_channels: int

    def read(self, n: int) -> np.ndarray: ...


def encode_frame(
    sequence: int,
    sample_rate: int,
    scale: float,
    samples_int16: np.ndarray,
    flags: int = 0,
) -> bytes:
    """Encode one frame: `samples_int16` has shape (S, C) and dtype int16.

    `sequence` is reduced modulo 2**32. `scale` is sent as float32, so a receiver gets
    `float(np.float32(scale))`. Raises ValueError naming the bad argument.
    """
    samples = np.asarray(samples_int16)
    if samples.dtype != np.int16:
        raise ValueError(
            f"invalid sample dtype {samples.dtype}: quantise to int16 first "
            f"(np.rint(x / scale).astype(np.int16))"
        )
    if samples.ndim == 1:
        samples = samples.reshape(-1, 1)
    if samples.ndim != 2:
        raise ValueError(f"invalid sample shape {samples.shape}: use (samples, channels)")
    n_samples, n_channels = samples.shape
    if not 1 <= n_samples <= 4096:
        raise ValueError(f"invalid samples per channel {n_samples}: the format allows 1..4096")
    if not 1 <= n_channels <= 8:
        raise ValueError(f"invalid channel count {n_channels}: the format allows 1..8")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise ValueError(f"invalid sample_rate {sample_rate!r}: use an integer in Hz")
    if not 1 <= sample_rate <= 1_000_000:
        raise ValueError(f"invalid sample_rate {sample_rate}: the format allows 1..1000000 Hz")
    scale32 = float(np.float32(scale))
    if not (math.isfinite(scale32) and scale32 > 0):
        raise ValueError(f"invalid scale {scale!r}: use a finite positive float32 value")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"invalid flags {flags!r}: use a 16-bit value")

    header = HEADER_AFTER_SYNC.pack(
        VERSION,
        n_channels,
        int(sequence) % 2**32,
        int(sample_rate),
        n_samples,
        flags,
        scale32,
    )
    # Row-major (S, C) order is the interleaving the format requires: s0c0, s0c1, ...
    body = header + np.ascontiguousarray(samples, dtype="<i2").tobytes()
    return SYNC_BYTES + body + zlib.crc32(body).to_bytes(4, "little")


class PtyVibrationSensor:
    """Accelerometer that streams frames into a pseudo-terminal at a real-time pace.

    The agent opens `path` (the slave side) like a serial port. A background thread reads
    `samples_per_frame` samples from `source` per frame, quantises them to int16 with one
    fixed scale (`full_scale_g / 32767` g per count, sent as float32) and writes the frame
    to the master side without blocking. Samples beyond full scale are clipped and the
    frame's flag bit 0 is set.

    Frames are produced at the pace of the signal divided by `speed`, on the monotonic
    clock and without cumulative drift. Like a sensor's output FIFO, a transmit queue of
    `tx_queue_bytes` keeps frames that the pty does not accept at once, which absorbs
    short scheduling stalls on either side. A frame that does not fit is dropped whole
    and counted in `frames_dropped`, as a real sensor keeps sampling whether or not anyone
    listens. Frames are written in order and a partially written frame is always finished
    before the next one starts, so the stream never contains a truncated frame. The
    sensor keeps its own slave descriptor open, so the line does not hang up when the
    agent closes and reopens the port.

    Fault injection for tests: `corrupt_every=N` inverts one sample byte in every Nth
    frame (its CRC then fails); `garbage_every=N` writes 1 to 64 random bytes before every
    Nth frame. `seed` makes the injected faults repeatable. With `max_frames` the thread
    produces that many frames, finishes writing the last one and ends (see
    `wait_finished`); the pty stays open until `stop()`.
    """

    def __init__(
        self,
        source: SampleSource,
        samples_per_frame: int = 256,
        speed: float = 1.0,
        full_scale_g: float | None = None,
        *,
        corrupt_every: int = 0,
        garbage_every: int = 0,
        first_sequence: int = 0,
        max_frames: int | None = None,
        tx_queue_bytes: int = 65536,
        link: str | None = None,
        seed: int | None = None,
    ) -> None:
        if not 1 <= samples_per_frame <= 4096:
            raise ValueError(f"invalid samples_per_frame {samples_per_frame!r}: use 1..4096")
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"invalid speed {speed!r}: use a positive factor (1.0 = real time)")
        for name, value in (("corrupt_every", corrupt_every), ("garbage_every", garbage_every)):
            if value < 0:
                raise ValueError(f"invalid {name} {value!r}: use 0 (off) or a frame count")
        if tx_queue_bytes < 0:
            raise ValueError(f"invalid tx_queue_bytes {tx_queue_bytes!r}: use 0 or more bytes")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"invalid max_frames {max_frames!r}: use None (endless) or >= 1")
        if not 1 <= source.n_channels <= 8:
            raise ValueError(f"source has {source.n_channels} channels; the format allows 1..8")
        if full_scale_g is None:
            peak = getattr(source, "peak_g", None)
            if peak is None or not peak > 0:
                raise ValueError(
                    f"cannot choose a scale: source peak_g is {peak!r}; pass full_scale_g="
                )
            full_scale_g = DEFAULT_HEADROOM * peak
        if not (math.isfinite(full_scale_g) and full_scale_g > 0):
            raise ValueError(f"invalid full_scale_g {full_scale_g!r}: use a positive level in g")

        self.source = source
        self.samples_per_frame = samples_per_frame
        self.speed = float(speed)
        self.sample_rate = int(source.sample_rate)
        self.scale = float(np.float32(full_scale_g / INT16_FULL_SCALE))
        self.corrupt_every = corrupt_every
        self.garbage_every = garbage_every
        self.max_frames = max_frames
        self.tx_queue_bytes = tx_queue_bytes
        self.link = link
        # Scenario faults: kind -> (first, last) frame index during which it is active.
        self._faults: dict[str, tuple[int, int]] = {}
        self._fault_lock = threading.Lock()
        self._frame_index = 0
        self.frames_withheld = 0
        self.port_removals = 0
        self._resume_index = 0
        self._sequence = first_sequence % 2**32
        self._rng = np.random.default_rng(seed)

        self.frames_sent = 0
        self.frames_dropped = 0
        self.frames_clipped = 0
        self.frames_corrupted = 0
        self.garbage_bytes = 0
        self.write_errors = 0
        self.error: BaseException | None = None

        self._master = self._slave = -1
        self.path = ""
        self._open_pty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Frames waiting for the pty: the head (possibly partly written) and whole frames.
        self._pending = memoryview(b"")
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0

    def _open_pty(self) -> None:
        """Open a new pty pair and point `link` (if set) at its slave, as udev does for a
        stable /dev/serial/by-id name when a USB adapter is plugged in."""
        self._master, self._slave, self.path = open_raw_pty()
        if self.link:
            point_link(self.link, self.path)

    def _close_pty(self) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        self._pending = memoryview(b"")
        self._queue.clear()
        self._queued_bytes = 0

    def apply_step(self, step: Step) -> None:
        """Apply a scenario step: ramps and sets go to the signal source, faults to the line.

        Faults (`kind`, for `duration_s` simulated seconds): "corrupt" flips a byte in every
        frame, "garbage" writes random bytes before every frame, "drop" withholds frames
        (the receiver detects a sequence gap), "port_removed" closes the pty, as when a USB
        adapter is unplugged, and opens a new one afterwards (the `link` follows it).
        """
        if step.action in ("ramp", "set"):
            apply = getattr(self.source, "apply_step", None)
            if apply is None:
                raise ValueError(f"the {type(self.source).__name__} source has no quantities to change")
            apply(step)
            return
        if step.action != "fault":
            raise ValueError(f"the vibration sensor takes ramp, set and fault steps, not {step.action!r}")
        kind = step.param("kind", str)
        if kind not in FAULT_KINDS:
            raise ValueError(f"the vibration sensor has no fault {kind!r}; it has {', '.join(FAULT_KINDS)}")
        duration = float(step.param("duration_s"))
        frames = max(1, int(round(duration * self.sample_rate / self.samples_per_frame)))
        with self._fault_lock:
            first = self._frame_index
            self._faults[kind] = (first, first + frames - 1)

    def _active(self, kind: str, index: int) -> bool:
        with self._fault_lock:
            span = self._faults.get(kind)
        return span is not None and span[0] <= index <= span[1]

    @property
    def frame_period_s(self) -> float:
        """Wall-clock time between frames in seconds."""
        return self.samples_per_frame / self.sample_rate / self.speed

    def start(self) -> None:
        """Start the streaming thread."""
        if self._thread is not None:
            raise RuntimeError(f"sensor on {self.path} was already started")
        self._thread = threading.Thread(
            target=self._run, name=f"pty-sensor {self.path}", daemon=True
        )
        self._thread.start()
        logger.info(
            "streaming %d Hz x %d ch on %s at %.3gx real time, %.4g g per count",
            self.sample_rate, self.source.n_channels, self.path, self.speed, self.scale,
        )

    def wait_finished(self, timeout_s: float) -> bool:
        """Wait until the thread has produced `max_frames` frames; return True if it has."""
        if self._thread is None:
            return False
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread (waiting up to `timeout_s`) and close both pty descriptors.

        Closing the master makes reads on the slave fail, as when a USB sensor is unplugged.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("sensor thread on %s did not stop within %.1f s", self.path, timeout_s)
                return
        self._close_pty()
        logger.info(
            "stopped %s: %d frames sent, %d dropped", self.path, self.frames_sent, self.frames_dropped
        )

    def __enter__(self) -> PtyVibrationSensor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            self._stream()
        except Exception as error:  # the thread has no caller to raise to
            self.error = error
            logger.exception("sensor thread on %s failed", self.path)

    def _stream(self) -> None:
        period = self.frame_period_s
        t0 = time.monotonic()
        index = 0
        while not self._stop.is_set():
            if self.max_frames is not None and index >= self.max_frames:
                self._drain()
                return
            # Frame `index` covers samples up to the end of its window, so it is due then.
            due = t0 + (index + 1) * period
            if self._active("port_removed", index):
                if not self._remove_port(index, t0, period):
                    return
                index = self._resume_index
                continue
            if not self._wait_until(due):
                return
            self._frame_index = index
            frame = self._next_frame(index)
            if self._active("drop", index):
                self.frames_withheld += 1
            else:
                self._enqueue(frame)
            index += 1
            self._flush()

            lag = time.monotonic() - (t0 + index * period)
            if lag > 1.0:
                # The thread was starved; restart the schedule instead of bursting frames.
                logger.warning("sensor on %s fell %.1f s behind; resetting its clock", self.path, lag)
                t0 = time.monotonic() - index * period

    def _remove_port(self, index: int, t0: float, period: float) -> bool:
        """Close the pty for the fault's span of frames, then open a new one.

        The signal source keeps running (its samples for the span are generated and
        lost), so the sequence numbers after the gap show how much was missed.
        """
        with self._fault_lock:
            first, last = self._faults["port_removed"]
        self.port_removals += 1
        old = self.path
        self._close_pty()
        logger.info("port %s removed for %d frames", old, last - index + 1)
        for _ in range(index, last + 1):
            self.source.read(self.samples_per_frame)
            self._sequence = (self._sequence + 1) % 2**32
        if self._stop.wait(max(0.0, t0 + (last + 1) * period - time.monotonic())):
            return False
        self._open_pty()
        logger.info("port restored as %s%s", self.path, f" (link {self.link})" if self.link else "")
        with self._fault_lock:
            self._faults.pop("port_removed", None)
        # The caller continues with frame last + 1.
        self._resume_index = last + 1
        return True

    def _wait_until(self, due: float) -> bool:
        """Sleep until `due`, writing queued frames meanwhile; return False on stop."""
        while True:
            remaining = due - time.monotonic()
            if remaining <= 0:
                return not self._stop.is_set()
            if self._held_bytes():
                # Wake when the pty has room, but at least every 50 ms to notice a stop.
                _, writable, _ = select.select([], [self._master], [], min(remaining, 0.05))
                if writable:
                    self._flush()
                if self._stop.is_set():
                    return False
            elif self._stop.wait(remaining):
                return False

    def _drain(self) -> None:
        while self._held_bytes() and not self._stop.is_set():
            _, writable, _ = select.select([], [self._master], [], 0.05)
            if writable:
                self._flush()

    def _held_bytes(self) -> int:
        return len(self._pending) + self._queued_bytes

    def _enqueue(self, frame: bytes) -> None:
        """Queue `frame`, or drop it when the queue is not empty and the frame does not fit."""
        held = self._held_bytes()
        if held and held + len(frame) > self.tx_queue_bytes:
            self.frames_dropped += 1
            if self.frames_dropped in (1, 100, 10_000) or self.frames_dropped % 100_000 == 0:
                logger.warning("%s: the reader is too slow; %d frames dropped so far (lower --speed or "
                               "--vibration-speed if the agent should see them all)", self.path, self.frames_dropped)
            return
        self._queue.append(frame)
        self._queued_bytes += len(frame)

    def _flush(self) -> None:
        """Write queued frames until the pty stops accepting bytes."""
        while True:
            if not self._pending:
                if not self._queue:
                    return
                frame = self._queue.popleft()
                self._queued_bytes -= len(frame)
                self._pending = memoryview(frame)
            try:
                written = os.write(self._master, self._pending)
            except BlockingIOError:
                return
            except OSError as error:
                self.write_errors += 1
                if self.write_errors == 1 or self.write_errors % 1000 == 0:
                    logger.error(
                        "write to %s failed (%d times so far): %s; dropping the frame",
                        self.path, self.write_errors, error,
                    )
                self._pending = memoryview(b"")
                return
            self._pending = self._pending[written:]
            if self._pending:
                return
            self.frames_sent += 1

    def _next_frame(self, index: int) -> bytes:
        block = np.asarray(self.source.read(self.samples_per_frame), dtype=np.float64)
        block = block.reshape(self.samples_per_frame, self.source.n_channels)
        counts = np.rint(block / self.scale)
        flags = 0
        if np.any(np.abs(counts) > INT16_FULL_SCALE):
            flags |= FLAG_CLIPPED
            self.frames_clipped += 1
            counts = np.clip(counts, -INT16_FULL_SCALE, INT16_FULL_SCALE)
        frame = encode_frame(
            self._sequence, self.sample_rate, self.scale, counts.astype(np.int16), flags
        )
        self._sequence = (self._sequence + 1) % 2**32
        number = index + 1
        corrupt = self.corrupt_every and number % self.corrupt_every == 0
        if corrupt or self._active("corrupt", index):
            damaged = bytearray(frame)
            position = HEADER_LENGTH + int(self._rng.integers(0, len(frame) - HEADER_LENGTH - 4))
            damaged[position] ^= 0xFF
            frame = bytes(damaged)
            self.frames_corrupted += 1
        if self.garbage_every and number % self.garbage_every == 0 or self._active("garbage", index):
            garbage = self._rng.bytes(int(self._rng.integers(1, 65)))
            self.garbage_bytes += len(garbage)
            frame = garbage + frame
        return frame
