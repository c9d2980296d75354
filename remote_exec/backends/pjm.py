"""Fujitsu Technical Computing Suite job manager (PJM), as on Fugaku and the Fujitsu
Cloud Service HPC: ``pjsub``, ``pjstat -v`` then ``pjstat -H day=3 -v``, ``pjdel``.

Formats (Fugaku user guide "5.12 Displaying a job status" and "5.16 Checking when a
job ends abnormally"; Fujitsu "Job Operation Software End-user's Guide", appendix
"A.1 pjstat and pjstat -v output"):

* ``pjsub`` prints ``[INFO] PJM 0000 pjsub Job 12345 submitted.``; errors read
  ``[ERR.] PJM 0057 pjsub node=32 is greater than the upper limit (24).``
* ``pjstat -v JOBID`` lists a queued or running job, ``pjstat -H day=3 -v JOBID`` an
  ended one (``-H``: the history of the last ``day`` days): a header line and one
  line per job, in columns such as::

      JOB_ID  JOB_NAME  MD ST  USER  GROUP  START_DATE      ELAPSE_TIM ELAPSE_LIM ...
      167661  test      NM EXT user1 grp1   03/06 13:55:02  0000:00:02 0000:01:00 ...

  ``ST`` is the state, ``LST`` the previous one, ``EC`` the job script's exit code
  (``-`` when it was killed by a signal), ``SN`` the signal, ``PC`` the job manager's
  own code (the "PJM CODE" table: 0 normal end, 1 deleted by ``pjdel``, 11 elapse
  limit exceeded, ...), ``REASON`` why it waits or ended. Dates are ``MM/DD hh:mm:ss``
  (no year); a date in parentheses is an expected one (a job not started yet).
  Values may hold one space (dates) and the last column (``REASON``) several, so
  the line is read token by token with those rules rather than by position.
* ``pjdel 12345`` prints ``[INFO] PJM 0100 pjdel Job 12345 canceled.``

Samples of every case are in ``tests/data/pjm/``.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from remote_exec.backends.scheduler import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    TIMED_OUT,
    JobInfo,
    Scheduler,
)

# Job states (End-user's Guide "Job state"; Fugaku user guide 5.12).
STATES = {
    "ACC": QUEUED,     # accepted: the submission is being processed
    "QUE": QUEUED,     # queued, waiting to run
    "RNA": QUEUED,     # acquiring the resources to run
    "HLD": QUEUED,     # held by pjhold (or held on an error, see ERR)
    "RNP": RUNNING,    # running the prologue
    "RUN": RUNNING,    # running
    "RNE": RUNNING,    # running the epilogue
    "RNO": RUNNING,    # ending: waiting for the end of termination processing
    "SPP": RUNNING,    # being suspended
    "SPD": RUNNING,    # suspended
    "RSM": RUNNING,    # resuming
    "EXT": COMPLETED,  # ended (refined by PJM CODE, exit code and signal)
    "CCL": CANCELLED,  # ended by cancellation (pjdel, or the job manager)
    "ERR": FAILED,     # stopped on an error; it stays in the queue until deleted
    "RJT": FAILED,     # rejected at acceptance: never ran
}

# "PJM CODE" values (Fugaku user guide 5.16.1 "Job manager exit code").
PJM_CODES = {
    1: "deleted by pjdel",
    2: "rejected at acceptance",
    3: "execution rejected by the job manager",
    4: "held by pjhold",
    6: "cancelled by a step job dependency",
    7: "cancelled by the deadline",
    8: "cancelled by the job manager",
    9: "ended while the job was rebuilt (re-execution not allowed)",
    11: "elapsed time limit exceeded",
    12: "killed for using too much memory",
    13: "killed for using too much disk",
    16: "the current directory or a standard input/output file was not accessible",
    18: "ended by a following job or a deadline schedule",
    20: "a node went down",
    21: "the job shell could not be run",
    22: "ICC error",
    23: "killed by the OOM killer",
    25: "HA failure",
    26: "prologue or epilogue error",
    27: "error in the job's resource management exit processing",
}
PJM_CODE_CANCELLED = (1, 6, 7, 8)
PJM_CODE_TIMEOUT = 11

# Columns whose value is a date ("03/06 13:55:02", "(03/08 11:41)") may take two tokens.
_DATE_COLUMNS = ("START_DATE", "ACCEPT", "END_DATE", "EXIT_DATE")
_DATE = re.compile(r"(\d\d)/(\d\d) (\d\d):(\d\d)(?::(\d\d))?")
_SUBMITTED = re.compile(r"\bJob (\d+(?:\[\d*\])?)(?: \S+)? submitted")

# Waiting reasons that need someone to act (REASON column), in plain words.
_STUCK = (
    ("RSCGRP STOP", "its resource group is stopped: it waits until the site starts it"),
    ("RSCGRP NOT EXIST", "its resource group does not exist: cancel it and pick another"),
    ("IMPOSSIBLE SCHED", "the job manager cannot ever schedule it as asked: cancel it and "
     "ask for fewer nodes or less time"),
    ("LIMIT OVER", "it asks for more than a limit of its resource group allows: cancel it "
     "and ask for less"),
)


class PjmScheduler(Scheduler):
    """The Fujitsu TCS job manager: ``pjsub``, ``pjstat -v``, ``pjstat -H``, ``pjdel``."""

    name = "pjm"
    title = "PJM"
    STATES = STATES

    def submit_argv(self, script: str) -> list[str]:
        return ["pjsub", script]

    def parse_submit(self, stdout: str) -> str:
        match = _SUBMITTED.search(stdout)
        if not match:
            raise ValueError(f"no job id in pjsub's answer {stdout.strip()!r}")
        return match.group(1)

    def queries(self, job_id: str) -> list[list[str]]:
        return [["pjstat", "-v", job_id], ["pjstat", "-H", "day=3", "-v", job_id]]

    def parse_query(self, index: int, stdout: str, job_id: str) -> JobInfo | None:
        for row in parse_pjstat(stdout):
            if row.get("JOB_ID") == job_id and row.get("ST"):
                return _job_info(self, job_id, row)
        return None

    def cancel_argv(self, job_id: str) -> list[str]:
        return ["pjdel", job_id]

    def probe_argv(self) -> list[str]:
        return ["pjstat", "--rsc"]  # the resource groups the user may submit to

    def explain(self, info: JobInfo) -> str | None:
        if info.state != QUEUED:
            return None
        for needle, words in _STUCK:
            if needle in info.reason.upper():
                return words
        if info.native == "HLD":
            return f"it is held: `pjrls {info.job_id}` releases it"
        return None


def parse_pjstat(text: str) -> list[dict[str, str]]:
    """The rows of ``pjstat`` / ``pjstat -v`` / ``pjstat -H`` output as ``{column: value}``."""
    rows: list[dict[str, str]] = []
    header: list[str] = []
    for line in text.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0] == "JOB_ID":
            header = tokens
            continue
        if not header or not re.match(r"\d", tokens[0]):
            continue
        rows.append(_row(header, tokens))
    return rows


def _row(header: list[str], tokens: list[str]) -> dict[str, str]:
    row: dict[str, str] = {}
    i = 0
    for n, column in enumerate(header):
        if i >= len(tokens):
            break
        if n == len(header) - 1:  # the last column (REASON) takes the rest of the line
            row[column] = " ".join(tokens[i:])
            break
        take = 1
        if column in _DATE_COLUMNS:
            if tokens[i].startswith("(") and not tokens[i].endswith(")"):
                take = 2
            elif re.fullmatch(r"\d\d/\d\d", tokens[i]) and i + 1 < len(tokens) \
                    and re.fullmatch(r"\d\d:\d\d(:\d\d)?", tokens[i + 1]):
                take = 2
        row[column] = " ".join(tokens[i:i + take])
        i += take
    return row


def _job_info(scheduler: PjmScheduler, job_id: str, row: dict[str, str]) -> JobInfo:
    native = row["ST"].upper()
    state = scheduler.map_state(native)
    reason = _blank(row.get("REASON", ""))
    info = JobInfo(job_id=job_id, native=native, state=state, reason=reason,
                   submitted=_date(row.get("ACCEPT", "")),
                   time_limit=_blank(row.get("ELAPSE_LIM", "")))
    if state != QUEUED:
        info.started = _date(row.get("START_DATE", ""))
    if state in (QUEUED, RUNNING):
        return info
    elapsed = _seconds(row.get("ELAPSE_TIM", ""))
    if info.started and elapsed is not None:
        info.ended = info.started + timedelta(seconds=elapsed)
    code, signal, pjm_code = _int(row.get("EC")), _int(row.get("SN")), _int(row.get("PC"))
    if signal:
        info.exit_code = 128 + signal
    elif code is not None:
        info.exit_code = code
    if pjm_code and not info.reason:
        info.reason = PJM_CODES.get(pjm_code, f"PJM code {pjm_code}")
    if pjm_code == PJM_CODE_TIMEOUT:
        info.state = TIMED_OUT
    elif native == "CCL" or pjm_code in PJM_CODE_CANCELLED:
        info.state = CANCELLED
    elif native == "EXT":
        info.state = COMPLETED if not pjm_code and info.exit_code == 0 else FAILED
    return info


def _blank(text: str) -> str:
    text = text.strip()
    return "" if text in ("", "-") else text


def _int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def _seconds(text: str) -> int | None:
    """``0001:30:00`` (hours:minutes:seconds) as seconds."""
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d)", text.strip())
    if not match:
        return None
    hours, minutes, secs = (int(g) for g in match.groups())
    return (hours * 60 + minutes) * 60 + secs


def _date(text: str, now: datetime | None = None) -> datetime | None:
    """``MM/DD hh:mm:ss`` (pjstat prints no year: the latest such date not after
    tomorrow); None for ``-`` and for an expected date in parentheses."""
    text = text.strip()
    match = _DATE.fullmatch(text)
    if not match:
        return None
    month, day, hour, minute = (int(g) for g in match.groups()[:4])
    second = int(match.group(5) or 0)
    now = now or datetime.now()
    for year in (now.year, now.year - 1):
        try:
            when = datetime(year, month, day, hour, minute, second)
        except ValueError:  # 02/29 of a year without it
            continue
        if when <= now + timedelta(days=1):
            return when
    return None
