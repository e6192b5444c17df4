"""Vibration frame stream: encoder, decoder, pty sensor, serial reader and signal sources."""

from __future__ import annotations

import os
import select
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.signal

from agent.drivers.frames import FrameDecoder, max_frame_size
from agent.drivers.vibration_serial import SerialFrameReader
from firmware_sim.frame_stream import PtyVibrationSensor, encode_frame
from firmware_sim.vibration import SKF6205_ORDERS, Recording, SyntheticBearing

REPO = Path(__file__).resolve().parents[1]
CWRU = Path(__file__).resolve().parents[2] / "shared" / "data" / "cwru"

# The worked example of docs/protocols.md: sequence 1, 25600 Hz, 2 channels, 2 samples,
# scale 2**-10, samples (1, -1), (256, -32768).
EXAMPLE_HEX = (
    "a5 5a 01 02 01 00 00 00 00 64 00 00 02 00 00 00 "
    "00 00 80 3a 01 00 ff ff 00 01 00 80 e6 2f 9c 0f"
)


def make_frame(sequence: int, n_samples: int = 4, n_channels: int = 1, flags: int = 0) -> bytes:
    values = np.arange(n_samples * n_channels) + sequence % 1000
    samples = values.astype(np.int16).reshape(n_samples, n_channels)
    return encode_frame(sequence, 1000, 0.01, samples, flags)


def sequences(frames) -> list[int]:
    return [frame.sequence for frame in frames]


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# Encoder and decoder


def test_round_trip_random_frames():
    rng = np.random.default_rng(7)
    decoder = FrameDecoder("vib")
    for n_channels in range(1, 9):
        for n_samples in (1, 3, 256, 4096):
            samples = rng.integers(-32768, 32768, (n_samples, n_channels)).astype(np.int16)
            sequence = int(rng.integers(0, 2**32))
            rate = int(rng.integers(1, 1_000_001))
            scale = float(np.float32(rng.uniform(1e-6, 10)))
            frames = decoder.feed(encode_frame(sequence, rate, scale, samples))
            case = f"C={n_channels} S={n_samples}"
            assert len(frames) == 1, case
            assert np.array_equal(frames[0].samples, samples), case
            assert frames[0].samples.dtype == np.int16, case
            assert frames[0].sample_rate == rate, case
            assert frames[0].scale == scale, case
            assert frames[0].sequence == sequence, case
    assert decoder.bytes_discarded == 0


def test_worked_example_decodes():
    data = bytes.fromhex(EXAMPLE_HEX)
    frames = FrameDecoder("vib").feed(data, t_mono=12.5)
    assert len(data) == 32
    assert len(frames) == 1
    frame = frames[0]
    assert frame.sequence == 1
    assert frame.sample_rate == 25600
    assert frame.scale == 2**-10
    assert frame.samples.tolist() == [[1, -1], [256, -32768]]
    assert frame.t_mono == 12.5
    assert zlib.crc32(data[2:-4]) == 0x0F9C2FE6


def test_worked_example_encodes():
    samples = np.array([[1, -1], [256, -32768]], dtype=np.int16)
    assert encode_frame(1, 25600, 2**-10, samples) == bytes.fromhex(EXAMPLE_HEX)


def test_worked_example_in_docs():
    assert EXAMPLE_HEX in (REPO / "docs" / "protocols.md").read_text()


