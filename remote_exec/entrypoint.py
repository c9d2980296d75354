"""What runs in the remote run directory, and the small POSIX sh wrapper around it.

Three small POSIX sh scripts go into ``.remote-exec/`` of every run directory:

  * ``launch.sh``  starts ``run.sh`` once (an atomic ``mkdir`` guard), detached in its
                   own session and process group, records that group in ``pgid`` and
                   waits for it while the SSH channel lasts;
  * ``run.sh``     enters the run directory, records its pid, runs the entrypoint with
                   stdout and stderr into ``remote_program_exec.log``, and writes the
                   exit code atomically to ``exit_code``;
  * ``cancel.sh``  TERM to the process group, KILL after a grace period.

The batch backend's ``batch.sh`` and the restricted site's agent keep the same launch-once
guard, cancel mark and exit-code file; the shell fragments below (:func:`launch_once`,
:func:`cancel_unlaunched`, :func:`write_atomically`) and the protocol constants are
the one definition the scripts are built from, the constants taken from the agent.

Whether a run finished is therefore a fact on the remote side, never a guess from
a connection, and a dropped connection does not stop the entrypoint.

Four kinds of entrypoint:
  * ``site``     the site's own program (MInt's ``execute_remote-side_program_ssh.sh``);
  * ``command``  a command line run by the remote login shell, as the legacy script did;
  * ``template`` a script rendered from an allowlisted template, run by ``/bin/sh``;
  * ``approved`` on a restricted site: the name of an entrypoint the site approved and
                 pinned, with its raw parameters; the agent validates and runs it (no
                 control scripts are written: see :mod:`remote_exec.backends.agent`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from remote_exec.agent_file import agent_module
from remote_exec.inputs import CONTROL_DIR, LOG_NAME
from remote_exec.templates import RemotePath

# The protocol's facts, shared with the restricted site's agent (which defines them:
# it must stay one file) and the batch backend's submitter.
_AGENT = agent_module()
#: a control script's (and the agent's) exit status when the run was launched before
ALREADY_LAUNCHED: int = _AGENT.EXIT_ALREADY_LAUNCHED
#: the agent's exit status for a refused request
REFUSED: int = _AGENT.EXIT_REFUSED
#: how the agent's lines on stderr begin
AGENT_PREFIX: str = _AGENT.SAY_PREFIX
#: the agent's framing word (see ``strip_mark`` in the agent)
MARK_WORD: str = _AGENT.MARK_WORD
#: the exit code a cancel records: TERM (or never started), KILL
TERMINATED: int = _AGENT.EXIT_TERMINATED
KILLED: int = _AGENT.EXIT_KILLED
#: a control script's exit status when it cannot enter its run directory
NO_RUN_DIR = 97

#: the control files in ``.remote-exec/`` (the agent keeps the same in its state
#: directory): the launch-once guard (a directory), the cancel mark, the exit code, the
#: run's process group
LAUNCHED_MARK: str = _AGENT.LAUNCHED
CANCELLED_MARK: str = _AGENT.CANCELLED
EXIT_CODE_FILE: str = _AGENT.EXIT_CODE_FILE
PGID_FILE: str = _AGENT.PGID_FILE
#: a run id (the name of its run directory)
RUN_ID_RE = _AGENT.RUN_ID_RE

# The shell fragments every control script shares (all paths relative to the run
# directory, which the script enters first).
_LAUNCHED = f"{CONTROL_DIR}/{LAUNCHED_MARK}"
_CANCELLED = f"{CONTROL_DIR}/{CANCELLED_MARK}"
_EXIT_CODE = f"{CONTROL_DIR}/{EXIT_CODE_FILE}"
_PGID = f"{CONTROL_DIR}/{PGID_FILE}"

#: enter the run directory (the script lives in its control directory)
ENTER_RUN_DIR = f'cd "$(dirname "$0")/.." || exit {NO_RUN_DIR}'


def write_atomically(path: str, value: str, indent: str = "") -> str:
    """Shell lines writing ``value`` (shell text: ``"$rc"``, ``143``) and a newline to
    ``path`` so that a reader sees the whole value or no file: a temporary file, renamed."""
    return (f"{indent}printf '%s\\n' {value} > {path}.tmp &&\n"
            f"{indent}  mv -f {path}.tmp {path}\n")


def launch_once(what: str) -> str:
    """Shell lines taking the launch-once guard (``mkdir`` is atomic, so a launch repeated
    after a dropped connection, or after a cancel took the guard, stops here with
    :data:`ALREADY_LAUNCHED`); ``what`` is the verb for the message."""
    return (f"if ! mkdir {_LAUNCHED} 2>/dev/null; then\n"
            f'  echo "remote-exec: this run was already {what}" >&2\n'
            f"  exit {ALREADY_LAUNCHED}\n"
            "fi\n")


def cancel_unlaunched(said: str, indent: str = "") -> str:
    """Shell lines marking the run cancelled and, if it was not launched yet, taking the
    launch guard so that it never will be: then its exit code is :data:`TERMINATED`, the
    script says ``said`` and exits 0. Otherwise it goes on (the run was launched)."""
    return (f"{indent}: > {_CANCELLED}\n"
            f"{indent}if mkdir {_LAUNCHED} 2>/dev/null; then\n"
            + write_atomically(_EXIT_CODE, str(TERMINATED), indent + "  ")
            + f'{indent}  echo "{said}"\n'
            f"{indent}  exit 0\n"
            f"{indent}fi\n")


# The wrapper: the run's process group leader. It records its pid, runs the
# entrypoint with its output in the log, and writes the exit code atomically. Its
# traps only make it outlive a TERM long enough to record the entrypoint's code.
WRAPPER = f"""#!/bin/sh
# Written by remote-exec. Runs this run's entrypoint and records its exit code.
{ENTER_RUN_DIR}
printf '%s\\n' "$$" > {CONTROL_DIR}/pid
date -u '+%Y-%m-%dT%H:%M:%SZ' > {CONTROL_DIR}/started_at 2>/dev/null
trap : TERM INT HUP
%ENTRY% > {LOG_NAME} 2>&1 < /dev/null
rc=$?
{write_atomically(_EXIT_CODE, '"$rc"')}exit "$rc"
"""

# The launcher: starts the wrapper at most once per run directory (``mkdir`` is the
# atomic guard, so a launch repeated after a dropped connection cannot run the
# entrypoint twice), detached in a session and process group of its own, then waits
# for it while the SSH channel lasts, so a short run costs one exec request.
LAUNCHER = f"""#!/bin/sh
# Written by remote-exec. Starts run.sh once, detached; waits for it if it can.
{ENTER_RUN_DIR}
{launch_once("launched")}if command -v setsid >/dev/null 2>&1; then
  setsid /bin/sh {CONTROL_DIR}/run.sh < /dev/null > /dev/null 2>&1 &
