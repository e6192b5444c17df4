"""Bearer tokens and TLS contexts shared by the uploader, the pull API and the collector.

Tokens are read from files so they stay out of the configuration file and the process
arguments. Nothing in this package logs a token.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import stat
from os import PathLike
from pathlib import Path

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 4096


def read_token_file(path: str | PathLike[str]) -> str:
    """Read a bearer token from a file: the first line, without surrounding whitespace.

    Logs a warning (naming the file, not the token) if group or others can read it.

    Raises:
        ValueError: the file is missing, unreadable, empty, too long or contains characters
            that an HTTP header cannot carry.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()[: MAX_TOKEN_BYTES + 1]
        mode = file.stat().st_mode
    except OSError as exc:
        raise ValueError(f"cannot read token file {str(file)!r}: {exc.strerror}; check the path and its permissions") from exc
    lines = raw.decode("ascii", errors="replace").splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ValueError(f"token file {str(file)!r} is empty; write the token on its first line")
    if len(token) > MAX_TOKEN_BYTES or not all(33 <= ord(char) <= 126 for char in token):
        raise ValueError(
            f"invalid token in token file {str(file)!r}: it has spaces, control or non-ASCII characters, "
            f"or longer than {MAX_TOKEN_BYTES} bytes; use printable ASCII without spaces"
        )
    if mode & (stat.S_IRGRP | stat.S_IROTH) and os.name == "posix":
        log.warning("token file %s can be read by other users; restrict it with chmod 600", file)
    return token


def bearer_matches(header: str | None, token: str) -> bool:
    """Return True if an Authorization header carries exactly this bearer token (constant-time compare)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "replace"), token.encode("utf-8"))


def client_ssl_context(
    ca_file: str | PathLike[str] | None = None,
    client_cert: str | PathLike[str] | None = None,
    client_key: str | PathLike[str] | None = None,
) -> ssl.SSLContext:
    """Build a TLS client context that verifies the server against `ca_file` (default: the system store).

    `client_cert` (PEM, may include the key) and `client_key` enable a client certificate.

    Raises:
        ValueError: a file is missing or not valid PEM, or a key is given without a certificate.
    """
    if client_key is not None and client_cert is None:
        raise ValueError(f"client_key {str(client_key)!r} is set without client_cert; set both or neither")
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load ca_file {str(ca_file)!r}: {exc}; expected a PEM file of CA certificates") from exc
    if client_cert is not None:
        try:
            context.load_cert_chain(str(client_cert), None if client_key is None else str(client_key))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load client_cert {str(client_cert)!r} / client_key {str(client_key)!r}: {exc}; "
                "expected PEM files with a matching certificate and private key"
            ) from exc
    return context


def server_ssl_context(cert_file: str | PathLike[str], key_file: str | PathLike[str] | None = None,
                       client_ca_file: str | PathLike[str] | None = None) -> ssl.SSLContext:
    """Build a TLS server context; with `client_ca_file`, clients must present a certificate it signed.

    Raises:
        ValueError: a file is missing or not valid PEM.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
        if client_ca_file is not None:
            context.load_verify_locations(cafile=str(client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the server certificate {str(cert_file)!r}: {exc}; expected PEM files") from exc
    return context
