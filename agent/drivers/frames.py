"""Decoder for the binary waveform frames that vibration sensors stream over serial.

The layout is described in docs/protocols.md. In short, all fields are little-endian:

    sync A5 5A | version u8 | channels u8 | sequence u32 | sample rate u32 |
    samples per channel u16 | flags u16 | scale f32 | samples i16[S*C] | CRC-32 u32

The CRC is zlib.crc32 over everything after the sync and before the CRC itself.
This module only parses bytes: it does no I/O, so the serial reader and the tests feed it.
"""

from __future__ import annotations

import logging
import math
import struct
import time
import zlib

import numpy as np

from agent.drivers.base import Frame

logger = logging.getLogger(__name__)

SYNC = b"\xa5\x5a"
FORMAT_VERSION = 1
# Sync, then version, channels, sequence, sample rate, samples per channel, flags, scale.
_HEADER = struct.Struct("<2sBBIIHHf")
HEADER_SIZE = _HEADER.size  # 20 bytes
CRC_SIZE = 4
MAX_CHANNELS = 8
MAX_SAMPLES = 4096
MAX_SAMPLE_RATE_HZ = 1_000_000
FLAG_OVERFLOW = 0x0001
SEQUENCE_MODULUS = 2**32


def max_frame_size(max_samples: int = MAX_SAMPLES, max_channels: int = MAX_CHANNELS) -> int:
    """Return the size in bytes of the largest frame with these limits."""
    return HEADER_SIZE + 2 * max_samples * max_channels + CRC_SIZE


