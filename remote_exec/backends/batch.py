"""Scheduler backends over SSH: submit a run's batch job, ask about it, cancel it.

The run directory is staged and fetched exactly as for the ``direct`` backend (the
login host and the compute nodes share the file system, as on every cluster);
what differs is how the wrapper ``run.sh`` is started: as the body of a batch job
(see :mod:`remote_exec.backends.scheduler` for the life of a job, and one module per
scheduler for its commands and formats).

Every command is an argument vector run through :mod:`remote_exec.ssh.shell`, so
nothing a user typed is read by a remote shell, and a login shell that prints or is
csh changes nothing.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import posixpath
import re
from typing import Any, cast

import asyncssh

from remote_exec.backends.direct import Launched, read_control, read_exit_code
from remote_exec.backends.scheduler import (
    RUN_SCRIPT,
    SCHEDULER_OUTPUT,
    JobInfo,
    Resources,
    Scheduler,
    slurm_time,
)
from remote_exec.backoff import POLL
from remote_exec.entrypoint import ALREADY_LAUNCHED, ENTER_RUN_DIR, cancel_unlaunched, launch_once
from remote_exec.errors import EXIT_REMOTE_LOST, EXIT_STAGE, TRANSIENT, RemoteExecError, StageError
from remote_exec.inputs import CONTROL_DIR
from remote_exec.ssh import shell

JOB_SCRIPT = f"{CONTROL_DIR}/job.sh"
BATCH_SCRIPT = f"{CONTROL_DIR}/batch.sh"

# The submitter: submits the job at most once per run directory (``mkdir`` is the
# atomic guard, shared with the cancel mark) and keeps what the scheduler printed,
# so a submission repeated after a dropped connection reads the first job's id.
# ``batch.sh cancel`` marks a run not submitted yet so that it never will be.
SUBMITTER = f"""#!/bin/sh
# Written by remote-exec. Usage: batch.sh submit COMMAND [ARG...] | batch.sh cancel
trap '' HUP PIPE
{ENTER_RUN_DIR}
case "$1" in
cancel)
{cancel_unlaunched("not submitted", "  ")}  echo "submitted"
  exit 0 ;;
submit) shift ;;
*) echo "usage: batch.sh submit COMMAND [ARG...] | batch.sh cancel" >&2; exit 2 ;;
esac
{launch_once("submitted")}"$@" > {CONTROL_DIR}/submit.tmp 2> {CONTROL_DIR}/submit.err
rc=$?
printf '%s\\n' "$rc" > {CONTROL_DIR}/submit.rc
mv -f {CONTROL_DIR}/submit.tmp {CONTROL_DIR}/submit.out
cat {CONTROL_DIR}/submit.out
cat {CONTROL_DIR}/submit.err >&2
exit "$rc"
"""


#: what the query commands say of a job they do not know (any more)
UNKNOWN_JOB = re.compile(r"invalid job id|unknown job|does not exist|no such job|"
                         r"job has finished|not found", re.IGNORECASE)


class SchedulerUnavailable(RemoteExecError):
    """The scheduler's commands failed without saying anything about the job: transient
    (the engine waits on and asks again; had it to give up, the run would be interrupted)."""

    exit_code = EXIT_REMOTE_LOST
    disposition = TRANSIENT


class SubmitError(StageError):
    """The scheduler refused the job (bad resources, unknown partition, no client)."""

    exit_code = EXIT_STAGE


def render_job_script(scheduler: Scheduler | str, run_id: str, resources: Resources,
                      **extra: str) -> str:
    """The batch job script of run ``run_id`` from the scheduler's template (or the
    template file named ``scheduler``); ``extra`` values are the template's own."""
    import jinja2

    folder = importlib.resources.files("remote_exec.backends") / "batch_scripts"
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)  # noqa: S701 - shell text, values validated
    name = scheduler if isinstance(scheduler, str) else scheduler.template
    return env.get_template(name).render(
        job_name=job_name(run_id), output=SCHEDULER_OUTPUT, run_script=RUN_SCRIPT,
        r=resources, slurm_time=slurm_time, **extra)


def job_name(run_id: str) -> str:
    """``re-`` and the run id's first 8 hex digits: short enough for every scheduler."""
    return "re-" + run_id.replace("-", "")[:8]


