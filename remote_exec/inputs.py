"""Checking the declared inputs on the local side, before anything happens remotely."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from remote_exec.agent_file import agent_module
from remote_exec.errors import InputError

#: Names inside the run directory that belong to remote-exec itself.
CONTROL_DIR = ".remote-exec"
#: the entrypoint's output, in the run directory (the agent, which must stay one file,
#: defines it)
LOG_NAME: str = agent_module().LOG_NAME


@dataclass(frozen=True)
class Input:
    """One declared input: where it is locally and the base name it gets remotely."""

    source: Path  # as given (may be a symlink, followed like rsync -L)
    name: str  # base name inside the run directory
    is_dir: bool
    size: int  # bytes, directories summed


def check_inputs(paths: list[str]) -> list[Input]:
    """Resolve and check every input; raise :class:`InputError` naming each problem.

    Symlinks are followed (MInt hands ports over as symlinks), base names are kept,
    and two inputs with one base name are refused because one would overwrite the other.
    """
    problems: list[str] = []
    inputs: list[Input] = []
    seen: dict[str, str] = {}
    for raw in paths:
        source = Path(raw)
        name = source.name
        if name in ("", ".", ".."):
            name = Path(os.path.abspath(raw)).name
        if not name or name in (".", ".."):
            problems.append(f"{raw!r}: cannot tell the base name to give it remotely")
            continue
        if name == CONTROL_DIR:
            problems.append(f"{raw!r}: the name {CONTROL_DIR!r} is reserved for remote-exec")
            continue
        if os.path.islink(raw) and not os.path.exists(raw):
            problems.append(f"{raw!r}: broken symlink (points to {os.readlink(raw)!r})")
            continue
        if not os.path.exists(raw):
            problems.append(f"{raw!r}: no such file or directory")
            continue
        if name in seen:
            problems.append(
                f"{raw!r} and {seen[name]!r} would both be staged as {name!r}; rename one of them"
            )
            continue
        try:
            _check_stageable(raw)
            is_dir = os.path.isdir(raw)
            size = _check_readable(source, is_dir)
        except NotStageable as exc:
            problems.append(str(exc) if exc.path == raw else f"{raw!r}: {exc}")
            continue
        except OSError as exc:
            problems.append(f"{raw!r}: cannot read {exc.filename or raw!r}: {exc.strerror}")
            continue
        seen[name] = raw
        inputs.append(Input(source=source, name=name, is_dir=is_dir, size=size))
    if problems:
        raise InputError(
            "cannot stage the declared inputs:\n  " + "\n  ".join(problems),
            hint="nothing was created on the remote host; fix the inputs and run again",
        )
    return inputs


class NotStageable(Exception):
    """A path that is neither a regular file nor a directory (FIFO, device, socket)."""

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        link = f" (a symlink to {os.path.realpath(path)!r})" if os.path.islink(path) else ""
        super().__init__(f"{path!r}{link} is {_kind(mode)}: only regular files and "
                         "directories can be staged")


def _kind(mode: int) -> str:
    """What a non-regular, non-directory file is, for messages."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_stageable(path: str) -> os.stat_result:
    """stat(2) ``path`` following symlinks; NotStageable unless a regular file or directory.

    Checked before anything is opened: opening a FIFO blocks, and a device would be
    staged as whatever its size says (an empty file for /dev/zero).
    """
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise NotStageable(path, st.st_mode)
    return st


def _check_readable(path: Path, is_dir: bool) -> int:
    """Open every file once for reading (following symlinks) and return the total size."""
    if not is_dir:
        with open(path, "rb"):
            pass
        return os.stat(path).st_size
    total = 0
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, _dirnames, filenames in os.walk(path, followlinks=True, onerror=_raise):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            raise OSError(40, "symlink loop", dirpath)
        seen_dirs.add((st.st_dev, st.st_ino))
        if not os.access(dirpath, os.R_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", dirpath)
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            if os.path.islink(full) and not os.path.exists(full):
                raise FileNotFoundError(2, "broken symlink", full)
            st = _check_stageable(full)
            with open(full, "rb"):
                pass
            total += st.st_size
    return total


def _raise(exc: OSError) -> None:
    raise exc
