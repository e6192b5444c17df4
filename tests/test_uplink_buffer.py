"""Tests of the summary buffer's disk budget, eviction, damage recovery and clock correction.

Every test uses real SQLite files in tmp_path; the week-long outage test also delivers over
real HTTP on 127.0.0.1. Clocks are the only stand-in: a gateway's clock cannot be stepped
from a test, so `ManualClock` plays the wall and monotonic clocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest
from aiohttp import web

from agent.uplink import recovery
from agent.uplink.buffer import (
    EVICTED_ALARM,
    EVICTED_QUARANTINED,
    EVICTED_ROUTINE,
    BufferBudgetError,
    SummaryBuffer,
)
from agent.uplink.clock import ClockMonitor, ClockStatus, SystemClock, read_boot_id, system_clock_status
from agent.uplink.collector import CollectorStore, create_app
from agent.uplink.push import Uploader
from agent.uplink.schema import SchemaError, decode_summary

MIB = 2**20
GATEWAY = "gw-buffer"


class ManualClock:
    """Wall and monotonic clocks moved by the test; wall = monotonic + offset."""

    def __init__(self, status: ClockStatus = ClockStatus.SYNCED, offset: float = 1_800_000_000.0, boot_id: str = "boot-a") -> None:
        self.state = status
        self.mono = 1000.0
        self.offset = offset
        self.boot_id = boot_id

    def status(self) -> ClockStatus:
        return self.state

    def wall(self) -> float:
        return self.mono + self.offset

    def monotonic(self) -> float:
        return self.mono


def summary(index: int = 0, *, alarm: bool = False, source: str = "chiller", padding: int = 0, clock: ManualClock | None = None) -> dict:
    t_end = clock.wall() if clock is not None else 1_800_000_000.0 + 10.0 * index
    features = {"index": index, "pressure": {"last": 4.2, "mean": 4.1, "n": 10}}
    if padding:
        features["padding"] = "x" * padding
    return {
        "v": 1,
        "gateway": GATEWAY,
        "source": source,
        "seq": 0,
        "kind": "points",
        "t_start": t_end - 10.0,
        "t_end": t_end,
        "duration_s": 10.0,
        "features": features,
        "quality": {"polls": 10},
        "alarms": [{"name": "high", "grade": "warning", "value": 2.0, "limit": 1.0, "message": "high"}] if alarm else [],
    }


def files_size(path: Path) -> int:
    """Bytes of every file the buffer owns on disk, measured independently of the buffer."""
    names = [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm", ".seq")]
    names += [p for p in path.parent.glob(f"{path.name}.corrupt-*")]
    return sum(p.stat().st_size for p in names if p.exists())


def indexes(buffer: SummaryBuffer, limit: int = 100_000) -> list[int]:
    return [decode_summary(body)["features"]["index"] for _, body in buffer.pending(limit)]


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "buffer.sqlite"


# --- budget and eviction ------------------------------------------------------------


def test_budget_rejects_tiny_value(path):
    with pytest.raises(ValueError, match="budget_bytes"):
        SummaryBuffer(path, budget_bytes=1000)


def test_eviction_takes_routine_first(path):
    with SummaryBuffer(path, budget_bytes=MIB, synchronous="NORMAL", clock=ManualClock()) as buffer:
        for i in range(3000):
            buffer.append(summary(i, alarm=i % 50 == 0, padding=300))
            assert files_size(path) <= MIB
        kept = indexes(buffer)
        counters = buffer.counters()
    alarm_indexes = list(range(0, 3000, 50))
    assert [i for i in kept if i % 50 == 0] == alarm_indexes
    routine_kept = [i for i in kept if i % 50]
    assert routine_kept == [i for i in range(routine_kept[0], 3000) if i % 50]
    assert counters[EVICTED_ROUTINE] == 3000 - len(kept)
    assert EVICTED_ALARM not in counters


def test_alarms_evicted_when_no_routine_left(path):
    with SummaryBuffer(path, budget_bytes=MIB, synchronous="NORMAL", clock=ManualClock()) as buffer:
        for i in range(2500):
            buffer.append(summary(i, alarm=True, padding=300))
            assert files_size(path) <= MIB
        kept = indexes(buffer)
        counters = buffer.counters()
    assert kept == list(range(kept[0], 2500))
    assert counters[EVICTED_ALARM] == kept[0]
    assert EVICTED_ROUTINE not in counters


def test_quarantine_evicted_first(path):
    with SummaryBuffer(path, budget_bytes=MIB, synchronous="NORMAL", clock=ManualClock()) as buffer:
        seqs = [buffer.append(summary(i, padding=300))[0] for i in range(20)]
        buffer.quarantine(seqs[:5], status=400, reason="bad")
        routine_before = buffer.depth()
        for i in range(20, 40):
            buffer.append(summary(i, padding=300))
        # Fill until the first eviction.
        i = 40
        while not buffer.counters().get(EVICTED_QUARANTINED) and i < 5000:
            buffer.append(summary(i, padding=300))
            i += 1
        counters = buffer.counters()
        remaining_quarantine = len(buffer.quarantined())
    assert routine_before == 15
    assert counters[EVICTED_QUARANTINED] >= 1
    assert remaining_quarantine == 5 - counters[EVICTED_QUARANTINED]
    assert counters.get(EVICTED_ROUTINE, 0) == 0 or remaining_quarantine == 0


def test_eviction_counters_persist(path):
    with SummaryBuffer(path, budget_bytes=MIB, synchronous="NORMAL", clock=ManualClock()) as buffer:
        for i in range(2500):
            buffer.append(summary(i, padding=300))
        before = buffer.counters()
    with SummaryBuffer(path, budget_bytes=MIB, clock=ManualClock()) as buffer:
        after = buffer.counters()
    assert before[EVICTED_ROUTINE] > 0
    assert after == before


def test_summary_larger_than_transaction_rejected(path):
    with SummaryBuffer(path, budget_bytes=MIB, clock=ManualClock()) as buffer:
        with pytest.raises(ValueError, match="raise budget_bytes"):
            buffer.append(summary(0, padding=200_000))
        assert buffer.depth() == 0
        assert buffer.next_seq == 1


def test_budget_lowered_shrinks_files(path):
    with SummaryBuffer(path, budget_bytes=8 * MIB, synchronous="NORMAL", clock=ManualClock()) as buffer:
        for i in range(0, 4000, 20):
            buffer.append_many([summary(j, padding=300) for j in range(i, i + 20)])
    assert files_size(path) > 2 * MIB
    with SummaryBuffer(path, budget_bytes=2 * MIB, clock=ManualClock()) as buffer:
        size_open = files_size(path)
        kept = indexes(buffer)
        buffer.append(summary(4000))
        size_after_append = files_size(path)
    assert size_open <= 2 * MIB
    assert size_after_append <= 2 * MIB
    assert kept == list(range(kept[0], 4000))


def test_file_system_full_is_not_eviction(path, monkeypatch):
    # A buffer far below its page limit that gets SQLITE_FULL must report the device, not evict.
    with SummaryBuffer(path, budget_bytes=64 * MIB, clock=ManualClock()) as buffer:
        buffer.append(summary(0))
        monkeypatch.setattr(buffer, "_set_page_limit", lambda pages: None)
        buffer._connection().execute("PRAGMA max_page_count = 1")
        with pytest.raises(sqlite3.OperationalError, match="file system is full"):
            buffer.append(summary(1, padding=20_000))
        assert buffer.depth() == 1
        assert buffer.counters() == {}


def test_full_of_other_data_raises(path):
    # Pages taken by a table the buffer does not know cannot be evicted.
    with SummaryBuffer(path, budget_bytes=MIB, clock=ManualClock()) as buffer:
        db = buffer._connection()
        db.execute("CREATE TABLE filler (data BLOB)")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            for _ in range(1000):
                db.execute("INSERT INTO filler VALUES (zeroblob(3000))")
        with pytest.raises(BufferBudgetError, match="does not fit"):
            buffer.append(summary(0, padding=10_000))
        assert files_size(path) <= MIB


# --- batching, order and release ----------------------------------------------------


def test_append_many_consecutive_seqs(path):
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        batch = [summary(i, source=f"s{i}") for i in range(3)]
        rows = buffer.append_many(batch)
        assert [seq for seq, _ in rows] == [1, 2, 3]
        assert [item["seq"] for item in batch] == [1, 2, 3]


def test_append_many_invalid_stores_nothing(path):
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        batch = [summary(0), summary(1), summary(2)]
        batch[1]["kind"] = "audio"
        with pytest.raises(SchemaError) as info:
            buffer.append_many(batch)
        assert info.value.index == 1
        assert buffer.depth() == 0
        assert buffer.append(summary(3))[0] == 1


def test_pending_merges_classes_by_seq(path):
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        for i in range(10):
            buffer.append(summary(i, alarm=i % 3 == 0))
        assert [seq for seq, _ in buffer.pending(100)] == list(range(1, 11))
        assert [seq for seq, _ in buffer.pending(3, after=4)] == [5, 6, 7]


def test_release_upto_repeatable(path):
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        for i in range(10):
            buffer.append(summary(i, alarm=i % 2 == 0))
        assert buffer.release_upto(6) == 6
        assert buffer.release_upto(6) == 0
        assert [seq for seq, _ in buffer.pending(100)] == [7, 8, 9, 10]


def test_seq_not_reused_after_release(path):
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        for i in range(5):
            buffer.append(summary(i))
        buffer.release_upto(5)
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        assert buffer.append(summary(5))[0] == 6


def test_requeue_gets_new_seq(path):
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        for i in range(4):
            buffer.append(summary(i))
        assert buffer.quarantine([2], status=422, reason="rejected") == 1
        assert [seq for seq, _ in buffer.pending(10)] == [1, 3, 4]
        assert buffer.requeue_quarantined() == 1
        rows = buffer.pending(10)
        assert [seq for seq, _ in rows] == [1, 3, 4, 5]
        assert decode_summary(rows[-1][1])["features"]["index"] == 1
        assert decode_summary(rows[-1][1])["seq"] == 5
        assert buffer.counters()["quarantined"] == 1


def test_legacy_layout_converted(path):
    legacy = summary(0, alarm=True)
    legacy["seq"] = 7
    from agent.uplink.schema import encode_summary

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(
            "CREATE TABLE summaries (seq INTEGER PRIMARY KEY, source TEXT NOT NULL, created REAL NOT NULL, body BLOB NOT NULL);"
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "INSERT INTO meta VALUES ('next_seq', 9);"
        )
        db.execute("INSERT INTO summaries VALUES (7, 'chiller', 1.0, ?)", (encode_summary(legacy),))
        db.commit()
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        assert [seq for seq, _ in buffer.pending(10)] == [7]
        assert buffer.stats().pending_alarm == 1
        assert buffer.append(summary(1))[0] == 9


# --- damaged files ------------------------------------------------------------------


def fill(path: Path, count: int = 200) -> int:
    """Append `count` summaries, release none; return the next seq."""
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        for start in range(0, count, 10):
            buffer.append_many([summary(i, padding=200) for i in range(start, start + 10)])
        return buffer.next_seq


def truncate_unaligned(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2 + 100)


def truncate_aligned(path: Path) -> None:
    os.truncate(path, (path.stat().st_size // 2) // 4096 * 4096)


def garbage_header(path: Path) -> None:
    with open(path, "r+b") as file:
        file.write(b"this is not an SQLite file at all")


def garbage_page(path: Path) -> None:
    with open(path, "r+b") as file:
        file.seek(4096 * 10)
        file.write(os.urandom(4096))


@pytest.mark.parametrize(
    "damage", [truncate_unaligned, truncate_aligned, garbage_header, garbage_page], ids=lambda f: f.__name__
)
def test_damaged_file_moved_aside(path, damage, caplog):
    next_seq = fill(path)
    damage(path)
    with caplog.at_level(logging.ERROR, logger="agent.uplink.buffer"):
        with SummaryBuffer(path, clock=ManualClock()) as buffer:
            seq, _ = buffer.append(summary(999))
            counters = buffer.counters()
    copies = recovery.corrupt_copies(path)
    assert len(copies) == 1
    assert re.fullmatch(r"buffer\.sqlite\.corrupt-\d{8}T\d{6}Z", copies[0].name)
    assert seq >= next_seq
    assert counters["corrupt_files"] == 1
    messages = [record.getMessage() for record in caplog.records]
    assert any("is damaged" in message and copies[0].name in message for message in messages)


def test_salvage_keeps_readable_rows(path):
    fill(path, 200)
    garbage_page(path)
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        kept = indexes(buffer)
        salvaged = buffer.counters()["salvaged"]
    assert salvaged == len(kept)
    assert 0 < len(kept) < 200
    assert kept[0] == 0
    assert kept[-1] == 199


def test_unreadable_meta_uses_sidecar(path):
    fill(path, 50)
    reserved = recovery.read_reserved_seq(path)
    garbage_header(path)
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        seq, _ = buffer.append(summary(0))
    assert reserved is not None
    assert seq == reserved + 1


def test_no_meta_no_sidecar_uses_time(path):
    fill(path, 50)
    recovery.sidecar_path(path).unlink()
    garbage_header(path)
    before = int(time.time() * 1_000_000)
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        seq, _ = buffer.append(summary(0))
    assert seq >= before


def test_deleted_file_continues_seq(path):
    next_seq = fill(path, 30)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with SummaryBuffer(path, clock=ManualClock()) as buffer:
        seq, _ = buffer.append(summary(0))
    assert seq > next_seq


def test_copies_kept_within_half_budget(path):
    for _ in range(3):
        fill(path, 300)
        garbage_header(path)
        with SummaryBuffer(path, budget_bytes=2 * MIB, clock=ManualClock()):
            pass
    copies_total = sum(recovery.copy_size(copy) for copy in recovery.corrupt_copies(path))
    assert copies_total <= MIB
    assert files_size(path) <= 2 * MIB


# --- week-long outage ---------------------------------------------------------------


def test_week_outage_keeps_budget_and_alarms(path, tmp_path):
    budget = 2 * MIB
    periods = 6 * 60 * 24 * 7  # one summary per source every 10 s for a week
    appended = {"routine": 0, "alarm": 0}
    alarm_periods = []
    peak = 0
    with SummaryBuffer(path, budget_bytes=budget, synchronous="NORMAL", clock=ManualClock()) as buffer:
        # The WAL is largest just before a checkpoint, inside a call, so sizes are also taken there.
        checkpoint = buffer._checkpoint
        sizes_at_checkpoint = []

        def measured_checkpoint() -> None:
            sizes_at_checkpoint.append(files_size(path))
            checkpoint()

        buffer._checkpoint = measured_checkpoint
        for start in range(0, periods, 10):
            batch = []
            for period in range(start, start + 10):
                for source in ("motor", "compressor", "power"):
                    alarm = source == "motor" and period % 240 == 0
                    item = summary(period, alarm=alarm, source=source)
                    batch.append(item)
                    appended["alarm" if alarm else "routine"] += 1
                    if alarm:
                        alarm_periods.append(period)
            buffer.append_many(batch)
            peak = max(peak, files_size(path))
        kept = buffer.pending(100_000)
        counters = buffer.counters()

        store = CollectorStore(tmp_path / "collector.sqlite")

        async def deliver() -> bool:
            runner = web.AppRunner(create_app(store), shutdown_timeout=1.0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/summaries"
            try:
                async with Uploader(buffer, url, gateway=GATEWAY, batch_size=500, timeout_s=5.0) as uploader:
                    return await uploader.drain(30.0)
            finally:
                await runner.cleanup()

        drained = asyncio.run(deliver())
        # The collector's rowid order is the order in which summaries arrived.
        with contextlib.closing(sqlite3.connect(tmp_path / "collector.sqlite")) as db:
            arrivals = [seq for (seq,) in db.execute("SELECT seq FROM summaries ORDER BY rowid")]
        delivered = store.summaries()
        store.close()

    assert peak <= budget
    assert peak > 0.8 * budget
    assert len(sizes_at_checkpoint) > 100
    assert max(sizes_at_checkpoint) <= budget
    assert counters[EVICTED_ROUTINE] == appended["routine"] - sum(1 for _, b in kept if not decode_summary(b)["alarms"])
    assert EVICTED_ALARM not in counters
    assert drained is True
    assert arrivals == [seq for seq, _ in kept]
    assert arrivals == sorted(arrivals)
    assert [s["features"]["index"] for s in delivered if s["alarms"]] == alarm_periods
    routine = [s["seq"] for s in delivered if not s["alarms"]]
    assert routine[-1] == periods * 3
    assert len(delivered) == len(kept)


# --- clock --------------------------------------------------------------------------


def test_system_clock_status_is_enum():
    assert isinstance(system_clock_status(), ClockStatus)


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").exists(), reason="needs Linux /proc")
def test_boot_id_is_uuid():
    assert re.fullmatch(r"[0-9a-f-]{36}", read_boot_id() or "")


def test_system_clock_has_boot_key():
    assert SystemClock().boot_id


def test_unsynced_summary_flagged(path):
    clock = ManualClock(ClockStatus.UNSYNCED)
    with SummaryBuffer(path, clock=clock) as buffer:
        item = summary(0, clock=clock)
        _, body = buffer.append(item)
    stored = decode_summary(body)
    assert stored["quality"]["clock_synced"] is False
    assert stored["quality"]["clock_correction_s"] == 0.0
    assert item["quality"]["clock_synced"] is False


def test_synced_summary_flagged(path):
    with SummaryBuffer(path, clock=ManualClock(ClockStatus.SYNCED)) as buffer:
        _, body = buffer.append(summary(0))
    assert decode_summary(body)["quality"] == {"polls": 10, "clock_synced": True}


def test_unknown_clock_leaves_quality(path):
    with SummaryBuffer(path, clock=ManualClock(ClockStatus.UNKNOWN)) as buffer:
        _, body = buffer.append(summary(0))
    assert decode_summary(body)["quality"] == {"polls": 10}


def test_sync_corrects_buffered_times(path):
    # Boot with the clock at 1970 + 1000 s; NTP later steps it to the real time.
    clock = ManualClock(ClockStatus.UNSYNCED, offset=0.0)
    real_offset = 1_800_000_000.0
    with SummaryBuffer(path, clock=clock) as buffer:
        monitor = ClockMonitor(buffer)
        originals = []
        for i in range(5):
            clock.mono += 10.0
            item = summary(i, clock=clock)
            buffer.append(item)
            originals.append((item["t_end"], clock.mono))
        assert monitor.check().corrected == 0
        clock.state = ClockStatus.SYNCED
        clock.offset = real_offset
        clock.mono += 5.0
        result = monitor.check()
        rows = [decode_summary(body) for _, body in buffer.pending(10)]
        again = monitor.check()
    assert result.corrected == 5
    assert result.step_s == pytest.approx(real_offset)
    assert again.corrected == 0
    assert [row["seq"] for row in rows] == [1, 2, 3, 4, 5]
    for row, (t_end, mono) in zip(rows, originals):
        assert row["t_end"] == pytest.approx(mono + real_offset)
        assert row["t_end"] - row["t_start"] == pytest.approx(10.0)
        assert row["quality"]["clock_synced"] is True
        assert row["quality"]["clock_correction_s"] == pytest.approx(real_offset)


def test_correction_skips_other_boot(path):
    with SummaryBuffer(path, clock=ManualClock(ClockStatus.UNSYNCED, boot_id="boot-a")) as buffer:
        buffer.append(summary(0))
    clock = ManualClock(ClockStatus.SYNCED, boot_id="boot-b")
    with SummaryBuffer(path, clock=clock) as buffer:
        corrected = ClockMonitor(buffer).check().corrected
        row = decode_summary(buffer.pending(1)[0][1])
    assert corrected == 0
    assert row["quality"]["clock_synced"] is False


def test_clock_steps_keep_seq_order(path):
    clock = ManualClock(ClockStatus.UNSYNCED, offset=5_000.0)
    with SummaryBuffer(path, clock=clock) as buffer:
        monitor = ClockMonitor(buffer)
        for i, offset in enumerate([5_000.0, -3_000.0, 90_000.0, 10.0]):
            clock.offset = offset
            clock.mono += 1.0
            buffer.append(summary(i, clock=clock))
            monitor.check()
        clock.state = ClockStatus.SYNCED
        clock.offset = 1_800_000_000.0
        monitor.check()
        rows = [decode_summary(body) for _, body in buffer.pending(10)]
    assert [row["features"]["index"] for row in rows] == [0, 1, 2, 3]
    assert [row["seq"] for row in rows] == [1, 2, 3, 4]
    t_ends = [row["t_end"] for row in rows]
    assert t_ends == sorted(t_ends)
    assert t_ends[-1] - t_ends[0] == pytest.approx(3.0)
