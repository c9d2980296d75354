"""Just enough of Fujitsu PJM (pjsub) for the simulator: ``#PJM`` directives and time formats.

Directives are the ``#PJM`` lines of the leading comment block of the script (as pjsub reads
them: the block ends at the first line that is neither blank nor a comment). Understood:

    -N name                       job name (default: the job script's file name)
    -L "k=v[,k=v...]"             elapse=[[H:]M:]S (or a range MIN-MAX: MAX counts; or
                                  "unlimited"), node=N, rscgrp=NAME (shown as "queue");
                                  other keys are kept in ``resources`` and ignored
    -o FILE / -e FILE / -j        stdout file / stderr file / stderr joined into stdout;
                                  "%j" in a file name becomes the job id; relative names are
                                  relative to the job's directory
    -g GROUP                      shown as "group"
    -x VAR=val[,VAR=val...]       environment for the job
    --interact                    refused (the WebAPI has no interactive jobs)

Other options are accepted and ignored (the ones known to take an argument skip it).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

# options that take a value (so the value is not mistaken for an option)
_WITH_VALUE = {
    "-N",
    "-L",
    "-o",
    "-e",
    "-g",
    "-x",
    "-m",
    "-p",
    "-z",
    "-w",
    "-X",
    "--mpi",
    "--mail-list",
    "--step",
    "--sparam",
    "--rsc-list",
    "--bulk",
    "--name",
    "--comment",
}


@dataclass
class JobOptions:
    name: str | None = None
    elapse: int | None = None  # seconds; None = not given
    node: str | None = None
    rscgrp: str | None = None
    group: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    join: bool = False
    interact: bool = False
    env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, str] = field(default_factory=dict)
    directives: list[list[str]] = field(default_factory=list)  # raw tokens, per #PJM line


class PjmError(ValueError):
    pass


def parse_elapse(value: str) -> int | None:
    """ "1:00:00" -> 3600, "90" -> 90, "1:30" -> 90, "10:00-20:00" -> 1200, "unlimited" -> None."""
    value = value.strip()
    if "-" in value:
        value = value.rsplit("-", 1)[1].strip()
    if value.lower() == "unlimited":
        return None
    parts = value.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.strip().isdigit() for p in parts):
        raise PjmError(f"bad elapse value: {value!r}")
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return seconds


def format_hms(seconds: float) -> str:
    """PJM's HHHH:MM:SS, e.g. 3600 -> "0001:00:00"."""
    s = max(0, int(seconds))
    return f"{s // 3600:04d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def parse_script(text: str) -> JobOptions:
    opts = JobOptions()
    for number, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if not stripped or (number == 0 and stripped.startswith("#!")):
            continue
        if not stripped.startswith("#"):
            break
        if not stripped.startswith("#PJM"):
            continue
        rest = stripped[len("#PJM") :]
        if rest and not rest[0].isspace():
            continue  # e.g. "#PJMX"
        try:
            tokens = shlex.split(rest)
        except ValueError as exc:
            raise PjmError(f"line {number + 1}: {exc}") from exc
        opts.directives.append(tokens)
        _apply(opts, tokens)
    return opts


def _apply(opts: JobOptions, tokens: list[str]) -> None:
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        value = None
        if "=" in tok and tok.startswith("--"):
            tok, value = tok.split("=", 1)
        elif tok in _WITH_VALUE:
            if i + 1 >= len(tokens):
                raise PjmError(f"option {tok} needs a value")
            i += 1
            value = tokens[i]
        i += 1
        if tok in ("-N", "--name"):
            opts.name = value
        elif tok in ("-L", "--rsc-list"):
            assert value is not None
            for item in value.split(","):
                item = item.strip()
                if not item:
                    continue
                key, _, val = item.partition("=")
                key = key.strip()
                val = val.strip()
                if key == "elapse":
                    opts.elapse = parse_elapse(val)
                elif key == "node":
                    opts.node = val
                elif key == "rscgrp":
                    opts.rscgrp = val
                else:
                    opts.resources[key] = val
        elif tok == "-o":
            opts.stdout = value
        elif tok == "-e":
            opts.stderr = value
        elif tok == "-j":
            opts.join = True
        elif tok == "-g":
            opts.group = value
        elif tok == "-x":
            assert value is not None
            for item in value.split(","):
                key, sep, val = item.partition("=")
                if key.strip():
                    opts.env[key.strip()] = val if sep else ""
        elif tok == "--interact":
            opts.interact = True
