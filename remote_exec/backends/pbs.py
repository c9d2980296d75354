"""PBS Professional / OpenPBS and Torque: ``qsub``, ``qstat -f``, ``qdel``.

Both print a job as a ``qstat -f`` block (PBS Professional Reference Guide, ``qstat``
"Job status in long format"; Torque Administrator Guide, ``qstat``)::

    Job Id: 1234.pbs01
        Job_Name = re-1a2b3c4d
        job_state = R
        Variable_List = PBS_O_HOME=/home/u,PBS_O_LANG=C,PBS_O_LOGNAME=u,
    \tPBS_O_WORKDIR=/scratch/u/run

``Key = value`` lines indented by four spaces; a value longer than the line is
broken (after a comma or anywhere) and goes on with lines starting with a tab
(``prt_attr`` in ``src/cmds/qstat.c`` of both code bases), to be joined as is.
Times look like ``Fri Oct 20 04:30:41 2017``.

What differs, and is kept as data on the two classes:

* **PBS Professional** keeps finished jobs (state ``F``) for ``qstat -x`` when the
  site enables job history (``job_history_enable``, off by default); plain
  ``qstat -f`` answers a finished job with "Job has finished, use -x or -H" (exit
  35) and an unknown one with "Unknown Job Id" (exit 153). Its exit status is
  ``Exit_status``; the start is ``stime``, the end ``obittime``; substate 91 marks
  a job ended by deletion (``JOB_SUBSTATE_TERMINATED`` in ``src/include/job.h``).
* **Torque** has no history and no ``-x`` (there ``-x`` means XML): a finished job
  stays in state ``C`` for ``keep_completed`` seconds, then is unknown
  ("Unknown Job Id Error", exit 153). Its exit status is ``exit_status``; the start
  is ``start_time``, the end ``comp_time``.

Exit status conventions (PBS Professional Reference Guide "Job Exit Status"; Torque
Administrator Guide "Job exit status"): 0-255 is what the job script returned;
256 + N means the job's top process was killed by signal N (271 = SIGTERM, what
``qdel`` of a running job gives: Adaptive Computing KB "exit code 271 for
canceled running jobs"); a negative value is a ``JOB_EXEC_*`` code of the
execution daemon, listed below. Walltime exceeded is ``-29``
(``JOB_EXEC_KILL_WALLTIME``, OpenPBS >= 20) on PBS and ``-11``
(``JOB_EXEC_OVERLIMIT_WT``, Torque >= 6) on Torque; older versions only report the
signal (271 or 265), so a signal death with ``resources_used.walltime`` at or past
``Resource_List.walltime`` is read as walltime exceeded too.
Samples of every case are in ``tests/data/pbs/`` and ``tests/data/torque/``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import ClassVar

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

# job_state letters (PBS Professional Reference Guide "Job States"; Torque qstat(1B)).
# A finished job (F, X, C) is refined by its exit status in _finished().
PBS_STATES = {
    "Q": QUEUED,     # queued, eligible to run or be routed
    "H": QUEUED,     # held (by a user, an operator, the system or a dependency)
    "W": QUEUED,     # waiting for its execution time, or after a failed stage-in
    "T": QUEUED,     # in transit: being moved to a new location
    "R": RUNNING,    # running
    "B": RUNNING,    # array job: at least one subjob has begun
    "E": RUNNING,    # exiting after having run (the exit status may not be set yet)
    "S": RUNNING,    # suspended by the server (keeps its place on the nodes)
    "U": RUNNING,    # suspended because its cycle-harvesting workstation is busy
    "F": COMPLETED,  # finished: completed, failed or deleted (history, qstat -x)
    "X": COMPLETED,  # subjob finished ("expired")
    "M": FAILED,     # moved to another server: this one no longer tracks it
}
TORQUE_STATES = {
    "Q": QUEUED,     # queued, eligible to run or be routed
    "H": QUEUED,     # held
    "W": QUEUED,     # waiting for its execution time
    "T": QUEUED,     # being moved to a new location
    "R": RUNNING,    # running
    "E": RUNNING,    # exiting after having run
    "S": RUNNING,    # suspended
    "C": COMPLETED,  # completed after having run, or deleted (kept keep_completed s)
}
FINISHED_LETTERS = ("F", "X", "C")

# Negative exit statuses: the execution daemon's JOB_EXEC_* codes.
# PBS: src/include/job.h of OpenPBS (the Reference Guide's table "Job Exit Codes").
PBS_EXEC_CODES = {
    -1: "JOB_EXEC_FAIL1: the job could not start (before its files were set up)",
    -2: "JOB_EXEC_FAIL2: the job could not start (after its files were set up)",
    -3: "JOB_EXEC_RETRY: the job could not start; it will be retried",
    -4: "JOB_EXEC_INITABT: the job was aborted when the execution daemon started",
    -5: "JOB_EXEC_INITRST: the job was aborted when the execution daemon started",
    -6: "JOB_EXEC_INITRMG: the job was aborted when the execution daemon started",
    -7: "JOB_EXEC_BADRESRT: the job's restart failed",
    -10: "JOB_EXEC_FAILUID: invalid user or group id for the job",
    -11: "JOB_EXEC_RERUN: the job was rerun",
    -12: "JOB_EXEC_CHKP: the job was checkpointed and killed",
    -13: "JOB_EXEC_FAIL_PASSWORD: the job failed on a bad password",
    -14: "JOB_EXEC_RERUN_SIS_FAIL: a sister node failed",
    -15: "JOB_EXEC_QUERST: requeued to restart from a checkpoint",
    -16: "JOB_EXEC_FAILHOOK_RERUN: a hook rejected the job; requeued",
    -17: "JOB_EXEC_FAILHOOK_DELETE: a hook rejected the job; deleted",
    -18: "JOB_EXEC_HOOK_RERUN: a hook requeued the job",
    -19: "JOB_EXEC_HOOK_DELETE: a hook deleted the job",
    -20: "JOB_EXEC_RERUN_MS_FAIL: the primary execution host could not be reached",
    -21: "JOB_EXEC_FAIL_SECURITY: security breach in the PBS directory",
    -22: "JOB_EXEC_HOOKERROR: a hook failed or timed out",
    -23: "JOB_EXEC_FAIL_KRB5: no Kerberos credentials",
    -24: "JOB_EXEC_KILL_NCPUS_BURST: killed for using more CPUs than asked (burst)",
    -25: "JOB_EXEC_KILL_NCPUS_SUM: killed for using more CPUs than asked (sum)",
    -26: "JOB_EXEC_KILL_VMEM: killed for exceeding its vmem",
    -27: "JOB_EXEC_KILL_MEM: killed for exceeding its memory",
    -28: "JOB_EXEC_KILL_CPUT: killed for exceeding its CPU time",
    -29: "JOB_EXEC_KILL_WALLTIME: killed for exceeding its walltime",
    -30: "JOB_EXEC_JOINJOB: the job's nodes could not be joined",
}
# Torque: Administrator Guide 6.1 "Job exit status", table "Torque supplied exit codes".
TORQUE_EXEC_CODES = {
    -1: "JOB_EXEC_FAIL1: the job could not start (before its files were set up)",
    -2: "JOB_EXEC_FAIL2: the job could not start (after its files were set up)",
    -3: "JOB_EXEC_RETRY: the job could not start; it will be retried",
    -4: "JOB_EXEC_INITABT: the job was aborted when pbs_mom started",
    -5: "JOB_EXEC_INITRST: the job was aborted when pbs_mom started",
    -6: "JOB_EXEC_INITRMG: the job was aborted when pbs_mom started",
    -7: "JOB_EXEC_BADRESRT: the job's restart failed",
    -8: "JOB_EXEC_CMDFAIL: exec() of the job's command failed",
    -9: "JOB_EXEC_STDOUTFAIL: the job's stdout/stderr files could not be created",
    -10: "JOB_EXEC_OVERLIMIT_MEM: killed for exceeding its memory",
    -11: "JOB_EXEC_OVERLIMIT_WT: killed for exceeding its walltime",
    -12: "JOB_EXEC_OVERLIMIT_CPUT: killed for exceeding its CPU time",
    -13: "JOB_EXEC_RETRY_CGROUP: the job's cgroups could not be created",
    -14: "JOB_EXEC_RETRY_PROLOGUE: the prologue failed",
}

_SIGNAL_BASE = 256  # Exit_status = 256 + signal when the job's top process was killed

_TIME_FORMAT = "%a %b %d %H:%M:%S %Y"  # "Fri Oct 20 04:30:41 2017" (ctime(3) style)


class PbsScheduler(Scheduler):
    """PBS Professional / OpenPBS: ``qsub``, ``qstat -x -f`` then ``qstat -f``, ``qdel``."""

    name = "pbs"
    title = "PBS"
    STATES = PBS_STATES
    #: what the execution daemon's negative exit statuses mean
    EXEC_CODES: ClassVar[dict[int, str]] = PBS_EXEC_CODES
    #: the exit status of a job killed for exceeding its walltime
    WALLTIME_CODE: ClassVar[int] = -29

    def submit_argv(self, script: str) -> list[str]:
        return ["qsub", script]

    def parse_submit(self, stdout: str) -> str:
        """qsub prints the new job's id (``1234.server``; ``1234[].server`` for arrays)."""
        for line in reversed(stdout.strip().splitlines()):
            word = line.strip()
            if re.fullmatch(r"\d+(\[\d*\])?(\.[\w.-]+)?", word):
                return word
        raise ValueError(f"no job id in qsub's answer {stdout.strip()!r}")

    def queries(self, job_id: str) -> list[list[str]]:
        # -x adds finished jobs when the site keeps job history; without history it
        # answers only for queued and running jobs, as plain -f does.
        return [["qstat", "-x", "-f", job_id], ["qstat", "-f", job_id]]

    def parse_query(self, index: int, stdout: str, job_id: str) -> JobInfo | None:
        for block_id, attrs in parse_qstat_f(stdout):
            if _same_job(block_id, job_id) and "job_state" in attrs:
                return self._job_info(job_id, attrs)
        return None

    def cancel_argv(self, job_id: str) -> list[str]:
        return ["qdel", job_id]

    def probe_argv(self) -> list[str]:
        return ["qstat", "-Q"]  # the queues: enabled, started, jobs per state

    def explain(self, info: JobInfo) -> str | None:
        if info.state != QUEUED:
            return None
        if info.reason.lower().startswith("can never run"):
            return ("the scheduler says it can never run as asked: cancel it and ask for "
                    "fewer resources or another queue")
        if info.native == "H":
            return ("it is held (by you, an administrator or a failed dependency): "
                    f"`qrls {info.job_id}` releases a user hold; `qstat -f {info.job_id}` "
                    "shows Hold_Types")
        if info.native == "W" and "stag" in info.reason.lower():
            return "its file stage-in failed: it waits and will be retried"
        return None

    # -- reading one block -------------------------------------------------------------------
    def _job_info(self, job_id: str, attrs: dict[str, str]) -> JobInfo:
        native = attrs["job_state"].strip().upper()
        state = self.map_state(native)
        info = JobInfo(job_id=job_id, native=native, state=state,
                       reason=attrs.get("comment", "").strip(),
                       submitted=_time(attrs.get("ctime") or attrs.get("qtime")),
                       started=_time(_started(attrs)),
                       nodes=_hosts(attrs.get("exec_host", "")),
                       time_limit=attrs.get("Resource_List.walltime", "").strip())
        if state == QUEUED:
            info.started = None
        if native == "M" and not info.reason:
            info.reason = "moved to another server"
        if native in FINISHED_LETTERS:
            self._finished(info, attrs)
        return info

    def _finished(self, info: JobInfo, attrs: dict[str, str]) -> None:
        """State, exit code and reason of a finished job, from its exit status."""
        info.ended = _time(attrs.get("obittime") or attrs.get("comp_time") or attrs.get("mtime"))
        status = _int(attrs.get("Exit_status") or attrs.get("exit_status"))
        meaning = self.EXEC_CODES.get(status) if status is not None and status < 0 else None
        if meaning:
            info.reason = f"{meaning} (exit status {status})" + (
                f"; {info.reason}" if info.reason else "")
        if status is not None and status >= 0:
            info.exit_code = (128 + status - _SIGNAL_BASE) if status > _SIGNAL_BASE else status
        if status == self.WALLTIME_CODE or (
                status is not None and status > _SIGNAL_BASE and _over_walltime(attrs)):
            info.state = TIMED_OUT
        elif self._deleted(attrs, status):
            info.state = CANCELLED
        elif status == 0:
            info.state = COMPLETED
        else:
            info.state = FAILED

    def _deleted(self, attrs: dict[str, str], status: int | None) -> bool:
        """Ended by ``qdel``: substate 91 (JOB_SUBSTATE_TERMINATED), or never started."""
        if attrs.get("substate", "").strip() == "91":
            return True
        return status is None and not _started(attrs)


