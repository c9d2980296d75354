"""Slurm: ``sbatch --parsable``, ``squeue`` then ``sacct`` then ``scontrol``, ``scancel``.

Formats (Slurm 22.05 man pages): ``sbatch --parsable`` prints ``JOBID[;CLUSTER]``;
``squeue -o`` prints the fields asked for (``%T`` the long state, ``%r`` the reason);
``sacct -P`` prints ``|``-separated fields, states like ``CANCELLED by 0``, and
exit codes as ``CODE:SIGNAL``; ``scontrol show job -o`` prints one line of
``Key=Value`` pairs. Sites without accounting answer ``sacct`` with an error; a
finished job is then known to ``scontrol`` for ``MinJobAge`` seconds (300 by
default), and after that only by the exit code the wrapper wrote.
Samples of each output (captured from a real Slurm) are in ``tests/data/slurm/``.
"""

from __future__ import annotations

import re
from datetime import datetime

from remote_exec.backends.scheduler import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    TIMED_OUT,
    JobInfo,
    Scheduler,
    parse_elapsed,
)

#: ``squeue -o`` fields: id, state, reason, submit, start, end, used, limit, nodes
SQUEUE_FORMAT = "%i|%T|%r|%V|%S|%e|%M|%l|%N"
SACCT_FIELDS = "JobIDRaw,State,ExitCode,Reason,Submit,Start,End,Elapsed,Timelimit,NodeList"

# Job state codes, from squeue(1) "JOB STATE CODES".
STATES = {
    "PENDING": QUEUED, "CONFIGURING": QUEUED, "REQUEUED": QUEUED, "REQUEUE_HOLD": QUEUED,
    "REQUEUE_FED": QUEUED, "RESV_DEL_HOLD": QUEUED,
    "RUNNING": RUNNING, "COMPLETING": RUNNING, "SUSPENDED": RUNNING, "STOPPED": RUNNING,
    "SIGNALING": RUNNING, "STAGE_OUT": RUNNING, "RESIZING": RUNNING,
    "COMPLETED": COMPLETED,
    "CANCELLED": CANCELLED, "REVOKED": CANCELLED,
    "TIMEOUT": TIMED_OUT, "DEADLINE": TIMED_OUT,
    "FAILED": FAILED, "NODE_FAIL": FAILED, "BOOT_FAIL": FAILED, "OUT_OF_MEMORY": FAILED,
    "PREEMPTED": FAILED, "SPECIAL_EXIT": FAILED,
}

# Pending reasons that need someone to act (squeue(1) "JOB REASON CODES"), in plain words.
_STUCK = (
    (("ReqNodeNotAvail", "UnavailableNodes", "DOWN, DRAINED", "DOWN,_DRAINED", "NodeDown"),
     "no node it may use is available (drained, down or reserved): it waits until an "
     "administrator resumes one (`sinfo -R` on the site says why)"),
    (("PartitionDown", "PartitionInactive"),
     "its partition is down or inactive: it waits until the site brings it back"),
    (("PartitionTimeLimit",), "its walltime exceeds the partition's limit: it will never "
     "start; cancel it and ask for less time"),
    (("PartitionNodeLimit",), "it asks for more nodes than the partition allows: it will "
     "never start; cancel it and ask for fewer"),
    (("JobHeldUser", "JobHeldAdmin"), "it is held: `scontrol release` (or an administrator) "
     "lets it run"),
    (("DependencyNeverSatisfied",), "its dependency can never be satisfied"),
    (("BadConstraints",), "its constraints cannot be met by any node"),
    (("InvalidAccount", "InvalidQOS"), "its account or QOS is not valid on the site"),
)

_SCONTROL_SPLIT = re.compile(r" (?=[A-Za-z][A-Za-z0-9_:/]*=)")


