"""The holder's client: what ``remote-exec run`` does to have its run driven by the holder.

Connect to the per-user Unix socket (starting the holder if none answers), send the
request, show the replies, pass SIGINT/SIGTERM/SIGHUP on as a cancel. Start-up time
matters here (a run is a fresh process): this module imports the standard library,
:mod:`remote_exec.paths`, :mod:`remote_exec.errors` and the wire format only, never
asyncssh or the engine (``tests/test_layout.py`` checks it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from remote_exec import errors
from remote_exec.holder import wire
from remote_exec.paths import state_dir

#: the signals that cancel a run (in the holder, or in this process without it)
CANCEL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: what of each client's environment the connections of its runs use (its ssh-agent):
#: the holder's own environment is that of whoever started it, maybe long ago
CALLER_ENV = ("SSH_AUTH_SOCK",)
#: what this process runs to start a holder (see ``remote_exec/holder/__main__.py``);
#: it inherits this environment, PYTHONPATH included, so it runs this same code
SERVER_COMMAND = ("-m", "remote_exec.holder")
#: seconds a client waits while another one starts the holder (that one waits 10 s
#: for its holder's socket), so that a holder that cannot start costs each client
#: this at most, not 10 s per client before it in line
START_LOCK_WAIT = 15.0


class Interrupted(BaseException):
    """A cancel signal reached this process (raised from the signal handler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return errors.EXIT_SIGNAL_BASE + self.signum


def socket_path() -> Path:
    return state_dir() / "holder" / "holder.sock"


def enabled() -> bool:
    return os.environ.get("REMOTE_EXEC_HOLDER", "1").lower() not in ("0", "no", "off", "false")


def idle_timeout() -> float:
    try:
        return float(os.environ.get("REMOTE_EXEC_HOLDER_IDLE", "120"))
    except ValueError:
        return 120.0


def caller_env() -> dict[str, str]:
    """The part of this process's environment its runs' connections must use."""
    return {name: os.environ[name] for name in CALLER_ENV if name in os.environ}


def code_fingerprint() -> str:
    """Which remote-exec code this process runs (the names, sizes and mtimes of the
    package's files): a holder started before an upgrade must not drive runs with its
    old code."""
    root = Path(__file__).resolve().parent.parent  # remote_exec/, not remote_exec/holder/
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
    sock = _connect(start=True)
    if sock is None:
        return None

    def raise_interrupted(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in CANCEL_SIGNALS}
    try:
        with sock:
            message = wire.run_message(request, progress=ui.show_progress, resume=resume,
                                       pid=os.getpid(), code=code_fingerprint(),
                                       env=caller_env())
            stream = sock.makefile("rb")
            try:
                sock.sendall(message)
                return _read_replies(stream, ui)
            except Interrupted as sig:
                def exit_now(signum: int, _frame: Any) -> None:
                    os._exit(errors.EXIT_SIGNAL_BASE + signum)

                for s in CANCEL_SIGNALS:
                    signal.signal(s, exit_now)
                ui.warn(f"{sig.name} received: cancelling the run "
                        "(send it again to exit at once)")
                sock.sendall(wire.cancel_message(sig.name, sig.exit_code))
                return _read_replies(stream, ui)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _read_replies(stream: Any, ui: Any) -> Any:
    """Show the holder's replies until the run's result (returned), error (raised) or
    ``stale`` (``_STALE``)."""
    for raw in stream:
        msg = wire.decode(raw)
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
            return wire.result_from(msg)
        elif kind == "stale":
            return _STALE
        elif kind == "error":
            raise wire.error_from(msg)
    raise errors.RemoteLostError(
        "the connection holder stopped in the middle of the run",
        hint="see the holder log in the state directory; `remote-exec resume` continues the "
        "run; run with --no-holder to bypass the holder",
    )


def _connect(start: bool) -> socket.socket | None:
    """A connection to the holder; with ``start``, start one if none answers.

    Starting is serialised by ``holder/start.lock``: of many clients started at once
    (MInt starting a batch), one starts the holder and the others wait for it here,
    instead of each starting a holder of its own that imports the engine only to find
    the holder lock taken (on a busy machine that was hundreds of CPU seconds).
    """
    path = socket_path()
    sock = _try_connect(path)
    if sock is not None or not start:
        return sock
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    with open(path.parent / "start.lock", "a") as lock:  # unlocked when it closes
        waited_until = time.monotonic() + START_LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                sock = _try_connect(path)  # the other client's holder is up
                if sock is not None:
                    return sock
                if time.monotonic() > waited_until:
                    return None  # (the run goes on in this process, as when none starts)
                time.sleep(0.05)
        sock = _try_connect(path)  # started while this process waited for the lock
        if sock is not None:
            return sock
        log = open(path.parent / "holder.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            subprocess.Popen(
                [sys.executable, *SERVER_COMMAND], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True, close_fds=True,
                env=_holder_env(),
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sock = _try_connect(path)
            if sock is not None:
                return sock
            time.sleep(0.01)
    return None


def claim_lock(path: Path) -> Any:
    """The holder lock of the socket ``path`` (an open file, held while it stays
    open), or None if another holder of this state directory holds it. Standard
    library only: a holder started needlessly exits before importing the engine."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_file = open(path.parent / "holder.lock", "w")  # noqa: SIM115 - held for life
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.close()
        return None
    return lock_file


def _try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _holder_env() -> dict[str, str] | None:
    """The holder's environment: this one; in the single-file build, one that makes the
    holder unpack its own copy (by default it would use this process's, which is removed
    when this process exits, while the holder lives on). Other children (rsync's remote
    shell) end before this process and may use its copy: they start faster."""
    if not getattr(sys, "frozen", False):
        return None
    return {**os.environ, "PYINSTALLER_RESET_ENVIRONMENT": "1"}


def status() -> dict[str, Any] | None:
    """The running holder's status, or None."""
    sock = _connect(start=False)
    if sock is None:
        return None
    with sock:
        sock.sendall(wire.STATUS)
        line = sock.makefile("rb").readline()
    return wire.decode(line) if line else None


def stop() -> bool:
    """Ask the running holder to exit once its runs end; returns whether one was running."""
    sock = _connect(start=False)
    if sock is None:
        return False
    with sock:
        sock.sendall(wire.STOP)
        sock.makefile("rb").readline()
    return True
