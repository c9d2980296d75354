"""Rescale's REST calls (seed 004 and the published API reference), one method each.

Every request carries ``Authorization: Token <key>``; JSON calls add
``Content-Type: application/json``; every path ends with a slash (the reference
demands it). Requests go through ``urllib`` (no extra dependency) in the caller's
worker thread. A 5xx, a 429 (after its ``Retry-After``), a timeout or a refused
connection is retried with :data:`~remote_exec.backoff.REQUEST_RETRY` (the site's
``retry_tries`` and ``retry_max_interval``); 401/403 is an :class:`AuthError` at once,
and its body is never parsed (its shape is not documented). Uploads and downloads are
streamed in chunks. Only the method, the path and the status are logged (at DEBUG),
never a header or a body.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from remote_exec.backends.rescale.settings import RescaleSettings
from remote_exec.backoff import REQUEST_RETRY
from remote_exec.errors import (
    FINAL,
    TRANSIENT,
    AuthError,
    ConnectError,
    FetchError,
    RemoteExecError,
    StageError,
)

log = logging.getLogger("remote_exec.rescale")
CHUNK = 1 << 20
#: a 429's Retry-After is honoured up to this many seconds
MAX_RETRY_AFTER = 120.0


class ApiError(RemoteExecError):
    """Rescale answered something other than what the call documents. ``transient``: a
    5xx that outlived the retries (worth a later ``resume``)."""

    exit_code = ConnectError.exit_code
    transient = False
    status = 0  # the HTTP status it answered

    @property  # type: ignore[override]
    def disposition(self) -> str:
        return TRANSIENT if self.transient else FINAL


@dataclass
class Answer:
    status: int
    body: Any


class _Multipart:
    """A ``multipart/form-data`` body with one file field, read in chunks (the file is
    never held in memory): what ``urllib`` sends when given an object with ``read``."""

    def __init__(self, path: Path, field_name: str, filename: str) -> None:
        self.boundary = uuid.uuid4().hex
        head = (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; "
                f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
        self._parts: list[bytes | Path] = [head.encode(), path,
                                           f"\r\n--{self.boundary}--\r\n".encode()]
        self.length = sum(len(p) if isinstance(p, bytes) else p.stat().st_size
                          for p in self._parts)
        self._open: BinaryIO | None = None
        self._index = 0

    def read(self, size: int = CHUNK) -> bytes:
        while self._index < len(self._parts):
            part = self._parts[self._index]
            if isinstance(part, bytes):
                self._index += 1
                return part
            if self._open is None:
                self._open = part.open("rb")
            data = self._open.read(size if size and size > 0 else CHUNK)
            if data:
                return data
            self._open.close()
            self._open, self._index = None, self._index + 1
        return b""

    def close(self) -> None:
        if self._open is not None:
            self._open.close()


class RescaleApi:
    """One platform's REST API, authenticated by one key."""

    def __init__(self, settings: RescaleSettings, token: str, *, tries: int = 5,
                 max_interval: float = 60.0) -> None:
        self.settings = settings
        self._token = token
        self.tries, self.max_interval = max(tries, 0), max_interval
        parts = urllib.parse.urlsplit(settings.platform)
        self._origin = (parts.scheme, parts.netloc)
        self._base = parts.path.rstrip("/")
        self._opener = urllib.request.build_opener()

    def __repr__(self) -> str:
        return f"RescaleApi({self.settings.platform!r})"

    # -- paths ---------------------------------------------------------------------------------
    def path(self, group: str, rest: str) -> str:
        """``/api/<version of group>/<rest>`` (``rest`` ends with a slash)."""
        return f"{self._base}/api/{self.settings.api[group]}/{rest}"

    @staticmethod
    def q(value: Any) -> str:
        return urllib.parse.quote(str(value), safe="")

    # -- files ---------------------------------------------------------------------------------
    def upload(self, path: Path, filename: str) -> dict[str, Any]:
        """``POST /api/v2/files/contents/`` (multipart, field ``file``): 201 and the file."""
        answer = self.call("POST", self.path("files", "files/contents/"),
                           upload=lambda: _Multipart(path, "file", filename))
        if answer.status not in (200, 201) or not _has_id(answer.body):
            raise self._unexpected("upload a file", answer, StageError)
        return dict(answer.body)

    def download(self, file_id: str, target: Path,
                 progress: Callable[[int], None] | None = None) -> str:
        """``GET /api/v2/files/{id}/contents/`` streamed into ``target``: its md5 (hex)."""
        path = self.path("files", f"files/{self.q(file_id)}/contents/")
        attempt = 0
        while True:
            digest = hashlib.md5()  # noqa: S324 - the service's checksum, not security
            try:
                with self._open("GET", path, None, {}) as response, target.open("wb") as out:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        if progress is not None:
                            progress(len(chunk))
                return digest.hexdigest()
            except urllib.error.HTTPError as exc:
                answer = Answer(exc.code, None)
                exc.close()
                self._refused(answer)
                if self._retryable(answer, attempt, exc.headers.get("Retry-After")):
                    attempt += 1
                    continue
                raise self._unexpected(f"download file {file_id}", answer, FetchError) from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
                    ConnectionError) as exc:
                attempt = self._network(exc, "GET", path, attempt, True)

    # -- jobs ----------------------------------------------------------------------------------
    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/v2/jobs/``: 201 and the job (created, not started). Never retried
        here: the caller looks for the job by its name before creating it again."""
        answer = self.call("POST", self.path("jobs", "jobs/"), body, retry=False)
        if answer.status not in (200, 201) or not _has_id(answer.body):
            raise self._unexpected("create a job", answer, StageError)
        return dict(answer.body)

    def jobs(self) -> Iterator[dict[str, Any]]:
        """``GET /api/v2/jobs/``, every page."""
        return self.pages(self.path("jobs", "jobs/"), "list jobs")

    def submit(self, job_id: str) -> None:
        """``POST /api/v2/jobs/{id}/submit/``: no data. Never retried blindly."""
        answer = self.call("POST", self.path("jobs", f"jobs/{self.q(job_id)}/submit/"),
                           retry=False)
        if not 200 <= answer.status < 300:
            raise self._unexpected("submit the job", answer, StageError)

    def submit_to_cluster(self, cluster_id: str, job_id: str) -> None:
        """Seed 004: ``POST /api/clusters/{cluster}/jobs/`` ``{"id", "submit": true}``."""
        path = self._base + self.settings.cluster_submit_path.format(cluster_id=self.q(cluster_id))
        answer = self.call("POST", path, {"id": job_id, "submit": True}, retry=False)
        if not 200 <= answer.status < 300:
            raise self._unexpected("submit the job to the cluster", answer, StageError)

    def job_statuses(self, job_id: str) -> list[dict[str, Any]]:
        """``GET /api/v2/jobs/{id}/statuses/``: the history, newest first."""
        return list(self.pages(self.path("jobs", f"jobs/{self.q(job_id)}/statuses/"),
                               "job statuses"))

    def job_files(self, job_id: str) -> list[dict[str, Any]]:
        """``GET /api/v2/jobs/{id}/files/``: the job's output files, every page."""
        return list(self.pages(self.path("jobs", f"jobs/{self.q(job_id)}/files/"),
                               "list output files"))

    def stop(self, job_id: str) -> int:
        """``POST /api/v2/jobs/{id}/stop/``: the status (202: stopping; a 4xx: the job is
        not running, or gone)."""
        answer = self.call("POST", self.path("jobs", f"jobs/{self.q(job_id)}/stop/"))
        if answer.status >= 500:
            raise self._unexpected("stop the job", answer)
        return answer.status

    def delete_job(self, job_id: str) -> bool:
        """``DELETE /api/v2/jobs/{id}/``: True if deleted (204), False if gone (404)."""
        answer = self.call("DELETE", self.path("jobs", f"jobs/{self.q(job_id)}/"))
        if answer.status == 404:
            return False
        if not 200 <= answer.status < 300:
            raise self._unexpected("delete the job", answer)
        return True

    # -- clusters and core types -----------------------------------------------------------
    def cluster_statuses(self, cluster_id: str) -> list[dict[str, Any]]:
        """``GET /api/v3/clusters/{id}/statuses/``: the history, newest first."""
        return list(self.pages(self.path("clusters", f"clusters/{self.q(cluster_id)}/statuses/"),
                               "cluster statuses"))

    def start_cluster(self, cluster_id: str) -> None:
        """``POST /api/v3/clusters/{id}/start/``: 204."""
        answer = self.call("POST", self.path("clusters", f"clusters/{self.q(cluster_id)}/start/"))
        if not 200 <= answer.status < 300:
            raise self._unexpected("start the cluster", answer)

    def core_types(self) -> list[dict[str, Any]]:
        """``GET /api/v2/coretypes/`` (an assumption: not in the sources read)."""
        return list(self.pages(self.path("coretypes", "coretypes/"), "list core types"))

    # -- HTTP ----------------------------------------------------------------------------------
    def pages(self, path: str, what: str) -> Iterator[dict[str, Any]]:
        """Every result of a paged list (``page``/``page_size``; follows ``next``)."""
        url: str | None = f"{path}?page_size={self.settings.page_size}"
        while url:
            answer = self.call("GET", url)
            body = answer.body
            if answer.status != 200 or not isinstance(body, dict) \
                    or not isinstance(body.get("results"), list):
                raise self._unexpected(what, answer)
            yield from (r for r in body["results"] if isinstance(r, dict))
            url = self._same_origin(body.get("next"))

    def _same_origin(self, link: Any) -> str | None:
        """A ``next`` link as a path on this platform (never another host)."""
        if not link:
            return None
        parts = urllib.parse.urlsplit(str(link))
        if parts.netloc and (parts.scheme, parts.netloc) != self._origin:
            raise ApiError(f"a page link points to another host ({parts.netloc})")
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def _open(self, method: str, path: str, data: Any, headers: dict[str, str]) -> Any:
        url = urllib.parse.urlunsplit((*self._origin, "", "", "")) + path
        request = urllib.request.Request(  # noqa: S310 - platform is checked http(s)
            url, data=data, method=method,
            headers={"Accept": "application/json", "Authorization": f"Token {self._token}",
                     **headers})
        return self._opener.open(request, timeout=self.settings.request_timeout)

    def call(self, method: str, path: str, body: Any = None, *, retry: bool = True,
             upload: Callable[[], _Multipart] | None = None) -> Answer:
        """One request (``path`` may carry a query), retried on 5xx/429 and network errors
        unless ``retry`` is False; 401/403 raise AuthError."""
        attempt = 0
        while True:
            headers: dict[str, str] = {}
            data: Any = None
            if upload is not None:
                data = upload()
                headers = {"Content-Type": f"multipart/form-data; boundary={data.boundary}",
                           "Content-Length": str(data.length)}
            elif body is not None:
                data = json.dumps(body).encode()
                headers = {"Content-Type": "application/json"}
            retry_after = None
            try:
                with self._open(method, path, data, headers) as response:
                    answer = Answer(response.status, _json(response.read()))
            except urllib.error.HTTPError as exc:
                answer = Answer(exc.code, _json(exc.read()))
                retry_after = exc.headers.get("Retry-After")
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
                    ConnectionError) as exc:
                attempt = self._network(exc, method, path, attempt, retry)
                continue
            finally:
                if upload is not None and data is not None:
                    data.close()
            log.debug("%s %s -> %s", method, path.partition("?")[0], answer.status)
            self._refused(answer)
            if retry and self._retryable(answer, attempt, retry_after):
                attempt += 1
                continue
            return answer

    def _refused(self, answer: Answer) -> None:
        if answer.status in (401, 403):
            raise AuthError(f"Rescale refused the API key ({answer.status})",
                            hint="check REMOTE_EXEC_RESCALE_TOKEN or the site's token_file, "
                            "and the site's platform (each platform has its own keys)")

    def _retryable(self, answer: Answer, attempt: int, retry_after: str | None) -> bool:
        """Whether to ask again (after sleeping): a 5xx or a 429 with tries left."""
        if attempt >= self.tries or not (answer.status >= 500 or answer.status == 429):
            return False
        delay = REQUEST_RETRY.capped(self.max_interval).delay(attempt)
        if answer.status == 429 and retry_after and retry_after.strip().isdigit():
            delay = min(float(retry_after), MAX_RETRY_AFTER)
        time.sleep(delay)
        return True

    def _network(self, exc: BaseException, method: str, path: str, attempt: int,
                 retry: bool) -> int:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        log.debug("%s %s: %s", method, path.partition("?")[0], reason)
        if attempt >= self.tries or not retry:
            raise ConnectError(f"Rescale at {self.settings.platform} did not answer: {reason}",
                               hint="check the site's platform, the network and the proxy"
                               ) from None
        time.sleep(REQUEST_RETRY.capped(self.max_interval).delay(attempt))
        return attempt + 1

    def _unexpected(self, operation: str, answer: Answer,
                    kind: type[RemoteExecError] = ApiError) -> RemoteExecError:
        if answer.status >= 500 or answer.status == 429:
            error = ApiError(f"{operation}: Rescale keeps failing ({answer.status})",
                             hint="try again later (`remote-exec resume`)")
            error.transient = True
            return error
        error = kind(f"{operation}: unexpected answer {answer.status} {_detail(answer)}".strip(),
                     hint="the API may differ from what the README assumes; check the site's "
                     "platform, api versions and hardware")
        error.status = answer.status  # type: ignore[attr-defined]
        return error


def _has_id(body: Any) -> bool:
    return isinstance(body, dict) and bool(body.get("id"))


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _detail(answer: Answer) -> str:
    """A 4xx body's words, short (its shape is not documented: any JSON object)."""
    if isinstance(answer.body, dict):
        return json.dumps(answer.body)[:200]
    return ""