class SlurmScheduler(Scheduler):
    """The Slurm workload manager."""

    name = "slurm"
    title = "Slurm"
    STATES = STATES

    def submit_argv(self, script: str) -> list[str]:
        return ["sbatch", "--parsable", script]

    def parse_submit(self, stdout: str) -> str:
        line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
        job_id = line.split(";")[0].strip()
        if not job_id.isdigit():
            raise ValueError(f"no job id in sbatch's answer {stdout.strip()!r}")
        return job_id

    def queries(self, job_id: str) -> list[list[str]]:
        return [
            ["squeue", "-h", "-j", job_id, "-o", SQUEUE_FORMAT],
            ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", SACCT_FIELDS],
            ["scontrol", "show", "job", "-o", job_id],
        ]

    def parse_query(self, index: int, stdout: str, job_id: str) -> JobInfo | None:
        parse = (self._parse_squeue, self._parse_sacct, self._parse_scontrol)[index]
        return parse(stdout, job_id)

    def cancel_argv(self, job_id: str) -> list[str]:
        return ["scancel", job_id]

    def probe_argv(self) -> list[str]:
        return ["sinfo", "-h", "-o", "%P %a %D %T"]  # partition, avail, nodes, state

    def explain(self, info: JobInfo) -> str | None:
        if info.state != QUEUED:
            return None
        for needles, words in _STUCK:
            if any(n in info.reason for n in needles):
                return words
        return None

    # -- the three formats -------------------------------------------------------------------
    def _parse_squeue(self, stdout: str, job_id: str) -> JobInfo | None:
        for line in stdout.splitlines():
            cells = line.split("|")
            if len(cells) != 9 or cells[0].strip() != job_id:
                continue
            native = cells[1].strip()
            state = self.map_state(native)
            if state not in (QUEUED, RUNNING):
                return None  # ended: the exit code comes from sacct or scontrol
            return JobInfo(job_id=job_id, native=native, state=state,
                           reason=_reason(cells[2]), submitted=_time(cells[3]),
                           started=_time(cells[4]) if state == RUNNING else None,
                           nodes=_blank(cells[8]), time_limit=_blank(cells[7]),
                           used=parse_elapsed(cells[6]) if state == RUNNING else None)
        return None

    def _parse_sacct(self, stdout: str, job_id: str) -> JobInfo | None:
        for line in stdout.splitlines():
            cells = line.split("|")
            if len(cells) != 10 or cells[0].strip() != job_id:
                continue
            native = cells[1].strip().split(" ")[0]  # "CANCELLED by 0"
            return JobInfo(job_id=job_id, native=native, state=self.map_state(native),
                           reason=_reason(cells[3]), exit_code=_exit_code(cells[2]),
                           submitted=_time(cells[4]), started=_time(cells[5]),
                           ended=_time(cells[6]), time_limit=_blank(cells[8]),
                           nodes=_blank(cells[9]))
        return None

    def _parse_scontrol(self, stdout: str, job_id: str) -> JobInfo | None:
        for line in stdout.splitlines():
            pairs = dict(part.partition("=")[::2] for part in _SCONTROL_SPLIT.split(line.strip()))
            if pairs.get("JobId") != job_id or "JobState" not in pairs:
                continue
            native = pairs["JobState"]
            state = self.map_state(native)
            ended = state not in (QUEUED, RUNNING)
            return JobInfo(job_id=job_id, native=native, state=state,
                           reason=_reason(pairs.get("Reason", "")),
                           exit_code=_exit_code(pairs.get("ExitCode", "")) if ended else None,
                           submitted=_time(pairs.get("SubmitTime", "")),
                           started=_time(pairs.get("StartTime", "")) if state != QUEUED else None,
                           ended=_time(pairs.get("EndTime", "")) if ended else None,
                           nodes=_blank(pairs.get("NodeList", "")),
                           time_limit=_blank(pairs.get("TimeLimit", "")))
        return None


def _blank(text: str) -> str:
    text = text.strip()
    return "" if text in ("", "(null)", "None", "N/A", "Unknown") else text


def _reason(text: str) -> str:
    return _blank(text).replace("_", " ") if _blank(text) else ""


def _time(text: str) -> datetime | None:
    text = _blank(text)
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _exit_code(text: str) -> int | None:
    """``CODE:SIGNAL`` as one shell-style exit code (128 + signal when killed)."""
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*", text)
    if not match:
        return None
    code, signal = int(match.group(1)), int(match.group(2))
    return 128 + signal if signal else code
