"""Tests of the uplink: schema codec, SQLite buffer, push uploader and collector.

Every test uses real parts: SQLite files in tmp_path and HTTP on 127.0.0.1 between an
httpx client and an aiohttp server bound to an ephemeral port.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import socket
import sqlite3

import httpx
import msgpack
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.uplink.buffer import SummaryBuffer
from agent.uplink.collector import CollectorStore, create_app, format_table, serve
from agent.uplink.push import UploadError, Uploader, idempotency_key
from agent.uplink.schema import (
    SUPPORTED_VERSIONS,
    SchemaError,
    decode_batch,
    decode_summary,
    encode_batch,
    encode_summary,
    validate_summary,
)

GATEWAY = "gw-test"
HEADERS = {"Content-Type": "application/msgpack"}


def make_summary(source: str = "accel-1", index: int = 0, seq: int = 1) -> dict:
    return {
        "v": 1,
        "gateway": GATEWAY,
        "source": source,
        "seq": seq,
        "kind": "vibration" if source.startswith("accel") else "points",
        "t_start": 1_700_000_000.0 + 60.0 * index,
        "t_end": 1_700_000_060.0 + 60.0 * index,
        "duration_s": 60.0,
        "features": {
            "rms_g": 0.0123 + index,
            "peak_hz": 49.5,
            "label": "pump",
            "running": True,
            "missing": None,
            "helium_pressure": {"last": 4.2, "min": 4.1, "max": 4.3, "mean": 4.2, "unit": "psi", "n": 60},
        },
        "quality": {"frames": 600, "bad_crc": 0, "missing_frames": 1, "clock_synced": True},
        "alarms": [{"name": "rms_high", "grade": "warning", "value": 0.9, "limit": 0.7, "message": "RMS above limit"}],
    }


def run(coro):
    """Run a coroutine on a fresh event loop, failing the test after 10 s."""
    return asyncio.run(asyncio.wait_for(coro, 10.0))


@contextlib.asynccontextmanager
async def collector_at(store: CollectorStore, port: int = 0, app: web.Application | None = None):
    """Serve the collector on 127.0.0.1 and yield its push URL."""
    runner = web.AppRunner(app or create_app(store), shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1/summaries"
    finally:
        await runner.cleanup()


def free_port() -> int:
    """Return a loopback port on which nothing listens (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def buffer(tmp_path):
    buf = SummaryBuffer(tmp_path / "buffer.db")
    yield buf
    buf.close()


@pytest.fixture
def store(tmp_path):
    collector_store = CollectorStore(tmp_path / "collector.db")
    yield collector_store
    collector_store.close()


def fast_uploader(buffer: SummaryBuffer, url: str, **kwargs) -> Uploader:
    options = {"gateway": GATEWAY, "timeout_s": 2.0, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}
    options.update(kwargs)
    return Uploader(buffer, url, **options)


# --- schema ---------------------------------------------------------------------------


def test_schema_round_trip():
    summary = make_summary()
    assert decode_summary(encode_summary(summary)) == summary


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_schema_round_trip_per_version(version):
    summary = make_summary()
    summary["v"] = version
    assert decode_summary(encode_summary(summary)) == summary


@pytest.mark.parametrize("version", [0, 2, 99])
def test_decoder_rejects_unknown_version(version):
    # A newer summary may carry fields this decoder does not know; the version error comes first.
    data = msgpack.packb({**make_summary(), "v": version, "new_field": 1})
    with pytest.raises(SchemaError, match="unsupported schema version") as info:
        decode_summary(data)
    assert info.value.field == "v"
    assert info.value.value == version
    assert "upgrade" in str(info.value)


def test_schema_clock_synced_must_be_bool():
    summary = make_summary()
    summary["quality"]["clock_synced"] = 1
    with pytest.raises(SchemaError) as info:
        validate_summary(summary)
    assert info.value.field == "quality.clock_synced"


def test_schema_clock_correction_is_float():
    summary = make_summary()
    summary["quality"]["clock_correction_s"] = 3
    decoded = decode_summary(encode_summary(summary))
    assert decoded["quality"]["clock_correction_s"] == 3.0
    assert isinstance(decoded["quality"]["clock_correction_s"], float)


def test_schema_int_time_becomes_float():
    summary = make_summary()
    summary["t_start"] = 1_700_000_000
    decoded = decode_summary(encode_summary(summary))
    assert isinstance(decoded["t_start"], float)


@pytest.mark.parametrize("field", ["v", "gateway", "seq", "features", "alarms"])
def test_schema_missing_field(field):
    summary = make_summary()
    del summary[field]
    with pytest.raises(SchemaError) as info:
        validate_summary(summary)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", "7"),
        ("seq", 0),
        ("seq", True),
        ("kind", "audio"),
        ("t_end", "yesterday"),
        ("quality", {"frames": "600"}),
        ("features", {"rms": [1, 2]}),
        ("v", 2),
    ],
)
def test_schema_wrong_type(field, value):
    summary = make_summary()
    summary[field] = value
    with pytest.raises(SchemaError) as info:
        validate_summary(summary)
    assert info.value.field.split(".")[0] == field