class BatchBackend:
    """Run the entrypoint as a batch job of ``scheduler``."""

    def __init__(self, scheduler: Scheduler, resources: Resources | None = None,
                 run_id: str = "") -> None:
        self.scheduler = scheduler
        self.name = scheduler.name
        self.resources = resources or Resources()
        self.run_id = run_id

    # -- submit ---------------------------------------------------------------------------
    async def launch(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                     rundir: str) -> Launched:
        files = {JOB_SCRIPT: render_job_script(self.scheduler, self.run_id or
                                               posixpath.basename(rundir), self.resources),
                 BATCH_SCRIPT: SUBMITTER}
        if not await sftp.exists(posixpath.join(rundir, CONTROL_DIR, "launched")):
            for rel, text in files.items():
                async with sftp.open(posixpath.join(rundir, rel), "wb") as f:
                    await f.write(text.encode("utf-8"))
        argv = ["/bin/sh", posixpath.join(rundir, BATCH_SCRIPT), "submit",
                *self.scheduler.submit_argv(JOB_SCRIPT)]
        result = await shell.run_argv(conn, argv)
        if result.exit_status is None and conn.is_closed():
            raise asyncssh.ConnectionLost("the connection closed while submitting")
        before = result.exit_status == ALREADY_LAUNCHED
        if before:
            out, err, status = await self._earlier_submission(sftp, rundir)
        else:
            out, err, status = str(result.stdout or ""), str(result.stderr or ""), \
                result.exit_status
        if status != 0:
            raise self._refused(status, err or out)
        try:
            job_id = self.scheduler.parse_submit(out)
        except ValueError as exc:
            raise SubmitError(f"{self.scheduler.title} did not give a job id: {exc}",
                              hint=f"look at {rundir}/{CONTROL_DIR}/submit.* on the host"
                              ) from None
        return Launched(job_id=job_id, before=before)

    async def _earlier_submission(self, sftp: asyncssh.SFTPClient, rundir: str,
                                  wait: float = 120.0) -> tuple[str, str, int | None]:
        """What the first submission printed (it may still be under way)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        for delay in POLL.delays():
            rc = await read_control(sftp, rundir, "submit.rc")
            if rc is not None:
                out = await read_control(sftp, rundir, "submit.out") or ""
                err = await read_control(sftp, rundir, "submit.err") or ""
                return out, err, int(rc) if rc.lstrip("-").isdigit() else None
            if await read_control(sftp, rundir, "cancelled") is not None:
                raise SubmitError("the run was cancelled before its job was submitted")
            if loop.time() > deadline:
                raise SubmitError(
                    "an earlier attempt started submitting this run's job but left no "
                    "answer", hint=f"look at {rundir}/{CONTROL_DIR} on the host and at the "
                    f"{self.scheduler.title} queue; then start a new run")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _refused(self, status: int | None, text: str) -> SubmitError:
        tool = self.scheduler.submit_argv("job.sh")[0]
        text = text.strip()[-800:]
        if status == 127:
            return SubmitError(
                f"{tool} was not found on the remote host ({self.scheduler.title} submits "
                "with it)",
                hint=f"is {self.scheduler.title}'s client installed there, and on the PATH "
                "of a non-interactive login? Or use another `backend` for the site")
        return SubmitError(
            f"{self.scheduler.title} refused the job ({tool} exit {status}): {text}",
            hint=f"check the resources asked ({self.resources.describe()}) against the "
            "site's queues and limits")

    # -- ask --------------------------------------------------------------------------------
    async def poll(self, sftp: asyncssh.SFTPClient, rundir: str,
                   job_id: str | None) -> int | None:
        """The exit code the wrapper recorded, or None (the scheduler is asked apart)."""
        return await read_exit_code(sftp, rundir)

    async def query(self, conn: asyncssh.SSHClientConnection, job_id: str) -> JobInfo | None:
        """What the scheduler says about ``job_id``; None if its commands answer that they
        do not know it (any more). Raises :class:`SchedulerUnavailable` when every
        command failed otherwise (controller down or timing out): that is no answer."""
        failures: list[str] = []
        unknown = False
        for index, argv in enumerate(self.scheduler.queries(job_id)):
            result = await shell.run_argv(conn, argv)
            if result.exit_status is None and conn.is_closed():
                raise asyncssh.ConnectionLost("the connection closed while asking the "
                                              "scheduler")
            if result.exit_status != 0:
                said = str(result.stderr or result.stdout or "").strip()
                if result.exit_status != 127 and UNKNOWN_JOB.search(said):
                    unknown = True
                else:
                    failures.append(f"{argv[0]}: {said.splitlines()[-1] if said else ''}"
                                    f" (exit {result.exit_status})")
                continue
            info = self.scheduler.parse_query(index, str(result.stdout or ""), job_id)
            if info is not None:
                return info
            unknown = True  # it answered, without the job
        if unknown:
            return None
        raise SchedulerUnavailable(f"{self.scheduler.title} did not answer about job "
                                   f"{job_id}: " + "; ".join(failures))

    # -- cancel -----------------------------------------------------------------------------
    async def cancel(self, conn: asyncssh.SSHClientConnection, rundir: str, grace: float,
                     job_id: str | None = None) -> str:
        """Mark an unsubmitted run so it never is; cancel a submitted job."""
        mark = await shell.run_argv(conn, ["/bin/sh", posixpath.join(rundir, BATCH_SCRIPT),
                                           "cancel"])
        answer = str(mark.stdout or "").strip()
        if mark.exit_status == 0 and answer == "not submitted":
            return "the job was not submitted yet (it never will be)"
        if not job_id:
            job_id = await self._job_id_from(conn, rundir)
        if not job_id:
            return (f"WARNING: no job id recorded: if a {self.scheduler.title} job named "
                    f"{job_name(self.run_id or posixpath.basename(rundir))} is in the queue, "
                    f"cancel it with {self.scheduler.cancel_argv('ID')[0]}")
        argv = self.scheduler.cancel_argv(job_id)
        result = await shell.run_argv(conn, argv)
        said = (str(result.stderr or "") + str(result.stdout or "")).strip()
        if result.exit_status == 0:
            return f"{argv[0]} {job_id}: done" + (f" ({said})" if said else "")
        return f"{argv[0]} {job_id} exit {result.exit_status}: {said[-300:]}"

    async def _job_id_from(self, conn: asyncssh.SSHClientConnection, rundir: str
                           ) -> str | None:
        async with await shell.open_sftp(conn) as sftp:
            try:
                out, _, status = await self._earlier_submission(sftp, rundir, wait=60.0)
            except SubmitError:
                return None
        if status != 0:
            return None
        try:
            return self.scheduler.parse_submit(out)
        except ValueError:
            return None

    def describe(self, info: JobInfo | None) -> str:
        """One line for ``status`` and events."""
        if info is None:
            return f"{self.scheduler.title} no longer knows the job"
        return describe_job(self.scheduler, info)


def describe_job(scheduler: Scheduler, info: JobInfo) -> str:
    """``Slurm job 12: RUNNING on node1 (queued 2 s, running 10 s)``-style text."""
    text = f"{scheduler.title} job {info.job_id}: {info.native}"
    if info.reason and info.reason.lower() not in ("none", info.native.lower()):
        text += f" ({info.reason})"
    if info.nodes:
        text += f" on {info.nodes}"
    times = []
    if info.queue_wait is not None:
        times.append(f"queued {_seconds(info.queue_wait)}")
    if info.run_time is not None:
        verb = "ran" if info.terminal else "running"
        times.append(f"{verb} {_seconds(info.run_time)}")
    if info.exit_code is not None:
        times.append(f"exit code {info.exit_code}")
    if times:
        text += "; " + ", ".join(times)
    why = scheduler.explain(info)
    if why:
        text += f": {why}"
    return text


def _seconds(value: float) -> str:
    value = int(round(value))
    if value < 120:
        return f"{value} s"
    if value < 7200:
        return f"{value // 60} min {value % 60} s"
    return f"{value // 3600} h {value % 3600 // 60} min"


def scheduler_named(name: str) -> Scheduler:
    """The scheduler of backend ``name`` (``slurm``, ``pbs``, ``torque``, ``pjm``)."""
    return cast(Any, SCHEDULERS[name])()


def _load() -> dict[str, type[Scheduler]]:
    from remote_exec.backends.pbs import PbsScheduler, TorqueScheduler
    from remote_exec.backends.pjm import PjmScheduler
    from remote_exec.backends.slurm import SlurmScheduler

    return {"slurm": SlurmScheduler, "pbs": PbsScheduler, "torque": TorqueScheduler,
            "pjm": PjmScheduler}


SCHEDULERS = _load()
