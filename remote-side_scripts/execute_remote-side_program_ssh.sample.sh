#!/bin/sh
# Sample site entrypoint, installed on the remote host as
#   ~/misrc_remote_workflow/scripts/execute_remote-side_program_ssh.sh
# (the sandbox installs it under its own site directory).
#
# remote-exec runs it inside the run directory <root>/<uuid>, where the declared
# inputs have been staged; its stdout and stderr go to remote_program_exec.log and
# everything left in the directory when it ends is returned to MInt. Delete here
# whatever must never leave the site.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
echo "sample entrypoint: running in $(pwd)"
python3 "$here/sample_solver.py" *.dat
echo "sample entrypoint: done"
