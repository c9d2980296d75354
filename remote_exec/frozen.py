"""The entry point of the single-file build (``scripts/build_single_file.py``, PyInstaller).

In the single file ``sys.executable`` is that file, not a Python interpreter, yet
remote-exec starts helpers of its own the way a Python program does:

* the connection holder as ``sys.executable -m remote_exec.holder``
  (:mod:`remote_exec.holder.client`);
* rsync's remote shell as ``sys.executable -S -E …/remote_exec/ssh/rsh_bridge.py SOCKET …``
  (:mod:`remote_exec.ssh.rsync`).

This entry point understands exactly those two interpreter forms, for modules of
``remote_exec`` only, so the same calls work unchanged in the single file; every
other command line is the CLI's. The holder is an independent instance of the file
(started with ``PYINSTALLER_RESET_ENVIRONMENT``): it outlives the command that started
it, so it must not share that command's unpacked copy, which is removed when it exits.
rsync's remote shell, which ends before the process that started it, reuses that
process's copy and starts faster.

The holder recognises the code it runs by the names, sizes and modification times of
the package's files (:func:`remote_exec.holder.client.code_fingerprint`; in the single
file only the job script templates are files, the code is in its archive). The file
unpacks them afresh at every start, so their times are set to the file's own
modification time first: two starts of one file agree, and a replaced file (an
upgrade) replaces the holder.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

#: the package whose modules the interpreter forms may run
PACKAGE = "remote_exec"
#: interpreter flags remote-exec passes before a script path (they change nothing here)
SCRIPT_FLAGS = frozenset({"-S", "-E"})


def bundle_dir() -> Path:
    """Where the single file unpacked itself (the source checkout when not frozen)."""
    return Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parent.parent))


def interpreter_module(argv: list[str]) -> tuple[str, list[str]] | None:
    """The ``remote_exec`` module and its arguments when ``argv`` (without the program
    name) is one of the interpreter forms above, else None (a CLI command line).

    A script is named by its path in the unpacked copy of the instance that started
    this one (not this instance's own copy), so it is taken by its module name: the
    part of the path from its last ``remote_exec`` directory on."""
    if len(argv) >= 2 and argv[0] == "-m":
        module = argv[1]
        if module == PACKAGE or module.startswith(PACKAGE + "."):
            return module, argv[2:]
        return None
    rest = list(argv)
    flags = 0
    while rest and rest[0] in SCRIPT_FLAGS:
        rest.pop(0)
        flags += 1
    if not flags or not rest or not rest[0].endswith(".py"):
        return None
    parts = Path(rest[0]).with_suffix("").parts
    if PACKAGE not in parts[:-1]:
        return None
    start = len(parts) - 1 - parts[::-1].index(PACKAGE)
    module = ".".join(parts[start:])
    if not all(part.isidentifier() for part in parts[start:]):
        return None
    from importlib.util import find_spec

    try:
        if find_spec(module) is None:
            return None
    except ImportError:
        return None
    return module, rest[1:]


def _pin_file_times(root: Path) -> None:
    """Give the unpacked package files the single file's modification time."""
    try:
        stamp = os.stat(sys.executable).st_mtime_ns
    except OSError:
        return
    for path in (root / PACKAGE).rglob("*"):
        try:
            os.utime(path, ns=(stamp, stamp), follow_symlinks=False)
        except OSError:
            pass


def main() -> None:
    root = bundle_dir()
    if getattr(sys, "frozen", False):
        _pin_file_times(root)
        os.environ.pop("PYINSTALLER_RESET_ENVIRONMENT", None)  # (read at start-up only)
    found = interpreter_module(sys.argv[1:])
    if found is not None:
        module, args = found
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    from remote_exec.cli import main as cli_main

    cli_main(prog_name="remote-exec")


if __name__ == "__main__":
    main()
