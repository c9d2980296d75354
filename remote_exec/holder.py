"""The connection holder: one per-user process that keeps SSH connections warm.

A run is a fresh process (MInt starts one per module run), and importing asyncssh
costs about as much as a whole SSH handshake. So ``remote-exec run`` does the local
checks itself and hands the run to a holder process over a Unix socket in the state
directory (mode 0600 in a 0700 directory, peer uid checked). The holder executes the
same :func:`remote_exec.run.execute_async` on a pooled connection and streams the
events back; the client prints them and exits with the run's code. Like OpenSSH's
ControlPersist, the holder exits after ``$REMOTE_EXEC_HOLDER_IDLE`` seconds without
runs (default 120). ``REMOTE_EXEC_HOLDER=0`` or ``run --no-holder`` runs in-process.

Admission is counted here, per host, across all the runs of one user: at most
``HOLDER_HANDSHAKES`` connections being opened at once (sshd drops unauthenticated
connections beyond MaxStartups) and at most ``RUNS_PER_CONNECTION`` runs sharing one
connection (each run uses two or three channels; sshd allows ten, MaxSessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from remote_exec import errors
from remote_exec.paths import state_dir
from remote_exec.ui import Reporter

RUNS_PER_CONNECTION = 3
#: what of each client's environment the connections of its runs use (its ssh-agent):
#: the holder's own environment is that of whoever started it, maybe long ago
CALLER_ENV = ("SSH_AUTH_SOCK",)


def socket_path() -> Path:
    return state_dir() / "holder" / "holder.sock"


def enabled() -> bool:
    return os.environ.get("REMOTE_EXEC_HOLDER", "1").lower() not in ("0", "no", "off", "false")


def idle_timeout() -> float:
    try:
        return float(os.environ.get("REMOTE_EXEC_HOLDER_IDLE", "120"))
    except ValueError:
        return 120.0


# -- client -------------------------------------------------------------------------------

def caller_env() -> dict[str, str]:
    """The part of this process's environment its runs' connections must use."""
    return {name: os.environ[name] for name in CALLER_ENV if name in os.environ}


def code_fingerprint() -> str:
    """Which remote-exec code this process runs (its files' names, sizes and mtimes):
    a holder started before an upgrade must not drive runs with its old code."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.j2")]):
        with contextlib.suppress(OSError):
            info = path.stat()
            digest.update(f"{path.relative_to(root)}:{info.st_size}:{info.st_mtime_ns}\n"
                          .encode())
    return digest.hexdigest()[:16]


def run_via_holder(request: Any, ui: Any, resume: bool = False) -> Any:
    """Execute ``request`` in the holder, replacing one that runs other code (an
    upgrade); None if unavailable."""
    for _attempt in range(2):
        result = _run_via_holder(request, ui, resume)
        if result is not _STALE:
            return result
        deadline = time.monotonic() + 5  # the old holder unlinks its socket at once
        while socket_path().exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return None


_STALE = object()


def _run_via_holder(request: Any, ui: Any, resume: bool = False) -> Any:
    """Execute ``request`` in the holder (starting it if needed); None if unavailable.

    SIGINT, SIGTERM and SIGHUP are passed on as a cancel request; the holder stops
    the remote process group and answers with the cancel error. A second signal
    exits at once (the holder still finishes the cancel). If this process dies
    without a word, the holder stops driving the run and leaves it to ``resume``.
    """
    from remote_exec.request import request_to_wire
    from remote_exec.run import CANCEL_SIGNALS, Interrupted

    sock = _connect(start=True)
    if sock is None:
        return None

    def raise_interrupted(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in CANCEL_SIGNALS}
    try:
        with sock:
            payload = {"run": request_to_wire(request), "progress": ui.show_progress,
                       "resume": resume, "pid": os.getpid(), "code": code_fingerprint(),
                       "env": caller_env()}
            stream = sock.makefile("rb")
            try:
                sock.sendall(json.dumps(payload).encode() + b"\n")
                return _read_replies(stream, ui)
            except Interrupted as sig:
                def exit_now(signum: int, _frame: Any) -> None:
                    os._exit(128 + signum)

                for s in CANCEL_SIGNALS:
                    signal.signal(s, exit_now)
                ui.warn(f"{sig.name} received: cancelling the run "
                        "(send it again to exit at once)")
                sock.sendall(json.dumps({"cancel": sig.name,
                                         "exit_code": sig.exit_code}).encode() + b"\n")
                return _read_replies(stream, ui)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _read_replies(stream: Any, ui: Any) -> Any:
    from remote_exec.request import RunResult

    for raw in stream:
        msg = json.loads(raw)
        kind = msg.pop("t")
        if kind == "event":
            ui.event(msg.pop("kind"), msg.pop("message"), **msg)
        elif kind == "warn":
            ui.warn(msg["message"])
        elif kind == "log":
            ui.log_text(msg["text"])
        elif kind == "progress_start":
            ui.progress_start(msg["label"], msg["total"])
        elif kind == "progress":
            ui.progress_update(msg["name"], msg["done"], msg["total"])
        elif kind == "progress_stop":
            ui.progress_stop()
        elif kind == "result":
            return RunResult(**msg["result"])
        elif kind == "stale":
            return _STALE
        elif kind == "error":
            cls = getattr(errors, msg["class"], errors.RemoteExecError)
            if not (isinstance(cls, type) and issubclass(cls, errors.RemoteExecError)):
                cls = errors.RemoteExecError
            err = cls(msg["message"], hint=msg.get("hint"))
            err.exit_code = msg["exit_code"]
            raise err
    raise errors.RemoteLostError(
        "the connection holder stopped in the middle of the run",
        hint="see the holder log in the state directory; `remote-exec resume` continues the "
        "run; run with --no-holder to bypass the holder",
    )


