"""The simulator: Rescale's REST API on loopback, backed by local files and /bin/sh jobs."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import secrets
import shutil
import signal
import string
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# a job's process group: TERM, KILL after a grace (as the Fujitsu simulator stops its jobs)
from fujitsu_sim.sim import _killpg, _terminate

#: a job's statuses in order (the reference's example, oldest → newest)
JOB_FLOW = ("Pending", "Queued", "Started", "Validated", "Executing", "Completed")
#: a persistent cluster's statuses in order (seed 004's example)
CLUSTER_FLOW = ("Not Started", "Pending", "Queued", "Starting", "Started")
NO_CREDENTIALS = {"detail": "Authentication credentials were not provided."}
BAD_TOKEN = {"detail": "Invalid token."}  # a guess (Django REST framework style)
NOT_FOUND = {"detail": "Not found."}
UNAVAILABLE = {"detail": "Service temporarily unavailable."}
CORE_TYPES = ("hpc-3", "emerald", "standard-plus")
_ID_CHARS = string.ascii_letters


def new_id() -> str:
    """An id like the seed's (``kvHyW``, ``QvQAo``): five or six letters."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(6))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Faults:
    """Misbehaviour on cue: change fields of ``sim.faults`` at any time."""

    burst_5xx: int = 0
    """the next N requests of any kind answer 503"""
    rate_limited: int = 0
    """the next N requests answer 429 with ``Retry-After: 1``"""
    lose_create_answer: int = 0
    """the next N job creations are done, but the connection closes without an answer"""
    lose_submit_answer: int = 0
    """the next N submits (on demand or to a cluster) are done, but no answer comes"""
    outputs_pending_polls: int = 0
    """after a job ends, its first N output listings show ``isUploaded: false`` (and
    downloading such a file answers 404)"""
    cancel_races_completion: bool = False
    """``stop/`` answers 202 but the job runs to its normal end"""
    revoke_token_after: int | None = None
    """after N more requests the token is refused (401)"""
    wrong_md5: bool = False
    """output listings show a wrong ``md5`` (a download damaged on the way)"""


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    status: int | None = None
    consumed: bool = False  # its body was read


@dataclass
class File:
    id: str
    name: str
    path: Path
    relative_path: str
    type_id: int  # 1 input, 5 output
    md5: str
    size: int
    uploaded: bool = True
    date: str = field(default_factory=_now)

    def to_json(self, base: str) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "relativePath": self.relative_path,
                "decryptedSize": self.size, "md5": self.md5, "isUploaded": self.uploaded,
                "path": f"user/{self.id}/{self.name}", "typeId": self.type_id,
                "dateUploaded": self.date, "encodedEncryptionKey": "c2ltLWtleQ==",
                "owner": "sim-user", "sharedWith": [], "viewInBrowser": False,
                "downloadUrl": f"{base}/api/v2/files/{self.id}/contents/"}


@dataclass
class Cluster:
    id: str
    body: dict[str, Any]
    statuses: list[dict[str, Any]] = field(default_factory=list)
    thread: threading.Thread | None = None

    @property
    def status(self) -> str:
        return self.statuses[-1]["status"] if self.statuses else "Not Started"


@dataclass
class Job:
    id: str
    body: dict[str, Any]
    workdir: Path
    inputs: list[File]
    statuses: list[dict[str, Any]] = field(default_factory=list)
    cluster: str | None = None
    outputs: list[File] = field(default_factory=list)
    pending_polls: int = 0
    pid: int | None = None
    returncode: int | None = None  # what the API never shows
    stop_requested: bool = False
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def status(self) -> str:
        return self.statuses[-1]["status"] if self.statuses else ""

    @property
    def active(self) -> bool:
        return bool(self.statuses) and self.status not in ("Completed", "Stopped")

    @property
    def history(self) -> list[str]:
        return [s["status"] for s in self.statuses]


