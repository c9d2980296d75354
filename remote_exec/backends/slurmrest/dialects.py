"""The two REST dialects as data, pure builders and parsers (no I/O, tested on recorded
answers in ``tests/data/slurmrest/``).

``slurmrestd`` — Slurm's own daemon (v0.0.36–v0.0.38, as Debian 12's Slurm 22.05 serves
them; the version is chosen from ``GET /openapi/v3``). Facts it rests on, each checked on
a real slurmrestd: ``#SBATCH`` lines are ignored, so every resource travels in the
``job`` object; ``environment`` is mandatory; without ``current_working_directory`` the
job runs in the daemon's directory; ``"requeue": false`` is ignored but
``"no_requeue": true`` works; a submission that succeeds may still list ``errors`` (a
held job): success is a ``job_id``; ``exit_code`` is a raw wait status (768 = exit 3);
an unknown job id, an expired token and a dead slurmctld all answer HTTP 500, told
apart by their error numbers (2017: no such job; -1: no answer from slurmctld, or a
token it refused).

``frce`` — the FRCE HPC API (seeds/003): ``POST submit_job`` with ``script-body``,
``partition`` (mandatory) and a few sbatch options under their own names, the whole
request under 4 KB; ``GET query_status`` lists the user's jobs of the last 24 hours;
answers are ``{"status": "call_success"|"call_failure", "reason": ...}`` (the text
says "Status"/"call success": both spellings are read). No cancel, no single-job
query, no exit code, no job name or working directory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from remote_exec.backends.scheduler import QUEUED, RUNNING, JobInfo, Resources, slurm_time
from remote_exec.backends.slurm import STATES
from remote_exec.backends.slurmrest.client import Answer, summary
from remote_exec.errors import ConfigError

# -- slurmrestd ------------------------------------------------------------------------------

#: the API versions remote-exec speaks, best first (v0.0.38 tested against the real daemon;
#: v0.0.37 and v0.0.36 take and give the same fields for what is used here)
KNOWN_VERSIONS = ("v0.0.38", "v0.0.37", "v0.0.36")
#: what the job's environment holds (slurmrestd requires one; sbatch would copy the login's)
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"

#: slurmrestd's error numbers that say something definite
NO_SUCH_JOB = 2017
NO_ANSWER = -1  # slurmctld did not answer, or refused the token
PERMISSION_DENIED = 2002
TRY_LATER = 2020
_VERSION_PATH = re.compile(r"^/slurm/(v\d+\.\d+\.\d+)/")


def offered_versions(paths: Iterable[str]) -> list[str]:
    """The API versions an OpenAPI document's paths serve."""
    return sorted({m.group(1) for p in paths if (m := _VERSION_PATH.match(p))})


def choose_version(offered: list[str], wanted: str) -> str:
    """The version to speak: ``wanted``, or (``auto``) the best one both sides know."""
    if wanted != "auto":
        if wanted not in KNOWN_VERSIONS:
            raise ConfigError(f"slurmrest.api_version {wanted} is not one remote-exec speaks",
                              hint="known: " + ", ".join(KNOWN_VERSIONS) + " (or auto)")
        if offered and wanted not in offered:
            raise ConfigError(f"slurmrestd does not serve {wanted} (it serves "
                              f"{', '.join(offered)})", hint="set slurmrest.api_version: auto")
        return wanted
    for version in KNOWN_VERSIONS:
        if version in offered:
            return version
    raise ConfigError(
        "slurmrestd serves API versions " + (", ".join(offered) or "none under /slurm/")
        + "; remote-exec speaks " + ", ".join(KNOWN_VERSIONS),
        hint="ask the site to load openapi/v0.0.38 (slurmrestd -s openapi/v0.0.38), or use "
        "the `slurm` backend (sbatch over SSH)")


def error_numbers(body: Any) -> list[int]:
    """The error numbers of a slurmrestd answer (``error_number`` or ``error_code``)."""
    numbers = []
    errors = body.get("errors") if isinstance(body, dict) else None
    for error in errors if isinstance(errors, list) else []:
        if isinstance(error, dict):
            value = error.get("error_number", error.get("error_code"))
            if isinstance(value, int):
                numbers.append(value)
    return numbers


