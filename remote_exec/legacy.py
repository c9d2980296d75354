"""MInt's old argument form: ``client_name:HOST client_cmd:CMD client_files:a,b,c``.

Behaves like ``execute_remote_command.sample.py`` from misrc_remote_workflow: the
command runs in a fresh remote directory with the listed files, the whole directory
comes back into the current directory, and the exit code is 0 on success and 1 on
any failure. Additions a module may rely on (all from the .sh variant of the script):

* ``solver_logs/solver_execute.log`` under ``<base>/<$MISYSTEM_SITEID>/`` gets
  ``YYYY-MM-DD HH:MM:SS: start|normal end|abnormal end: <solver>: unknown`` lines
  when ``$MISYSTEM_SITEID`` is set (``<base>`` defaults to
  ``/home/misystem/assets/workflow``; ``legacy.solver_log_base`` in the configuration
  or ``$REMOTE_EXEC_SOLVER_LOG_BASE`` changes it);
* on failure the remote log is printed between
  ``---------- remote side log ----------------`` lines.

Unlike the original, a value may itself contain ``:`` (only the first one splits).
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remote_exec.config import Site
    from remote_exec.request import RunRequest

LOG_MARKER = "---------- remote side log ----------------"
USAGE = """\
Remote execution (drop-in for execute_remote_command.sample.py)
Usage:
  remote-exec legacy client_name:HOST client_cmd:CMD client_files:FILE[,FILE...]
  Options:
     client_name  : the SSH host: an address, a host name, a ~/.ssh/config alias,
                    or a site of the remote-exec configuration
     client_cmd   : the script or solver to run on the remote side (in the run directory)
     client_files : the files the remote side needs, separated by commas
     solver       : (optional) the solver name written to solver_execute.log
"""


@dataclass
class LegacyArgs:
    client_name: str
    client_cmd: str
    client_files: list[str]
    solver: str


def parse(argv: list[str]) -> LegacyArgs | None:
    """The legacy arguments, or None when one of the three is missing (usage case)."""
    values: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition(":")
        if sep and key in ("client_name", "client_cmd", "client_files", "solver"):
            values[key] = value
    if not all(k in values for k in ("client_name", "client_cmd", "client_files")):
        return None
    files = [f for f in values["client_files"].split(",") if f]
    solver = values.get("solver") or os.environ.get("REMOTE_EXEC_SOLVER") or _solver_name(
        values["client_cmd"]
    )
    return LegacyArgs(values["client_name"], values["client_cmd"], files, solver)


def build(args: LegacyArgs, site: Site, into: Path) -> RunRequest:
    """The run request for ``args`` on ``site``, built like ``run``'s
    (:func:`remote_exec.request.build_request`: the site's `backend` and `resources`,
    every check before connecting). A restricted site runs only what its agent approved:
    ``client_cmd`` naming exactly the site's entrypoint runs that approved entrypoint;
    any other command line is refused (exit 1) with what to run instead."""
    from remote_exec.request import build_request

    return build_request(site, command=args.client_cmd, inputs=args.client_files, into=into,
                         command_option="client_cmd")


def _solver_name(cmd: str) -> str:
    try:
        words = shlex.split(cmd)
    except ValueError:
        words = cmd.split()
    return os.path.basename(words[0]) if words else "unknown"


class SolverLog:
    """Appends MInt's solver_execute.log lines, when ``$MISYSTEM_SITEID`` is set.

    Lines pair up as MInt reads them: every ``normal end`` or ``abnormal end`` follows a
    ``start`` (:meth:`end` writes the start line first when the run failed before it
    began, as the original wrote ``start`` before its first step)."""

    def __init__(self, base: str, solver: str) -> None:
        self.solver = solver
        self.started = False
        site_id = os.environ.get("MISYSTEM_SITEID")
        base = os.environ.get("REMOTE_EXEC_SOLVER_LOG_BASE", base)
        self.path = (Path(base) / site_id / "solver_logs" / "solver_execute.log"
                     if site_id else None)

    def start(self) -> None:
        if not self.started:
            self.write("start")
            self.started = True

    def end(self, ok: bool) -> None:
        self.start()
        self.write("normal end" if ok else "abnormal end")

    def write(self, what: str) -> None:
        if self.path is None:
            return
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{stamp}: {what}: {self.solver}: unknown\n")
        except OSError as exc:
            sys.stderr.write(f"remote-exec: warning: cannot write {self.path}: {exc}\n")


def print_remote_log(text: str) -> None:
    """The legacy failure report on stdout."""
    print(LOG_MARKER)
    if text:
        print(text.rstrip("\n"))
    print(LOG_MARKER)
    sys.stdout.flush()
