"""Putting fetched results in place so that an interrupted pull never leaves half-written files."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path


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
