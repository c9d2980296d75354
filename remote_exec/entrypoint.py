"""What runs in the remote run directory, and the small POSIX sh wrapper around it.

The wrapper (``.remote-exec/run.sh``) is the same for every run: it enters the run
directory, records its pid, runs the entrypoint with stdout and stderr into
``remote_program_exec.log``, and writes the exit code atomically to
``.remote-exec/exit_code``. Whether a run finished is therefore a fact on the
remote side, never a guess from a connection.

Three kinds of entrypoint:
  * ``site``     the site's own program (MInt's ``execute_remote-side_program_ssh.sh``);
  * ``command``  a command line run by the remote login shell, as the legacy script did;
  * ``template`` a script rendered from an allowlisted template, run by ``/bin/sh``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from remote_exec.inputs import CONTROL_DIR, LOG_NAME
from remote_exec.templates import RemotePath

WRAPPER = f"""#!/bin/sh
# Written by remote-exec. Runs this run's entrypoint and records its exit code.
cd "$(dirname "$0")/.." || exit 97
printf '%s\\n' "$$" > {CONTROL_DIR}/pid
date -u '+%Y-%m-%dT%H:%M:%SZ' > {CONTROL_DIR}/started_at 2>/dev/null
%ENTRY% > {LOG_NAME} 2>&1 < /dev/null
rc=$?
printf '%s\\n' "$rc" > {CONTROL_DIR}/exit_code.tmp &&
  mv -f {CONTROL_DIR}/exit_code.tmp {CONTROL_DIR}/exit_code
exit "$rc"
"""


@dataclass(frozen=True)
class Entrypoint:
    """What to run: its kind, a label for messages, and the files it needs."""

    kind: str  # "site" | "command" | "template"
    label: str
    text: str  # site: the program path; command: the command line; template: the script

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
        else:
            raise ValueError(self.kind)
        files["run.sh"] = WRAPPER.replace("%ENTRY%", entry).encode("utf-8")
        return files


def launch_command(rundir: str) -> str:
    """The exec request that runs the wrapper (quoted for any sh-like login shell)."""
    return f"/bin/sh {shlex.quote(rundir + '/' + CONTROL_DIR + '/run.sh')}"