def submit_body(script: str, *, name: str, rundir: str, output: str,
                r: Resources) -> dict[str, Any]:
    """The ``POST /slurm/VERSION/job/submit`` body of one run's job."""
    job: dict[str, Any] = {
        "name": name,
        "current_working_directory": rundir,
        "standard_output": output,
        "environment": {"PATH": JOB_PATH},
        "no_requeue": True,
    }
    optional = {"nodes": r.nodes, "tasks": r.tasks, "cpus_per_task": r.cpus_per_task,
                "memory_per_node": r.memory_mb, "partition": r.queue, "account": r.project,
                "time_limit": math.ceil(r.walltime_s / 60) if r.walltime_s else None}
    job.update({k: v for k, v in optional.items() if v is not None})
    return {"script": script, "job": job}


def parse_submitted(answer: Answer) -> str | None:
    """The job id of a submission's answer; None if there is none (then
    :func:`refusal` says why)."""
    body = answer.body
    if isinstance(body, dict) and isinstance(body.get("job_id"), int) and answer.status < 500:
        return str(body["job_id"])
    return None


def transient(answer: Answer) -> bool:
    """Whether a failed answer is worth asking again later (slurmctld not answering)."""
    numbers = error_numbers(answer.body)
    return answer.status >= 500 and (not numbers or NO_ANSWER in numbers
                                     or TRY_LATER in numbers)


def parse_job(answer: Answer, job_id: str) -> JobInfo | None:
    """``GET /slurm/VERSION/job/ID``'s answer: the job, or None if Slurm does not know it
    (any more). Raises ValueError for an answer that is neither."""
    if answer.status == 500 and NO_SUCH_JOB in error_numbers(answer.body):
        return None
    body = answer.body
    if answer.status != 200 or not isinstance(body, dict):
        raise ValueError(summary(answer) or f"HTTP {answer.status}")
    for job in body.get("jobs") or []:
        if isinstance(job, dict) and str(job.get("job_id")) == job_id:
            return job_info(job)
    return None


def job_info(job: dict[str, Any]) -> JobInfo:
    """One job object of slurmrestd (v0.0.36–38) as a :class:`JobInfo`."""
    native = job.get("job_state") or ""
    if isinstance(native, list):  # newer versions: a list of flags, the state first
        native = native[0] if native else ""
    native = str(native)
    state = STATES.get(native.upper(), "failed")
    ended = state not in (QUEUED, RUNNING)
    reason = str(job.get("state_reason") or "")
    limit = job.get("time_limit")
    return JobInfo(
        job_id=str(job.get("job_id")), native=native, state=state,
        reason="" if reason == "None" else reason.replace("_", " "),
        exit_code=wait_status(job.get("exit_code")) if ended else None,
        submitted=_epoch(job.get("submit_time")),
        started=_epoch(job.get("start_time")) if state != QUEUED else None,
        ended=_epoch(job.get("end_time")) if ended else None,
        nodes=str(job.get("nodes") or ""),
        time_limit=slurm_time(int(limit) * 60) if isinstance(limit, int) and limit > 0 else "",
        extra={k: str(job[k]) for k in ("partition", "user_name", "batch_host")
               if job.get(k)})


def wait_status(value: Any) -> int | None:
    """A raw wait status (``exit_code`` of v0.0.38: 768 is exit 3, 15 is TERM) as one
    shell-style exit code (128 + signal when killed)."""
    if not isinstance(value, int) or value < 0:
        return None
    if value & 0x7F:
        return 128 + (value & 0x7F)
    return (value >> 8) & 0xFF


def find_job(answer: Answer, name: str, rundir: str) -> str | None:
    """In ``GET /slurm/VERSION/jobs``' answer, the newest job of ``name`` running in
    ``rundir`` (a submission whose answer was lost)."""
    body = answer.body
    found = []
    for job in body.get("jobs") or [] if isinstance(body, dict) else []:
        if (isinstance(job, dict) and job.get("name") == name
                and str(job.get("current_working_directory", "")).rstrip("/") == rundir):
            found.append(int(job.get("job_id", 0)))
    return str(max(found)) if found else None


def _epoch(value: Any) -> datetime | None:
    if isinstance(value, dict):  # newer versions: {"set": true, "number": N}
        value = value.get("number") if value.get("set", True) else None
    return datetime.fromtimestamp(value) if isinstance(value, int) and value > 0 else None


# -- FRCE -------------------------------------------------------------------------------------