else
  set -m
  /bin/sh {CONTROL_DIR}/run.sh < /dev/null > /dev/null 2>&1 &
fi
child=$!
{write_atomically(_PGID, '"$child"')}echo "${{1:+$1 }}started $child"
wait "$child"
"""

# The launch server: one per SSH connection of a run that launches directly. It reads
# requests ``TAG`` and ``RUNDIR`` (a line each) and runs that run directory's
# ``launch.sh TAG`` in the background (a double fork: the loop keeps no children), which
# answers ``TAG started PID`` and, once the entrypoint ended, ``TAG exit STATUS``. So a
# run launched over a warm connection pays no login shell of its own: the server's exec
# request paid it once. launch.sh keeps its guard, so a launch repeated any other way
# after a lost answer still starts the entrypoint at most once.
LAUNCH_SERVER = ('while IFS= read -r t && IFS= read -r d; do '
                 f'( {{ /bin/sh "$d/{CONTROL_DIR}/launch.sh" "$t" < /dev/null 2> /dev/null; '
                 'echo "$t exit $?"; } & ); done')

# The canceller: TERM to the run's process group, KILL after GRACE seconds. A run not
# launched yet is marked so that it never will be.
CANCELLER = f"""#!/bin/sh
# Written by remote-exec. Usage: cancel.sh GRACE_SECONDS
# It finishes even if its SSH channel goes away (the caller may exit at once).
trap '' HUP PIPE
{ENTER_RUN_DIR}
grace=$(( ${{1:-{_AGENT.DEFAULT_CANCEL_GRACE}}} * 5 ))
{cancel_unlaunched("not started")}n=0
while [ ! -s {_PGID} ] && [ "$n" -lt {round(_AGENT.PGID_WAIT_SECONDS * 10)} ]; do
  sleep 0.1 2>/dev/null || sleep 1
  n=$((n + 1))
done
pgid=$(cat {_PGID} 2>/dev/null)
case "$pgid" in ''|*[!0-9]*) echo "no process group recorded"; exit 3 ;; esac
if [ -f {_EXIT_CODE} ]; then echo "already finished"; exit 0; fi
kill -TERM "-$pgid" 2>/dev/null || {{ echo "already gone"; exit 0; }}
n=0
while [ "$n" -lt "$grace" ]; do
  kill -0 "-$pgid" 2>/dev/null || {{ echo "stopped by TERM"; exit 0; }}
  sleep 0.2 2>/dev/null || sleep 1
  n=$((n + 1))
done
kill -KILL "-$pgid" 2>/dev/null && echo "killed"
if [ ! -f {_EXIT_CODE} ]; then
{write_atomically(_EXIT_CODE, str(KILLED), "  ")}fi
exit 0
"""


@dataclass(frozen=True)
class Entrypoint:
    """What to run: its kind, a label for messages, and the files it needs."""

    kind: str  # "site" | "command" | "template" | "approved"
    label: str
    text: str  # the program path | the command line | the script | the approved name
    params: dict[str, Any] = field(default_factory=dict)  # approved: as the user gave them

    def control_files(self) -> dict[str, bytes]:
        """Files to write under ``.remote-exec/`` before launching."""
        if self.kind == "site":
            entry = RemotePath(self.text).shell()
            files: dict[str, bytes] = {}
        elif self.kind == "command":
            entry = f'"${{SHELL:-/bin/sh}}" {CONTROL_DIR}/command'
            files = {"command": self.text.encode("utf-8") + b"\n"}
        elif self.kind == "template":
            entry = f"/bin/sh {CONTROL_DIR}/entrypoint.sh"
            files = {"entrypoint.sh": self.text.encode("utf-8")}
        elif self.kind == "approved":
            return {}  # the site's agent runs its own pinned copy
        else:
            raise ValueError(self.kind)
        files["run.sh"] = WRAPPER.replace("%ENTRY%", entry).encode("utf-8")
        files["launch.sh"] = LAUNCHER.encode("utf-8")
        files["cancel.sh"] = CANCELLER.encode("utf-8")
        return files


def control_argv(rundir: str, script: str, *args: int) -> list[str]:
    """The program that runs control script ``script`` (for :mod:`remote_exec.ssh.shell`)."""
    return ["/bin/sh", f"{rundir}/{CONTROL_DIR}/{script}", *(str(int(a)) for a in args)]
