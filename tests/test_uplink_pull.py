"""Tests of the pull API on the agent side and the collector's poller, list and export.

Real parts throughout: SQLite buffers and collector stores in tmp_path, aiohttp servers
and httpx clients on 127.0.0.1 ephemeral ports.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json

import httpx
import msgpack
import pytest
from aiohttp import web

from agent.uplink.buffer import SummaryBuffer
from agent.uplink.collect import (
    CSV_BASE_COLUMNS,
    GatewayPoller,
    PollError,
    PollTarget,
    export_summaries,
    list_sources,
    poll_gateways,
)
from agent.uplink.collector import CollectorStore, create_app
from agent.uplink.pull import add_pull_routes, check_pull_binding, create_pull_app, start_pull_server
from agent.uplink.push import Uploader
from agent.uplink.schema import decode_batch

TOKEN = "pull-token-123"


def summary(index: int, gateway: str = "gw-a", source: str = "chiller", alarm: bool = False) -> dict:
    return {
        "v": 1,
        "gateway": gateway,
        "source": source,
        "seq": 0,
        "kind": "points",
        "t_start": 1_800_000_000.0 + 10 * index,
        "t_end": 1_800_000_010.0 + 10 * index,
        "duration_s": 10.0,
        "features": {"index": index, "pressure": {"last": 4.0 + index, "mean": 4.5, "n": 10}, "label": "pump"},
        "quality": {"polls": 10},
        "alarms": [{"name": "high", "grade": "warning", "value": 2.0, "limit": 1.0, "message": "high"}] if alarm else [],
    }


def run(coro, timeout_s: float = 15.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def buffer(tmp_path):
    buf = SummaryBuffer(tmp_path / "buffer.sqlite")
    yield buf
    buf.close()


@pytest.fixture
def store(tmp_path):
    collector_store = CollectorStore(tmp_path / "collector.sqlite")
    yield collector_store
    collector_store.close()


def fill(buffer: SummaryBuffer, count: int, **kwargs) -> None:
    for i in range(count):
        buffer.append(summary(i, **kwargs))


async def pull_base(buffer: SummaryBuffer, token: str | None = TOKEN) -> tuple[web.AppRunner, str]:
    runner, port = await start_pull_server(buffer, host="127.0.0.1", port=0, token=token)
    return runner, f"http://127.0.0.1:{port}"


# --- agent side -----------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, auth("wrong-token"), {"Authorization": TOKEN}], ids=["none", "wrong", "no-scheme"])
def test_pull_without_token_401(buffer, headers):
    fill(buffer, 3)

    async def scenario():
        runner, base = await pull_base(buffer)
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                get = await client.get(f"{base}/v1/summaries", headers=headers)
                ack = await client.post(f"{base}/v1/ack", json={"upto": 3}, headers=headers)
                status = await client.get(f"{base}/v1/status", headers=headers)
                return get, ack, status
        finally:
            await runner.cleanup()

    get, ack, status = run(scenario())
    assert get.status_code == 401
    assert get.headers["WWW-Authenticate"] == "Bearer"
    assert ack.status_code == 401
    assert status.status_code == 401
    assert buffer.depth() == 3


def test_pull_returns_seq_order(buffer):
    for i in range(10):
        buffer.append(summary(i, alarm=i % 4 == 0))

    async def scenario():
        runner, base = await pull_base(buffer)
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                first = await client.get(f"{base}/v1/summaries", params={"after": 0, "limit": 4}, headers=auth())
                rest = await client.get(f"{base}/v1/summaries", params={"after": 4}, headers=auth())
                empty = await client.get(f"{base}/v1/summaries", params={"after": 10}, headers=auth())
                return first, rest, empty
        finally:
            await runner.cleanup()

    first, rest, empty = run(scenario())
    assert first.headers["Content-Type"] == "application/msgpack"
    assert [item["seq"] for item, _ in decode_batch(first.content)] == [1, 2, 3, 4]
    assert first.headers["X-Last-Seq"] == "4"
    assert [item["seq"] for item, _ in decode_batch(rest.content)] == [5, 6, 7, 8, 9, 10]
    assert decode_batch(empty.content) == []
    assert empty.headers["X-Last-Seq"] == "10"
    assert empty.headers["X-Next-Seq"] == "11"


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_ack_releases_and_repeats(buffer, encoding):
    fill(buffer, 6)

    def body(upto: int) -> dict:
        if encoding == "json":
            return {"content": json.dumps({"upto": upto}), "headers": {**auth(), "Content-Type": "application/json"}}
        return {"content": msgpack.packb({"upto": upto}), "headers": {**auth(), "Content-Type": "application/msgpack"}}

    async def scenario():
        runner, base = await pull_base(buffer)
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                first = await client.post(f"{base}/v1/ack", **body(4))
                again = await client.post(f"{base}/v1/ack", **body(4))
                return first, again
        finally:
            await runner.cleanup()

    first, again = run(scenario())
    assert first.json() == {"upto": 4, "released": 4}
    assert again.json() == {"upto": 4, "released": 0}
    assert [seq for seq, _ in buffer.pending(10)] == [5, 6]


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/v1/summaries?after=-1", {}),
        ("GET", "/v1/summaries?limit=0", {}),
        ("GET", "/v1/summaries?limit=5000", {}),
        ("GET", "/v1/summaries?after=abc", {}),
        ("POST", "/v1/ack", {"json": {"upto": 99}}),
        ("POST", "/v1/ack", {"json": {"upto": "3"}}),
        ("POST", "/v1/ack", {"json": [3]}),
        ("POST", "/v1/ack", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/ack", {"content": b"upto=3", "headers": {"Content-Type": "text/plain"}}),
    ],
    ids=["negative-after", "zero-limit", "huge-limit", "text-after", "future-upto", "text-upto", "list", "bad-json", "text-plain"],
)
def test_pull_rejects_bad_request(buffer, method, path, kwargs):
    fill(buffer, 3)

    async def scenario():
        runner, base = await pull_base(buffer)
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                headers = {**auth(), **kwargs.pop("headers", {})}
                return await client.request(method, f"{base}{path}", headers=headers, **kwargs)
        finally:
            await runner.cleanup()

    response = run(scenario())
    assert response.status_code == 400
    assert "invalid" in response.json()["error"] or "unsupported" in response.json()["error"]
    assert buffer.depth() == 3


def test_status_reports_counts(buffer):
    fill(buffer, 3, alarm=True)

    async def scenario():
        runner, base = await pull_base(buffer)
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                return (await client.get(f"{base}/v1/status", headers=auth())).json()
        finally:
            await runner.cleanup()

    status = run(scenario())
    assert status["pending"] == 3
    assert status["pending_alarm"] == 3
    assert status["next_seq"] == 4


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "gateway.local"])
def test_public_bind_needs_token(host):
    with pytest.raises(ValueError, match="without a token"):
        check_pull_binding(host, None)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_bind_without_token(host):
    check_pull_binding(host, None)


def test_add_routes_rejects_public_without_token(buffer):
    with pytest.raises(ValueError, match="token"):
        add_pull_routes(web.Application(), buffer, token=None, host="0.0.0.0")


def test_pull_mounted_as_subapp(buffer):
    fill(buffer, 2)

    async def scenario():
        app = web.Application()
        app.add_subapp("/uplink", create_pull_app(buffer, token=TOKEN))
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                base = f"http://127.0.0.1:{runner.addresses[0][1]}/uplink"
                return await client.get(f"{base}/v1/summaries", headers=auth())
        finally:
            await runner.cleanup()

    response = run(scenario())
    assert [item["seq"] for item, _ in decode_batch(response.content)] == [1, 2]


# --- collector poller -----------------------------------------------------------------


def test_poll_two_gateways_once_each(tmp_path, store):
    buffers = [SummaryBuffer(tmp_path / f"gw{n}.sqlite") for n in range(2)]
    for n, buf in enumerate(buffers):
        for i in range(120):
            buf.append(summary(i, gateway=f"gw-{n}", alarm=i % 10 == 0))

    async def scenario():
        servers = [await pull_base(buf) for buf in buffers]
        targets = [PollTarget(base, TOKEN) for _, base in servers]
        stop = asyncio.Event()
        task = asyncio.create_task(poll_gateways(store, targets, stop=stop, interval_s=0.05, limit=50))
        try:
            while store.count() < 240 or any(buf.depth() for buf in buffers):
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task
            for runner, _ in servers:
                await runner.cleanup()
        return targets

    targets = run(scenario())
    for buf in buffers:
        buf.close()
    assert store.count() == 240
    for n in range(2):
        assert [s["seq"] for s in store.summaries(gateway=f"gw-{n}")] == list(range(1, 121))
    assert [store.cursor(target.url) for target in targets] == [120, 120]


def test_lost_ack_repeated_no_duplicates(buffer, store):
    fill(buffer, 5)
    failures = {"ack": 1}

    @web.middleware
    async def drop_first_ack(request, handler):
        if request.path.endswith("/ack") and failures["ack"]:
            failures["ack"] -= 1
            return web.json_response({"error": "simulated"}, status=500)
        return await handler(request)

    async def scenario():
        app = web.Application(middlewares=[drop_first_ack])
        add_pull_routes(app, buffer, token=TOKEN)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        target = PollTarget(f"http://127.0.0.1:{runner.addresses[0][1]}", TOKEN)
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                poller = GatewayPoller(store, target, client, limit=10)
                with pytest.raises(PollError, match="500"):
                    await poller.poll_once()
                depth_after_lost_ack = buffer.depth()
                second = await poller.poll_once()
                return depth_after_lost_ack, second
        finally:
            await runner.cleanup()

    depth_after_lost_ack, second = run(scenario())
    assert depth_after_lost_ack == 5
    assert second == 0
    assert buffer.depth() == 0
    assert store.count() == 5


def test_invalid_pulled_item_kept_aside(buffer, store):
    fill(buffer, 3)
    # Damage the middle row's body as a buggy or newer gateway might serve it.
    bad = msgpack.packb({"v": 9, "seq": 2, "gateway": "gw-a"})
    buffer._connection().execute("UPDATE routine SET body = ? WHERE seq = 2", (bad,))

    async def scenario():
        runner, base = await pull_base(buffer)
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                return await GatewayPoller(store, PollTarget(base, TOKEN), client).poll_once()
        finally:
            await runner.cleanup()

    assert run(scenario()) == 3
    rejected = store.rejected()
    assert [row["seq"] for row in rejected] == [2]
    assert "unsupported schema version" in rejected[0]["error"]
    assert rejected[0]["body"] == bad
    assert [s["seq"] for s in store.summaries()] == [1, 3]
    assert buffer.depth() == 0


def test_poll_wrong_token_fails(buffer, store):
    fill(buffer, 2)

    async def scenario():
        runner, base = await pull_base(buffer)
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                with pytest.raises(PollError, match="401"):
                    await GatewayPoller(store, PollTarget(base, "nope"), client).poll_once()
        finally:
            await runner.cleanup()

    run(scenario())
    assert store.count() == 0
    assert buffer.depth() == 2


def test_push_and_pull_together(buffer, store):
    fill(buffer, 200)

    async def scenario():
        push_runner = web.AppRunner(create_app(store), shutdown_timeout=1.0)
        await push_runner.setup()
        await web.TCPSite(push_runner, "127.0.0.1", 0).start()
        push_url = f"http://127.0.0.1:{push_runner.addresses[0][1]}/v1/summaries"
        pull_runner, base = await pull_base(buffer)
        stop = asyncio.Event()
        try:
            async with Uploader(buffer, push_url, gateway="gw-a", batch_size=7, timeout_s=5.0) as uploader:
                poll = asyncio.create_task(
                    poll_gateways(store, [PollTarget(base, TOKEN)], stop=stop, interval_s=0.01, limit=9)
                )
                push = asyncio.create_task(uploader.run(stop))
                while buffer.depth():
                    await asyncio.sleep(0.01)
                stop.set()
                await asyncio.gather(poll, push)
        finally:
            await pull_runner.cleanup()
            await push_runner.cleanup()

    run(scenario())
    assert [s["seq"] for s in store.summaries()] == list(range(1, 201))


def test_poll_targets_validated(store):
    with pytest.raises(ValueError, match="gateway URL"):
        PollTarget("ftp://gateway")

    async def scenario():
        target = PollTarget("http://127.0.0.1:1")
        with pytest.raises(ValueError, match="repeat"):
            await poll_gateways(store, [target, target], stop=asyncio.Event())

    run(scenario())


# --- list and export ------------------------------------------------------------------


@pytest.fixture
def filled_store(store):
    from agent.uplink.schema import encode_summary, validate_summary

    items = []
    for i in range(6):
        item = summary(i, source="chiller" if i % 2 else "motor")
        item["seq"] = i + 1
        items.append(validate_summary(item))
    store.insert_batch(items, [encode_summary(item) for item in items])
    return store


def test_list_sources_counts(filled_store):
    rows = list_sources(filled_store)
    assert [(row["source"], row["count"]) for row in rows] == [("chiller", 3), ("motor", 3)]


def test_export_jsonl_selected(filled_store):
    out = io.StringIO()
    count = export_summaries(filled_store, out, fmt="jsonl", source="motor", features=["pressure.last", "absent"])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert count == 3
    assert [line["seq"] for line in lines] == [1, 3, 5]
    assert lines[0]["features"] == {"pressure.last": 4.0, "absent": None}


def test_export_csv_columns(filled_store):
    out = io.StringIO()
    count = export_summaries(filled_store, out, fmt="csv", since=1_800_000_020.0, until=1_800_000_050.0)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert count == 3
    assert rows[0] == [*CSV_BASE_COLUMNS, "index", "label", "pressure.last", "pressure.mean", "pressure.n"]
    assert [row[2] for row in rows[1:]] == ["2", "3", "4"]
    assert rows[1][len(CSV_BASE_COLUMNS):] == ["1", "pump", "5.0", "4.5", "10"]


def test_export_rejects_format(filled_store):
    with pytest.raises(ValueError, match="export format"):
        export_summaries(filled_store, io.StringIO(), fmt="xml")


def test_serve_polls_gateway(buffer, tmp_path):
    from agent.uplink.collector import serve

    fill(buffer, 12)
    db_path = tmp_path / "served.sqlite"

    async def scenario():
        runner, base = await pull_base(buffer)
        stop = asyncio.Event()
        task = asyncio.create_task(
            serve(db_path, port=0, stop=stop, poll=[PollTarget(base, TOKEN)], poll_interval_s=0.05)
        )
        try:
            while buffer.depth():
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task
            await runner.cleanup()

    run(scenario())
    served = CollectorStore(db_path)
    try:
        assert [s["seq"] for s in served.summaries()] == list(range(1, 13))
    finally:
        served.close()
