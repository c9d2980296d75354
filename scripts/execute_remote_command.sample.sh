#!/bin/sh
# Drop-in for MInt's execute_remote_command.sample.sh / .py: a module's objectPath
# program keeps calling it with the old arguments
#   client_name:HOST client_cmd:CMD client_files:a,b,c
# and remote-exec does the work over one SSH connection.
#
# remote-exec is looked up, first found wins: a `remote-exec` executable beside this
# script (the single-file build, dist/remote-exec, or a link to an installed one),
# `remote-exec` on PATH, then `python3 -m remote_exec` when that python3 has it.
# Otherwise one line on stderr says how to install it, and the exit code is 1, the
# original's code for any failure.
case $0 in
  */*) here=${0%/*} ;;
  *) here=. ;;
esac
dirs=$here
# the directory of the file itself when this script is reached through a symlink
if real=$(readlink -f -- "$0" 2>/dev/null) && [ -n "$real" ]; then
  dirs="$here
${real%/*}"
fi
old_ifs=$IFS
IFS='
'
for dir in $dirs; do
  if [ -f "$dir/remote-exec" ] && [ -x "$dir/remote-exec" ]; then
    IFS=$old_ifs
    exec "$dir/remote-exec" legacy "$@"
  fi
done
IFS=$old_ifs
if command -v remote-exec >/dev/null 2>&1; then
  exec remote-exec legacy "$@"
fi
if python3 -c 'import sys, remote_exec; sys.exit(sys.version_info < (3, 9))' >/dev/null 2>&1; then
  exec python3 -m remote_exec legacy "$@"
fi
echo "${0##*/}: remote-exec not found (beside this script, on PATH, or python3 -m remote_exec): copy the single-file build dist/remote-exec beside this script, or run 'python3 -m pip install <remote-exec checkout>' with a Python >= 3.9" >&2
exit 1
