"""``site check``'s table: one row per fact, with its status and, when it fails, its fix.
Every backend's :meth:`~remote_exec.backends.base.Backend.check` returns these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from remote_exec.sizes import size_text

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skipped"
#: less free space than this under the runs root is worth a warning
LOW_SPACE = 1 << 30


@dataclass
class Row:
    check: str
    status: str
    detail: str
    fix: str = ""


def failed(rows: list[Row]) -> bool:
    return any(r.status == FAIL for r in rows)


def as_dicts(rows: list[Row]) -> list[dict[str, str]]:
    return [dataclasses.asdict(r) for r in rows]


def space_row(free: int | None) -> Row:
    """The free space under the runs root (None: unknown)."""
    if free is None:
        return Row("free space", WARN, "unknown")
    return Row("free space", WARN if free < LOW_SPACE else OK,
               f"{size_text(free)} under the root",
               "free space on the host or point `root` elsewhere" if free < LOW_SPACE else "")
