"""The submit side of the pull protocol (``docs/pull-protocol.md``) over aiohttp.

One :class:`QueueClient` per run: it reads the submit token, keeps one HTTPS connection
pool, retries what may pass (no answer, 5xx, 429, 503; ``backoff.REQUEST_RETRY`` up to the
site's ``retry_tries``) and turns the server's error answers into remote-exec's errors:
401/403 are the site's or the server's refusal (77), 507 a full spool (73). A server that
stays away raises :class:`QueueUnreachable`, which interrupts the run (75, ``resume``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from remote_exec.backends.pull.settings import PullSettings
from remote_exec.backoff import REQUEST_RETRY
from remote_exec.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    FetchError,
    InputError,
    RemoteExecError,
    StageError,
)

#: bytes read or written at once while streaming a file
CHUNK = 1024 * 1024
#: answers that may pass if asked again
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class QueueUnreachable(ConnectError):
    """The queue server did not answer (or kept answering 5xx) past the retries."""


class QueueAnswer(RemoteExecError):
    """An error answer of the queue server: its status, code and extra fields."""

    def __init__(self, message: str, status: int, code: str, data: dict[str, Any],
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status, self.code, self.data = status, code, data


def quote_path(path: str) -> str:
    """A file path of the protocol as it goes into a URL."""
    return urllib.parse.quote(path, safe="/")


class QueueClient:
    """Calls of the submit role, for one site."""

    def __init__(self, settings: PullSettings, site_name: str, tries: int,
                 max_interval: float) -> None:
        self.settings = settings
        self.site_name = site_name
        self.tries = tries
        self.policy = REQUEST_RETRY.capped(max_interval)
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext:
        cafile = self.settings.ca_file
        if cafile and not os.path.isfile(cafile):
            raise ConfigError(f"the pull ca_file {cafile} does not exist",
                              hint="give the CA certificate that signed the queue server's "
                              "certificate (the site's pull.ca_file)")
        return ssl.create_default_context(cafile=cafile)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.settings.token()}"}
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=8)
            self._session = aiohttp.ClientSession(headers=headers, connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        return self.settings.server + path

    # -- one request, retried ------------------------------------------------------------------
    async def call(self, method: str, path: str, *, json: Any = None,
                   params: dict[str, Any] | None = None, timeout: float | None = None,
                   ok: tuple[int, ...] = (200, 201, 202, 204),
                   body: Callable[[], Any] | None = None,
                   headers: dict[str, str] | None = None,
                   read: Callable[[aiohttp.ClientResponse], Awaitable[Any]] | None = None,
                   ) -> tuple[int, Any]:
        """``method path``; the status and the JSON answer (or what ``read`` makes of the
        response). ``body()`` makes a fresh request body for each try."""
        session = await self.session()
        limit = aiohttp.ClientTimeout(total=timeout or self.settings.request_timeout)
        what = f"{method} {path.split('?')[0]}"
        delays = self.policy.delays()
        for attempt in range(self.tries + 1):
            problem: str
            try:
                async with session.request(method, self.url(path), json=json, params=params,
                                           data=body() if body else None, headers=headers,
                                           timeout=limit) as response:
                    if response.status in ok:
                        if read is not None:
                            return response.status, await read(response)
                        data = None
                        if response.content_type == "application/json":
                            data = await response.json()
                        return response.status, data
                    if response.status not in RETRY_STATUS:
                        raise await self._refusal(response, what)
                    problem = f"HTTP {response.status}"
                    retry_after = response.headers.get("Retry-After", "")
            except aiohttp.ClientConnectorCertificateError as exc:
                raise ConnectError(
                    f"the queue server {self.settings.server} presented a certificate this "
                    f"side does not trust: {exc.certificate_error}",
                    hint="set the site's pull.ca_file to the CA that signed the server's "
                    "certificate (and check the host name in pull.server)") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                problem = str(exc) or type(exc).__name__
                retry_after = ""
            if attempt >= self.tries:
                raise QueueUnreachable(
                    f"the queue server {self.settings.server} did not answer {what}: "
                    f"{problem} (after {self.tries} retries)",
                    hint="check that `remote-exec queue serve` runs and is reachable")
            delay = next(delays)
            if retry_after.isdigit():
                delay = max(delay, min(float(retry_after), self.policy.ceiling))
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _refusal(self, response: aiohttp.ClientResponse, what: str) -> RemoteExecError:
        try:
            data = await response.json(content_type=None)
            error = data.get("error", {}) if isinstance(data, dict) else {}
        except (ValueError, aiohttp.ClientError):
            error = {}
        code = str(error.get("code") or "")
        message = str(error.get("message") or f"HTTP {response.status}")
        text = f"the queue server refused {what}: {message}"
        status = response.status
        if status in (401, 403):
            return AuthError(text, hint=f"check the token in {self.settings.token_file} "
                             "(`remote-exec queue token add --role submit --site "
                             f"{self.site_name}` on the queue server makes a new one)")
        if status == 507:
            return StageError(text, hint="the queue server's spool is full: free space "
                              "there (`remote-exec queue gc`) and run again")
        if status == 413:
            return StageError(text, hint="the queue server's max_file_size / max_run_bytes "
                              "refuse it")
        return QueueAnswer(text, status, code, error)

    # -- files ---------------------------------------------------------------------------------
    async def put_file(self, path: str, source: Path, size: int, digest: str,
                       progress: Callable[[int], None] | None = None) -> None:
        """Stream ``source`` to ``PUT path`` (size and sha256 announced)."""

        def body() -> Any:
            return _file_chunks(source, progress)
        try:
            await self.call("PUT", path, body=body, timeout=max(600.0, size / (1 << 20)),
                            headers={"Content-Length": str(size), "X-RE-SHA256": digest,
                                     "Content-Type": "application/octet-stream"})
        except QueueAnswer as err:
            if err.status == 422:
                raise InputError(f"{source} changed while it was being sent",
                                 hint="leave inputs alone during a run, then run again") \
                    from None
            raise

    async def get_file(self, path: str, target: Path, digest: str, size: int,
                       progress: Callable[[int], None] | None = None) -> None:
        """Stream ``GET path`` into ``target`` (through ``target.part``), sha256 checked."""
        part = target.with_name(target.name + ".part")

        async def read(response: aiohttp.ClientResponse) -> str:
            hasher = hashlib.sha256()
            with open(part, "wb") as f:
                async for chunk in response.content.iter_chunked(CHUNK):
                    hasher.update(chunk)
                    await asyncio.to_thread(f.write, chunk)
                    if progress is not None:
                        progress(len(chunk))
            return hasher.hexdigest()

        got = (await self.call("GET", path, read=read, ok=(200,),
                               timeout=max(600.0, size / (1 << 20))))[1]
        if got != digest:
            part.unlink(missing_ok=True)
            raise FetchError(f"{target.name}: the bytes that came back have sha256 {got}, "
                             f"not the site's {digest}",
                             hint="fetch again with `remote-exec resume RUN`")
        os.replace(part, target)


async def _file_chunks(source: Path, progress: Callable[[int], None] | None) -> Any:
    """``source``'s bytes, chunk by chunk, read off the event loop."""
    with open(source, "rb") as f:
        while True:
            chunk = await asyncio.to_thread(f.read, CHUNK)
            if not chunk:
                return
            if progress is not None:
                progress(len(chunk))
            yield chunk