def _connect(start: bool) -> socket.socket | None:
    path = socket_path()
    sock = _try_connect(path)
    if sock is not None or not start:
        return sock
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    log = open(path.parent / "holder.log", "ab")  # noqa: SIM115 - handed to the child
    with log:
        subprocess.Popen(
            [sys.executable, "-m", "remote_exec.holder"], stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=True, close_fds=True,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sock = _try_connect(path)
        if sock is not None:
            return sock
        time.sleep(0.01)
    return None


def _try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def status() -> dict[str, Any] | None:
    """The running holder's status, or None."""
    sock = _connect(start=False)
    if sock is None:
        return None
    with sock:
        sock.sendall(b'{"status": true}\n')
        line = sock.makefile("rb").readline()
    return json.loads(line) if line else None


def stop() -> bool:
    """Ask the running holder to exit once its runs end; returns whether one was running."""
    sock = _connect(start=False)
    if sock is None:
        return False
    with sock:
        sock.sendall(b'{"stop": true}\n')
        sock.makefile("rb").readline()
    return True


# -- server -------------------------------------------------------------------------------

class _WireReporter(Reporter):
    """A Reporter that forwards everything to the client socket."""

    def __init__(self, writer: asyncio.StreamWriter, progress: bool) -> None:  # noqa: D107
        # no super().__init__(): this process has no terminal of its own
        self.writer = writer
        self.show_progress = progress

    def _send(self, **msg: Any) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg, default=str).encode() + b"\n")

    def event(self, kind: str, message: str, **fields: Any) -> None:
        self._send(t="event", kind=kind, message=message, **fields)

    def warn(self, message: str) -> None:
        self._send(t="warn", message=message)

    def log_text(self, data: str) -> None:
        self._send(t="log", text=data)

    async def drain(self) -> None:
        """Back-pressure: a client that stops reading (``--follow`` on a slow terminal)
        holds the log's reader here instead of the holder buffering the whole log."""
        if not self.writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    def progress_start(self, label: str, total: int) -> None:
        if self.show_progress:
            self._send(t="progress_start", label=label, total=total)

    def progress_update(self, name: str, done: int, total: int) -> None:
        self._send(t="progress", name=name, done=done, total=total)

    def progress_stop(self) -> None:
        if self.show_progress:
            self._send(t="progress_stop")

    @property
    def progress_fn(self) -> Any:
        return self.progress_update if self.show_progress else None


class _Pool:
    """Warm connections per destination and caller's agent, with admission counted per host.

    ``acquire`` (with the run's ``caller_env`` bound) and ``release`` have the shape
    :class:`remote_exec.ssh.link.Link` takes, so a run's reconnects go through the pool
    too. A connection is shared only by runs whose callers have the same ssh-agent:
    a run never authenticates with another caller's agent.
    """

    def __init__(self) -> None:
        self.conns: dict[tuple, list[list[Any]]] = {}  # key -> [[conn, active_runs], ...]
        self.handshakes: dict[str, asyncio.Semaphore] = {}
        self.lock = asyncio.Lock()

    @staticmethod
    def key(site: Any, caller_env: Mapping[str, str]) -> tuple:
        return (site.host, site.port, site.user, site.identity_file, site.known_hosts,
                site.connect_timeout, site.stall_timeout, tuple(sorted(caller_env.items())))

    def _take(self, key: tuple) -> Any:
        slots = self.conns.setdefault(key, [])
        slots[:] = [s for s in slots if not s[0].is_closed()]
        for slot in slots:
            if slot[1] < RUNS_PER_CONNECTION:
                slot[1] += 1
                return slot[0]
        return None

    async def acquire(self, site: Any, tries: int, *, caller_env: Mapping[str, str]) -> Any:
        from remote_exec.ssh.link import HOLDER_HANDSHAKES, open_throttled

        key = self.key(site, caller_env)
        async with self.lock:
            conn = self._take(key)
            if conn is not None:
                return conn
            gate = self.handshakes.setdefault(site.host, asyncio.Semaphore(HOLDER_HANDSHAKES))
        async with gate:
            async with self.lock:  # someone may have opened one meanwhile
                conn = self._take(key)
                if conn is not None:
                    return conn
            conn = await open_throttled(site, tries, caller_env=caller_env)
            async with self.lock:
                self.conns.setdefault(key, []).append([conn, 1])
                return conn

    def release(self, conn: Any, broken: bool) -> None:
        if broken:
            conn.close()
        for slots in self.conns.values():
            for slot in slots:
                if slot[0] is conn:
                    slot[1] -= 1
                    if broken:
                        slots.remove(slot)
                    return

    def destinations(self) -> dict[str, int]:
        """``user@host:port`` as each open connection resolved it (~/.ssh/config
        included) -> how many connections."""
        counts: dict[str, int] = {}
        for slots in self.conns.values():
            for conn, _runs in slots:
                if not conn.is_closed():
                    dest = (f"{conn.get_extra_info('username')}@{conn.get_extra_info('host')}"
                            f":{conn.get_extra_info('port')}")
                    counts[dest] = counts.get(dest, 0) + 1
        return counts

    def close_all(self) -> None:
        for slots in self.conns.values():
            for conn, _ in slots:
                conn.close()
        self.conns.clear()