#: the seed's documented failure reasons, in plain words (whether worth a later try)
FRCE_REASONS: dict[str, tuple[str, str, bool]] = {
    "postdata_parse_error": ("the API could not read the request's JSON", "", False),
    "postdata_too_big": ("the request is over the API's 4 KB limit",
                         "use a shorter `root` for the site", False),
    "no_partition_given": ("no partition was given",
                           "set the site's resources.queue (or -R queue=NAME)", False),
    "bad_partition": ("the partition does not take API jobs",
                      "ask the FRCE administrators which partitions do", False),
    "bad_number_of_tasks": ("the number of tasks is not valid", "check -R tasks=N", False),
    "conflicting_mem_specifications": ("both mem-per-cpu and mem-per-node were given", "",
                                       False),
    "backend_query_malloc_failed": ("the API ran out of memory while submitting",
                                    "try again later", True),
    "backend_query_job_submission_failed": ("Slurm refused the job",
                                            "check the resources asked against the "
                                            "partition's limits", False),
}


def frce_body(script: str, r: Resources) -> dict[str, Any]:
    """The ``POST submit_job`` body (the seed's field names)."""
    if r.nodes is not None or r.project is not None:
        which = "nodes" if r.nodes is not None else "project"
        raise ConfigError(f"the FRCE API has no field for {which}",
                          hint="ask with tasks, cpus_per_task, memory, walltime and queue")
    if not r.queue:
        raise ConfigError("the FRCE API needs a partition",
                          hint="set the site's resources.queue (or -R queue=NAME)")
    body: dict[str, Any] = {"script-body": script, "partition": r.queue}
    optional = {"ntasks": r.tasks, "cpus-per-task": r.cpus_per_task,
                "mem-per-node": f"{r.memory_mb}M" if r.memory_mb else None,
                "timelimit": frce_time(r.walltime_s) if r.walltime_s else None}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def frce_time(seconds: int) -> str:
    """``DD-HH:MM:SS``, the only form the FRCE API reads."""
    days, rest = divmod(seconds, 86400)
    return f"{days:02d}-{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def _frce_fields(answer: Answer) -> tuple[bool | None, str]:
    """(success?, reason) of an FRCE answer; success None if it is not one."""
    body = answer.body
    if not isinstance(body, dict):
        return None, summary(answer) or f"HTTP {answer.status}"
    status = str(body.get("status", body.get("Status", ""))).replace(" ", "_").lower()
    reason = str(body.get("reason", body.get("Reason", "")))
    if status == "call_success":
        return True, reason
    if status == "call_failure":
        return False, reason
    return None, reason or f"HTTP {answer.status}"


def frce_submitted(answer: Answer) -> tuple[str | None, str, str, bool]:
    """(job id, why not, hint, worth a later try) of a ``submit_job`` answer."""
    ok, reason = _frce_fields(answer)
    if ok and reason.strip().isdigit():
        return reason.strip(), "", "", False
    if ok is None:
        return None, f"the API answered HTTP {answer.status}: {reason}", \
            "a severe error of the API (it said no more)", answer.status >= 500
    words, hint, later = FRCE_REASONS.get(reason, (reason or "no reason given", "", False))
    return None, f"{words} ({reason})" if reason in FRCE_REASONS else words, hint, later


def frce_job(answer: Answer, job_id: str) -> JobInfo | None:
    """``query_status``' record of ``job_id``, None if it is not listed (it never was,
    or it is older than the API's 24 hours). ValueError for a failed call."""
    ok, reason = _frce_fields(answer)
    if not ok or not isinstance(answer.body, dict):
        raise ValueError(reason)
    record = answer.body.get(job_id)
    if not isinstance(record, dict):
        return None
    native = str(record.get("state") or "")
    state = STATES.get(native.upper(), "failed")
    ended = state not in (QUEUED, RUNNING)
    return JobInfo(job_id=job_id, native=native, state=state,
                   started=_frce_time(record.get("start")) if state != QUEUED else None,
                   ended=_frce_time(record.get("end")) if ended else None,
                   extra={k: str(record[k]) for k in ("partition", "user", "name")
                          if record.get(k)})


def frce_new_jobs(answer: Answer, before: set[str], partition: str | None, *,
                  live_only: bool = True) -> list[str]:
    """The ids ``query_status`` lists that are not in ``before`` (in ``partition``, and
    still queued or running unless ``live_only`` is False). ValueError for a failed call."""
    ok, reason = _frce_fields(answer)
    if not ok or not isinstance(answer.body, dict):
        raise ValueError(reason)
    found = []
    for key, record in answer.body.items():
        if not key.isdigit() or key in before or not isinstance(record, dict):
            continue
        if partition and record.get("partition") not in (None, partition):
            continue
        state = STATES.get(str(record.get("state", "")).upper(), "failed")
        if live_only and state not in (QUEUED, RUNNING):
            continue
        found.append(key)
    return sorted(found)


def _frce_time(value: Any) -> datetime | None:
    try:
        return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
