"""Pull API: a central poller fetches buffered summaries from the agent's HTTP server.

Routes, under a prefix (default "/v1"):

- `GET  {prefix}/summaries?after=SEQ&limit=N`: msgpack array of pending summaries with
  seq > SEQ, lowest first, at most N. Headers: `X-Last-Seq` (seq of the last item, or
  SEQ when empty) and `X-Next-Seq` (the seq the next appended summary will get).
- `POST {prefix}/ack` with a JSON or msgpack body `{"upto": SEQ}`: releases every pending
  row with seq <= SEQ. Repeating it is harmless. SEQ must be below X-Next-Seq.
- `GET  {prefix}/status`: JSON counts and counters of the buffer.

Every route requires `Authorization: Bearer <token>` when a token is configured and
returns 401 otherwise; the token is compared in constant time. A token may be omitted
only when the server binds a loopback address.

Use `add_pull_routes` on the agent's own `web.Application`, or `create_pull_app` with
`app.add_subapp`, or `start_pull_server` when the agent has no HTTP server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from typing import Any

import msgpack
from aiohttp import web

from agent.uplink.auth import bearer_matches
from agent.uplink.buffer import SummaryBuffer
from agent.uplink.schema import encode_batch

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/msgpack"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_ACK_BODY_BYTES = 4096
DEFAULT_PORT = 8701


def is_loopback(host: str) -> bool:
    """Return True if `host` is "localhost" or a loopback IP address; other host names count as not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_pull_binding(host: str, token: str | None) -> None:
    """Reject a pull API without a token on an address other hosts can reach.

    Raises:
        ValueError: `host` is not a loopback address and `token` is None or empty.
    """
    if not isinstance(host, str) or not host:
        raise ValueError(f"invalid pull API host {host!r}; expected an address such as 127.0.0.1")
    if not token and not is_loopback(host):
        raise ValueError(
            f"the pull API would listen on {host!r} without a token, so anyone on the network could read "
            "and release summaries; set a token file or bind 127.0.0.1"
        )


def add_pull_routes(
    app: web.Application,
    buffer: SummaryBuffer,
    *,
    token: str | None,
    host: str = "127.0.0.1",
    prefix: str = "/v1",
    max_limit: int = MAX_LIMIT,
) -> None:
    """Add the pull routes to an existing application, whose server binds `host`.

    Raises:
        ValueError: `host` is not loopback and there is no token, or `max_limit` is invalid.
    """
    check_pull_binding(host, token)
    if isinstance(max_limit, bool) or not isinstance(max_limit, int) or max_limit < 1:
        raise ValueError(f"invalid max_limit {max_limit!r}; expected an integer >= 1")
    if not token:
        log.warning("pull API on %s has no token: any local process can read and release summaries", host)
    handlers = _PullHandlers(buffer, token or None, max_limit)
    app.router.add_get(f"{prefix}/summaries", handlers.get_summaries)
    app.router.add_post(f"{prefix}/ack", handlers.post_ack)
    app.router.add_get(f"{prefix}/status", handlers.get_status)


def create_pull_app(
    buffer: SummaryBuffer, *, token: str | None, host: str = "127.0.0.1", max_limit: int = MAX_LIMIT
) -> web.Application:
    """Build a sub-application with the routes under /v1, to mount with `app.add_subapp(prefix, sub)`."""
    sub = web.Application(client_max_size=MAX_ACK_BODY_BYTES)
    add_pull_routes(sub, buffer, token=token, host=host, max_limit=max_limit)
    return sub


async def start_pull_server(
    buffer: SummaryBuffer, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None
) -> tuple[web.AppRunner, int]:
    """Serve only the pull API; return the runner (call `await runner.cleanup()` to stop) and the bound port.

    Port 0 binds an ephemeral port.
    """
    check_pull_binding(host, token)
    app = web.Application(client_max_size=MAX_ACK_BODY_BYTES)
    add_pull_routes(app, buffer, token=token, host=host)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    log.info("pull API listening on %s:%d", host, bound)
    return runner, bound