def test_schema_error_names_nested_field():
    summary = make_summary()
    summary["alarms"][0]["value"] = "high"
    with pytest.raises(SchemaError) as info:
        validate_summary(summary)
    assert info.value.field == "alarms[0].value"
    assert "'high'" in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_schema_rejects_non_finite(bad):
    summary = make_summary()
    summary["features"]["helium_pressure"]["mean"] = bad
    with pytest.raises(SchemaError) as info:
        validate_summary(summary)
    assert info.value.field == "features.helium_pressure.mean"


def test_schema_rejects_unknown_field():
    summary = make_summary()
    summary["t_stop"] = 1.0
    with pytest.raises(SchemaError) as info:
        validate_summary(summary)
    assert info.value.field == "t_stop"


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01", encode_summary(make_summary()) + b"\x00"])
def test_decode_bad_bytes(data):
    with pytest.raises(SchemaError):
        decode_summary(data)


def test_batch_split_keeps_bytes():
    bodies = [encode_summary(make_summary(seq=n)) for n in range(1, 21)]
    items = decode_batch(encode_batch(bodies))
    assert [body for _, body in items] == bodies
    assert [summary["seq"] for summary, _ in items] == list(range(1, 21))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
feature_maps = st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.one_of(scalars, st.dictionaries(st.text(min_size=1, max_size=10), scalars, max_size=4)),
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(features=feature_maps)
def test_schema_round_trip_any_features(features):
    summary = make_summary()
    summary["features"] = features
    assert decode_summary(encode_summary(summary)) == summary


# --- buffer ---------------------------------------------------------------------------


def test_buffer_seq_survives_reopen(tmp_path):
    path = tmp_path / "buffer.db"
    with SummaryBuffer(path) as buf:
        seqs = [buf.append(make_summary(index=i))[0] for i in range(3)]
        buf.release(seqs)
        assert buf.depth() == 0
    with SummaryBuffer(path) as buf:
        seq, _ = buf.append(make_summary())
    assert seqs == [1, 2, 3]
    assert seq == 4


def test_buffer_append_sets_seq(buffer):
    summary = make_summary(seq=999)
    seq, body = buffer.append(summary)
    assert summary["seq"] == seq == 1
    assert decode_summary(body) == summary


def test_buffer_invalid_append_uses_no_seq(buffer):
    bad = make_summary()
    bad["kind"] = "audio"
    with pytest.raises(SchemaError):
        buffer.append(bad)
    assert buffer.append(make_summary())[0] == 1
    assert buffer.depth() == 1


def test_buffer_pending_by_seq_not_time(buffer, tmp_path):
    for i in range(5):
        buffer.append(make_summary(index=i))
    # Make wall times run backwards, as after a clock step on a gateway without an RTC.
    with contextlib.closing(sqlite3.connect(tmp_path / "buffer.db")) as db:
        for table in ("routine", "alarm"):
            db.execute(f"UPDATE {table} SET created = 1000.0 - seq")
        db.commit()
    assert [seq for seq, _ in buffer.pending(10)] == [1, 2, 3, 4, 5]
    assert [seq for seq, _ in buffer.pending(2)] == [1, 2]
    assert buffer.oldest_created() == 999.0


def test_buffer_release_exact_rows(buffer):
    for i in range(5):
        buffer.append(make_summary(index=i))
    assert buffer.release([2, 4]) == 2
    assert [seq for seq, _ in buffer.pending(10)] == [1, 3, 5]
    assert buffer.depth() == 3


def test_buffer_wal_mode(buffer, tmp_path):
    with contextlib.closing(sqlite3.connect(tmp_path / "buffer.db")) as db:
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_buffer_rejects_synchronous_off(tmp_path):
    with pytest.raises(ValueError, match="OFF"):
        SummaryBuffer(tmp_path / "buffer.db", synchronous="OFF")


def test_buffer_missing_directory(tmp_path):
    path = tmp_path / "absent" / "buffer.db"
    with pytest.raises(sqlite3.OperationalError, match="directory exists"):
        SummaryBuffer(path)


