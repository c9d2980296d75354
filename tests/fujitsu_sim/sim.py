"""The simulator: an HPC WebAPI on loopback, backed by moto's S3 server and local /bin/sh jobs."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from . import auth as _auth
from .pjm import JobOptions, PjmError, format_hms, parse_script

API_PREFIX = "/v1"

# PJM states. The API shows jobs in ACTIVE states only; the others are final.
ACTIVE_STATES = ("ACC", "QUE", "RNA", "RUN", "RNO")
FINAL_STATES = ("EXT", "CCL", "RJT", "ERR")

NOT_FOUND = {"code": "Client.URLNotFound", "message": "A specified URL is not found."}
UNAVAILABLE = {
    "code": "Server.ServiceUnavailable",
    "message": "The service is temporarily unavailable. Retry later.",
}

JOB_KEYS = (
    "Fugaku:core",
    "Fugaku:e_pol",
    "Fugaku:ec",
    "Fugaku:elapse_limit",
    "Fugaku:lst",
    "Fugaku:md",
    "Fugaku:pc",
    "Fugaku:rank",
    "Fugaku:reason",
    "Fugaku:sn",
    "Fugaku:v_mem",
    "Fugaku:v_pol",
    "Fugaku:vnode",
    "accept",
    "elapse_time",
    "group",
    "job_id",
    "job_name",
    "node_require",
    "priority",
    "queue",
    "start_date",
    "status",
    "user",
)


class _Headers(dict):
    """A plain dict of the request headers whose look-ups ignore case."""

    def _find(self, key: object) -> object:
        if isinstance(key, str):
            for k in self.keys():
                if k.lower() == key.lower():
                    return k
        return key

    def __getitem__(self, key: object) -> str:
        return super().__getitem__(self._find(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._find(key))

    def get(self, key: object, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(self._find(key), default)


@dataclass
class Faults:
    """Misbehaviour on cue. Change fields of ``sim.faults`` at any time (or replace it)."""

    sync_waits: int = 0
    """per sync started from now on: that many ``{"status": "waiting"}`` answers before it even
    starts copying (and then "waiting" until the copy is done); the files are not there before"""
    sync_result: str = "0"
    """for syncs started from now on; "1" = wrong object-storage credentials: nothing is copied
    and the status ends as ``{"result": "1", "status": "complete"}``"""
    burst_5xx: int = 0
    """the next N requests of any kind answer 503 Server.ServiceUnavailable (counts down)"""
    detail_404_after_submit: int = 0
    """for jobs submitted from now on: their first N Get Job Detail calls answer 404 although
    the job is queued (it stays in QUE until those N calls were made; Get Job List shows it)"""
    cancel_races_completion: bool = False
    """Cancel a Job lets the job run to its normal end, then answers 404"""


@dataclass
class Request:
    """One request as received (``path`` without query; ``headers`` look-ups ignore case)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    raw_body: bytes
    body: Any  # the parsed JSON, or None when empty / not JSON
    time: float
    status: int | None = None
    response: Any = None


@dataclass
class Sync:
    request_id: int
    path: str
    direction: str  # as applied: an omitted direction is recorded as "from_online"
    direction_given: bool
    delete: bool
    result: str
    waits_left: int
    started: bool = False
    done: bool = False
    error: str | None = None
    copied: list[str] = field(default_factory=list)  # object keys / relative paths transferred
    deleted: list[str] = field(default_factory=list)


@dataclass
class Job:
    job_id: int
    name: str
    jobfile: str  # as given in the request (relative to hpc_root)
    script: Path  # absolute
    workdir: Path  # the job's directory (cwd, PJM_O_WORKDIR)
    options: JobOptions
    qopt: str | None
    elapse_limit: int  # seconds
    stdout_path: Path
    stderr_path: Path | None  # None when joined into stdout (-j)
    group: str
    user: str
    accept: dt.datetime
    state: str = "ACC"
    last_state: str = "ACC"
    history: list[str] = field(default_factory=lambda: ["ACC"])
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    pid: int | None = None
    exit_code: int | None = None  # the script's exit status; None if it never ran / signalled
    signal: int | None = None  # the signal that ended the script, if any
    timed_out: bool = False
    cancelled: bool = False
    error: str | None = None  # why the simulator could not run it at all
    phantom_404s: int = 0
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class _ApiError(Exception):
    def __init__(self, status: int, payload: Any, headers: dict[str, str] | None = None):
        super().__init__(status, payload)
        self.status = status
        self.payload = payload
        self.headers = headers or {}


