"""What runs in the remote run directory, and the small POSIX sh wrapper around it.

Three small POSIX sh scripts go into ``.remote-exec/`` of every run directory:

  * ``launch.sh``  starts ``run.sh`` once (an atomic ``mkdir`` guard), detached in its
                   own session and process group, records that group in ``pgid`` and
                   waits for it while the SSH channel lasts;
  * ``run.sh``     enters the run directory, records its pid, runs the entrypoint with
                   stdout and stderr into ``remote_program_exec.log``, and writes the
                   exit code atomically to ``exit_code``;
  * ``cancel.sh``  TERM to the process group, KILL after a grace period.

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

from remote_exec.inputs import CONTROL_DIR, LOG_NAME
from remote_exec.templates import RemotePath

#: launch.sh's exit status when the run directory was launched before
ALREADY_LAUNCHED = 96

# The wrapper: the run's process group leader. It records its pid, runs the
# entrypoint with its output in the log, and writes the exit code atomically. Its
# traps only make it outlive a TERM long enough to record the entrypoint's code.
WRAPPER = f"""#!/bin/sh
# Written by remote-exec. Runs this run's entrypoint and records its exit code.
cd "$(dirname "$0")/.." || exit 97
printf '%s\\n' "$$" > {CONTROL_DIR}/pid
date -u '+%Y-%m-%dT%H:%M:%SZ' > {CONTROL_DIR}/started_at 2>/dev/null
trap : TERM INT HUP
%ENTRY% > {LOG_NAME} 2>&1 < /dev/null
rc=$?
printf '%s\\n' "$rc" > {CONTROL_DIR}/exit_code.tmp &&
  mv -f {CONTROL_DIR}/exit_code.tmp {CONTROL_DIR}/exit_code
exit "$rc"
"""

# The launcher: starts the wrapper at most once per run directory (``mkdir`` is the
# atomic guard, so a launch repeated after a dropped connection cannot run the
# entrypoint twice), detached in a session and process group of its own, then waits
# for it while the SSH channel lasts, so a short run costs one exec request.
LAUNCHER = f"""#!/bin/sh
# Written by remote-exec. Starts run.sh once, detached; waits for it if it can.
cd "$(dirname "$0")/.." || exit 97
if ! mkdir {CONTROL_DIR}/launched 2>/dev/null; then
  echo "remote-exec: this run was already launched" >&2
  exit {ALREADY_LAUNCHED}
fi
if command -v setsid >/dev/null 2>&1; then
  setsid /bin/sh {CONTROL_DIR}/run.sh < /dev/null > /dev/null 2>&1 &
else
  set -m
  /bin/sh {CONTROL_DIR}/run.sh < /dev/null > /dev/null 2>&1 &
fi
child=$!
printf '%s\\n' "$child" > {CONTROL_DIR}/pgid.tmp && mv -f {CONTROL_DIR}/pgid.tmp {CONTROL_DIR}/pgid
echo "started $child"
wait "$child"
"""

# The canceller: TERM to the run's process group, KILL after GRACE seconds. A run not
# launched yet is marked so that it never will be.
CANCELLER = f"""#!/bin/sh
# Written by remote-exec. Usage: cancel.sh GRACE_SECONDS
# It finishes even if its SSH channel goes away (the caller may exit at once).
trap '' HUP PIPE
cd "$(dirname "$0")/.." || exit 97
grace=$(( ${{1:-10}} * 5 ))
: > {CONTROL_DIR}/cancelled
if mkdir {CONTROL_DIR}/launched 2>/dev/null; then
  printf '143\\n' > {CONTROL_DIR}/exit_code.tmp &&
    mv -f {CONTROL_DIR}/exit_code.tmp {CONTROL_DIR}/exit_code
  echo "not started"
  exit 0
fi
n=0
while [ ! -s {CONTROL_DIR}/pgid ] && [ "$n" -lt 50 ]; do
  sleep 0.1 2>/dev/null || sleep 1
  n=$((n + 1))
done
pgid=$(cat {CONTROL_DIR}/pgid 2>/dev/null)
case "$pgid" in ''|*[!0-9]*) echo "no process group recorded"; exit 3 ;; esac
if [ -f {CONTROL_DIR}/exit_code ]; then echo "already finished"; exit 0; fi
kill -TERM "-$pgid" 2>/dev/null || {{ echo "already gone"; exit 0; }}
n=0
while [ "$n" -lt "$grace" ]; do
  kill -0 "-$pgid" 2>/dev/null || {{ echo "stopped by TERM"; exit 0; }}
  sleep 0.2 2>/dev/null || sleep 1
  n=$((n + 1))
done
kill -KILL "-$pgid" 2>/dev/null && echo "killed"
if [ ! -f {CONTROL_DIR}/exit_code ]; then
  printf '137\\n' > {CONTROL_DIR}/exit_code.tmp &&
    mv -f {CONTROL_DIR}/exit_code.tmp {CONTROL_DIR}/exit_code
fi
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