class Holder:
    def __init__(self, path: Path, idle: float) -> None:
        self.path = path
        self.lock_file: Any = None
        self.idle = idle
        self.pool = _Pool()
        self.active = 0
        self.last_activity = time.monotonic()
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.runs_done = 0
        self.code = code_fingerprint()

    def claim(self) -> bool:
        """Take the holder lock; False if another holder of this state directory runs."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lock_file = open(self.path.parent / "holder.lock", "w")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    async def serve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old_umask)
        async with server:
            while not self.stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)
                if self.active == 0 and time.monotonic() - self.last_activity > self.idle:
                    break
            server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            while self.active:
                await asyncio.sleep(0.1)
        self.pool.close_all()

    def _peer_ok(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            return uid == os.getuid()
        except (OSError, AttributeError):
            return True  # not Linux: the 0600 socket in a 0700 directory is the guard

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._peer_ok(writer):
            writer.close()
            return
        self.active += 1
        self.last_activity = time.monotonic()
        try:
            line = await reader.readline()
            if not line:
                return
            msg = json.loads(line)
            if "status" in msg:
                writer.write(json.dumps({"pid": os.getpid(), "active_runs": self.active - 1,
                                         "runs_done": self.runs_done,
                                         "connections": self.pool.destinations(),
                                         "idle_timeout": self.idle,
                                         "started": self.started}).encode() + b"\n")
            elif "stop" in msg:
                self.stopping.set()
                writer.write(b'{"stopping": true}\n')
            elif "run" in msg and msg.get("code", self.code) != self.code:
                self.stopping.set()  # other code than the client's: make way for a new one
                writer.write(b'{"t": "stale"}\n')
            elif "run" in msg:
                await self._run(msg, reader, writer)
            await writer.drain()
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            self.active -= 1
            self.last_activity = time.monotonic()
            with contextlib.suppress(Exception):
                writer.close()

    async def _run(self, msg: dict[str, Any], reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        """Drive one run for a client; a ``cancel`` line cancels it, EOF abandons it."""
        from remote_exec.engine import RunControl, execute_async
        from remote_exec.request import request_from_wire

        request = request_from_wire(msg["run"])
        ui = _WireReporter(writer, bool(msg.get("progress")))
        control = RunControl()
        # the connections of this run use its caller's agent, never this process's
        acquire = functools.partial(self.pool.acquire, caller_env=dict(msg.get("env") or {}))
        task = asyncio.ensure_future(execute_async(
            request, ui, resume=bool(msg.get("resume")), control=control,
            acquire=acquire, release=self.pool.release, driver_pid=msg.get("pid"),
        ))
        watcher = asyncio.ensure_future(self._watch_client(reader, control))
        try:
            result = await task
            self.runs_done += 1
            ui._send(t="result", result=asdict(result))
        except asyncio.CancelledError:
            pass  # abandoned: the client went away, the run stays resumable
        except errors.RemoteExecError as err:
            ui._send(t="error", **{"class": type(err).__name__}, message=err.message,
                     hint=err.hint, exit_code=err.exit_code)
        except Exception as exc:  # noqa: BLE001 - reported to the client as an internal error
            ui._send(t="error", **{"class": "RemoteExecError"},
                     message=f"internal error in the connection holder: {exc!r}",
                     hint="please report this; run with --no-holder to bypass the holder",
                     exit_code=errors.EXIT_INTERNAL)
        finally:
            watcher.cancel()

    @staticmethod
    async def _watch_client(reader: asyncio.StreamReader, control: Any) -> None:
        while True:
            line = await reader.readline()
            if not line:
                control.abandon()
                return
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if "cancel" in msg:
                    control.cancel(str(msg["cancel"]), int(msg.get("exit_code", 130)))


def main() -> None:
    os.chdir("/")
    holder = Holder(socket_path(), idle_timeout())
    if not holder.claim():
        return  # another holder serves this state directory
    asyncio.run(holder.serve())


if __name__ == "__main__":
    main()