def _bad(message: str) -> _ApiError:
    return _ApiError(400, {"code": "Client.InvalidParameter", "message": message})


def _now() -> dt.datetime:
    return dt.datetime.now()


def _iso(t: dt.datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S") if t else "-"


class _Handler(BaseHTTPRequestHandler):
    server_version = "FujitsuHpcSim/1.0"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def _serve(self) -> None:
        self.server.sim._handle(self)  # type: ignore[attr-defined]

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = _serve  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        self.server.sim._http_log.append(format % args)  # type: ignore[attr-defined]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops bursts of connects (1 s SYN retry)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # quiet: into the in-memory log instead of a traceback on stderr
        import traceback

        self.sim._http_log.append(traceback.format_exc())  # type: ignore[attr-defined]


class FujitsuSim:
    """A Fujitsu Cloud Service HPC WebAPI simulator (see the package docstring)."""

    def __init__(
        self,
        workdir: Path,
        *,
        auth: str = "bearer",
        token: str = "sim-token-0123456789",
        access_key: str = "SIMACCESSKEY",
        secret_key: str = "sim-secret-key",
        user: str = "apiuser1",
        group: str = "apiuser1",
        default_elapse: int = 3600,
        queue_seconds: float = 0.2,
        kill_grace: float = 2.0,
        bucket: str | None = None,
    ):
        if auth not in _auth.SCHEMES:
            raise ValueError(f"auth must be one of {_auth.SCHEMES}, not {auth!r}")
        self.workdir = Path(workdir)
        self.auth = auth
        self.token = token
        self.access_key = access_key
        self.secret_key = secret_key
        self.user = user
        self.group = group
        self.default_elapse = default_elapse
        self.queue_seconds = queue_seconds
        self.kill_grace = kill_grace
        self.faults = Faults()
        self.hpc_root = self.workdir / "hpc"
        self._bucket = bucket or f"fujitsu-sim-{uuid.uuid4().hex[:12]}"
        self._s3_credentials = {
            "aws_access_key_id": "SIMS3ACCESSKEY",
            "aws_secret_access_key": "sim-s3-secret",
        }
        self._lock = threading.RLock()
        self._requests: list[Request] = []
        self._http_log: list[str] = []
        self._syncs: dict[int, Sync] = {}
        self._jobs: dict[int, Job] = {}
        self._threads: list[threading.Thread] = []
        self._next_job_id = 1001
        self._httpd: _Server | None = None
        self._http_thread: threading.Thread | None = None
        self._moto: Any = None
        self._s3: Any = None
        self._user_s3: Any = None
        self._s3_endpoint: str | None = None
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FujitsuSim:
        t0 = time.monotonic()
        import boto3
        from botocore.config import Config
        from moto.server import ThreadedMotoServer

        # werkzeug logs every request to stderr unless its logger has a level of its own
        wlog = logging.getLogger("werkzeug")
        if wlog.level == logging.NOTSET:
            wlog.setLevel(logging.WARNING)

        self.hpc_root.mkdir(parents=True, exist_ok=True)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self._s3_endpoint = f"http://{host}:{port}"
        self._s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=self._s3_endpoint,
            region_name=self.region,
            config=Config(retries={"max_attempts": 2}),
            **self._s3_credentials,
        )
        self._s3.create_bucket(Bucket=self._bucket)

        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.sim = self  # type: ignore[attr-defined]
        self._http_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="fujitsu-sim-http",
            daemon=True,
        )
        self._http_thread.start()
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            for job in self._jobs.values():
                if job.state in ACTIVE_STATES:
                    job.cancelled = True
                    job._cancel.set()
        for t in list(self._threads):
            t.join(timeout=self.kill_grace + 5)
        if self._s3 is not None:
            with contextlib.suppress(Exception):
                self._empty_bucket()
                self._s3.delete_bucket(Bucket=self._bucket)
            self._s3 = self._user_s3 = None
        if self._moto is not None:
            self._moto.stop()
            self._moto = None

    def __enter__(self) -> FujitsuSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{API_PREFIX}"

    @property
    def s3_endpoint(self) -> str:
        assert self._s3_endpoint is not None, "start() first"
        return self._s3_endpoint

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def region(self) -> str:
        return "us-east-1"

    @property
    def s3_credentials(self) -> dict[str, str]:
        """``aws_access_key_id`` / ``aws_secret_access_key``: pass as ``**kwargs`` to boto3."""
        return dict(self._s3_credentials)

    @property
    def requests(self) -> list[Request]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def http_log(self) -> list[str]:
        return list(self._http_log)

    @property
    def jobs(self) -> dict[int, Job]:
        """Every job ever submitted (finished ones too), by id (a new dict of the live records:
        ``state``, ``history``, ``exit_code``, ``signal``, ``timed_out``, ``cancelled`` ...)."""
        with self._lock:
            return dict(self._jobs)

    @property
    def syncs(self) -> dict[int, Sync]:
        with self._lock:
            return dict(self._syncs)

    def s3_client(self) -> Any:
        """A boto3 S3 client for the moto endpoint (one per simulator, cached; thread-safe)."""
        with self._lock:
            if self._user_s3 is None:
                import boto3

                self._user_s3 = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.s3_endpoint,
                    region_name=self.region,
                    **self.s3_credentials,
                )
            return self._user_s3

    def auth_headers(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        """Good credentials for one request of this instance's scheme (``path`` = URL path)."""
        if self.auth == "bearer":
            return _auth.bearer_headers(self.token)
        return _auth.hmac_headers(self.access_key, self.secret_key, method, path, body)

    def wait_job(self, job_id: int, timeout: float = 30) -> Job:
        job = self._jobs[job_id]
        if not job.done.wait(timeout):
            raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
        return job

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until every job has finished and every sync is done."""
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise TimeoutError("simulator still busy")

    # ------------------------------------------------------------------ HTTP

    def _handle(self, h: _Handler) -> None:
        try:
            length = int(h.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            h.send_error(411, "a valid Content-Length is required")
            return
        raw = h.rfile.read(length) if length > 0 else b""
        split = urlsplit(h.path)
        headers = _Headers(h.headers.items())
        body: Any = None
        if raw:
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
        req = Request(h.command, split.path, split.query, headers, raw, body, time.time())
        with self._lock:
            self._requests.append(req)
        extra: dict[str, str] = {}
        try:
            status, payload = self._dispatch(req)
        except _ApiError as exc:
            status, payload, extra = exc.status, exc.payload, exc.headers
        except Exception as exc:  # a simulator bug: say so loudly but keep serving
            status, payload = 500, {"code": "Server.InternalError", "message": repr(exc)}
        req.status, req.response = status, copy.deepcopy(payload)
        if status == 204:  # no body, and no Content-Length either (RFC 9110)
            h.send_response(status)
            h.end_headers()
            return
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            h.send_header(name, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _dispatch(self, req: Request) -> tuple[int, Any]:
        with self._lock:
            if self.faults.burst_5xx > 0:
                self.faults.burst_5xx -= 1
                return 503, dict(UNAVAILABLE)
        self._authenticate(req)
        if not req.path.startswith(API_PREFIX + "/"):
            raise _ApiError(404, dict(NOT_FOUND))
        parts = req.path[len(API_PREFIX) + 1 :].split("/")
        routes: dict[str, Any]
        if parts == ["sync"]:
            routes = {"POST": self._start_sync}
        elif len(parts) == 2 and parts[0] == "sync" and parts[1]:
            routes = {"GET": lambda r: self._sync_status(parts[1])}
        elif parts == ["jobs"]:
            routes = {"POST": self._submit, "GET": self._list_jobs}
        elif len(parts) == 2 and parts[0] == "jobs" and parts[1]:
            routes = {
                "GET": lambda r: self._job_detail(parts[1]),
                "DELETE": lambda r: self._cancel(parts[1]),
            }
        else:
            raise _ApiError(404, dict(NOT_FOUND))
        handler = routes.get(req.method)
        if handler is None:
            raise _ApiError(
                405,
                {"code": "Client.MethodNotAllowed", "message": f"{req.method} is not allowed"},
                {"Allow": ", ".join(routes)},
            )
        return handler(req)

    def _authenticate(self, req: Request) -> None:
        if self.auth == "bearer":
            reason = _auth.check_bearer(req.headers, self.token)
        else:
            reason = _auth.check_hmac(
                req.headers, req.method, req.path, req.raw_body, self.access_key, self.secret_key
            )
        if reason:
            raise _ApiError(401, {"code": "Client.Unauthorized", "message": reason})

    @staticmethod
    def _json_object(req: Request) -> dict[str, Any]:
        ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _ApiError(
                415,
                {
                    "code": "Client.UnsupportedMediaType",
                    "message": "Content-Type must be application/json",
                },
            )
        if not isinstance(req.body, dict):
            raise _bad("the request body must be a JSON object")
        return req.body

    def _hpc_path(self, value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise _bad(f"{what} must be a non-empty string")
        p = PurePosixPath(value)
        if p.is_absolute() or value.startswith("~"):
            raise _bad(f"{what} must be relative to the HPC-side root: {value!r}")
        if ".." in p.parts:
            raise _bad(f"{what} must not contain '..': {value!r}")
        return self.hpc_root.joinpath(*p.parts)

    # ------------------------------------------------------------------ sync

    def _start_sync(self, req: Request) -> tuple[int, Any]:
        body = self._json_object(req)
        self._hpc_path(body.get("path"), "path")
        direction_given = "direction" in body
        direction = body.get("direction", "from_online")  # documented: omitted = from_online
        if direction not in ("from_online", "to_online"):
            raise _bad(f'direction must be "from_online" or "to_online", not {direction!r}')
        delete = body.get("delete", False)
        if not isinstance(delete, bool):
            raise _bad("delete must be a boolean")
        with self._lock:
            rid = secrets.randbelow(9_000_000_000) + 1_000_000_000
            while rid in self._syncs:
                rid = secrets.randbelow(9_000_000_000) + 1_000_000_000
            sync = Sync(
                request_id=rid,
                path=body["path"],
                direction=direction,
                direction_given=direction_given,
                delete=delete,
                result=str(self.faults.sync_result),
                waits_left=max(0, int(self.faults.sync_waits)),
            )
            self._syncs[rid] = sync
            if sync.waits_left == 0:
                self._launch_sync(sync)
        return 200, {"requestid": rid}

    def _launch_sync(self, sync: Sync) -> None:
        sync.started = True
        t = threading.Thread(
            target=self._run_sync,
            args=(sync,),
            daemon=True,
            name=f"fujitsu-sim-sync-{sync.request_id}",
        )
        self._threads.append(t)
        t.start()

    def _sync_status(self, raw_id: str) -> tuple[int, Any]:
        with self._lock:
            sync = self._syncs.get(int(raw_id)) if raw_id.isdigit() else None
            if sync is None:
                return 200, {"status": "error: no such ID"}
            if sync.waits_left > 0:
                sync.waits_left -= 1
                if sync.waits_left == 0:
                    self._launch_sync(sync)
                return 200, {"status": "waiting"}
            if not sync.done:
                return 200, {"status": "waiting"}
            if sync.error:
                return 200, {"status": f"error: {sync.error}"}
            return 200, {"result": sync.result, "status": "complete"}

    def _run_sync(self, sync: Sync) -> None:
        try:
            if sync.result == "0":
                target = self._hpc_path(sync.path, "path")
                if sync.direction == "from_online":
                    self._sync_from_online(sync, target)
                else:
                    self._sync_to_online(sync, target)
        except _ApiError as exc:
            sync.error = exc.payload["message"]
        except Exception as exc:
            sync.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                sync.done = True

    def _objects(self) -> Iterator[str]:
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def _sync_from_online(self, sync: Sync, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        keep: set[str] = set()
        for key in self._objects():
            parts = PurePosixPath(key).parts
            if key.startswith("/") or ".." in parts or not parts:
                raise RuntimeError(f"object key outside the target directory: {key!r}")
            dest = target.joinpath(*parts)
            if key.endswith("/"):
                dest.mkdir(parents=True, exist_ok=True)
                continue
            keep.add("/".join(parts))
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = self._s3.get_object(Bucket=self._bucket, Key=key)["Body"].read()
            tmp = dest.with_name(dest.name + ".sim-sync-tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
            sync.copied.append(key)
        if sync.delete:
            for rel, path in _local_files(target):
                if rel not in keep:
                    path.unlink()
                    sync.deleted.append(rel)

    def _sync_to_online(self, sync: Sync, target: Path) -> None:
        if not target.is_dir():
            raise RuntimeError(f"no such directory: {sync.path}")
        local = dict(_local_files(target))
        for rel, path in sorted(local.items()):
            self._s3.put_object(Bucket=self._bucket, Key=rel, Body=path.read_bytes())
            sync.copied.append(rel)
        if sync.delete:
            for key in list(self._objects()):
                if key not in local:
                    self._s3.delete_object(Bucket=self._bucket, Key=key)
                    sync.deleted.append(key)

    def _empty_bucket(self) -> None:
        for key in list(self._objects()):
            self._s3.delete_object(Bucket=self._bucket, Key=key)

    # ------------------------------------------------------------------ jobs

    def _submit(self, req: Request) -> tuple[int, Any]:
        body = self._json_object(req)
        qopt = body.get("qopt")
        if "qopt" in body and not isinstance(qopt, str):
            raise _ApiError(404, dict(NOT_FOUND))  # documented: non-string qopt -> 404
        jobfile = body.get("jobfile")
        script = self._hpc_path(jobfile, "jobfile")
        if not script.is_file():
            raise _bad(f"jobfile not found: {jobfile}")
        try:
            opts = parse_script(script.read_text(errors="replace"))
        except PjmError as exc:
            raise _bad(f"bad #PJM directive: {exc}") from exc
        if opts.interact:
            raise _bad("interactive jobs are not available through the WebAPI")
        workdir = script.parent
        with self._lock:
            job_id = self._next_job_id
            self._next_job_id += 1
            name = opts.name or script.name

            def place(spec: str) -> Path:
                p = Path(spec.replace("%j", str(job_id)))
                return p if p.is_absolute() else workdir / p

            stdout = place(opts.stdout) if opts.stdout else workdir / f"{name}.{job_id}.out"
            if opts.join:
                stderr = None
            elif opts.stderr:
                stderr = place(opts.stderr)
            else:
                stderr = workdir / f"{name}.{job_id}.err"
            job = Job(
                job_id=job_id,
                name=name,
                jobfile=str(jobfile),
                script=script,
                workdir=workdir,
                options=opts,
                qopt=qopt,
                elapse_limit=opts.elapse if opts.elapse is not None else self.default_elapse,
                stdout_path=stdout,
                stderr_path=stderr,
                group=opts.group or self.group,
                user=self.user,
                accept=_now(),
                phantom_404s=max(0, int(self.faults.detail_404_after_submit)),
            )
            self._jobs[job_id] = job
            t = threading.Thread(
                target=self._run_job, args=(job,), daemon=True, name=f"fujitsu-sim-job-{job_id}"
            )
            self._threads.append(t)
            t.start()
        return 201, {"job_id": job_id}

    def _job_object(self, job: Job) -> dict[str, str]:
        now = dt.datetime.now()
        if job.start is None:
            elapsed = 0.0
        else:
            elapsed = ((job.end or now) - job.start).total_seconds()
        return {
            "Fugaku:core": "-",
            "Fugaku:e_pol": "-",
            "Fugaku:ec": "0",
            "Fugaku:elapse_limit": format_hms(job.elapse_limit),
            "Fugaku:lst": job.last_state,
            "Fugaku:md": "NM",
            "Fugaku:pc": "0",
            "Fugaku:rank": "bychip",
            "Fugaku:reason": "-",
            "Fugaku:sn": "0",
            "Fugaku:v_mem": "-",
            "Fugaku:v_pol": "-",
            "Fugaku:vnode": "-",
            "accept": _iso(job.accept),
            "elapse_time": format_hms(elapsed),
            "group": job.group,
            "job_id": str(job.job_id),
            "job_name": job.name,
            "node_require": job.options.node or "1",
            "priority": "127",
            "queue": job.options.rscgrp or "def_grp",
            "start_date": _iso(job.start),
            "status": job.state,
            "user": job.user,
        }

    def _list_jobs(self, req: Request) -> tuple[int, Any]:
        with self._lock:
            return 200, [
                self._job_object(j)
                for _, j in sorted(self._jobs.items())
                if j.state in ACTIVE_STATES
            ]

    def _find_job(self, raw_id: str) -> Job | None:
        return self._jobs.get(int(raw_id)) if raw_id.isdigit() else None

    def _job_detail(self, raw_id: str) -> tuple[int, Any]:
        with self._lock:
            job = self._find_job(raw_id)
            if job is not None and job.phantom_404s > 0:
                job.phantom_404s -= 1
                return 404, dict(NOT_FOUND)
            if job is None or job.state not in ACTIVE_STATES:
                return 404, dict(NOT_FOUND)
            return 200, self._job_object(job)

    def _cancel(self, raw_id: str) -> tuple[int, Any]:
        with self._lock:
            job = self._find_job(raw_id)
            if job is None or job.state not in ACTIVE_STATES:
                return 404, dict(NOT_FOUND)
            if not self.faults.cancel_races_completion:
                job.cancelled = True
                job._cancel.set()
                if job.state in ("ACC", "QUE"):
                    self._set_state(job, "CCL")
                elif job.state in ("RNA", "RUN"):
                    self._set_state(job, "RNO")
                return 204, None
            job.phantom_404s = 0  # nothing may hold it back from finishing
        job.done.wait(job.elapse_limit + self.kill_grace + 30)
        return 404, dict(NOT_FOUND)

    def _set_state(self, job: Job, state: str) -> None:
        with self._lock:
            if job.state != state:
                job.last_state = job.state
                job.state = state
                job.history.append(state)

    def _run_job(self, job: Job) -> None:
        try:
            self._job_lifecycle(job)
        except Exception as exc:
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                if job.state not in FINAL_STATES:
                    self._set_state(job, "CCL" if job.cancelled else "EXT")
                job.end = job.end or _now()
            job.done.set()

    def _job_lifecycle(self, job: Job) -> None:
        queued = max(0.0, self.queue_seconds)
        accepted = min(0.05, queued / 2)  # ACC briefly, then QUE for the rest
        if job._cancel.wait(accepted):
            return
        with self._lock:
            if job._cancel.is_set():
                return
            self._set_state(job, "QUE")
        deadline = time.monotonic() + queued - accepted
        while True:
            with self._lock:
                if job._cancel.is_set():
                    return
                if job.phantom_404s <= 0 and time.monotonic() >= deadline:
                    self._set_state(job, "RNA")
                    break
            time.sleep(0.02)

        env = dict(os.environ)
        env.update(job.options.env)
        env.update(
            PJM_JOBID=str(job.job_id),
            PJM_JOBNAME=job.name,
            PJM_O_WORKDIR=str(job.workdir),
            PJM_O_LOGNAME=job.user,
        )
        job.stdout_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(job.stdout_path, "wb"))  # noqa: SIM115
            if job.stderr_path is None:
                err: Any = subprocess.STDOUT
            else:
                job.stderr_path.parent.mkdir(parents=True, exist_ok=True)
                err = stack.enter_context(open(job.stderr_path, "wb"))  # noqa: SIM115
            with self._lock:
                if job._cancel.is_set():
                    return
                proc = subprocess.Popen(
                    ["/bin/sh", str(job.script)],
                    cwd=job.workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
                job.pid = proc.pid
                job.start = _now()
                self._set_state(job, "RUN")
        deadline = time.monotonic() + job.elapse_limit
        rc: int | None = None
        while rc is None:
            if job._cancel.is_set():
                break
            if time.monotonic() >= deadline:
                job.timed_out = True
                self._set_state(job, "RNO")
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = proc.wait(timeout=0.05)
        if rc is None:
            rc = _terminate(proc, self.kill_grace)
        else:
            _killpg(proc.pid, signal.SIGKILL)  # leftovers in the job's process group
        with self._lock:
            if rc < 0:
                job.signal = -rc
            else:
                job.exit_code = rc
            job.end = _now()
            if job.state != "RNO":
                self._set_state(job, "RNO")
        time.sleep(0.05)  # RNO: a brief post-processing phase, as PJM has
        self._set_state(job, "CCL" if job.cancelled else "EXT")


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _terminate(proc: subprocess.Popen, grace: float) -> int:
    _killpg(proc.pid, signal.SIGTERM)
    try:
        rc = proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    _killpg(proc.pid, signal.SIGKILL)
    return rc


def _local_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under ``root`` (file symlinks too)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".sim-sync-tmp") or not path.is_file():
                continue
            yield path.relative_to(root).as_posix(), path


def job_keys_ok(obj: Mapping[str, Any]) -> bool:
    """True when ``obj`` has exactly the documented job keys, all string values."""
    return set(obj) == set(JOB_KEYS) and all(isinstance(v, str) for v in obj.values())
