"""Sizes in the configuration: one syntax and one parser for every size key.

A size is a whole number of bytes (``268435456``) or a whole number with a unit:
``K``, ``M``, ``G``, ``T`` or ``P``, optionally followed by ``B`` or ``iB``
(``512M``, ``1GB``, ``1GiB``; case does not matter), or ``B`` for bytes; no fractions
(``1536M``, not ``1.5G``). Every unit is a power of 1024, whichever way it is written:
``1GB`` = ``1GiB`` = ``1G`` = 1073741824 bytes, as Slurm and PBS read ``--mem=1G``.
A key may read a bare number in another unit (``memory``: MiB, as schedulers do).
"""

from __future__ import annotations

import re
from typing import Any

from remote_exec.errors import ConfigError

#: the syntax, shared by the configuration schema (strings) and :func:`parse_size`
SIZE_PATTERN = r"^\s*([0-9]+)\s*([kKmMgGtTpP](?:[iI]?[bB])?|[bB])?\s*$"
#: the schema of a size key: a whole number, or a string of SIZE_PATTERN
SIZE_SCHEMA: dict[str, Any] = {"type": ["integer", "string"], "minimum": 0,
                               "pattern": SIZE_PATTERN}
SIZE_HINT = ("a whole number of bytes, or a whole number with a unit K, M, G, T (powers "
             "of 1024; KB, KiB and K are the same), e.g. 1G, 512MiB, 268435456")

_SIZE_RE = re.compile(SIZE_PATTERN)
_SCALE = {"b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4, "p": 1024 ** 5}


def parse_size(value: Any, what: str, bare: str = "b") -> int:
    """``value`` in bytes; a bare number counts in ``bare`` units (``"b"`` bytes,
    ``"m"`` MiB). A ConfigError naming ``what`` if ``value`` is no size."""
    text = str(value)
    match = _SIZE_RE.match(text) if not isinstance(value, bool) else None
    if match is None:
        raise ConfigError(f"{what}: invalid size {value!r}", hint=SIZE_HINT)
    unit = (match.group(2) or bare)[0].lower()
    return int(match.group(1)) * _SCALE[unit]


def size_text(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 MiB``, ``1.0 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def duration_text(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 5 min``: a duration for people."""
    value = int(round(seconds))
    if value < 120:
        return f"{value} s"
    if value < 7200:
        return f"{value // 60} min {value % 60} s"
    return f"{value // 3600} h {value % 3600 // 60} min"