def test_buffer_empty_oldest_is_none(buffer):
    assert buffer.oldest_created() is None


# --- uploader and collector -----------------------------------------------------------


def test_upload_delivers_everything_once(buffer, store):
    appended = []
    for i in range(250):
        summary = make_summary(source=f"accel-{i % 2}", index=i)
        buffer.append(summary)
        appended.append(summary)

    async def scenario():
        async with collector_at(store) as url, fast_uploader(buffer, url, batch_size=100) as uploader:
            sizes = [await uploader.upload_once() for _ in range(4)]
            return sizes, uploader.counters

    sizes, counters = run(scenario())
    assert sizes == [100, 100, 50, 0]
    assert buffer.depth() == 0
    assert store.summaries() == appended
    assert counters.batches_sent == 3
    assert counters.summaries_sent == 250
    assert counters.failures == 0


def test_upload_sends_idempotency_key(buffer, store):
    for i in range(3):
        buffer.append(make_summary(index=i))
    seen = []

    @web.middleware
    async def record_headers(request, handler):
        seen.append(request.headers.get("Idempotency-Key"))
        return await handler(request)

    app = create_app(store)
    app.middlewares.append(record_headers)

    async def scenario():
        async with collector_at(store, app=app) as url, fast_uploader(buffer, url) as uploader:
            await uploader.upload_once()

    run(scenario())
    assert seen == [idempotency_key(GATEWAY, 1, 3)]
    assert seen == [f"{GATEWAY}:1-3"]


def test_resent_batch_stored_once(buffer, store):
    bodies = [buffer.append(make_summary(index=i))[1] for i in range(5)]
    body = encode_batch(bodies)

    async def scenario():
        async with collector_at(store) as url, httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            first = await client.post(url, content=body, headers=HEADERS)
            second = await client.post(url, content=body, headers=HEADERS)
            return first, second

    first, second = run(scenario())
    assert first.status_code == 200
    assert first.json() == {"stored": 5, "duplicates": 0}
    assert second.status_code == 200
    assert second.json() == {"stored": 0, "duplicates": 5}
    assert store.count() == 5


def test_collector_down_then_drain(buffer, store):
    for i in range(30):
        buffer.append(make_summary(index=i))
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/summaries"

    async def scenario():
        async with fast_uploader(buffer, url, batch_size=8) as uploader:
            with pytest.raises(UploadError):
                await uploader.upload_once()
            depth_while_down = buffer.depth()
            async with collector_at(store, port=port):
                drained = await uploader.drain(5.0)
            return depth_while_down, drained, uploader.counters

    depth_while_down, drained, counters = run(scenario())
    assert depth_while_down == 30
    assert counters.failures == 1
    assert counters.last_error is not None
    assert drained is True
    assert buffer.depth() == 0
    assert [s["seq"] for s in store.summaries()] == list(range(1, 31))


def test_drain_gives_up_at_deadline(buffer):
    buffer.append(make_summary())
    url = f"http://127.0.0.1:{free_port()}/v1/summaries"

    async def scenario():
        async with fast_uploader(buffer, url) as uploader:
            return await uploader.drain(0.3)

    assert run(scenario()) is False
    assert buffer.depth() == 1


def test_upload_halves_batch_on_413(buffer, store):
    for i in range(10):
        buffer.append(make_summary(index=i))
    one_body = len(buffer.pending(1)[0][1])
    app = create_app(store, max_body_bytes=4 * one_body)

    async def scenario():
        async with collector_at(store, app=app) as url, fast_uploader(buffer, url, batch_size=10) as uploader:
            return await uploader.drain(5.0)

    assert run(scenario()) is True
    assert store.count() == 10


def test_run_uploads_after_notify(buffer, store):
    async def scenario():
        stop = asyncio.Event()
        async with collector_at(store) as url, fast_uploader(buffer, url, poll_interval_s=30.0) as uploader:
            task = asyncio.create_task(uploader.run(stop))
            await asyncio.sleep(0.05)
            for i in range(3):
                buffer.append(make_summary(index=i))
                uploader.notify()
            while store.count() < 3:
                await asyncio.sleep(0.01)
            stop.set()
            await task

    run(scenario())
    assert store.count() == 3
    assert buffer.depth() == 0


def test_run_backs_off_while_down(buffer):
    buffer.append(make_summary())
    url = f"http://127.0.0.1:{free_port()}/v1/summaries"

    async def scenario():
        stop = asyncio.Event()
        async with fast_uploader(buffer, url) as uploader:
            task = asyncio.create_task(uploader.run(stop))
            await asyncio.sleep(0.3)
            stop.set()
            await task
            return uploader.counters.failures

    failures = run(scenario())
    assert failures >= 2
    assert buffer.depth() == 1


