"""Authentication of the simulated HPC WebAPI (two schemes; one per simulator instance).

The real service's header recipe lives in a document we do not have ("HPC API 認証情報と
ヘッダー情報"), so the simulator defines its own, and the client mirrors it.

``bearer``
    ``Authorization: Bearer <token>``

``hmac``
    ``X-Access-Key: <access key>``
    ``X-Timestamp: <unix seconds, integer text>``
    ``X-Signature: <lowercase hex HMAC-SHA256(secret_key, string_to_sign)>``

    string_to_sign = METHOD + "\\n" + PATH + "\\n" + TIMESTAMP + "\\n" + SHA256HEX(body)

    METHOD    the HTTP method in upper case ("GET", "POST", "DELETE")
    PATH      the path of the request target exactly as sent, without the query string
              (e.g. "/v1/jobs/123"; includes the base prefix "/v1")
    TIMESTAMP the same text as sent in X-Timestamp
    SHA256HEX lowercase hex SHA-256 of the raw body bytes; for an empty body that is
              sha256(b"").hexdigest() = "e3b0c442...b855"

    The key is the secret key's UTF-8 bytes. A timestamp more than 300 s away from the
    server's clock (either direction) is rejected.

Any missing or wrong credential answers ``401 {"code": "Client.Unauthorized", "message": ...}``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping

SCHEMES = ("bearer", "hmac")

HEADER_AUTHORIZATION = "Authorization"
BEARER_PREFIX = "Bearer "
HEADER_ACCESS_KEY = "X-Access-Key"
HEADER_TIMESTAMP = "X-Timestamp"
HEADER_SIGNATURE = "X-Signature"
MAX_CLOCK_SKEW = 300  # seconds

AUTH_RECIPE = __doc__


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body or b"").hexdigest()


def string_to_sign(method: str, path: str, timestamp: str, body: bytes) -> str:
    return "\n".join((method.upper(), path, str(timestamp), body_sha256(body)))


def signature(secret_key: str, method: str, path: str, timestamp: str, body: bytes) -> str:
    message = string_to_sign(method, path, timestamp, body).encode()
    return hmac.new(secret_key.encode(), message, hashlib.sha256).hexdigest()


def hmac_headers(
    access_key: str,
    secret_key: str,
    method: str,
    path: str,
    body: bytes = b"",
    timestamp: int | None = None,
) -> dict[str, str]:
    """The three headers of the ``hmac`` scheme (``path`` without the query string)."""
    ts = str(int(time.time()) if timestamp is None else int(timestamp))
    return {
        HEADER_ACCESS_KEY: access_key,
        HEADER_TIMESTAMP: ts,
        HEADER_SIGNATURE: signature(secret_key, method, path, ts, body),
    }


def bearer_headers(token: str) -> dict[str, str]:
    return {HEADER_AUTHORIZATION: BEARER_PREFIX + token}


def check_bearer(headers: Mapping[str, str], token: str) -> str | None:
    """None when authorised, else the reason."""
    value = headers.get(HEADER_AUTHORIZATION)
    if not value:
        return "missing Authorization header"
    if not value.startswith(BEARER_PREFIX):
        return "Authorization is not a Bearer token"
    if not hmac.compare_digest(value[len(BEARER_PREFIX) :].encode(), token.encode()):
        return "invalid token"
    return None


def check_hmac(
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    access_key: str,
    secret_key: str,
    now: float | None = None,
) -> str | None:
    """None when authorised, else the reason."""
    key = headers.get(HEADER_ACCESS_KEY)
    ts = headers.get(HEADER_TIMESTAMP)
    sig = headers.get(HEADER_SIGNATURE)
    missing = [
        name
        for name, value in (
            (HEADER_ACCESS_KEY, key),
            (HEADER_TIMESTAMP, ts),
            (HEADER_SIGNATURE, sig),
        )
        if not value
    ]
    if missing:
        return "missing header(s): " + ", ".join(missing)
    assert key is not None and ts is not None and sig is not None
    if not hmac.compare_digest(key.encode(), access_key.encode()):
        return "unknown access key"
    if not re.fullmatch(r"[0-9]+", ts):
        return "X-Timestamp is not integer unix seconds"
    now = time.time() if now is None else now
    if abs(now - int(ts)) > MAX_CLOCK_SKEW:
        return f"X-Timestamp more than {MAX_CLOCK_SKEW} s off the server clock"
    expected = signature(secret_key, method, path, ts, body)
    if not hmac.compare_digest(sig.encode(), expected.encode()):
        return "signature mismatch"
    return None
