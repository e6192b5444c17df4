"""Tests of the push uploader's handling of collector responses, tokens and TLS.

Real parts throughout: SQLite buffers in tmp_path, aiohttp servers on 127.0.0.1 ephemeral
ports, and TLS certificates made with the openssl command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import subprocess
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from aiohttp import web

from agent.uplink.auth import read_token_file, server_ssl_context
from agent.uplink.buffer import SummaryBuffer
from agent.uplink.collector import CollectorStore, create_app
from agent.uplink.push import UploadError, Uploader, parse_retry_after
from agent.uplink.schema import decode_batch

GATEWAY = "gw-push"
TOKEN = "s3cret-token-value"


def summary(index: int) -> dict:
    return {
        "v": 1,
        "gateway": GATEWAY,
        "source": "chiller",
        "seq": 0,
        "kind": "points",
        "t_start": 1_800_000_000.0 + 10 * index,
        "t_end": 1_800_000_010.0 + 10 * index,
        "duration_s": 10.0,
        "features": {"index": index},
        "quality": {"polls": 10},
        "alarms": [],
    }


def run(coro, timeout_s: float = 15.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@contextlib.asynccontextmanager
async def serve(app: web.Application, ssl_context: ssl.SSLContext | None = None):
    """Serve an application on 127.0.0.1 and yield its push URL."""
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    scheme = "https" if ssl_context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/v1/summaries"
    finally:
        await runner.cleanup()


Reply = tuple[int, dict, dict]  # status, JSON body, headers


def scripted_app(replies: list[Reply], seen: list | None = None, then: web.Application | None = None) -> web.Application:
    """Application that replies to pushes with `replies` in turn, then with `then`'s handler (or 200).

    `seen` collects (request, body, arrival time) of every push.
    """
    queue = list(replies)
    app = then if then is not None else web.Application()

    @web.middleware
    async def script(request, handler):
        body = await request.read()
        if seen is not None:
            seen.append((request, body, time.monotonic()))
        if queue:
            status, payload, headers = queue.pop(0)
            return web.json_response(payload, status=status, headers=headers)
        return await handler(request)

    async def accept(request):
        return web.json_response({"stored": 0, "duplicates": 0})

    app.middlewares.append(script)
    if then is None:
        app.router.add_post("/v1/summaries", accept)
    return app


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


def uploader(buffer: SummaryBuffer, url: str, **kwargs) -> Uploader:
    options = {"gateway": GATEWAY, "timeout_s": 3.0, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}
    options.update(kwargs)
    return Uploader(buffer, url, **options)


def fill(buffer: SummaryBuffer, count: int) -> list[int]:
    return [buffer.append(summary(i))[0] for i in range(count)]


# --- Retry-After ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "date", "expected"),
    [
        ("120", None, 120.0),
        ("0", None, 0.0),
        ("Wed, 21 Oct 2015 07:28:07 GMT", "Wed, 21 Oct 2015 07:28:00 GMT", 7.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", "Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None, None),
        ("-5", None, None),
        (None, None, None),
    ],
)
def test_parse_retry_after(value, date, expected):
    assert parse_retry_after(value, date) == expected


def test_parse_retry_after_local_clock():
    assert parse_retry_after(formatdate(time.time() + 30, usegmt=True)) == pytest.approx(30.0, abs=2.0)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_reported(buffer, status):
    fill(buffer, 3)
    app = scripted_app([(status, {"error": "busy"}, {"Retry-After": "7"})])

    async def scenario():
        async with serve(app) as url, uploader(buffer, url) as up:
            with pytest.raises(UploadError) as info:
                await up.upload_once()
            return info.value, up.retry_delay(info.value, 1)

    error, delay = run(scenario())
    assert error.status == status
    assert error.retry_after_s == 7.0
    assert 7.0 <= delay <= 7.7
    assert buffer.depth() == 3


def test_retry_after_capped(buffer):
    fill(buffer, 1)
    app = scripted_app([(503, {}, {"Retry-After": "86400"})])

    async def scenario():
        async with serve(app) as url, uploader(buffer, url, retry_after_max_s=60.0) as up:
            with pytest.raises(UploadError) as info:
                await up.upload_once()
            return info.value.retry_after_s

    assert run(scenario()) == 60.0


def test_run_waits_for_retry_after(buffer):
    fill(buffer, 2)
    seen: list = []
    app = scripted_app([(429, {}, {"Retry-After": "1"})], seen)

    async def scenario():
        stop = asyncio.Event()
        async with serve(app) as url, uploader(buffer, url) as up:
            task = asyncio.create_task(up.run(stop))
            while buffer.depth() and len(seen) < 5:
                await asyncio.sleep(0.02)
            stop.set()
            await task

    run(scenario())
    assert len(seen) == 2
    assert seen[1][2] - seen[0][2] >= 1.0
    assert buffer.depth() == 0


# --- quarantine -----------------------------------------------------------------------


def test_rejected_item_quarantined_by_index(buffer, store, caplog):
    fill(buffer, 10)
    app = scripted_app(
        [(400, {"error": "summary 3: invalid field 'x'", "index": 3, "field": "x"}, {})],
        then=create_app(store),
    )

    async def scenario():
        async with serve(app) as url, uploader(buffer, url) as up:
            with caplog.at_level(logging.ERROR, logger="agent.uplink.push"):
                handled = await up.upload_once()
            delivered = await up.upload_once()
            return handled, delivered, up.counters

    handled, delivered, counters = run(scenario())
    quarantined = buffer.quarantined()
    assert handled == 1
    assert delivered == 9
    assert [row.seq for row in quarantined] == [4]
    assert quarantined[0].status == 400
    assert "invalid field" in quarantined[0].reason
    assert counters.quarantined == 1
    assert buffer.counters()["quarantined"] == 1
    assert [s["seq"] for s in store.summaries()] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert len([r for r in caplog.records if "quarantine" in r.getMessage()]) == 1


def test_rejected_item_found_by_halving(buffer, store):
    fill(buffer, 8)
    bad_seq = 6

    @web.middleware
    async def reject_seq(request, handler):
        items = decode_batch(await request.read())
        if any(item["seq"] == bad_seq for item, _ in items):
            return web.json_response({"error": "unprocessable"}, status=422)
        return await handler(request)

    app = create_app(store)
    app.middlewares.append(reject_seq)

    async def scenario():
        async with serve(app) as url, uploader(buffer, url, batch_size=8) as up:
            return await up.drain(5.0)

    assert run(scenario()) is True
    assert [row.seq for row in buffer.quarantined()] == [bad_seq]
    assert [s["seq"] for s in store.summaries()] == [1, 2, 3, 4, 5, 7, 8]


def test_oversized_single_quarantined(buffer):
    fill(buffer, 1)
    app = scripted_app([(413, {"error": "too large"}, {})])

    async def scenario():
        async with serve(app) as url, uploader(buffer, url) as up:
            return await up.upload_once()

    assert run(scenario()) == 1
    assert [row.status for row in buffer.quarantined()] == [413]


@pytest.mark.parametrize("status", [401, 403, 404, 405, 415, 500, 502])
def test_config_errors_not_quarantined(buffer, status):
    fill(buffer, 3)
    app = scripted_app([(status, {"error": "no"}, {})] * 3)

    async def scenario():
        async with serve(app) as url, uploader(buffer, url) as up:
            for _ in range(3):
                with pytest.raises(UploadError):
                    await up.upload_once()
            return up.counters

    counters = run(scenario())
    assert counters.failures == 3
    assert counters.last_status == status
    assert buffer.quarantined() == []
    assert buffer.depth() == 3


# --- token ----------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_token_sent_and_accepted(buffer, store, token_file):
    fill(buffer, 4)

    async def scenario():
        async with serve(create_app(store, token=TOKEN)) as url, uploader(buffer, url, token_file=token_file) as up:
            return await up.upload_once()

    assert run(scenario()) == 4
    assert store.count() == 4


def test_wrong_token_gets_401(buffer, store, tmp_path):
    fill(buffer, 2)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")

    async def scenario():
        async with serve(create_app(store, token=TOKEN)) as url, uploader(buffer, url, token_file=wrong) as up:
            with pytest.raises(UploadError) as info:
                await up.upload_once()
            return info.value.status

    assert run(scenario()) == 401
    assert store.count() == 0
    assert buffer.depth() == 2
    assert buffer.quarantined() == []


def test_token_reloaded_after_401(buffer, store, tmp_path):
    fill(buffer, 2)
    path = tmp_path / "token"
    path.write_text("old-token")

    async def scenario():
        async with serve(create_app(store, token=TOKEN)) as url, uploader(buffer, url, token_file=path) as up:
            with pytest.raises(UploadError):
                await up.upload_once()
            path.write_text(TOKEN)
            with pytest.raises(UploadError):
                await up.upload_once()  # this 401 makes the uploader read the file again
            return await up.upload_once()

    assert run(scenario()) == 2


def test_token_never_logged(buffer, token_file, caplog):
    fill(buffer, 1)
    echo = web.Application()

    async def echo_headers(request):
        return web.Response(status=403, text=f"forbidden: {request.headers.get('Authorization')}")

    echo.router.add_post("/v1/summaries", echo_headers)

    async def scenario():
        async with serve(echo) as url, uploader(buffer, url, token_file=token_file) as up:
            with caplog.at_level(logging.DEBUG):
                with pytest.raises(UploadError) as info:
                    await up.upload_once()
            return info.value

    error = run(scenario())
    assert TOKEN not in caplog.text
    assert TOKEN not in str(error)
    assert "[token]" in str(error)


@pytest.mark.parametrize(("content", "message"), [("", "empty"), ("two words", "spaces")])
def test_bad_token_file(tmp_path, content, message):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_token_file(path)


def test_missing_token_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read token file"):
        read_token_file(tmp_path / "absent")


# --- TLS ------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("pki")
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name in ("ca", "other-ca"):
        openssl(
            "req", "-x509", *curve, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder,
        )  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder,
        )  # fmt: skip
    return folder


def test_tls_with_client_certificate(buffer, store, pki):
    fill(buffer, 3)
    context = server_ssl_context(pki / "server.pem", pki / "server.key", client_ca_file=pki / "ca.pem")

    async def scenario():
        async with serve(create_app(store), context) as url:
            async with uploader(
                buffer, url, ca_file=pki / "ca.pem", client_cert=pki / "client.pem", client_key=pki / "client.key"
            ) as up:
                return await up.upload_once()

    assert run(scenario()) == 3
    assert store.count() == 3


def test_tls_without_client_certificate_fails(buffer, store, pki):
    fill(buffer, 1)
    context = server_ssl_context(pki / "server.pem", pki / "server.key", client_ca_file=pki / "ca.pem")

    async def scenario():
        async with serve(create_app(store), context) as url, uploader(buffer, url, ca_file=pki / "ca.pem") as up:
            with pytest.raises(UploadError):
                await up.upload_once()

    run(scenario())
    assert store.count() == 0
    assert buffer.depth() == 1


def test_tls_untrusted_server_fails(buffer, store, pki):
    fill(buffer, 1)
    context = server_ssl_context(pki / "server.pem", pki / "server.key")

    async def scenario():
        async with serve(create_app(store), context) as url, uploader(buffer, url, ca_file=pki / "other-ca.pem") as up:
            with pytest.raises(UploadError) as info:
                await up.upload_once()
            return info.value.reason

    reason = run(scenario())
    assert "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower()
    assert store.count() == 0


def test_tls_options_need_https(buffer, pki):
    with pytest.raises(ValueError, match="https"):
        Uploader(buffer, "http://127.0.0.1:1/v1/summaries", gateway=GATEWAY, ca_file=pki / "ca.pem")


def test_missing_ca_file(buffer, tmp_path):
    with pytest.raises(ValueError, match="ca_file"):
        Uploader(buffer, "https://127.0.0.1:1/v1/summaries", gateway=GATEWAY, ca_file=tmp_path / "absent.pem")


def test_requeued_summary_delivered(buffer, store):
    fill(buffer, 3)
    app = scripted_app([(400, {"error": "bad", "index": 0}, {})], then=create_app(store))

    async def scenario():
        async with serve(app) as url, uploader(buffer, url) as up:
            await up.upload_once()
            await up.upload_once()
            buffer.requeue_quarantined()
            await up.upload_once()

    run(scenario())
    delivered = store.summaries()
    assert [s["seq"] for s in delivered] == [2, 3, 4]
    assert [s["features"]["index"] for s in delivered] == [1, 2, 0]
