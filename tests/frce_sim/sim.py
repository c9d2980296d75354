"""The FRCE HPC API simulator: ``hpcapi/submit_job`` and ``hpcapi/query_status`` on loopback,
backed by local processes (see the package docstring for what is documented and what assumed)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

API_PREFIX = "/hpcapi"
CONTROL_PREFIX = "/_sim"
FIRST_JOB_ID = 46185772  # the seed's example answer

PENDING, RUNNING = "PENDING", "RUNNING"
COMPLETED, FAILED, CANCELLED, TIMEOUT = "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"
ACTIVE_STATES = (PENDING, RUNNING)
FINAL_STATES = (COMPLETED, FAILED, CANCELLED, TIMEOUT)

# the documented failure reasons (seed 003, "Errors:")
POSTDATA_PARSE_ERROR = "postdata_parse_error"
POSTDATA_TOO_BIG = "postdata_too_big"
NO_PARTITION_GIVEN = "no_partition_given"
BAD_PARTITION = "bad_partition"
BAD_NUMBER_OF_TASKS = "bad_number_of_tasks"
CONFLICTING_MEM = "conflicting_mem_specifications"
MALLOC_FAILED = "backend_query_malloc_failed"
SUBMISSION_FAILED = "backend_query_job_submission_failed"
DOCUMENTED_REASONS = (
    POSTDATA_PARSE_ERROR,
    POSTDATA_TOO_BIG,
    NO_PARTITION_GIVEN,
    BAD_PARTITION,
    BAD_NUMBER_OF_TASKS,
    CONFLICTING_MEM,
    MALLOC_FAILED,
    SUBMISSION_FAILED,
)
# ASSUMED (the seed: "OTHER ERRORS REMAIN TO BE DOCUMENTED!")
NO_SCRIPT_BODY = "no_script_body"

FIELDS = (
    "script-body",
    "partition",
    "ntasks",
    "ntasks-per-core",
    "ntasks-per-node",
    "cpus-per-task",
    "mem-per-cpu",
    "mem-per-node",
    "dependency",
    "timelimit",
)
QUERY_KEYS = ("user", "name", "partition", "start", "end", "state")
UNKNOWN_TIME = "Unknown"

_TIMELIMIT = re.compile(r"^(\d+)-(\d{2}):(\d{2}):(\d{2})$")
_MEMORY = re.compile(r"^\d+[KMGT]?$")
_SBATCH = re.compile(r"^[ \t]*#SBATCH")
_MAX_READ = 1 << 20  # bodies above this are not even read (the connection is closed)

_HTML_401 = (
    '<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head>\n'
    "<title>401 Unauthorized</title>\n</head><body>\n<h1>Unauthorized</h1>\n"
    "<p>This server could not verify that you\nare authorized to access the document\n"
    "requested.</p>\n</body></html>\n"
)


@dataclass
class Faults:
    """Misbehaviour on cue: counters of the next N requests concerned (they count down).
    Change fields of ``sim.faults`` at any time (or replace it)."""

    malloc_failed: int = 0
    """the next N valid submissions answer ``call_failure`` / ``backend_query_malloc_failed``
    (no job is created)"""
    submission_failed: int = 0
    """the next N valid submissions answer ``backend_query_job_submission_failed`` (no job)"""
    severe_error: int = 0
    """the next N API requests (submit or query, after authentication) answer 500 with a
    ``text/plain`` body (the seed's "severe error"); no job is created"""
    lose_submit_answer: int = 0
    """the next N valid submissions create the job and then close the connection without
    sending any response"""
    query_unavailable: int = 0
    """the next N ``query_status`` requests answer 503 (``text/plain``)"""


@dataclass
class Request:
    """One request as received. No header values are kept (never an Authorization value)."""

    method: str
    path: str  # without the query string
    query: str
    content_type: str | None
    body: Any  # the parsed JSON body, or None (no body / not JSON)
    raw_size: int
    time: float
    authorized: bool = False  # carried an ``Authorization: Negotiate <base64>`` header
    challenged: bool = False  # answered 401 + ``WWW-Authenticate: Negotiate``
    status: int | None = None
    reason: str | None = None  # the ``reason`` of a JSON answer, if any
    dropped: bool = False  # the connection was closed without an answer


@dataclass
class Job:
    job_id: int
    partition: str
    script: str  # the ``script-body`` as received
    script_run: str  # what runs: ``#SBATCH`` lines removed
    fields: dict[str, Any]  # the whole JSON object received
    user: str
    directory: Path  # workdir/jobs/<id>: script.sh, slurm-<id>.out, the cwd
    timelimit: float | None  # seconds; None = no limit given (the simulator enforces none)
    submit: dt.datetime
    state: str = PENDING
    history: list[str] = field(default_factory=lambda: [PENDING])
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    pid: int | None = None  # also the process group id
    exit_code: int | None = None  # the script's exit status; None if never ran / signalled
    signal: int | None = None  # the signal that ended the script, if any
    error: str | None = None  # why the simulator could not run it
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def script_path(self) -> Path:
        return self.directory / "script.sh"

    @property
    def output_path(self) -> Path:
        return self.directory / f"slurm-{self.job_id}.out"

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def parse_timelimit(value: Any) -> float | None:
    """Seconds of a ``DD-HH:MM:SS`` string, or None when it is not one."""
    if not isinstance(value, str):
        return None
    m = _TIMELIMIT.match(value)
    if not m:
        return None
    d, h, mi, s = (int(x) for x in m.groups())
    if h > 23 or mi > 59 or s > 59:
        return None
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


def strip_sbatch(script: str) -> str:
    """The script without its ``#SBATCH`` lines (the rest unchanged)."""
    return "".join(line for line in script.splitlines(keepends=True) if not _SBATCH.match(line))


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        n = int(value)
        return n if n > 0 else None
    return None


def _slurm_time(t: dt.datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S") if t is not None else UNKNOWN_TIME


class _Refused(Exception):
    """A ``call_failure`` answer."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Handler(BaseHTTPRequestHandler):
    server_version = "Apache"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        self.server.sim._handle(self)  # type: ignore[attr-defined]

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        self.server.sim._http_log.append(format % args)  # type: ignore[attr-defined]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        import traceback

        self.sim._http_log.append(traceback.format_exc())  # type: ignore[attr-defined]


class FrceSim:
    """An FRCE HPC API simulator (see the package docstring)."""

    def __init__(
        self,
        workdir: Path,
        *,
        partitions: Iterable[str] = ("norm", "quick"),
        body_limit: int = 4096,
        auth: str = "none",
        user: str = "root",
        queue_delay: float = 0.5,
        window: float = 24 * 3600,
        failure_status: int = 200,
        kill_grace: float = 2.0,
        first_job_id: int = FIRST_JOB_ID,
    ):
        if auth not in ("none", "negotiate"):
            raise ValueError(f"auth must be 'none' or 'negotiate', not {auth!r}")
        self.workdir = Path(workdir)
        self.partitions = tuple(partitions)
        self.body_limit = body_limit
        self.auth = auth
        self.user = user
        self.queue_delay = queue_delay
        self.window = window
        self.failure_status = failure_status
        self.kill_grace = kill_grace
        self.faults = Faults()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._jobs: dict[int, Job] = {}
        self._requests: list[Request] = []
        self._http_log: list[str] = []
        self._threads: list[threading.Thread] = []
        self._next_job_id = first_job_id
        self._httpd: _Server | None = None
        self._http_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FrceSim:
        (self.workdir / "jobs").mkdir(parents=True, exist_ok=True)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.sim = self  # type: ignore[attr-defined]
        self._http_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="frce-sim-http",
            daemon=True,
        )
        self._http_thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job._cancel.set()
            if job.pid is not None:
                _killpg(job.pid, signal.SIGKILL)
        for t in list(self._threads):
            t.join(5)

    def __enter__(self) -> FrceSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ for the tests' eyes

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the simulator is not running")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (what ``FRCE_SIM_URL`` holds for the scancel stand-in)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/hpcapi``: the API is ``url + "/submit_job"`` and
        ``url + "/query_status"``."""
        return self.base_url + API_PREFIX

    @property
    def jobs(self) -> dict[int, Job]:
        with self._lock:
            return dict(self._jobs)

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    @property
    def challenges(self) -> int:
        """How many requests were answered with a Negotiate challenge (401)."""
        with self._lock:
            return sum(1 for r in self._requests if r.challenged)

    def scancel_env(self) -> dict[str, str]:
        """The environment the scancel stand-in needs."""
        return {"FRCE_SIM_URL": self.base_url}

    def wait_job(
        self, job_id: int | str, states: Iterable[str] = FINAL_STATES, timeout: float = 30
    ) -> Job:
        """Wait until the job is in one of ``states`` (default: any final state)."""
        wanted = {states} if isinstance(states, str) else set(states)
        job = self._jobs[int(job_id)]
        deadline = time.monotonic() + timeout
        with self._changed:
            while job.state not in wanted:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"job {job_id} is {job.state}, not {sorted(wanted)}, after {timeout} s"
                    )
                self._changed.wait(left)
        return job

    def cancel(self, job_id: int | str) -> bool:
        """Cancel a job (as scancel does). True if it was pending or running, False if it had
        already ended; KeyError for an unknown id. A running job's process group gets TERM,
        then KILL after ``kill_grace`` seconds."""
        job = self._jobs[int(job_id)]
        with self._lock:
            if job.finished:
                return False
            job._cancel.set()
            if job.state == PENDING:
                job.end = dt.datetime.now()
                self._set_state(job, CANCELLED)
            return True

    # ------------------------------------------------------------------ HTTP

    def _handle(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        length_raw = h.headers.get("Content-Length")
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            h.close_connection = True
            self._send_text(h, 411, "Length Required\n")
            return
        try:
            length = int(length_raw or 0)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_READ:
            req = Request(
                h.command, split.path, split.query, None, None, max(length, 0), time.time()
            )
            with self._lock:
                self._requests.append(req)
            if length > _MAX_READ and split.path == API_PREFIX + "/submit_job":
                h.close_connection = True
                req.status, req.reason = self.failure_status, POSTDATA_TOO_BIG
                self._send_json(h, self.failure_status, _failure(POSTDATA_TOO_BIG))
                return
            h.close_connection = True
            req.status = 400
            self._send_text(h, 400, "Bad Request\n")
            return
        raw = h.rfile.read(length) if length > 0 else b""
        body: Any = None
        if raw:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                body = json.loads(raw)
        req = Request(
            method=h.command,
            path=split.path,
            query=split.query,
            content_type=h.headers.get("Content-Type"),
            body=body,
            raw_size=len(raw),
            time=time.time(),
        )
        with self._lock:
            self._requests.append(req)
        try:
            self._route(h, req, raw)
        except Exception as exc:  # a simulator bug: say so loudly but keep serving
            req.status = 500
            self._send_text(h, 500, f"simulator error: {exc!r}\n")

    def _route(self, h: _Handler, req: Request, raw: bytes) -> None:
        if req.path.startswith(CONTROL_PREFIX + "/"):
            self._control(h, req)
            return
        routes = {
            API_PREFIX + "/submit_job": "POST",
            API_PREFIX + "/query_status": "GET",
        }
        if req.path not in routes:
            req.status = 404
            self._send_text(h, 404, "Not Found\n")
            return
        if not self._authenticate(h, req):
            return
        if req.method != routes[req.path]:
            req.status = 405
            self._send_text(h, 405, "Method Not Allowed\n", {"Allow": routes[req.path]})
            return
        with self._lock:
            if self.faults.severe_error > 0:
                self.faults.severe_error -= 1
                severe = True
            else:
                severe = False
        if severe:
            req.status = 500
            self._send_text(
                h, 500, "Internal Server Error: severe error (simulated)\n", self._api_headers()
            )
            return
        if req.method == "GET":
            self._query_status(h, req)
        else:
            self._submit(h, req, raw)

    def _authenticate(self, h: _Handler, req: Request) -> bool:
        if self.auth == "none":
            return True
        value = h.headers.get("Authorization") or ""
        scheme, _, token = value.strip().partition(" ")
        ok = False
        if scheme.lower() == "negotiate" and token.strip():
            try:
                ok = bool(base64.b64decode(token.strip(), validate=True))
            except (binascii.Error, ValueError):
                ok = False
        if ok:
            req.authorized = True
            return True
        req.status, req.challenged = 401, True
        data = _HTML_401.encode("iso-8859-1")
        h.send_response(401, "Unauthorized")
        h.send_header("WWW-Authenticate", "Negotiate")
        h.send_header("Content-Type", "text/html; charset=iso-8859-1")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        return False

    def _api_headers(self) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": "*"}
        if self.auth == "negotiate":
            headers["WWW-Authenticate"] = (
                "Negotiate " + base64.b64encode(secrets.token_bytes(24)).decode()
            )
        return headers

    def _send_json(
        self, h: _Handler, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status, "Success" if status == 200 else None)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    @staticmethod
    def _send_text(
        h: _Handler, status: int, text: str, headers: dict[str, str] | None = None
    ) -> None:
        data = text.encode()
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Type", "text/plain; charset=utf-8")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    # ------------------------------------------------------------------ control endpoint

    def _control(self, h: _Handler, req: Request) -> None:
        parts = req.path[len(CONTROL_PREFIX) + 1 :].split("/")
        if req.method != "POST" or len(parts) != 2 or parts[0] != "cancel":
            req.status = 404
            self._send_text(h, 404, "Not Found\n")
            return
        raw_id = parts[1]
        job_id = int(raw_id) if raw_id.isascii() and raw_id.isdigit() else None
        if job_id is None or job_id not in self._jobs:
            req.status = 404
            self._send_json(h, 404, {"error": "Invalid job id specified", "job_id": raw_id})
            return
        was_active = self.cancel(job_id)
        req.status = 200
        self._send_json(
            h, 200, {"job_id": job_id, "cancelled": was_active, "state": self._jobs[job_id].state}
        )

    # ------------------------------------------------------------------ query_status

    def _query_status(self, h: _Handler, req: Request) -> None:
        with self._lock:
            if self.faults.query_unavailable > 0:
                self.faults.query_unavailable -= 1
                req.status = 503
                self._send_text(h, 503, "Service Unavailable\n", self._api_headers())
                return
            now = dt.datetime.now()
            horizon = now - dt.timedelta(seconds=self.window)
            payload: dict[str, Any] = {"status": "call_success"}
            for job_id, job in sorted(self._jobs.items()):
                recent = job.submit >= horizon or (job.end is not None and job.end >= horizon)
                if not recent:
                    continue
                payload[str(job_id)] = self._record(job)
            payload["reason"] = "query_success"
        req.status, req.reason = 200, "query_success"
        self._send_json(h, 200, payload, self._api_headers())

    def _record(self, job: Job) -> dict[str, str]:
        if job.state == RUNNING:
            # what squeue shows while it runs: the expected end (start + time limit)
            end = (
                job.start + dt.timedelta(seconds=job.timelimit)
                if job.start is not None and job.timelimit is not None
                else None
            )
        else:
            end = job.end
        return {
            "user": job.user,
            "name": f"{job.user}-",
            "partition": job.partition,
            "start": _slurm_time(job.start),
            "end": _slurm_time(end),
            "state": job.state,
        }

    # ------------------------------------------------------------------ submit_job

    def _fail(self, h: _Handler, req: Request, reason: str) -> None:
        req.status, req.reason = self.failure_status, reason
        self._send_json(h, self.failure_status, _failure(reason), self._api_headers())

    def _submit(self, h: _Handler, req: Request, raw: bytes) -> None:
        try:
            fields = self._validate(raw, req.body)
        except _Refused as exc:
            self._fail(h, req, exc.reason)
            return
        with self._lock:
            if self.faults.malloc_failed > 0:
                self.faults.malloc_failed -= 1
                reason: str | None = MALLOC_FAILED
            elif self.faults.submission_failed > 0:
                self.faults.submission_failed -= 1
                reason = SUBMISSION_FAILED
            else:
                reason = None
            if reason is None:
                job = self._create_job(fields)
                lose = self.faults.lose_submit_answer > 0
                if lose:
                    self.faults.lose_submit_answer -= 1
        if reason is not None:
            self._fail(h, req, reason)
            return
        if lose:
            req.dropped = True
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        req.status, req.reason = 200, str(job.job_id)
        self._send_json(
            h, 200, {"status": "call_success", "reason": str(job.job_id)}, self._api_headers()
        )

    def _validate(self, raw: bytes, body: Any) -> dict[str, Any]:
        if len(raw) > self.body_limit:
            raise _Refused(POSTDATA_TOO_BIG)
        if not isinstance(body, dict):
            raise _Refused(POSTDATA_PARSE_ERROR)
        partition = body.get("partition")
        if partition is None or partition == "":
            raise _Refused(NO_PARTITION_GIVEN)
        if not isinstance(partition, str) or partition not in self.partitions:
            raise _Refused(BAD_PARTITION)
        if "ntasks" in body and _positive_int(body["ntasks"]) is None:
            raise _Refused(BAD_NUMBER_OF_TASKS)
        if "mem-per-cpu" in body and "mem-per-node" in body:
            raise _Refused(CONFLICTING_MEM)
        script = body.get("script-body")
        if not isinstance(script, str) or not script:
            raise _Refused(NO_SCRIPT_BODY)  # ASSUMED reason
        # ASSUMED: what sbatch itself would refuse comes back as job_submission_failed
        if not script.startswith("#!"):
            raise _Refused(SUBMISSION_FAILED)
        if "timelimit" in body and parse_timelimit(body["timelimit"]) is None:
            raise _Refused(SUBMISSION_FAILED)
        if "ntasks-per-core" in body and _positive_int(body["ntasks-per-core"]) not in (1, 2):
            raise _Refused(SUBMISSION_FAILED)
        for name in ("ntasks-per-node", "cpus-per-task"):
            if name in body and _positive_int(body[name]) is None:
                raise _Refused(SUBMISSION_FAILED)
        for name in ("mem-per-cpu", "mem-per-node"):
            if name in body and not _MEMORY.match(str(body[name])):
                raise _Refused(SUBMISSION_FAILED)
            if name in body and isinstance(body[name], bool):
                raise _Refused(SUBMISSION_FAILED)
        if "dependency" in body and not isinstance(body["dependency"], str):
            raise _Refused(SUBMISSION_FAILED)
        return body

    def _create_job(self, fields: dict[str, Any]) -> Job:
        with self._lock:
            job_id = self._next_job_id
            self._next_job_id += 1
            directory = self.workdir / "jobs" / str(job_id)
            directory.mkdir(parents=True, exist_ok=True)
            script = fields["script-body"]
            job = Job(
                job_id=job_id,
                partition=fields["partition"],
                script=script,
                script_run=strip_sbatch(script),
                fields=dict(fields),
                user=self.user,
                directory=directory,
                timelimit=parse_timelimit(fields["timelimit"]) if "timelimit" in fields else None,
                submit=dt.datetime.now(),
            )
            job.script_path.write_text(job.script_run)
            job.script_path.chmod(0o700)
            self._jobs[job_id] = job
            t = threading.Thread(
                target=self._run_job, args=(job,), daemon=True, name=f"frce-sim-job-{job_id}"
            )
            self._threads.append(t)
            t.start()
            return job

    # ------------------------------------------------------------------ running jobs

    def _set_state(self, job: Job, state: str) -> None:
        with self._changed:
            if job.state != state:
                job.state = state
                job.history.append(state)
            self._changed.notify_all()

    def _run_job(self, job: Job) -> None:
        try:
            self._lifecycle(job)
        except Exception as exc:
            job.error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                if not job.finished:
                    job.end = job.end or dt.datetime.now()
                    self._set_state(job, CANCELLED if job._cancel.is_set() else FAILED)

    def _lifecycle(self, job: Job) -> None:
        if job._cancel.wait(max(0.0, self.queue_delay)):
            return  # cancel() already set CANCELLED
        env = dict(os.environ)
        env.update(
            SLURM_JOB_ID=str(job.job_id),
            SLURM_JOB_PARTITION=job.partition,
            SLURM_SUBMIT_DIR=str(job.directory),
        )
        with open(job.output_path, "wb") as out:
            with self._lock:
                if job._cancel.is_set():
                    return
                # the shebang's interpreter runs it (the kernel reads the #! line), as Slurm does
                proc = subprocess.Popen(
                    [str(job.script_path)],
                    cwd=job.directory,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                job.pid = proc.pid
                job.start = dt.datetime.now()
                self._set_state(job, RUNNING)
            deadline = None if job.timelimit is None else time.monotonic() + job.timelimit
            rc: int | None = None
            timed_out = False
            while rc is None:
                if job._cancel.is_set():
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
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
            job.end = dt.datetime.now()
            if job._cancel.is_set():
                final = CANCELLED
            elif timed_out:
                final = TIMEOUT
            else:
                final = COMPLETED if rc == 0 else FAILED
            self._set_state(job, final)


def _failure(reason: str) -> dict[str, str]:
    return {"status": "call_failure", "reason": reason}


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