def test_crc_check_value():
    assert zlib.crc32(b"123456789") == 0xCBF43926


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"samples_int16": np.zeros((4, 1), dtype=np.float64)}, "dtype"),
        ({"samples_int16": np.zeros((0, 1), dtype=np.int16)}, "samples per channel"),
        ({"samples_int16": np.zeros((4, 9), dtype=np.int16)}, "channel count"),
        ({"sample_rate": 0}, "sample_rate"),
        ({"sample_rate": 1000.5}, "sample_rate"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": 0.0}, "scale"),
        ({"flags": 0x10000}, "flags"),
    ],
)
def test_encoder_rejects_bad_argument(kwargs, fragment):
    arguments = {
        "sequence": 0,
        "sample_rate": 1000,
        "scale": 0.01,
        "samples_int16": np.zeros((4, 1), dtype=np.int16),
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        encode_frame(**arguments)


def test_resync_garbage_before_between():
    rng = np.random.default_rng(1)
    garbage = rng.bytes(300).replace(b"\xa5", b"\x00")
    stream = garbage + make_frame(0) + garbage[:17] + make_frame(1) + b"\xa5" + make_frame(2)
    decoder = FrameDecoder("vib")
    frames = decoder.feed(stream)
    assert sequences(frames) == [0, 1, 2]
    assert decoder.bytes_discarded == 300 + 17 + 1
    assert decoder.resyncs == 3
    assert decoder.bad_crc == 0


def test_resync_frame_inside_truncated_frame():
    # Frame 1 is cut off after its header, so frame 2 starts inside frame 1's claimed length.
    truncated = make_frame(1, n_samples=64)[:30]
    stream = make_frame(0) + truncated + make_frame(2) + make_frame(3, n_samples=64)
    decoder = FrameDecoder("vib")
    frames = decoder.feed(stream)
    assert sequences(frames) == [0, 2, 3]
    assert decoder.bad_crc == 1
    assert decoder.missing_frames == 1


def test_resync_frame_inside_false_header():
    # A fake sync with a plausible header claims 4096 samples, which swallows real frames
    # until its CRC fails; the frames inside must still come out.
    fake = b"\xa5\x5a\x01\x01" + (7).to_bytes(4, "little") + (1000).to_bytes(4, "little")
    fake += (4096).to_bytes(2, "little") + b"\x00\x00" + np.float32(0.01).tobytes()
    real = b"".join(make_frame(n, n_samples=256) for n in range(20))
    decoder = FrameDecoder("vib")
    held_back = decoder.feed(fake + real[:5000])
    frames = decoder.feed(real[5000:])
    assert held_back == []
    assert sequences(frames) == list(range(20))
    assert decoder.bad_crc == 1


def test_resync_implausible_header():
    bad_version = bytearray(make_frame(0))
    bad_version[2] = 9
    decoder = FrameDecoder("vib")
    frames = decoder.feed(bytes(bad_version) + make_frame(1))
    assert sequences(frames) == [1]
    assert decoder.bad_header == 1
    assert decoder.bad_crc == 0


def test_flipped_byte_counts_bad_crc():
    damaged = bytearray(make_frame(1))
    damaged[22] ^= 0x01
    decoder = FrameDecoder("vib")
    frames = decoder.feed(make_frame(0) + bytes(damaged) + make_frame(2))
    assert sequences(frames) == [0, 2]
    assert decoder.bad_crc == 1
    assert decoder.missing_frames == 1


def test_tiny_feeds_decode():
    stream = b"\x01\xa5" + make_frame(0, n_samples=50, n_channels=3) + make_frame(1)
    decoder = FrameDecoder("vib")
    frames = []
    rng = np.random.default_rng(3)
    position = 0
    while position < len(stream):
        step = int(rng.integers(1, 4))
        frames += decoder.feed(stream[position : position + step])
        position += step
    assert sequences(frames) == [0, 1]
    assert frames[0].samples.shape == (50, 3)
    assert decoder.bytes_discarded == 2


def test_sequence_gap_counts_missing():
    decoder = FrameDecoder("vib")
    decoder.feed(make_frame(10) + make_frame(11) + make_frame(15))
    assert decoder.missing_frames == 3
    assert decoder.restarts == 0


def test_sequence_wrap_not_missing():
    decoder = FrameDecoder("vib")
    frames = decoder.feed(make_frame(2**32 - 2) + make_frame(2**32 - 1) + make_frame(0))
    assert sequences(frames) == [2**32 - 2, 2**32 - 1, 0]
    assert decoder.missing_frames == 0
    assert decoder.restarts == 0


def test_sequence_gap_across_wrap():
    decoder = FrameDecoder("vib")
    decoder.feed(make_frame(2**32 - 1) + make_frame(2))
    assert decoder.missing_frames == 2


def test_sequence_restart_not_missing():
    decoder = FrameDecoder("vib", max_sequence_gap=1000)
    decoder.feed(make_frame(500) + make_frame(3) + make_frame(4) + make_frame(90_000))
    assert decoder.missing_frames == 0
    assert decoder.restarts == 2


def test_overflow_flag_counted():
    decoder = FrameDecoder("vib")
    decoder.feed(make_frame(0, flags=1) + make_frame(1) + make_frame(2, flags=0x8001))
    assert decoder.overflow_frames == 2


def test_decoder_rejects_channels_over_limit():
    decoder = FrameDecoder("vib", max_channels=2)
    frames = decoder.feed(make_frame(0, n_channels=3) + make_frame(1, n_channels=2))
    assert sequences(frames) == [1]
    assert decoder.bad_header == 1


def test_decoder_buffer_bounded():
    rng = np.random.default_rng(5)
    decoder = FrameDecoder("vib")
    limit = max_frame_size()
    largest = 0
    for _ in range(200):
        decoder.feed(rng.bytes(4096))
        largest = max(largest, decoder.buffered)
    assert largest < limit
    frames = decoder.feed(b"\x00" * limit + make_frame(0))
    assert sequences(frames) == [0]


# Pseudo-terminal sensor and serial reader


def start_reader(port: str, frames: list, **kwargs) -> SerialFrameReader:
    kwargs.setdefault("read_timeout_s", 0.1)
    reader = SerialFrameReader("vib", port, frames.append, **kwargs)
    reader.start()
    assert wait_for(lambda: reader.connected, 2.0), f"reader did not open {port}"
    return reader


def test_pty_stream_matches_source():
    n_frames = 2000  # 20 s of signal, about 1 s at speed 20
    sensor = PtyVibrationSensor(SyntheticBearing(seed=11), speed=20, max_frames=n_frames)
    frames: list = []
    reader = start_reader(sensor.path, frames)
    try:
        sensor_started = time.monotonic()
        sensor.start()
        assert sensor.wait_finished(5.0)
        streaming_s = time.monotonic() - sensor_started
        assert wait_for(lambda: len(frames) >= n_frames, 2.0)
    finally:
        started = time.monotonic()
        stopped = reader.stop()
        stop_duration = time.monotonic() - started
        sensor.stop()
    assert stopped
    assert stop_duration < reader.read_timeout_s + 0.2
    assert streaming_s >= 0.99 * n_frames * sensor.frame_period_s
    assert sensor.frames_dropped == 0
    assert len(frames) == n_frames
    assert sequences(frames) == list(range(n_frames))
    assert reader.counters["bad_crc"] == 0
    assert reader.counters["bytes_discarded"] == 0
    assert all(b.t_mono >= a.t_mono for a, b in zip(frames, frames[1:]))

    reference = SyntheticBearing(seed=11).read(256 * n_frames)
    received = np.concatenate([frame.samples * frame.scale for frame in frames])
    assert received.shape == reference.shape
    assert np.max(np.abs(received - reference)) <= frames[0].scale


def test_pty_faults_counted():
    n_frames = 600
    sensor = PtyVibrationSensor(
        SyntheticBearing(seed=2),
        speed=20,
        corrupt_every=7,
        garbage_every=5,
        max_frames=n_frames,
        seed=4,
    )
    frames: list = []
    reader = start_reader(sensor.path, frames)
    try:
        sensor.start()
        assert sensor.wait_finished(5.0)
        expected = sensor.frames_sent - sensor.frames_corrupted
        assert wait_for(lambda: len(frames) >= expected, 2.0)
    finally:
        reader.stop()
        sensor.stop()
    counters = reader.counters
    assert sensor.frames_dropped == 0
    assert sensor.frames_corrupted == n_frames // 7
    assert counters["bad_crc"] == sensor.frames_corrupted
    assert len(frames) == n_frames - sensor.frames_corrupted
    assert counters["bytes_discarded"] >= sensor.garbage_bytes
    assert frames[-1].sequence == n_frames - 1


def test_pty_clipping_sets_flag():
    sensor = PtyVibrationSensor(
        SyntheticBearing(seed=3), speed=20, full_scale_g=0.05, max_frames=20
    )
    frames: list = []
    reader = start_reader(sensor.path, frames)
    try:
        sensor.start()
        assert sensor.wait_finished(2.0)
        assert wait_for(lambda: len(frames) >= 20, 2.0)
    finally:
        reader.stop()
        sensor.stop()
    assert sensor.frames_clipped == 20
    assert reader.counters["overflow_frames"] == 20
    assert max(int(np.abs(frame.samples).max()) for frame in frames) == 32767


def test_pty_slow_listener_drops_whole_frames():
    # Nobody drains the pty fast enough, so the sensor must drop frames, but every byte that
    # reaches the listener still belongs to a complete, valid frame.
    sensor = PtyVibrationSensor(SyntheticBearing(seed=6), speed=50, max_frames=1500)
    listener = os.open(sensor.path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    decoder = FrameDecoder("vib")
    frames: list = []
    try:
        sensor.start()
        finished = False
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 0.2:
            readable, _, _ = select.select([listener], [], [], 0.01)
            if readable:
                frames += decoder.feed(os.read(listener, 512))
                idle_since = time.monotonic()
                time.sleep(0.002)
            finished = finished or sensor.wait_finished(0)
            if not finished:
                idle_since = time.monotonic()
    finally:
        os.close(listener)
        sensor.stop()
    assert sensor.frames_dropped > 0
    assert sensor.frames_sent + sensor.frames_dropped == 1500
    assert decoder.bad_crc == 0
    assert decoder.bad_header == 0
    assert decoder.bytes_discarded == 0
    assert len(frames) == sensor.frames_sent
    assert decoder.missing_frames <= sensor.frames_dropped


def test_reader_reopens_after_port_vanishes(tmp_path):
    link = tmp_path / "ttyVIB0"
    first = PtyVibrationSensor(SyntheticBearing(seed=1), speed=5, full_scale_g=2.0)
    link.symlink_to(first.path)
    frames: list = []
    reader = start_reader(str(link), frames, read_timeout_s=0.05, reopen_backoff=(0.02, 0.1))
    second = None
    try:
        first.start()
        assert wait_for(lambda: len(frames) >= 3, 2.0)
        first.stop()
        assert wait_for(lambda: reader.counters["read_errors"] >= 1, 2.0)

        second = PtyVibrationSensor(SyntheticBearing(seed=2), speed=5, full_scale_g=4.0)
        replacement = tmp_path / "ttyVIB0.new"
        replacement.symlink_to(second.path)
        os.replace(replacement, link)
        second.start()
        scale_two = float(np.float32(4.0 / 32767))
        assert wait_for(lambda: any(f.scale == scale_two for f in frames[-3:]), 3.0)
    finally:
        stopped = reader.stop()
        if second is not None:
            second.stop()
    assert stopped
    assert reader.counters["reopens"] >= 1
    assert not reader.connected


def test_reader_missing_port_retries():
    frames: list = []
    reader = SerialFrameReader(
        "vib", "/nonexistent/ttyVIB9", frames.append, reopen_backoff=(0.02, 0.05)
    )
    reader.start()
    try:
        assert wait_for(lambda: reader.counters["open_failures"] >= 3, 2.0)
        assert not reader.connected
    finally:
        assert reader.stop(timeout_s=1.0)


def test_reader_survives_callback_error():
    sensor = PtyVibrationSensor(SyntheticBearing(seed=8), speed=20, max_frames=30)
    received: list = []
    lock = threading.Lock()

    def on_frame(frame):
        with lock:
            received.append(frame)
        if frame.sequence == 3:
            raise RuntimeError("consumer bug")

    reader = SerialFrameReader("vib", sensor.path, on_frame, read_timeout_s=0.1)
    reader.start()
    try:
        assert wait_for(lambda: reader.connected, 2.0)
        sensor.start()
        assert wait_for(lambda: len(received) >= 30, 3.0)
    finally:
        reader.stop()
        sensor.stop()
    assert reader.counters["callback_errors"] == 1


# Signal sources


def envelope_peak_hz(signal: np.ndarray, sample_rate: float, band=(2000.0, 5000.0)) -> float:
    """Return the strongest envelope-spectrum frequency between 20 and 500 Hz."""
    spectrum = np.fft.rfft(signal)
    freqs = np.fft.rfftfreq(signal.size, 1 / sample_rate)
    spectrum[(freqs < band[0]) | (freqs > band[1])] = 0
    band_passed = np.fft.irfft(spectrum, signal.size)
    envelope = np.abs(scipy.signal.hilbert(band_passed))
    envelope -= envelope.mean()
    envelope_spectrum = np.abs(np.fft.rfft(envelope * np.hanning(envelope.size)))
    window = (freqs >= 20) & (freqs <= 500)
    return float(freqs[window][np.argmax(envelope_spectrum[window])])


@pytest.mark.parametrize(
    ("fault", "order"),
    [
        ("inner", SKF6205_ORDERS["bpfi"]),
        ("outer", SKF6205_ORDERS["bpfo"]),
        ("ball", 2 * SKF6205_ORDERS["bsf"]),
    ],
)
def test_synthetic_envelope_peak(fault, order):
    source = SyntheticBearing(fault=fault, seed=21)
    signal = source.read(2 * source.sample_rate)[:, 0]  # 0.5 Hz resolution
    expected_hz = order * source.shaft_hz
    assert abs(envelope_peak_hz(signal, source.sample_rate) - expected_hz) <= 1.0


@pytest.mark.parametrize("fault", ["inner", "outer", "ball"])
def test_synthetic_level_realistic(fault):
    signal = SyntheticBearing(fault=fault, seed=4).read(25600)[:, 0]
    rms = float(np.sqrt(np.mean(signal**2)))
    assert 0.1 <= rms <= 0.5


def test_synthetic_peak_estimate_covers_signal():
    source = SyntheticBearing(fault="outer", seed=9)
    assert np.max(np.abs(source.read(10 * 25600))) < source.peak_g


def test_synthetic_block_split_invariant():
    whole = SyntheticBearing(seed=13).read(10_000)
    split_source = SyntheticBearing(seed=13)
    split = np.concatenate([split_source.read(n) for n in (1, 255, 4096, 5648)])
    assert np.array_equal(whole, split)


def test_synthetic_rejects_bad_fault():
    with pytest.raises(ValueError, match="fault"):
        SyntheticBearing(fault="cage")


@pytest.mark.skipif(not (CWRU / "105.mat").is_file(), reason="CWRU recordings not present")
def test_recording_reads_cwru_105():
    recording = Recording(CWRU / "105.mat")
    expected = scipy.io.loadmat(CWRU / "105.mat")["X105_DE_time"][:, 0]
    assert recording.sample_rate == 12000
    assert recording.rpm == 1797
    assert recording.variable == "X105_DE_time"
    assert np.array_equal(recording.read(1000)[:, 0], expected[:1000])


@pytest.mark.skipif(not (CWRU / "105.mat").is_file(), reason="CWRU recordings not present")
def test_recording_loops_at_end():
    recording = Recording(CWRU / "105.mat", channel="FE")
    length = recording.data.size
    recording.read(length - 5)
    tail = recording.read(10)[:, 0]
    assert np.array_equal(tail[:5], recording.data[-5:])
    assert np.array_equal(tail[5:], recording.data[:5])


def test_recording_picks_variable_by_number(tmp_path):
    path = tmp_path / "99.mat"
    scipy.io.savemat(
        path,
        {
            "X098_DE_time": np.ones((5, 1)),
            "X099_DE_time": np.arange(5.0).reshape(5, 1),
            "X099RPM": np.array([[1750]], dtype=np.uint16),
        },
    )
    recording = Recording(path, sample_rate=48000)
    assert recording.read(5)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert recording.shaft_hz == pytest.approx(1750 / 60)


def test_recording_unknown_rate_needs_override(tmp_path):
    path = tmp_path / "123.mat"
    scipy.io.savemat(path, {"X123_DE_time": np.zeros((5, 1))})
    with pytest.raises(ValueError, match="sample_rate="):
        Recording(path)


def test_recording_missing_variable(tmp_path):
    path = tmp_path / "130.mat"
    scipy.io.savemat(path, {"X999_DE_time": np.zeros((5, 1))})
    with pytest.raises(KeyError, match="X130_DE_time"):
        Recording(path)


def test_recording_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="105.mat"):
        Recording(tmp_path / "105.mat")


def test_recording_streams_over_pty(tmp_path):
    path = tmp_path / "7.mat"
    data = np.sin(np.arange(3000) / 10.0).reshape(-1, 1) * 0.3
    scipy.io.savemat(path, {"X007_DE_time": data})
    sensor = PtyVibrationSensor(
        Recording(path, sample_rate=12000), samples_per_frame=500, speed=20, max_frames=8
    )
    frames: list = []
    reader = start_reader(sensor.path, frames)
    try:
        sensor.start()
        assert wait_for(lambda: len(frames) >= 8, 2.0)
    finally:
        reader.stop()
        sensor.stop()
    received = np.concatenate([frame.samples[:, 0] * frame.scale for frame in frames])
    expected = np.concatenate([data[:, 0], data[:, 0]])[:4000]
    assert frames[0].sample_rate == 12000
    assert np.max(np.abs(received - expected)) <= frames[0].scale
