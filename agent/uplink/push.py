"""Push uploader: sends buffered summaries to the collector over HTTP and releases them.

Delivery is at least once: rows leave the buffer only after a 2xx response, so a crash
between the response and the release sends the same rows again. The reference collector
stores each (gateway, seq) once, so a batch sent twice is stored once.

Responses other than 2xx, by status:

- 429 and 503: wait as long as `Retry-After` gives (seconds or an HTTP date), else back off.
- 401 and 403: a configuration error; back off, log, and read the token file again.
- 413: halve the batch; a single summary that is still too large is quarantined.
- 404, 405, 406, 407, 411, 415, 421, 426, 431: the URL or the server set-up is wrong,
  so every batch would fail the same way. Back off and log, never quarantine.
- 408 and 425: transient; back off.
- any other 4xx: the batch itself is bad. The uploader finds the bad summary (from the
  `index` field of a JSON error body, else by halving the batch) and moves it to the
  buffer's quarantine table, so one bad summary cannot block the queue.
- 5xx and connection errors: back off with jitter.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import sqlite3
import time
from dataclasses import dataclass
from datetime import timezone
from os import PathLike
from typing import Any

import httpx

from agent import __version__
from agent.uplink.auth import client_ssl_context, read_token_file
from agent.uplink.buffer import SummaryBuffer
from agent.uplink.schema import encode_batch

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/msgpack"
# A failure with the same reason as the previous one is logged again after this many seconds.
LOG_REPEAT_S = 300.0
DEFAULT_RETRY_AFTER_MAX_S = 3600.0

_RETRY_AFTER_STATUSES = frozenset({429, 503})
_AUTH_STATUSES = frozenset({401, 403})
# 4xx statuses that mean the URL or server set-up is wrong (or are transient), not the batch.
_NOT_BATCH_STATUSES = frozenset({404, 405, 406, 407, 408, 411, 415, 421, 425, 426, 431})


class UploadError(RuntimeError):
    """A batch was not acknowledged by the collector; its rows stay in the buffer.

    `status` is the HTTP status code, or None when no response arrived. `retry_after_s`
    is the wait the server asked for (or 0.0 to retry at once with a smaller batch), or
    None to use the exponential backoff.
    """

    def __init__(self, reason: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass
class UploadCounters:
    """Totals since the uploader was created."""

    batches_sent: int = 0
    summaries_sent: int = 0
    failures: int = 0
    quarantined: int = 0
    last_error: str | None = None
    last_status: int | None = None
    # Seconds the last successful POST took, from sending to the 2xx response.
    last_latency_s: float | None = None


class Uploader:
    """Uploads pending rows of a SummaryBuffer in batches, oldest seq first.

    All methods must be called from the event loop thread that runs `run`, because the
    buffer calls block that thread briefly and `notify` sets an asyncio.Event.
    The HTTP client ignores proxy environment variables; pass `proxy` to use one.

    `token_file` contains a bearer token sent as `Authorization: Bearer`. It is read at
    construction and again after a 401 or 403, so a replaced token takes effect without a
    restart. For https URLs, `ca_file` replaces the system CA store and `client_cert` /
    `client_key` (PEM) enable a client certificate. `timeout_s` bounds every phase of
    every request (connect, write, read, pool wait).
    """

    def __init__(
        self,
        buffer: SummaryBuffer,
        url: str,
        *,
        gateway: str,
        batch_size: int = 100,
        timeout_s: float = 10.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        poll_interval_s: float = 30.0,
        proxy: str | None = None,
        token_file: str | PathLike[str] | None = None,
        ca_file: str | PathLike[str] | None = None,
        client_cert: str | PathLike[str] | None = None,
        client_key: str | PathLike[str] | None = None,
        retry_after_max_s: float = DEFAULT_RETRY_AFTER_MAX_S,
    ) -> None:
        self.url = _check_url(url)
        # The id goes into an HTTP header, which carries printable ASCII only.
        if not isinstance(gateway, str) or not gateway or not (gateway.isascii() and gateway.isprintable()):
            raise ValueError(f"invalid gateway id {gateway!r}; expected a non-empty string of printable ASCII")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"invalid batch_size {batch_size!r}; expected an integer >= 1")
        self.timeout_s = _check_seconds("timeout_s", timeout_s)
        self.backoff_initial_s = _check_seconds("backoff_initial_s", backoff_initial_s)
        self.backoff_max_s = _check_seconds("backoff_max_s", backoff_max_s)
        self.poll_interval_s = _check_seconds("poll_interval_s", poll_interval_s)
        self.retry_after_max_s = _check_seconds("retry_after_max_s", retry_after_max_s)
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"invalid backoff_max_s {backoff_max_s!r}; expected at least backoff_initial_s ({backoff_initial_s!r})"
            )
        https = httpx.URL(self.url).scheme == "https"
        if not https and (ca_file is not None or client_cert is not None or client_key is not None):
            raise ValueError(
                f"ca_file, client_cert and client_key need an https:// collector URL, but the URL is {self.url!r}; "
                "use https:// or remove the TLS settings"
            )
        self._ssl_context = client_ssl_context(ca_file, client_cert, client_key) if https else None
        self._token_file = token_file
        self._token = read_token_file(token_file) if token_file is not None else None

        self.gateway = gateway
        self.batch_size = batch_size
        self.counters = UploadCounters()
        self._buffer = buffer
        self._proxy = proxy
        self._client: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self._random = random.Random()
        # Halved after a 413 response, down to 1, and kept: the collector's body limit persists.
        self._batch_limit = batch_size
        # Halved while searching a rejected batch for its bad summary; reset after the quarantine.
        self._search_limit = batch_size
        self._consecutive_failures = 0
        self._logged_reason: str | None = None
        self._logged_at = -math.inf
        self._unlogged_repeats = 0

    def notify(self) -> None:
        """Wake `run` from its idle wait because a summary was appended."""
        self._wake.set()

    async def upload_once(self) -> int:
        """Send one batch of pending rows and release them on a 2xx response.

        Returns the number of summaries that left the queue: delivered, or quarantined
        after the collector rejected them. Returns 0 if the buffer was empty.
        Cancelling the call leaves the rows in the buffer unless the release already ran.

        Raises:
            UploadError: connection failure, timeout or a response that released nothing.
        """
        rows = self._buffer.pending(min(self._batch_limit, self._search_limit))
        if not rows:
            return 0
        seqs = [seq for seq, _ in rows]
        body = encode_batch([encoded for _, encoded in rows])
        headers = {
            "Content-Type": CONTENT_TYPE,
            "Idempotency-Key": idempotency_key(self.gateway, seqs[0], seqs[-1]),
        }
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"

        try:
            response = await self._http().post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise self._failed(f"timed out after {self.timeout_s:g} s ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise self._failed(f"request failed: {type(exc).__name__}: {self._redact(str(exc))}") from exc

        if response.is_success:
            self._buffer.release(seqs)
            self._succeeded(len(rows), response)
            return len(rows)
        return self._handle_rejection(response, rows, len(body))

    def _handle_rejection(self, response: httpx.Response, rows: list[tuple[int, bytes]], body_bytes: int) -> int:
        """Quarantine what the collector rejected, or raise UploadError for a retry."""
        status = response.status_code
        detail = self._excerpt(response)
        reason = f"collector returned HTTP {status}: {detail}"
        if status in _RETRY_AFTER_STATUSES:
            wait = parse_retry_after(response.headers.get("Retry-After"), response.headers.get("Date"))
            raise self._failed(reason, status, None if wait is None else min(wait, self.retry_after_max_s))
        if status in _AUTH_STATUSES:
            self._reload_token()
            raise self._failed(f"{reason}; check the token file and the collector's token", status)
        if status == 413 and len(rows) > 1:
            self._batch_limit = max(1, len(rows) // 2)
            log.warning(
                "collector rejected %d summaries (%d bytes) as too large; batch size lowered to %d",
                len(rows),
                body_bytes,
                self._batch_limit,
            )
            raise self._failed(reason, status, 0.0)
        if status < 400 or status >= 500 or status in _NOT_BATCH_STATUSES:
            raise self._failed(reason, status)

        index = _json_field(response, "index")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(rows):
            bad = [rows[index][0]]
        elif len(rows) > 1:
            # The response does not name the bad summary: halve the batch until one summary is left.
            self._search_limit = max(1, len(rows) // 2)
            raise self._failed(reason, status, 0.0)
        else:
            bad = [rows[0][0]]
        moved = self._buffer.quarantine(bad, status=status, reason=detail)
        self._search_limit = self.batch_size
        self.counters.quarantined += moved
        self.counters.last_status = status
        log.error(
            "collector rejected seq %s with HTTP %d: %s; moved %d summaries to quarantine, "
            "where they stay until requeued",
            ", ".join(str(seq) for seq in bad),
            status,
            detail,
            moved,
        )
        return moved

    async def run(self, stop: asyncio.Event) -> None:
        """Upload until `stop` is set: back off after failures, idle until `notify` or a poll."""
        failures = 0
        log.info("uploader started: %s, gateway %s, %d pending", self.url, self.gateway, self._buffer.depth())
        while not stop.is_set():
            # Cleared before the upload, so a notify() during the upload is not lost.
            self._wake.clear()
            try:
                sent = await self.upload_once()
            except (UploadError, sqlite3.Error) as exc:
                if isinstance(exc, sqlite3.Error):
                    log.error("uploader failed to read or release buffer rows: %s", exc)
                failures += 1
                await _wait_any(stop, None, self.retry_delay(exc, failures))
                continue
            failures = 0
            if sent == 0:
                await _wait_any(stop, self._wake, self.poll_interval_s)
        log.info("uploader stopped: %d pending", self._buffer.depth())

    async def drain(self, deadline_s: float) -> bool:
        """Upload everything pending within `deadline_s` seconds; return True if the buffer is empty."""
        deadline_s = _check_seconds("deadline_s", deadline_s, allow_zero=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        failures = 0
        while self._buffer.depth() > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await self.upload_once()
                failures = 0
            except TimeoutError:
                break
            except (UploadError, sqlite3.Error) as exc:
                failures += 1
                await asyncio.sleep(min(self.retry_delay(exc, failures), max(0.0, deadline - loop.time())))
        left = self._buffer.depth()
        if left:
            log.warning("drain ended after %.1f s with %d summaries still pending", deadline_s, left)
        return left == 0

    def retry_delay(self, error: Exception, failures: int) -> float:
        """Return the wait before the next attempt: the server's Retry-After if it sent one, else the backoff.

        A Retry-After wait gets up to 10 % jitter on top, never less than asked.
        """
        wait = getattr(error, "retry_after_s", None)
        if wait is None:
            return self.backoff_delay(failures)
        return wait + self._random.uniform(0.0, 0.1 * wait)

    def backoff_delay(self, failures: int) -> float:
        """Return the wait in seconds after `failures` consecutive failures, with jitter.

        The base doubles from backoff_initial_s up to backoff_max_s. The wait is drawn
        uniformly from the upper half of the base, so gateways that lost the network
        together do not retry in step.
        """
        exponent = min(max(failures, 1) - 1, 60)
        base = min(self.backoff_max_s, self.backoff_initial_s * 2.0**exponent)
        return base / 2 + self._random.uniform(0.0, base / 2)

    async def aclose(self) -> None:
        """Close the HTTP client; a later upload opens a new one."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> Uploader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                trust_env=False,
                proxy=self._proxy,
                verify=self._ssl_context if self._ssl_context is not None else True,
                headers={"User-Agent": f"imaging-edge-agent/{__version__}"},
            )
        return self._client

    def _reload_token(self) -> None:
        if self._token_file is None:
            return
        try:
            token = read_token_file(self._token_file)
        except ValueError as exc:
            log.error("cannot reload the upload token: %s", exc)
            return
        if token != self._token:
            log.info("upload token reloaded from %s", self._token_file)
            self._token = token

    def _excerpt(self, response: httpx.Response) -> str:
        """Return the first 200 characters of a response body, with the token masked."""
        try:
            text = response.text
        except (UnicodeDecodeError, LookupError):
            text = repr(response.content[:200])
        return self._redact(" ".join(text[:200].split()))

    def _redact(self, text: str) -> str:
        # A server may echo request headers back; the token must not reach the log.
        return text.replace(self._token, "[token]") if self._token else text

    def _failed(self, reason: str, status: int | None = None, retry_after_s: float | None = None) -> UploadError:
        self.counters.failures += 1
        self.counters.last_error = reason
        self.counters.last_status = status
        self._consecutive_failures += 1
        now = time.monotonic()
        if reason != self._logged_reason or now - self._logged_at >= LOG_REPEAT_S:
            repeats = f" (the previous failure repeated {self._unlogged_repeats} more times)" if self._unlogged_repeats else ""
            log.warning(
                "upload to %s failed, %d in a row: %s; %d summaries pending%s",
                self.url,
                self._consecutive_failures,
                reason,
                self._buffer.depth(),
                repeats,
            )
            self._logged_reason = reason
            self._logged_at = now
            self._unlogged_repeats = 0
        else:
            self._unlogged_repeats += 1
        return UploadError(reason, status, retry_after_s)

    def _succeeded(self, count: int, response: httpx.Response) -> None:
        self.counters.last_latency_s = response.elapsed.total_seconds()
        self.counters.batches_sent += 1
        self.counters.summaries_sent += count
        if self._consecutive_failures:
            log.info("upload to %s recovered after %d failures", self.url, self._consecutive_failures)
        self._consecutive_failures = 0
        self._logged_reason = None
        self._unlogged_repeats = 0
        duplicates = _json_field(response, "duplicates")
        if duplicates:
            # Expected after a crash between a 2xx response and the release.
            log.info("collector already held %s of %d summaries sent", duplicates, count)


