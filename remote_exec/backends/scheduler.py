"""Batch schedulers on the remote side: what every scheduler backend shares.

A scheduler backend (``slurm``, ``pbs``, ``torque``, ``pjm``) runs the same
``.remote-exec/run.sh`` wrapper as the ``direct`` backend, but as the body of a
batch job rendered from a per-scheduler template (``batch_scripts/NAME.sh.j2``):

  * **submit** once: ``submit.sh`` takes an atomic ``mkdir`` guard, runs the
    scheduler's submit command (``sbatch --parsable`` / ``qsub`` / ``pjsub``) in the
    run directory and keeps what it printed in ``.remote-exec/submit.out``, so a
    submission repeated after a dropped connection finds the first job id;
  * **poll**: the wrapper's ``exit_code`` file first (no load on the scheduler),
    the scheduler's own view (``squeue``/``sacct``/``scontrol``, ``qstat -f``,
    ``pjstat``) less often; each scheduler's states map, as data, to one small set
    (:data:`COMMON_STATES`), and its native state and reason are kept for ``status``;
  * **cancel**: a job not submitted yet is marked so it never will be; a submitted
    one is cancelled with ``scancel`` / ``qdel`` / ``pjdel``.

A :class:`Scheduler` is the per-scheduler data and parsing: which commands, how to
read their output, which directives carry :class:`Resources`. It does no I/O, so
its parsers are tested on the sample outputs in ``tests/data/``.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, ClassVar

from remote_exec.errors import ConfigError
from remote_exec.sizes import SIZE_HINT, SIZE_SCHEMA, parse_size

#: the one small set every scheduler's states map to
QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, TIMED_OUT = (
    "queued", "running", "completed", "failed", "cancelled", "timed_out")
COMMON_STATES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, TIMED_OUT)
TERMINAL_STATES = (COMPLETED, FAILED, CANCELLED, TIMED_OUT)

#: where the scheduler writes the job's own stdout/stderr (relative to the run directory)
SCHEDULER_OUTPUT = ".remote-exec/scheduler.out"
#: what the job script runs (relative to the run directory)
RUN_SCRIPT = ".remote-exec/run.sh"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")  # fullmatch: no newline


@dataclass
class JobInfo:
    """What a scheduler says about one job.

    ``native`` and ``reason`` are the scheduler's own words (``PENDING`` /
    ``Resources``, ``Q``, ``QUE``); ``state`` is one of :data:`COMMON_STATES`.
    Times are the scheduler's (naive, in its clock): only their differences are used.
    """

    job_id: str
    native: str
    state: str
    reason: str = ""
    exit_code: int | None = None
    submitted: datetime | None = None
    started: datetime | None = None
    ended: datetime | None = None
    nodes: str = ""
    time_limit: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # more of the scheduler's fields
    used: float | None = None  # seconds it has run so far, as the scheduler counts them

    def __post_init__(self) -> None:
        if self.state not in COMMON_STATES:
            raise ValueError(f"unknown common state {self.state!r}")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def queue_wait(self) -> float | None:
        """Seconds between submission and start (None if unknown or not started)."""
        if self.submitted and self.started:
            return max((self.started - self.submitted).total_seconds(), 0.0)
        return None

    @property
    def run_time(self) -> float | None:
        """Seconds between start and end; while running, the time used so far (None if
        unknown)."""
        if self.started and self.ended:
            return max((self.ended - self.started).total_seconds(), 0.0)
        return self.used

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("submitted", "started", "ended"):
            value = data[key]
            data[key] = value.isoformat() if value else None
        data["queue_wait"], data["run_time"] = self.queue_wait, self.run_time
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobInfo:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("submitted", "started", "ended"):
            if values.get(key):
                values[key] = datetime.fromisoformat(values[key])
        return cls(**values)


@dataclass(frozen=True)
class Resources:
    """What a job asks of the scheduler: typed, validated, scheduler-neutral.

    ``memory_mb`` is per node, ``walltime_s`` in seconds; ``queue`` is Slurm's
    partition, PBS's queue or PJM's resource group; ``project`` is Slurm's account,
    PBS's account (``-A``) or PJM's group (``-g``).
    """

    nodes: int | None = None
    tasks: int | None = None
    cpus_per_task: int | None = None
    memory_mb: int | None = None
    walltime_s: int | None = None
    queue: str | None = None
    project: str | None = None

    #: the keys users write (``-R KEY=VALUE`` and a site's ``resources:``)
    KEYS: ClassVar[tuple[str, ...]] = ("nodes", "tasks", "cpus_per_task", "memory",
                                       "walltime", "queue", "project")

    @classmethod
    def parse(cls, values: dict[str, Any], where: str) -> Resources:
        """Validate user-given ``values`` (keys of :attr:`KEYS`); ConfigError if bad."""
        out: dict[str, Any] = {}
        for key, value in values.items():
            norm = key.replace("-", "_")
            if norm not in cls.KEYS:
                raise ConfigError(f"{where}: unknown resource {key!r}",
                                  hint="known resources: " + ", ".join(cls.KEYS))
            if value is None or value == "":
                continue
            if norm in ("nodes", "tasks", "cpus_per_task"):
                out[norm] = _positive_int(value, f"{where}: {norm}")
            elif norm == "memory":
                out["memory_mb"] = parse_memory_mb(value, f"{where}: memory")
            elif norm == "walltime":
                out["walltime_s"] = parse_walltime(value, f"{where}: walltime")
            else:
                text = str(value)
                if not _NAME_RE.fullmatch(text):
                    raise ConfigError(f"{where}: invalid {norm} name {text!r}",
                                      hint="letters, digits and . _ @ + - only")
                out[norm] = text
        return cls(**out)

    def merged(self, override: Resources) -> Resources:
        """These values with ``override``'s set ones on top."""
        data = asdict(self)
        data.update({k: v for k, v in asdict(override).items() if v is not None})
        return Resources(**data)

    @property
    def walltime_hms(self) -> str | None:
        """``H:MM:SS`` (hours may exceed 24), or None."""
        if self.walltime_s is None:
            return None
        hours, rest = divmod(self.walltime_s, 3600)
        return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"

    def describe(self) -> str:
        """``nodes=2, walltime=1:00:00, memory=4096M`` as a user writes them."""
        shown = {**asdict(self), "memory_mb": None, "walltime_s": None,
                 "walltime": self.walltime_hms,
                 "memory": f"{self.memory_mb}M" if self.memory_mb else None}
        parts = [f"{k}={v}" for k, v in shown.items() if v is not None]
        return ", ".join(parts) or "the scheduler's defaults"