class TorqueScheduler(PbsScheduler):
    """Torque (and PBS-compatible Torque forks): ``qsub``, ``qstat -f``, ``qdel``."""

    name = "torque"
    title = "Torque"
    STATES = TORQUE_STATES
    EXEC_CODES = TORQUE_EXEC_CODES
    WALLTIME_CODE = -11
    #: what qdel of a running job leaves (256 + SIGTERM)
    DELETED_RUNNING_CODE: ClassVar[int] = 271

    def queries(self, job_id: str) -> list[list[str]]:
        return [["qstat", "-f", job_id]]

    def _deleted(self, attrs: dict[str, str], status: int | None) -> bool:
        if status == self.DELETED_RUNNING_CODE:
            return True
        return status is None and not _started(attrs)


def parse_qstat_f(text: str) -> list[tuple[str, dict[str, str]]]:
    """The ``(job id, {attribute: value})`` blocks of ``qstat -f`` output, continuation
    lines joined back (a tab-indented line continues the previous value as is)."""
    blocks: list[tuple[str, dict[str, str]]] = []
    attrs: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("Job Id:"):
            attrs, key = {}, ""
            blocks.append((line.partition(":")[2].strip(), attrs))
        elif not blocks or not line.strip():
            continue
        elif re.match(r"    \S", line) and " = " in line:
            key, _, value = line.strip().partition(" = ")
            attrs[key] = value
        elif key:  # a continuation: "\t" in qstat's own output, spaces in some copies
            attrs[key] += line[1:] if line.startswith("\t") else line.strip()
    return blocks