def parse_retry_after(value: str | None, server_date: str | None = None) -> float | None:
    """Return the seconds a Retry-After header requests as a wait, or None if it is missing or invalid.

    The header is either whole seconds or an HTTP date. A date is compared with the
    response's Date header when there is one, so a gateway clock that is off (no RTC, not
    yet synchronised) does not distort the wait; otherwise with the local wall clock.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    retry_at = _http_date(text)
    if retry_at is None:
        return None
    reference = _http_date(server_date) if server_date else None
    return max(0.0, retry_at - (reference if reference is not None else time.time()))


def _http_date(text: str) -> float | None:
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def idempotency_key(gateway: str, first_seq: int, last_seq: int) -> str:
    """Return the Idempotency-Key header value for a batch: "<gateway>:<first seq>-<last seq>"."""
    return f"{gateway}:{first_seq}-{last_seq}"


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event | None, timeout_s: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _json_field(response: httpx.Response, name: str) -> Any:
    try:
        payload = response.json()
    except ValueError:
        return None
    return payload.get(name) if isinstance(payload, dict) else None


def _check_url(url: Any) -> str:
    try:
        parsed = httpx.URL(url)
    except (TypeError, httpx.InvalidURL) as exc:
        raise ValueError(f"invalid collector URL {url!r}: {exc}; expected http://host:port/v1/summaries") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid collector URL {url!r}; expected http://host:port/v1/summaries or https://...")
    return str(parsed)


def _check_seconds(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"invalid {name} {value!r}; expected a finite number of seconds {expected}")
    return float(value)
