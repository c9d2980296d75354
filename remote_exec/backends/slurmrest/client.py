"""JSON over HTTP(S) to a Slurm REST API, off the event loop.

Each request runs ``urllib`` in a worker thread (no extra dependency, and a slow API
never blocks the run's other steps). A request that got no answer (refused, reset,
timed out) or a 502/503/504 is repeated with the project's ``REQUEST_RETRY`` backoff —
unless the caller says it must not be (a submission: the caller looks the job up
instead of submitting twice). No answer at all is the scheduler's silence
(:class:`~remote_exec.backends.batch.SchedulerUnavailable`, transient: a wait goes on, a
step ends the run *interrupted*, for ``resume``). A 500 is the dialect's to read:
slurmrestd answers most errors with it. Only the method, the path and the status are
logged, never a header or a body.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

from remote_exec.backends.batch import SchedulerUnavailable as NoAnswer
from remote_exec.backoff import REQUEST_RETRY
from remote_exec.errors import AuthError

log = logging.getLogger("remote_exec.slurmrest")

#: answers worth asking again (a proxy or the service restarting)
RETRY_STATUSES = (502, 503, 504)


class Auth(Protocol):
    async def headers(self, renew: bool = False) -> dict[str, str]:
        """The headers that authenticate the next request (``renew``: load a fresh token)."""

    def challenged(self, www_authenticate: str) -> bool:
        """Answer a 401's challenge; True if the request is worth repeating."""


@dataclass
class Answer:
    status: int
    body: Any  # the parsed JSON, or the text of a non-JSON answer
    content_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class RestClient:
    """One API's base URL, its authentication and its retry policy."""

    def __init__(self, base_url: str, auth: Auth, *, timeout: float = 30.0,
                 ca_file: str | None = None, tries: int = 5, max_interval: float = 60.0,
                 what: str = "the Slurm REST API") -> None:
        self.base_url, self.auth, self.timeout = base_url.rstrip("/"), auth, timeout
        self.tries, self.max_interval, self.what = max(tries, 0), max_interval, what
        self._context = (ssl.create_default_context(cafile=ca_file)
                         if base_url.startswith("https://") else None)

    async def call(self, method: str, path: str, body: Any = None, *, retry: bool = True,
                   renew: bool = False) -> Answer:
        """One request (``path`` below the base URL, with its query string)."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        attempt, challenged = 0, False
        while True:
            headers = {"Accept": "application/json", **await self.auth.headers(renew)}
            renew = False
            if data is not None:
                headers["Content-Type"] = "application/json"
            try:
                answer = await asyncio.to_thread(self._once, method, path, data, headers)
            except NoAnswer:
                if not retry or attempt >= self.tries:
                    raise
                attempt = await self._backoff(attempt)
                continue
            log.debug("%s %s -> %s", method, path.split("?")[0], answer.status)
            if answer.status == 401 and not challenged:
                challenged = True
                if self.auth.challenged(answer.headers.get("www-authenticate", "")):
                    continue
            if answer.status in (401, 403):
                raise AuthError(f"{self.what} refused the credentials ({answer.status}"
                                f"{': ' + summary(answer) if summary(answer) else ''})",
                                hint="check the site's slurmrest user and token (or your "
                                "Kerberos ticket: klist)")
            if answer.status in RETRY_STATUSES and retry and attempt < self.tries:
                attempt = await self._backoff(attempt)
                continue
            return answer

    def _once(self, method: str, path: str, data: bytes | None,
              headers: dict[str, str]) -> Answer:
        url = self.base_url + path
        request = urllib.request.Request(url, data=data, headers=headers,  # noqa: S310
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,  # noqa: S310
                                        context=self._context) as r:
                return _answer(r.status, r.headers, r.read())
        except urllib.error.HTTPError as exc:
            return _answer(exc.code, exc.headers, exc.read())
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
                ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.debug("%s %s: %s", method, path.split("?")[0], reason)
            raise NoAnswer(f"{self.what} at {self.base_url} gave no answer: {reason}",
                           hint="check the site's slurmrest.url, the network and the "
                           "service") from None

    async def _backoff(self, attempt: int) -> int:
        await asyncio.sleep(REQUEST_RETRY.capped(self.max_interval).delay(attempt))
        return attempt + 1


def _answer(status: int, headers: Any, raw: bytes) -> Answer:
    content_type = (headers.get("Content-Type", "") if headers else "") or ""
    kept = {k.lower(): v for k, v in (headers.items() if headers else [])
            if k.lower() in ("www-authenticate", "content-type")}
    text = raw.decode("utf-8", "replace")
    try:
        body: Any = json.loads(text) if text.strip() else None
    except ValueError:
        body = text
    return Answer(status, body, content_type, kept)


def summary(answer: Answer) -> str:
    """A short text of an error answer (its errors' words, or its first text)."""
    body = answer.body
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            words = []
            for error in errors:
                if isinstance(error, dict):
                    number = error.get("error_number", error.get("error_code"))
                    parts = [str(error[k]) for k in ("error", "description") if error.get(k)]
                    text = ": ".join(dict.fromkeys(parts))
                    words.append(f"{text} (error {number})" if number is not None else text)
            return "; ".join(w for w in words if w)[:300]
        for key in ("reason", "Reason", "error", "message"):
            if body.get(key):
                return str(body[key])[:300]
        return ""
    if isinstance(body, str):
        return body.strip().splitlines()[0][:300] if body.strip() else ""
    return ""


def query(path: str, **values: Any) -> str:
    """``path`` with a query string of ``values``."""
    return f"{path}?{urllib.parse.urlencode(values)}" if values else path
