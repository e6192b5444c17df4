"""Typed values that drivers hand to the service."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Reading:
    """One polled value of one device point.

    `quality` is "good" for a value decoded from a valid reply, "bad" otherwise.
    `t_mono` is `time.monotonic()` and `t_wall` is `time.time()` at the reply.
    """

    device: str
    point: str
    value: float | int | str
    unit: str
    quality: str
    t_mono: float
    t_wall: float


@dataclass(frozen=True, slots=True)
class Frame:
    """One block of waveform samples from a streaming sensor.

    `samples` has shape (n_samples, n_channels), dtype int16; multiply by `scale` to get
    engineering units (g for the accelerometer stream). `sequence` is the sender's frame
    counter, which wraps at 2**32. `t_mono` is the monotonic time the frame was received.
    """

    device: str
    sequence: int
    sample_rate: float
    scale: float
    samples: np.ndarray
    t_mono: float

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.samples.shape[1])
