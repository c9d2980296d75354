#!/usr/bin/env python3
"""Drop-in for MInt's execute_remote_command.sample.py: forwards to `remote-exec legacy`.

remote-exec is looked up, first found wins: a `remote-exec` executable beside this
script (the single-file build, dist/remote-exec, or a link to an installed one),
`remote-exec` on PATH, then this Python's `-m remote_exec` when it has remote-exec.
Otherwise one line on stderr says how to install it, and the exit code is 1, the
original's code for any failure. Runs on Python 3.6 (MInt nodes' /usr/bin/python3).
"""
import os
import sys

NAME = "remote-exec"
NEEDS = (3, 9)


def _beside():
    """A remote-exec executable in this script's directory (as called, then resolved)."""
    here = os.path.abspath(__file__)
    seen = []
    for directory in (os.path.dirname(here), os.path.dirname(os.path.realpath(here))):
        candidate = os.path.join(directory, NAME)
        if candidate not in seen and os.path.isfile(candidate) \
                and os.access(candidate, os.X_OK):
            return candidate
        seen.append(candidate)
    return None


def _on_path():
    from shutil import which

    return which(NAME)


def _importable():
    """Whether this Python can run `-m remote_exec` (new enough, and has the package)."""
    if sys.version_info < NEEDS:
        return False
    from importlib.util import find_spec

    return find_spec("remote_exec") is not None


def main(command="legacy"):
    """Run `remote-exec COMMAND ARGS...` (scripts/mi-system-wf.py: `legacy-pull`)."""
    args = [command] + sys.argv[1:]
    found = _beside() or _on_path()
    if found:
        os.execv(found, [found] + args)
    if _importable():
        os.execv(sys.executable, [sys.executable, "-m", "remote_exec"] + args)
    me = os.path.basename(sys.argv[0])
    sys.stderr.write(
        f"{me}: remote-exec not found (beside this script, on PATH, or "
        f"{sys.executable} -m remote_exec): copy the single-file build dist/remote-exec "
        "beside this script, or run 'python3 -m pip install <remote-exec checkout>' "
        "with a Python >= 3.9\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