class _Reply(Exception):
    def __init__(self, status: int, payload: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.payload, self.headers = status, payload, headers or {}


class _Lost(Exception):
    """Close the connection without an answer (the request was carried out)."""


class _Handler(BaseHTTPRequestHandler):
    server_version = "RescaleSim/1.0"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        self.server.sim._handle(self)  # type: ignore[attr-defined]

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _serve  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class RescaleSim:
    """Rescale's API as seed 004 and the research note describe it (see the package
    docstring): ``with RescaleSim(tmp) as sim: ... sim.url ... sim.jobs[id]``."""

    def __init__(self, workdir: Path, *, token: str = "sim-rescale-key-0123456789abcdef",
                 step_seconds: float = 0.05, cluster_step_seconds: float = 0.1,
                 kill_grace: float = 1.0, unpack_archives: bool = False) -> None:
        self.workdir = Path(workdir)
        self.token = token
        self.step_seconds = step_seconds
        self.cluster_step_seconds = cluster_step_seconds
        self.kill_grace = kill_grace
        self.unpack_archives = unpack_archives
        self.cluster_statuses_404_seconds = 0.5
        self.faults = Faults()
        self._lock = threading.RLock()
        self._requests: list[Request] = []
        self.files: dict[str, File] = {}
        self.jobs: dict[str, Job] = {}
        self.clusters: dict[str, Cluster] = {}
        self.errors: list[str] = []  # simulator bugs (500s), for tests to assert empty
        self._threads: list[threading.Thread] = []
        self._httpd: _Server | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> RescaleSim:
        (self.workdir / "files").mkdir(parents=True, exist_ok=True)
        (self.workdir / "jobs").mkdir(parents=True, exist_ok=True)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.sim = self  # type: ignore[attr-defined]
        thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                  daemon=True, name="rescale-sim-http")
        thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for job in list(self.jobs.values()):
            job._stop.set()
        for t in list(self._threads):
            t.join(timeout=self.kill_grace + 5)

    def __enter__(self) -> RescaleSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def calls(self, method: str, suffix: str) -> list[Request]:
        """The requests of ``method`` whose path ends with ``suffix``."""
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    def add_cluster(self, status: str = "Not Started") -> Cluster:
        """A persistent cluster, as if created earlier (``POST /api/v3/clusters/``)."""
        cluster = Cluster(new_id(), {"name": "sim cluster"})
        cluster.statuses.append(self._status(status, clusterId=cluster.id))
        with self._lock:
            self.clusters[cluster.id] = cluster
        return cluster

    def wait_job(self, job_id: str, timeout: float = 30) -> Job:
        job = self.jobs[job_id]
        if not job.done.wait(timeout):
            raise TimeoutError(f"job {job_id} still {job.status}")
        return job

    # -- HTTP ------------------------------------------------------------------------------
    def _handle(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        query = parse_qs(split.query)
        headers = {k.lower(): v for k, v in h.headers.items()}
        req = Request(h.command, split.path, query, headers, None)
        with self._lock:
            self._requests.append(req)
        length = int(h.headers.get("Content-Length") or 0)
        try:
            if "chunked" in headers.get("transfer-encoding", ""):
                raise _Reply(411, {"detail": "Content-Length required"})
            status, payload, extra = self._route(h, req, length)
        except _Reply as reply:
            status, payload, extra = reply.status, reply.payload, reply.headers
        except _Lost:
            req.status = -1
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(2)
            return
        except Exception as exc:  # a simulator bug: loud, but keep serving
            self.errors.append(repr(exc))
            status, payload, extra = 500, {"detail": repr(exc)}, {}
        finally:
            if length and not req.consumed:  # a refused request: drain its body
                with contextlib.suppress(OSError):
                    while length > 0:
                        length -= len(h.rfile.read(min(length, 1 << 16)) or b"x" * length)
        req.status = status
        if isinstance(payload, Path):
            self._send_file(h, payload)
            return
        h.send_response(status)
        for name, value in extra.items():
            h.send_header(name, value)
        if status == 204 or payload is None and status != 200:
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = json.dumps(payload).encode() if payload is not None else b""
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _send_file(h: _Handler, path: Path) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(path.stat().st_size))
        h.end_headers()
        with path.open("rb") as f:
            while chunk := f.read(1 << 16):
                h.wfile.write(chunk)

    def _route(self, h: _Handler, req: Request, length: int) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            if self.faults.burst_5xx > 0:
                self.faults.burst_5xx -= 1
                raise _Reply(503, dict(UNAVAILABLE))
            if self.faults.rate_limited > 0:
                self.faults.rate_limited -= 1
                raise _Reply(429, {"detail": "Request was throttled."}, {"Retry-After": "1"})
            revoked = self.faults.revoke_token_after
            if revoked is not None:
                self.faults.revoke_token_after = revoked - 1
        auth = req.headers.get("authorization", "")
        if not auth:
            raise _Reply(401, dict(NO_CREDENTIALS))
        if auth != f"Token {self.token}" or (revoked is not None and revoked <= 0):
            raise _Reply(401, dict(BAD_TOKEN))
        if not req.path.endswith("/"):
            raise _Reply(404, dict(NOT_FOUND))  # the reference: the trailing slash is required
        parts = req.path.strip("/").split("/")
        if parts[:1] != ["api"]:
            raise _Reply(404, dict(NOT_FOUND))
        parts = parts[1:]
        if parts[:1] == ["clusters"]:  # seed 004: the cluster submit path has no version
            if len(parts) == 3 and parts[2] == "jobs" and req.method == "POST":
                return self._submit_to_cluster(parts[1], self._json(h, req, length))
            raise _Reply(404, dict(NOT_FOUND))
        if not parts or parts[0] not in ("v2", "v3"):
            raise _Reply(404, dict(NOT_FOUND))
        version, rest = parts[0], parts[1:]
        if rest[:1] == ["files"] and rest[1:] == ["contents"] and req.method == "POST":
            return 201, self._upload(h, req, length), {}
        routes: dict[tuple[str, ...], Any] = {
            ("GET", "files", "*", "contents"): lambda: self._download(rest[1]),
            ("GET", "files", "*"): lambda: (200, self._file(rest[1]).to_json(self.url), {}),
            ("POST", "jobs"): lambda: self._create_job(self._json(h, req, length)),
            ("GET", "jobs"): lambda: self._page(req, [self._job_json(j) for j in
                                                      reversed(list(self.jobs.values()))]),
            ("GET", "jobs", "*"): lambda: (200, self._job_json(self._job(rest[1])), {}),
            ("DELETE", "jobs", "*"): lambda: self._delete_job(rest[1]),
            ("POST", "jobs", "*", "submit"): lambda: self._submit(rest[1]),
            ("POST", "jobs", "*", "stop"): lambda: self._stop_job(rest[1]),
            ("GET", "jobs", "*", "statuses"): lambda: self._page(
                req, list(reversed(self._job(rest[1]).statuses))),
            ("GET", "jobs", "*", "cluster_statuses"): lambda: self._job_cluster_statuses(
                req, rest[1]),
            ("GET", "jobs", "*", "runs"): lambda: self._page(req, self._runs(rest[1])),
            ("GET", "jobs", "*", "files"): lambda: self._page(req, self._outputs(req, rest[1])),
            ("GET", "coretypes"): lambda: self._page(
                req, [{"code": c, "name": c.title()} for c in CORE_TYPES]),
        }
        if version == "v3":
            routes.update({
                ("POST", "clusters"): lambda: self._create_cluster(self._json(h, req, length)),
                ("POST", "clusters", "*", "start"): lambda: self._start_cluster(rest[1]),
                ("GET", "clusters", "*", "statuses"): lambda: self._page(
                    req, list(reversed(self._cluster(rest[1]).statuses))),
            })
        # every second part of a path is an id: it matches "*"
        key = (req.method, *[p if i % 2 == 0 else "*" for i, p in enumerate(rest)])
        handler = routes.get(key)
        if handler is None:
            if any(k[1:] == key[1:] for k in routes):
                raise _Reply(405, {"detail": f'Method "{req.method}" not allowed.'})
            raise _Reply(404, dict(NOT_FOUND))
        return handler()

    def _json(self, h: _Handler, req: Request, length: int) -> dict[str, Any]:
        raw = h.rfile.read(length) if length else b""
        req.consumed = True
        if (req.headers.get("content-type") or "").split(";")[0] != "application/json":
            raise _Reply(415, {"detail": "Unsupported media type"})
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Reply(400, {"detail": "JSON parse error"}) from None
        if not isinstance(body, dict):
            raise _Reply(400, {"detail": "a JSON object is expected"})
        req.body = body
        return body

    def _page(self, req: Request, items: list[Any]) -> tuple[int, Any, dict[str, str]]:
        size = int(req.query.get("page_size", ["10"])[0])
        page = int(req.query.get("page", ["1"])[0])
        if size < 1 or page < 1:
            raise _Reply(404, {"detail": "Invalid page."})
        start = (page - 1) * size
        if start and start >= len(items):
            raise _Reply(404, {"detail": "Invalid page."})

        def link(n: int) -> str:
            return f"{self.url}{req.path}?page={n}&page_size={size}"
        return 200, {"count": len(items),
                     "next": link(page + 1) if start + size < len(items) else None,
                     "previous": link(page - 1) if page > 1 else None,
                     "results": items[start:start + size]}, {}

    @staticmethod
    def _status(name: str, reason: str | None = None, **more: Any) -> dict[str, Any]:
        return {"status": name, "statusDate": _now(), "id": new_id(), "statusReason": reason,
                **more}

    # -- files -----------------------------------------------------------------------------
    def _upload(self, h: _Handler, req: Request, length: int) -> dict[str, Any]:
        ctype = req.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data") or "boundary=" not in ctype:
            raise _Reply(400, {"detail": "multipart/form-data with a file expected"})
        boundary = ctype.split("boundary=", 1)[1].strip().strip('"').encode()
        file_id = new_id()
        raw = self.workdir / "files" / f"{file_id}.upload"
        with raw.open("wb") as out:  # streamed to disk, never held whole
            left = length
            while left > 0:
                chunk = h.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
        req.consumed = True
        with raw.open("rb") as f:
            head = f.read(4096)
            start = head.find(b"\r\n\r\n")
            if not head.startswith(b"--" + boundary) or start < 0:
                raise _Reply(400, {"detail": "malformed multipart body"})
            disposition = head[:start].decode("utf-8", "replace")
            if 'name="file"' not in disposition or "filename=" not in disposition:
                raise _Reply(400, {"detail": 'the field "file" with a filename is required'})
            name = disposition.split('filename="', 1)[1].split('"', 1)[0]
            end_mark = b"\r\n--" + boundary + b"--"
            f.seek(max(0, length - len(end_mark) - 64))
            tail = f.read()
            end = max(0, length - len(end_mark) - 64) + tail.rfind(end_mark)
            if tail.rfind(end_mark) < 0:
                raise _Reply(400, {"detail": "the multipart body does not end"})
            data_at = start + 4
            target = self.workdir / "files" / file_id
            md5 = hashlib.md5()  # noqa: S324
            f.seek(data_at)
            left = end - data_at
            with target.open("wb") as out:
                while left > 0:
                    chunk = f.read(min(left, 1 << 16))
                    out.write(chunk)
                    md5.update(chunk)
                    left -= len(chunk)
        raw.unlink()
        item = File(file_id, name, target, name, 1, md5.hexdigest(), end - data_at)
        with self._lock:
            self.files[file_id] = item
        return item.to_json(self.url)

    def _file(self, file_id: str) -> File:
        item = self.files.get(file_id)
        if item is None:
            raise _Reply(404, dict(NOT_FOUND))
        return item

    def _download(self, file_id: str) -> tuple[int, Any, dict[str, str]]:
        item = self._file(file_id)
        if not item.uploaded or not item.path.is_file():
            raise _Reply(404, dict(NOT_FOUND))
        return 200, item.path, {}

    # -- jobs ------------------------------------------------------------------------------
    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise _Reply(404, dict(NOT_FOUND))
        return job

    def _job_json(self, job: Job) -> dict[str, Any]:
        return {"id": job.id, **job.body, "owner": "sim-user",
                "jobStatus": job.statuses[-1] if job.statuses else None}

    def _create_job(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        problems = []
        if not isinstance(body.get("name"), str) or not body["name"]:
            problems.append("name")
        analyses = body.get("jobanalyses")
        first = analyses[0] if isinstance(analyses, list) and analyses else None
        if not isinstance(first, dict):
            raise _Reply(400, {"jobanalyses": ["This field is required."]})
        analysis = first.get("analysis")
        if not isinstance(analysis, dict) or not analysis.get("code") \
                or "version" not in analysis:
            problems.append("jobanalyses[0].analysis")
        if not isinstance(first.get("command"), str) or not first["command"].strip():
            problems.append("jobanalyses[0].command")
        hardware = first.get("hardware")
        core = hardware.get("coreType") if isinstance(hardware, dict) else None
        code = core.get("code") if isinstance(core, dict) else core
        if code not in CORE_TYPES or not isinstance(hardware.get("coresPerSlot"), int):
            problems.append("jobanalyses[0].hardware")
        inputs = []
        for entry in first.get("inputFiles") or []:
            item = self.files.get(entry.get("id")) if isinstance(entry, dict) else None
            if item is None:
                problems.append(f"inputFiles: {entry!r} does not exist")
            else:
                inputs.append(item)
        if problems:
            raise _Reply(400, {"detail": "invalid: " + ", ".join(problems)})
        job_id = new_id()
        job = Job(job_id, body, self.workdir / "jobs" / job_id / "work", inputs)
        with self._lock:
            self.jobs[job_id] = job
            lose = self.faults.lose_create_answer > 0
            if lose:
                self.faults.lose_create_answer -= 1
        if lose:
            raise _Lost
        return 201, self._job_json(job), {}

    def _submit(self, job_id: str, cluster: str | None = None) -> tuple[int, Any, dict]:
        job = self._job(job_id)
        with self._lock:
            if job.statuses:
                raise _Reply(400, {"detail": "This job has already been submitted."})
            job.cluster = cluster
            job.statuses.append(self._status("Pending"))
            thread = threading.Thread(target=self._run_job, args=(job,), daemon=True,
                                      name=f"rescale-sim-job-{job_id}")
            self._threads.append(thread)
            thread.start()
            lose = self.faults.lose_submit_answer > 0
            if lose:
                self.faults.lose_submit_answer -= 1
        if lose:
            raise _Lost
        return 200, None, {}

    def _submit_to_cluster(self, cluster_id: str, body: dict[str, Any]) -> tuple[int, Any, dict]:
        self._cluster(cluster_id)
        if body.get("submit") is not True or not isinstance(body.get("id"), str):
            raise _Reply(400, {"detail": '{"id": <job id>, "submit": true} expected'})
        self._submit(body["id"], cluster_id)
        return 200, {"id": new_id()}, {}  # seed 004: {"id": "ReUKdb"}, not the job's id

    def _stop_job(self, job_id: str) -> tuple[int, Any, dict]:
        job = self._job(job_id)
        with self._lock:
            if not job.active:
                raise _Reply(400, {"detail": "The job is not running."})
            if not self.faults.cancel_races_completion:
                job.stop_requested = True
                job._stop.set()
        return 202, None, {}

    def _delete_job(self, job_id: str) -> tuple[int, Any, dict]:
        job = self._job(job_id)
        with self._lock:
            if job.active:
                raise _Reply(400, {"detail": "A running job cannot be deleted: stop it first."})
            del self.jobs[job_id]
            for item in job.outputs:
                self.files.pop(item.id, None)
        shutil.rmtree(job.workdir.parent, ignore_errors=True)
        return 204, None, {}

    def _job_cluster_statuses(self, req: Request, job_id: str) -> tuple[int, Any, dict]:
        job = self._job(job_id)
        first = job.statuses[0]["statusDate"] if job.statuses else None
        if first is None or time.time() - _epoch(first) < self.cluster_statuses_404_seconds:
            raise _Reply(404, dict(NOT_FOUND))  # third-party code: 404 until available
        return self._page(req, [self._status("Started")])

    def _runs(self, job_id: str) -> list[dict[str, Any]]:
        job = self._job(job_id)
        if "Executing" not in job.history:
            return []
        return [{"id": 1, "dateStarted": job.statuses[job.history.index("Executing")]
                 ["statusDate"], "dateCompleted": job.statuses[-1]["statusDate"]
                 if not job.active else None, "outputFileCount": len(job.outputs),
                 "outputFileSize": sum(f.size for f in job.outputs)}]

    def _outputs(self, req: Request, job_id: str) -> list[dict[str, Any]]:
        job = self._job(job_id)
        search = req.query.get("search", [""])[0]
        with self._lock:
            pending = job.pending_polls > 0
            if pending:
                job.pending_polls -= 1
            for item in job.outputs:
                item.uploaded = not pending
        listed = [f.to_json(self.url) for f in job.outputs if search in f.name]
        if self.faults.wrong_md5:
            for item in listed:
                item["md5"] = "0" * 32
        return listed

    # -- a job's life ----------------------------------------------------------------------
    def _step(self, job: Job, status: str, reason: str | None = None) -> bool:
        """Wait a step, then enter ``status``; False if a stop came meanwhile."""
        if job._stop.wait(self.step_seconds):
            return False
        with self._lock:
            job.statuses.append(self._status(status, reason))
        return True

    def _run_job(self, job: Job) -> None:
        try:
            self._job_life(job)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"job {job.id}: {exc!r}")
        finally:
            with self._lock:  # the outputs are listed before the final status shows
                job.pending_polls = self.faults.outputs_pending_polls
                self._register_outputs(job)
                if job.stop_requested:
                    if job.status != "Stopping":
                        job.statuses.append(self._status("Stopping"))
                    job.statuses.append(self._status("Stopped", "Stopped by user"))
                else:
                    job.statuses.append(self._status("Completed", "Completed successfully"))
            job.done.set()

    def _job_life(self, job: Job) -> None:
        if not self._step(job, "Queued"):
            return
        while job.cluster is not None:  # a persistent cluster: its jobs wait until it runs
            if self.clusters[job.cluster].status == "Started":
                break
            if job._stop.wait(0.02):
                return
        for status in ("Started", "Validated", "Executing"):
            if not self._step(job, status):
                return
        job.workdir.mkdir(parents=True, exist_ok=True)
        for item in job.inputs:
            shutil.copyfile(item.path, job.workdir / item.name)
            if self.unpack_archives and item.name.endswith(".tar.gz"):
                subprocess.run(["tar", "xzf", item.name], cwd=job.workdir, check=False)
        command = job.body["jobanalyses"][0]["command"]
        with (job.workdir / "process_output.log").open("wb") as log:
            proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=job.workdir,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
            job.pid = proc.pid
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    job.returncode = proc.wait(timeout=0.02)
                    break
                if job._stop.is_set():
                    with self._lock:
                        job.statuses.append(self._status("Stopping"))
                    job.returncode = _terminate(proc, self.kill_grace)
                    return
        _killpg(proc.pid, signal.SIGKILL)

    def _register_outputs(self, job: Job) -> None:
        if not job.workdir.is_dir():
            return
        for path in sorted(job.workdir.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            md5 = hashlib.md5()  # noqa: S324 - the service's checksum
            with path.open("rb") as f:
                while chunk := f.read(1 << 16):
                    md5.update(chunk)
            item = File(new_id(), path.name, path, path.relative_to(job.workdir).as_posix(), 5,
                        md5.hexdigest(), path.stat().st_size, uploaded=job.pending_polls == 0)
            self.files[item.id] = item
            job.outputs.append(item)

    # -- clusters --------------------------------------------------------------------------
    def _cluster(self, cluster_id: str) -> Cluster:
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            raise _Reply(404, dict(NOT_FOUND))
        return cluster

    def _create_cluster(self, body: dict[str, Any]) -> tuple[int, Any, dict]:
        if not isinstance(body.get("hardware"), dict) or not body.get("name"):
            raise _Reply(400, {"detail": "name and hardware are required"})
        cluster = Cluster(new_id(), body)
        cluster.statuses.append(self._status("Not Started", clusterId=cluster.id))
        with self._lock:
            self.clusters[cluster.id] = cluster
        return 201, {"id": cluster.id, **body}, {}

    def _start_cluster(self, cluster_id: str) -> tuple[int, Any, dict]:
        cluster = self._cluster(cluster_id)
        with self._lock:
            if cluster.status not in ("Not Started", "Stopped"):
                raise _Reply(400, {"detail": f"The cluster is {cluster.status}."})
            cluster.statuses.append(self._status("Pending", clusterId=cluster.id))
            thread = threading.Thread(target=self._boot, args=(cluster,), daemon=True)
            self._threads.append(thread)
            thread.start()
        return 204, None, {}  # seed 004: "This returns a 204 on success."

    def _boot(self, cluster: Cluster) -> None:
        for status in CLUSTER_FLOW[2:]:
            time.sleep(self.cluster_step_seconds)
            with self._lock:
                cluster.statuses.append(self._status(status, clusterId=cluster.id))


def _epoch(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=dt.timezone.utc).timestamp()