def test_backoff_is_capped(buffer):
    uploader = Uploader(buffer, "http://127.0.0.1:1/", gateway=GATEWAY, backoff_initial_s=1.0, backoff_max_s=8.0)
    delays = [uploader.backoff_delay(n) for n in (1, 2, 3, 10, 1000)]
    assert 0.5 <= delays[0] <= 1.0
    assert 1.0 <= delays[1] <= 2.0
    assert all(4.0 <= d <= 8.0 for d in delays[3:])


@pytest.mark.parametrize("url", ["ftp://host/x", "not a url", "", 42])
def test_uploader_rejects_bad_url(buffer, url):
    with pytest.raises(ValueError, match="collector URL"):
        Uploader(buffer, url, gateway=GATEWAY)


def test_uploader_rejects_bad_gateway(buffer):
    with pytest.raises(ValueError, match="gateway"):
        Uploader(buffer, "http://127.0.0.1:1/", gateway="gw\n1")


def invalid_batch() -> bytes:
    bad = make_summary(seq=2)
    bad["duration_s"] = "long"
    return encode_batch([encode_summary(make_summary(seq=1)), msgpack.packb(bad)])


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"\xc1garbage", "application/msgpack", 400),
        (msgpack.packb({"not": "an array"}), "application/msgpack", 400),
        (encode_batch([encode_summary(make_summary())]) + b"\x01", "application/msgpack", 400),
        (encode_batch([encode_summary(make_summary())]), "application/json", 415),
        (invalid_batch(), "application/msgpack", 400),
    ],
    ids=["garbage", "map", "trailing", "content-type", "invalid-item"],
)
def test_collector_rejects_malformed(store, body, content_type, status):
    async def scenario():
        async with collector_at(store) as url, httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            return await client.post(url, content=body, headers={"Content-Type": content_type})

    response = run(scenario())
    assert response.status_code == status
    assert "error" in response.json()
    assert store.count() == 0


def test_collector_error_names_item(store):
    async def scenario():
        async with collector_at(store) as url, httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            return await client.post(url, content=invalid_batch(), headers=HEADERS)

    payload = run(scenario()).json()
    assert payload["index"] == 1
    assert payload["field"] == "duration_s"


def test_collector_health(store):
    async def scenario():
        async with collector_at(store) as url, httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            return await client.get(url.replace("/v1/summaries", "/v1/health"))

    response = run(scenario())
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_serve_writes_port_file(tmp_path):
    port_file = tmp_path / "collector.port"

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(serve(tmp_path / "served.db", port_file=port_file, stop=stop))
        while not port_file.exists():
            await asyncio.sleep(0.01)
        port = int(port_file.read_text())
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            response = await client.get(f"http://127.0.0.1:{port}/v1/health")
        stop.set()
        await task
        return response.status_code

    assert run(scenario()) == 200
    assert not port_file.exists()


def test_format_table_counts_bytes(store):
    summaries = [make_summary(source="accel-1", index=i, seq=i + 1) for i in range(3)]
    summaries.append(make_summary(source="chiller", index=0, seq=4))
    bodies = [encode_summary(s) for s in summaries]
    assert store.insert_batch([validate_summary(s) for s in summaries], bodies) == (4, 0)

    text = format_table(store.table())
    lines = text.splitlines()
    accel_bytes = sum(len(b) for b in bodies[:3])
    assert lines[0].split()[:3] == ["gateway", "source", "count"]
    assert lines[1].split() == [GATEWAY, "accel-1", "3", "2023-11-14T22:13:20Z", "2023-11-14T22:16:20Z", str(accel_bytes)]
    assert lines[2].split()[1:3] == ["chiller", "1"]
    assert lines[2].split()[-1] == str(len(bodies[3]))


def test_format_table_empty():
    assert format_table([]) == "no summaries stored"


def test_store_filters_by_source(store):
    summaries = [make_summary(source=name, seq=n) for n, name in enumerate(["accel-1", "chiller", "accel-1"], 1)]
    store.insert_batch(summaries, [encode_summary(s) for s in summaries])
    assert [s["seq"] for s in store.summaries(source="accel-1")] == [1, 3]
    assert store.summaries(gateway="other") == []


def test_make_summary_is_valid():
    summary = make_summary()
    assert validate_summary(copy.deepcopy(summary)) == summary
