"""Putting fetched results in place so that an interrupted pull never leaves half-written files."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from remote_exec.errors import FetchError


def partial_dir(into: Path, run_id: str) -> Path:
    """The run's directory beside the destination (same file system: renames are atomic).

    It is named after the run, so a fetch repeated after a dropped connection (or by
    ``resume``) continues into what the earlier attempt brought.
    """
    into.mkdir(parents=True, exist_ok=True)
    partial = partial_path(into, run_id)
    partial.mkdir(mode=0o700, exist_ok=True)
    return partial


def partial_path(into: Path, run_id: str) -> Path:
    """Where :func:`partial_dir` puts the run's partial results (nothing is created)."""
    return into / f".remote-exec-{run_id}.partial"


def place(partial: Path, into: Path) -> list[str]:
    """Move everything under ``partial`` into ``into``; returns the top-level names placed.

    Each file is moved with one rename, so a reader of ``into`` sees either the old
    file or the whole new one. Directories are merged, as ``rsync -a`` would.
    """
    placed = sorted(os.listdir(partial))
    for name in placed:
        _merge(partial / name, into / name)
    shutil.rmtree(partial, ignore_errors=True)
    return placed


def _merge(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
            dst.unlink()
        if not dst.exists():
            os.replace(src, dst)
            return
        for name in os.listdir(src):
            _merge(src / name, dst / name)
        shutil.copystat(src, dst, follow_symlinks=False)
        return
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    os.replace(src, dst)


def discard(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


def tree_size(path: Path) -> int:
    """Total bytes of the regular files under ``path`` (links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


#: errno values and rsync's words for a local file system without room
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")


def out_of_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what caused it is a file system running out of space."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        if any(words in str(exc) for words in _NO_SPACE_WORDS):  # rsync's message
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_space_error(partial: Path, run_id: str, remote: str,
                       total: int | None) -> FetchError:
    """The local disk filled up while fetching into ``partial``: say where things are and
    that ``remote-exec resume`` continues the fetch into the same partial directory."""
    free = shutil.disk_usage(partial).free
    need = ""
    if total is not None:
        missing = max(total - tree_size(partial), 0)
        need = f": {missing} more bytes needed, {free} free"
    return FetchError(
        f"fetching the results failed: the local file system of {partial.parent} is full"
        f"{need}. What was fetched is kept in {partial}; the results are still on the "
        f"remote host ({remote})",
        hint=f"free space there, then `remote-exec resume {run_id[:8]}` continues the fetch "
        f"into {partial} (or delete that directory to give the results up)",
    )


def unwritable_error(into: Path, exc: OSError, run_id: str, remote: str) -> FetchError:
    """The results cannot be written into ``into`` (not a directory, no permission...)."""
    what = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
    return FetchError(
        f"cannot put the results into {into} ({what}); the results are still on the "
        f"remote host ({remote})",
        hint=f"make {into} a writable directory, then `remote-exec resume {run_id[:8]}` "
        "fetches them",
    )