#: the configuration schema of a site's ``resources:`` (the keys of :attr:`Resources.KEYS`;
#: their values are checked by :meth:`Resources.parse`)
RESOURCES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        key: SIZE_SCHEMA if key == "memory" else {"type": ["string", "integer"]}
        for key in Resources.KEYS  # a bare memory number is MiB
    },
}


def _positive_int(value: Any, what: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{what} must be a whole number, not {value!r}") from None
    if number < 1:
        raise ConfigError(f"{what} must be at least 1, not {number}")
    return number


def parse_memory_mb(value: Any, what: str = "memory") -> int:
    """``4096``, ``512M``, ``4G``, ``4GB``, ``4GiB``, ``1T`` as MiB, rounded up (a bare
    number is MiB, as schedulers read it; the syntax is :mod:`remote_exec.sizes`')."""
    size = parse_size(value, what, bare="m")
    if size < 1:
        raise ConfigError(f"{what} must be more than 0, not {value!r}", hint=SIZE_HINT)
    return math.ceil(size / 1024 ** 2)


def parse_walltime(value: Any, what: str = "walltime") -> int:
    """``90`` (minutes, as Slurm reads it), ``MM:SS``, ``H:MM:SS``, ``D-H[:MM[:SS]]``,
    or ``30s``/``15m``/``2h``/``1d`` as seconds."""
    text = str(value).strip()
    unit = re.fullmatch(r"(\d+)\s*([smhd])", text)
    if unit:
        seconds = int(unit.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit.group(2)]
    else:
        days = 0
        match = re.fullmatch(r"(\d+)-(.+)", text)
        if match:
            days, text = int(match.group(1)), match.group(2)
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
            raise ConfigError(f"{what}: invalid time {value!r}",
                              hint="use H:MM:SS, D-H:MM:SS, minutes, or 30m / 2h / 1d")
        numbers = [int(p) for p in parts]
        if match:  # D-H, D-H:MM, D-H:MM:SS
            numbers += [0] * (3 - len(numbers))
            hours, minutes, secs = numbers
        elif len(numbers) == 1:  # minutes
            hours, minutes, secs = 0, numbers[0], 0
        elif len(numbers) == 2:  # MM:SS
            hours, minutes, secs = 0, numbers[0], numbers[1]
        else:
            hours, minutes, secs = numbers
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds < 1:
        raise ConfigError(f"{what} must be at least one second, not {value!r}")
    return seconds


class Scheduler(ABC):
    """One batch system: its commands, its output formats, its states. No I/O here."""

    #: backend name (``slurm``) and what messages call it (``Slurm``)
    name: ClassVar[str]
    title: ClassVar[str]
    #: native state -> one of COMMON_STATES (exact, upper-cased keys)
    STATES: ClassVar[dict[str, str]]

    @property
    def template(self) -> str:
        """The job script template's file name under ``batch_scripts/``."""
        return f"{self.name}.sh.j2"

    @abstractmethod
    def submit_argv(self, script: str) -> list[str]:
        """The command submitting job script ``script`` (a path relative to the run
        directory, where the command runs), e.g. ``["sbatch", "--parsable", script]``."""

    @abstractmethod
    def parse_submit(self, stdout: str) -> str:
        """The job id in what the submit command printed; ValueError if there is none."""

    @abstractmethod
    def queries(self, job_id: str) -> list[list[str]]:
        """Commands asking about ``job_id``, in the order to try them."""

    @abstractmethod
    def parse_query(self, index: int, stdout: str, job_id: str) -> JobInfo | None:
        """Read what query ``index`` printed (exit status 0); None if it does not
        know the job (then the next query is tried)."""

    @abstractmethod
    def cancel_argv(self, job_id: str) -> list[str]:
        """The command cancelling ``job_id``."""

    def probe_argv(self) -> list[str] | None:
        """A quick command showing the scheduler is usable (queues and their state),
        for ``remote-exec site check``; None if there is none."""
        return None

    def map_state(self, native: str) -> str:
        """The common state of native state ``native`` (``failed`` if unknown)."""
        return self.STATES.get(native.strip().upper(), FAILED)

    def explain(self, info: JobInfo) -> str | None:
        """Plain words for why a queued job waits, when the reason needs action
        (e.g. every node drained); None when waiting is normal."""
        return None


def parse_elapsed(text: str) -> float | None:
    """``SS``, ``MM:SS``, ``H:MM:SS``, ``HHHH:MM:SS`` or ``D-HH:MM:SS`` (schedulers'
    elapsed-time columns) as seconds; None if it is none of these."""
    match = re.fullmatch(r"\s*(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\s*", text or "")
    if not match:
        return None
    days = int(match.group(1) or 0)
    numbers = [int(g) for g in match.groups()[1:] if g is not None]
    while len(numbers) < 3:
        numbers.insert(0, 0)
    hours, minutes, seconds = numbers
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_time(seconds: int) -> str:
    """``D-HH:MM:SS`` (or ``HH:MM:SS`` under a day), the form every Slurm version reads."""
    days, rest = divmod(seconds, 86400)
    hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{hms}" if days else hms