class _PullHandlers:
    def __init__(self, buffer: SummaryBuffer, token: str | None, max_limit: int) -> None:
        self._buffer = buffer
        self._token = token
        self._max_limit = max_limit

    def _unauthorised(self, request: web.Request) -> web.Response | None:
        if self._token is None or bearer_matches(request.headers.get("Authorization"), self._token):
            return None
        log.warning("pull API: rejected %s %s from %s: missing or wrong bearer token", request.method, request.path, request.remote)
        return web.json_response(
            {"error": "missing or wrong bearer token; send Authorization: Bearer <token>"},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def get_summaries(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorised(request)) is not None:
            return denied
        try:
            after = _int_param(request, "after", 0, low=0)
            limit = _int_param(request, "limit", min(DEFAULT_LIMIT, self._max_limit), low=1, high=self._max_limit)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        rows = await asyncio.to_thread(self._buffer.pending, limit, after)
        last = rows[-1][0] if rows else after
        return web.Response(
            body=encode_batch([body for _, body in rows]),
            content_type=CONTENT_TYPE,
            headers={"X-Last-Seq": str(last), "X-Next-Seq": str(self._buffer.next_seq)},
        )

    async def post_ack(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorised(request)) is not None:
            return denied
        try:
            upto = await _read_upto(request)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        next_seq = self._buffer.next_seq
        if upto >= next_seq:
            message = f"invalid upto {upto}: no summary above seq {next_seq - 1} exists yet; acknowledge only seqs you stored"
            return web.json_response({"error": message}, status=400)
        released = await asyncio.to_thread(self._buffer.release_upto, upto)
        log.debug("pull API: ack upto %d from %s released %d", upto, request.remote, released)
        return web.json_response({"upto": upto, "released": released})

    async def get_status(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorised(request)) is not None:
            return denied
        stats = await asyncio.to_thread(self._buffer.stats)
        return web.json_response(
            {
                "pending": stats.pending,
                "pending_alarm": stats.pending_alarm,
                "quarantined": stats.quarantined,
                "next_seq": stats.next_seq,
                "counters": stats.counters,
                "disk_bytes": stats.disk_bytes,
                "budget_bytes": stats.budget_bytes,
            }
        )


def _int_param(request: web.Request, name: str, default: int, *, low: int, high: int | None = None) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit():
        raise ValueError(f"invalid {name} {text!r}; expected a decimal integer")
    value = int(text)
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"invalid {name} {value}; expected an integer {bound}")
    return value


async def _read_upto(request: web.Request) -> int:
    if request.content_length is not None and request.content_length > MAX_ACK_BODY_BYTES:
        raise ValueError(f"invalid ack body: {request.content_length} bytes is too large; send {{\"upto\": SEQ}}")
    try:
        async with asyncio.timeout(10.0):
            data = await request.read()
    except (TimeoutError, web.HTTPRequestEntityTooLarge) as exc:
        raise ValueError("invalid ack body: not received within 10 s, or too large; send {\"upto\": SEQ}") from exc
    payload: Any
    if request.content_type == CONTENT_TYPE:
        try:
            payload = msgpack.unpackb(data, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"invalid ack body: not valid msgpack ({exc}); send a map {{\"upto\": SEQ}}") from exc
    elif request.content_type == "application/json":
        try:
            payload = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"invalid ack body: not valid JSON ({exc}); send {{\"upto\": SEQ}}") from exc
    else:
        raise ValueError(f"unsupported Content-Type {request.content_type!r}; send application/json or {CONTENT_TYPE}")
    upto = payload.get("upto") if isinstance(payload, dict) else None
    if isinstance(upto, bool) or not isinstance(upto, int) or upto < 0:
        raise ValueError(f"invalid ack body {payload!r:.80}; expected a map with \"upto\": an integer seq >= 0")
    return upto