def _started(attrs: dict[str, str]) -> str | None:
    """When the job started: ``stime`` (PBS) or ``start_time`` (Torque)."""
    return attrs.get("stime") or attrs.get("start_time")


def _same_job(block_id: str, job_id: str) -> bool:
    """``1234.pbs01`` is job ``1234`` (qstat may print a longer or shorter server name)."""
    return block_id == job_id or block_id.split(".")[0] == job_id.split(".")[0]


def _time(text: str | None) -> datetime | None:
    if not text or not text.strip():
        return None
    try:
        return datetime.strptime(" ".join(text.split()), _TIME_FORMAT)
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _seconds(text: str | None) -> int | None:
    """``HH:MM:SS``, ``MM:SS`` or seconds, as seconds."""
    if not text or not re.fullmatch(r"\d+(:\d+){0,2}", text.strip()):
        return None
    seconds = 0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def _over_walltime(attrs: dict[str, str]) -> bool:
    used = _seconds(attrs.get("resources_used.walltime"))
    limit = _seconds(attrs.get("Resource_List.walltime"))
    return used is not None and limit is not None and used >= limit


def _hosts(exec_host: str) -> str:
    """``node1/0*2+node2/0`` as ``node1,node2``."""
    hosts: list[str] = []
    for part in exec_host.strip().split("+"):
        host = part.split("/")[0].strip()
        if host and host not in hosts:
            hosts.append(host)
    return ",".join(hosts)