class FrameDecoder:
    """Incremental decoder that turns a byte stream into `Frame` objects.

    `feed()` accepts any slicing of the stream, from single bytes to many frames at once.
    The decoder searches for the sync bytes and rejects implausible headers before
    trusting their length. On a bad header or a CRC mismatch it skips one byte past that
    sync and searches again, so a good frame that starts inside garbage or inside a
    damaged frame is still found. Between calls it keeps less than one maximum-size frame
    of bytes.

    Counters are plain int attributes, and `counters` returns them as a dict:

    - frames: frames decoded.
    - bad_crc, bad_header: candidate frames rejected by the CRC or the header checks.
    - missing_frames: frames lost, from sequence gaps modulo 2**32.
    - restarts: sequence steps back, repeats or forward jumps over `max_sequence_gap`.
    - bytes_discarded: bytes that were not part of a good frame.
    - resyncs: times alignment was lost (one per run of discarded bytes).
    - overflow_frames: frames whose sender set the overflow/clipping flag.
    """

    def __init__(
        self,
        device: str,
        max_samples: int = MAX_SAMPLES,
        max_channels: int = MAX_CHANNELS,
        max_sequence_gap: int = 1_000_000,
    ) -> None:
        if not 1 <= max_samples <= MAX_SAMPLES:
            raise ValueError(
                f"invalid max_samples {max_samples!r}: the format allows 1..{MAX_SAMPLES}"
            )
        if not 1 <= max_channels <= MAX_CHANNELS:
            raise ValueError(
                f"invalid max_channels {max_channels!r}: the format allows 1..{MAX_CHANNELS}"
            )
        if not 1 <= max_sequence_gap < SEQUENCE_MODULUS // 2:
            raise ValueError(
                f"invalid max_sequence_gap {max_sequence_gap!r}: use 1..{SEQUENCE_MODULUS // 2 - 1}"
            )
        self.device = device
        self.max_samples = max_samples
        self.max_channels = max_channels
        # A forward jump larger than this (in frames) is taken as a sender restart. The
        # default is about 2.8 hours of frames at 100 frames per second.
        self.max_sequence_gap = max_sequence_gap
        self._buffer = bytearray()
        self._last_sequence: int | None = None
        self._aligned = True

        self.frames = 0
        self.bad_crc = 0
        self.bad_header = 0
        self.missing_frames = 0
        self.restarts = 0
        self.bytes_discarded = 0
        self.resyncs = 0
        self.overflow_frames = 0

    @property
    def counters(self) -> dict[str, int]:
        """Snapshot of the decoder counters."""
        return {
            "frames": self.frames,
            "bad_crc": self.bad_crc,
            "bad_header": self.bad_header,
            "missing_frames": self.missing_frames,
            "restarts": self.restarts,
            "bytes_discarded": self.bytes_discarded,
            "resyncs": self.resyncs,
            "overflow_frames": self.overflow_frames,
        }

    @property
    def buffered(self) -> int:
        """Number of bytes held back while waiting for the rest of a frame."""
        return len(self._buffer)

    def clear(self) -> None:
        """Drop buffered bytes (counted as discarded), for example after reopening a port.

        The last sequence number is kept, so frames lost while the port was closed are
        counted as missing.
        """
        if self._buffer:
            self._discard(len(self._buffer))
            self._buffer.clear()

    def feed(self, data: bytes, t_mono: float | None = None) -> list[Frame]:
        """Append `data` to the stream and return the frames it completes.

        `t_mono` is the monotonic receipt time stamped on every returned frame; it
        defaults to `time.monotonic()` at the call.
        """
        if t_mono is None:
            t_mono = time.monotonic()
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        start = 0
        while True:
            sync_at = buffer.find(SYNC, start)
            if sync_at < 0:
                # Keep a trailing first sync byte, because its partner may come next.
                keep_from = len(buffer) - 1 if buffer.endswith(SYNC[:1]) else len(buffer)
                keep_from = max(keep_from, start)
                self._discard(keep_from - start)
                start = keep_from
                break
            self._discard(sync_at - start)
            start = sync_at

            if len(buffer) - start < HEADER_SIZE:
                break
            _, version, channels, sequence, rate, samples, flags, scale = _HEADER.unpack_from(
                buffer, start
            )
            if not self._header_plausible(version, channels, rate, samples, scale):
                self.bad_header += 1
                self._discard(1)
                start += 1
                continue

            end = start + HEADER_SIZE + 2 * samples * channels + CRC_SIZE
            if len(buffer) < end:
                break
            (expected_crc,) = struct.unpack_from("<I", buffer, end - CRC_SIZE)
            with memoryview(buffer) as view:
                actual_crc = zlib.crc32(view[start + 2 : end - CRC_SIZE])
            if actual_crc != expected_crc:
                self.bad_crc += 1
                logger.debug(
                    "%s: CRC mismatch in frame %d (computed 0x%08X, received 0x%08X)",
                    self.device, sequence, actual_crc, expected_crc,
                )
                self._discard(1)
                start += 1
                continue

            block = _copy_samples(buffer, start + HEADER_SIZE, samples, channels)
            frames.append(Frame(self.device, sequence, float(rate), float(scale), block, t_mono))
            self._count_frame(sequence, flags)
            start = end

        del buffer[:start]
        return frames

    def _header_plausible(
        self, version: int, channels: int, rate: int, samples: int, scale: float
    ) -> bool:
        return (
            version == FORMAT_VERSION
            and 1 <= channels <= self.max_channels
            and 1 <= samples <= self.max_samples
            and 1 <= rate <= MAX_SAMPLE_RATE_HZ
            and math.isfinite(scale)
            and scale > 0.0
        )

    def _discard(self, count: int) -> None:
        if count <= 0:
            return
        self.bytes_discarded += count
        if self._aligned:
            self._aligned = False
            self.resyncs += 1

    def _count_frame(self, sequence: int, flags: int) -> None:
        self.frames += 1
        self._aligned = True
        if flags & FLAG_OVERFLOW:
            self.overflow_frames += 1
        last = self._last_sequence
        self._last_sequence = sequence
        if last is None:
            return
        step = (sequence - last) % SEQUENCE_MODULUS
        if step == 1:
            return
        if 1 < step <= self.max_sequence_gap + 1:
            self.missing_frames += step - 1
            return
        self.restarts += 1
        logger.info(
            "%s: sequence went from %d to %d; treating it as a sender restart",
            self.device, last, sequence,
        )


def _copy_samples(buffer: bytearray, offset: int, samples: int, channels: int) -> np.ndarray:
    """Copy interleaved little-endian int16 samples out of `buffer` as (samples, channels).

    The copy matters: a numpy view would pin the bytearray, which then cannot shrink.
    """
    view = np.frombuffer(buffer, dtype="<i2", count=samples * channels, offset=offset)
    return view.astype(np.int16).reshape(samples, channels)
