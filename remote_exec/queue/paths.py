"""The one rule for file paths of the pull protocol (input names and output paths).

A path is a relative POSIX path: segments separated by ``/``, none of them empty, ``.``
or ``..``, no NUL character, at most 16 segments and 4096 bytes (UTF-8). Every other
character (spaces, quotes, newlines, ``$(...)``) is allowed: paths are data, never shell.
The queue server, the MInt-side client and the poller apply the same rule, so this
module is pure and imports nothing but the standard library.
"""

from __future__ import annotations

MAX_SEGMENTS = 16
MAX_BYTES = 4096


def path_problem(path: object) -> str | None:
    """Why ``path`` is not a valid protocol path, or None when it is."""
    if not isinstance(path, str) or not path:
        return "a path must be a non-empty string"
    if "\x00" in path:
        return "a path may not contain NUL"
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        return "a path must be valid UTF-8"
    if size > MAX_BYTES:
        return f"a path may be at most {MAX_BYTES} bytes long"
    if path.startswith("/"):
        return "a path must be relative (it starts with /)"
    segments = path.split("/")
    if len(segments) > MAX_SEGMENTS:
        return f"a path may have at most {MAX_SEGMENTS} segments"
    for segment in segments:
        if segment == "":
            return "a path may not have empty segments (// or a trailing /)"
        if segment in (".", ".."):
            return f"a path may not have {segment!r} segments"
    return None


def check_path(path: object) -> str:
    """``path`` itself if it follows the rule; ValueError saying why otherwise."""
    problem = path_problem(path)
    if problem is not None:
        raise ValueError(f"{path!r}: {problem}")
    return path  # type: ignore[return-value]
