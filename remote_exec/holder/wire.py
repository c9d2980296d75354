"""The holder's wire format: what ``remote-exec run`` and the holder say to each other.

One message is one JSON object on one line (UTF-8, ``\\n``-terminated) over the
holder's Unix socket. This module is the only place that knows the messages; it
imports nothing above the run's data (:mod:`remote_exec.request`) and the error
classes (:mod:`remote_exec.errors`), so the client (no asyncssh) and the server
(the engine) both import it without importing each other.

Client to holder, first line (one of):

    {"status": true}                  -> one line of status, then the holder closes
    {"stop": true}                    -> {"stopping": true}; the holder exits once idle
    {"run": REQUEST, "progress": bool, "resume": bool, "pid": int, "code": str,
     "env": {...}}                    -> replies below, ending in a result or an error

and, while a run goes on, at most one more line: ``{"cancel": "SIGINT", "exit_code": 130}``.
EOF (the client went away) abandons the run: it stays resumable.

Holder to client, during a run: lines with ``"t"`` (type) in ``event``, ``warn``,
``log``, ``progress_start``, ``progress``, ``progress_stop``, then exactly one of
``result``, ``error`` or ``stale`` (this holder runs other code than the client:
it goes, and the client starts a new one).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from remote_exec import errors

if TYPE_CHECKING:
    from remote_exec.request import RunRequest, RunResult

# (remote_exec.request, and the configuration under it, is imported by the functions that
# need it: `holder status` and `holder stop` do without)

# -- framing ------------------------------------------------------------------------------

def encode(msg: dict[str, Any]) -> bytes:
    """One message as one line (values JSON does not know are sent as their ``str``)."""
    return json.dumps(msg, default=str).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One line as a message; ValueError if it is not a JSON object."""
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError(f"not a holder message: {line[:80]!r}")
    return msg


# -- client to holder ---------------------------------------------------------------------

STATUS = encode({"status": True})
STOP = encode({"stop": True})


def run_message(request: RunRequest, *, progress: bool, resume: bool, pid: int, code: str,
                env: dict[str, str]) -> bytes:
    """Ask for ``request`` to be run (``code``: the client's code fingerprint; ``env``:
    the part of the client's environment its connections use)."""
    from remote_exec.request import request_to_wire

    return encode({"run": request_to_wire(request), "progress": progress, "resume": resume,
                   "pid": pid, "code": code, "env": env})


def run_request(msg: dict[str, Any]) -> RunRequest:
    """The request of a ``run`` message."""
    from remote_exec.request import request_from_wire

    return request_from_wire(msg["run"])


def cancel_message(signal_name: str, exit_code: int) -> bytes:
    return encode({"cancel": signal_name, "exit_code": exit_code})


# -- holder to client ---------------------------------------------------------------------

STALE = encode({"t": "stale"})
STOPPING = encode({"stopping": True})
#: the types of message that end a run's replies
FINAL_TYPES = ("result", "error", "stale")


def event_message(kind: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"t": "event", "kind": kind, "message": message, **fields}


def warn_message(message: str) -> dict[str, Any]:
    return {"t": "warn", "message": message}


def log_message(text: str) -> dict[str, Any]:
    """A piece of the followed log (the server waits for the client between pieces)."""
    return {"t": "log", "text": text}


def progress_start_message(label: str, total: int) -> dict[str, Any]:
    return {"t": "progress_start", "label": label, "total": total}


def progress_message(name: str, done: int, total: int) -> dict[str, Any]:
    return {"t": "progress", "name": name, "done": done, "total": total}


def progress_stop_message() -> dict[str, Any]:
    return {"t": "progress_stop"}


def result_message(result: RunResult) -> dict[str, Any]:
    return {"t": "result", "result": asdict(result)}


def result_from(msg: dict[str, Any]) -> RunResult:
    from remote_exec.request import RunResult

    return RunResult(**msg["result"])


def error_message(err: errors.RemoteExecError) -> dict[str, Any]:
    return {"t": "error", "class": type(err).__name__, "message": err.message,
            "hint": err.hint, "exit_code": err.exit_code}


def internal_error_message(exc: BaseException) -> dict[str, Any]:
    """A failure of the holder itself, told to the client as an internal error."""
    return {"t": "error", "class": "RemoteExecError",
            "message": f"internal error in the connection holder: {exc!r}",
            "hint": "please report this; run with --no-holder to bypass the holder",
            "exit_code": errors.EXIT_INTERNAL}


def error_from(msg: dict[str, Any]) -> errors.RemoteExecError:
    """The error an ``error`` message describes (a class of :mod:`remote_exec.errors`,
    else the base class), with the holder's exit code."""
    cls = getattr(errors, str(msg.get("class")), errors.RemoteExecError)
    if not (isinstance(cls, type) and issubclass(cls, errors.RemoteExecError)):
        cls = errors.RemoteExecError
    err = cls(msg["message"], hint=msg.get("hint"))
    err.exit_code = msg["exit_code"]
    return err
