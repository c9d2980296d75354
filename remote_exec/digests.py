"""sha256 digests of local input files, with a small memo so that an unchanged large
input is not read again on every run.

The memo (``$STATE/digests.json``) maps a file's real path (symlinks resolved: MInt
hands ports over as new symlinks in every run's directory) to its size,
modification time (ns), inode and device when it was hashed, and the digest; an entry
is used only while all four still match. It is written atomically (a temporary file,
then a rename); runs writing it at once may lose each other's new entries, which only
costs a hash next time. Everything here blocks: call it in a thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from remote_exec.paths import state_dir

#: bytes read at once while hashing
CHUNK = 1024 * 1024
#: entries the memo keeps (the most recently hashed or used)
MEMO_ENTRIES = 4096
MEMO_NAME = "digests.json"


def _memo_path() -> Path:
    return state_dir() / MEMO_NAME


def _load() -> dict[str, list]:
    try:
        data = json.loads(_memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(memo: dict[str, list]) -> None:
    path = _memo_path()
    items = list(memo.items())[-MEMO_ENTRIES:]
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(items), f)
        os.replace(tmp, path)
    except OSError:
        pass  # a memo that cannot be written only costs a hash next time


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of the file at ``path`` (symlinks followed), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digests(paths: Iterable[str]) -> dict[str, str]:
    """The sha256 of each file of ``paths`` (absolute, symlinks followed), from the memo
    where the file has not changed since it was hashed. Blocks: call it in a thread."""
    memo = _load()
    found: dict[str, str] = {}
    changed = False
    for path in paths:
        key = os.path.realpath(path)  # (MInt's ports are symlinks, new ones every run)
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
        entry = memo.pop(key, None)  # (re-added last: the most recent is kept)
        if isinstance(entry, list) and entry[:4] == stamp and len(entry) == 5:
            found[path] = entry[4]
        else:
            found[path] = sha256_file(path)
            after = os.stat(path)
            if [after.st_size, after.st_mtime_ns, after.st_ino, after.st_dev] != stamp:
                changed = True  # written while read: do not remember it
                continue
        memo[key] = [*stamp, found[path]]
        changed = True
    if changed:
        _save(memo)
    return found
