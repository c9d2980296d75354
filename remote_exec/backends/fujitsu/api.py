"""The HPC WebAPI's job and file-sync operations (seeds/000 §6), one method each.

Requests are JSON over HTTPS (``urllib``: no extra dependency), authenticated by an
:class:`~remote_exec.backends.fujitsu.auth.Auth`. A 5xx answer, a timeout or a refused
connection is retried with exponential backoff and jitter (the site's ``retry_tries``
and ``retry_max_interval``); a 401/403 is an authentication error at once. Only the
method, the path and the status are logged (at DEBUG), never a header or a body.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from remote_exec.backends.fujitsu.auth import Auth
from remote_exec.backends.fujitsu.settings import FujitsuSettings
from remote_exec.backoff import REQUEST_RETRY
from remote_exec.errors import (
    FINAL,
    TRANSIENT,
    AuthError,
    ConnectError,
    RemoteExecError,
    RemoteLostError,
    StageError,
)

log = logging.getLogger("remote_exec.fujitsu")

#: §4.3: what to do when a sync completes with a result other than "0"
CREDENTIALS_HINT = ("the HPC side could not use the object storage: set up its credentials "
                    "as the guide's §4.3 says (aws-vault: register the object storage's "
                    "access key, then the bucket's endpoint and region), then retry")


class ApiError(RemoteExecError):
    """The WebAPI answered something other than what the operation documents.
    ``transient``: a 5xx that outlived the retries (worth a later ``resume``)."""

    exit_code = ConnectError.exit_code
    transient = False

    @property  # type: ignore[override]
    def disposition(self) -> str:
        return TRANSIENT if self.transient else FINAL


class SyncError(StageError):
    """The sync that carries the inputs to the HPC side failed (final, exit 73)."""


class ResultSyncError(RemoteLostError):
    """The sync that brings a job's files back failed after the job ran: the run is
    interrupted (exit 75), and ``resume`` syncs again and fetches (the job never reruns)."""


@dataclass
class Answer:
    status: int
    body: Any


class WebApi:
    """One site's WebAPI."""

    def __init__(self, settings: FujitsuSettings, auth: Auth, *, tries: int = 5,
                 max_interval: float = 60.0) -> None:
        self.settings, self.auth = settings, auth
        self.tries, self.max_interval = max(tries, 0), max_interval
        self.base_path = urllib.parse.urlsplit(settings.api_url).path.rstrip("/")

    # -- the operations ----------------------------------------------------------------------
    def start_sync(self, path: str, direction: str, delete: bool = False) -> int:
        """"Start to sync files" (§6.2.1, §6.6.1): the request id. ``direction`` is always
        sent: omitted, the API takes ``from_online`` (§6.6.1)."""
        assert direction in ("from_online", "to_online")
        answer = self.call("POST", self._path("sync"),
                           {"path": path, "direction": direction, "delete": delete})
        requestid = answer.body.get("requestid") if isinstance(answer.body, dict) else None
        if answer.status != 200 or requestid is None:
            raise self._unexpected("Start to sync files", answer)
        return int(requestid)

    def sync_status(self, requestid: int | str) -> dict[str, Any]:
        """"Get Synchronization Status" (§6.2.2): ``status`` and, when complete, ``result``."""
        answer = self.call("GET", self._path("sync_status", requestid=requestid))
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise self._unexpected("Get Synchronization Status", answer)
        return answer.body

    def submit(self, jobfile: str) -> str:
        """"Submit a Job" (§6.3): 201 and the job id. No ``qopt`` (reserved). Never
        retried here: a 5xx or a timeout may come after the job was accepted (the caller
        looks for it by name before submitting again)."""
        answer = self.call("POST", self._path("jobs"), {"jobfile": jobfile}, retry=False)
        job_id = answer.body.get("job_id") if isinstance(answer.body, dict) else None
        if answer.status != 201 or job_id is None:
            raise self._unexpected("Submit a Job", answer, StageError)
        return str(job_id)

    def jobs(self) -> list[dict[str, Any]]:
        """"Get Job List" (§6.4.1): queued and running jobs."""
        answer = self.call("GET", self._path("jobs"))
        if answer.status != 200 or not isinstance(answer.body, list):
            raise self._unexpected("Get Job List", answer)
        return [j for j in answer.body if isinstance(j, dict)]

    def job(self, job_id: str) -> dict[str, Any] | None:
        """"Get Job Detail" (§6.4.2): the job while queued or running; None on 404 (it
        does not exist or has ended)."""
        answer = self.call("GET", self._path("job", job_id=job_id))
        if answer.status == 404:
            return None
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise self._unexpected("Get Job Detail", answer)
        return answer.body

    def cancel(self, job_id: str) -> bool:
        """"Cancel a Job" (§6.5): True if it was cancelled (204), False if it had ended or
        never existed (404)."""
        answer = self.call("DELETE", self._path("job", job_id=job_id), retry=False)
        if answer.status in (200, 202, 204):
            return True
        if answer.status == 404:
            return False
        raise self._unexpected("Cancel a Job", answer)

    # -- HTTP ----------------------------------------------------------------------------------
    def _path(self, name: str, **values: Any) -> str:
        template = self.settings.paths[name]
        quoted = {k: urllib.parse.quote(str(v), safe="") for k, v in values.items()}
        return self.base_path + template.format(**quoted)

    def call(self, method: str, path: str, body: Any = None, retry: bool = True) -> Answer:
        """One request, retried on 5xx and network errors (unless ``retry`` is False: for
        requests that must not be repeated blindly); 401/403 raise AuthError."""
        data = b"" if body is None else json.dumps(body).encode()
        parts = urllib.parse.urlsplit(self.settings.api_url)
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        attempt = 0
        while True:
            headers = {"Accept": "application/json", **self.auth.headers(method, path, data)}
            if body is not None:
                headers["Content-Type"] = "application/json"
            request = urllib.request.Request(  # noqa: S310 - api_url is checked http(s)
                url, data=data if body is not None else None, headers=headers, method=method)
            try:
                with urllib.request.urlopen(  # noqa: S310 - http(s) only (schema)
                        request, timeout=self.settings.request_timeout) as r:
                    answer = Answer(r.status, _json(r.read()))
            except urllib.error.HTTPError as exc:
                answer = Answer(exc.code, _json(exc.read()))
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
                    ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                log.debug("%s %s: %s", method, path, reason)
                if attempt >= self.tries or not retry:
                    raise ConnectError(f"the WebAPI at {self.settings.api_url} is not "
                                       f"reachable: {reason}",
                                       hint="check api_url, the network and the proxy") from None
                attempt = self._backoff(attempt)
                continue
            log.debug("%s %s -> %s", method, path, answer.status)
            if answer.status in (401, 403):
                raise AuthError(f"the WebAPI refused the credentials ({answer.status} "
                                f"{_code(answer)})",
                                hint="check the site's `auth` scheme and the access key / "
                                "token (REMOTE_EXEC_FUJITSU_* or credentials_file)")
            if answer.status >= 500 and attempt < self.tries and retry:
                attempt = self._backoff(attempt)
                continue
            return answer

    def _backoff(self, attempt: int) -> int:
        time.sleep(REQUEST_RETRY.capped(self.max_interval).delay(attempt))
        return attempt + 1

    def _unexpected(self, operation: str, answer: Answer,
                    kind: type[RemoteExecError] = ApiError) -> RemoteExecError:
        if answer.status >= 500:
            error = ApiError(f"{operation}: the WebAPI keeps failing ({answer.status} "
                             f"{_code(answer)})".strip(), hint="try again later")
            error.transient = True
            return error
        return kind(f"{operation}: unexpected answer {answer.status} {_code(answer)}".strip(),
                    hint="the WebAPI may differ from the guide (seeds/000 §6); check the "
                    "site's api_url and paths")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"message": raw[:200].decode("utf-8", "replace")}


def _code(answer: Answer) -> str:
    if isinstance(answer.body, dict):
        return " ".join(str(answer.body.get(k, "")) for k in ("code", "message")).strip()
    return ""
