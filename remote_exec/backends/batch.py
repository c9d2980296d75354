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

from remote_exec.backends.base import Launched, RemoteState, Run
from remote_exec.backends.scheduler import (
    CANCELLED,
    COMPLETED,
    RUN_SCRIPT,
    SCHEDULER_OUTPUT,
    TIMED_OUT,
    JobInfo,
    Resources,
    Scheduler,
    slurm_time,
)
from remote_exec.backends.ssh import SshBackend, read_control
from remote_exec.backoff import POLL, QUERY
from remote_exec.entrypoint import (
    ALREADY_LAUNCHED,
    CANCELLED_MARK,
    ENTER_RUN_DIR,
    KILLED,
    LAUNCHED_MARK,
    TERMINATED,
    cancel_unlaunched,
    launch_once,
)
from remote_exec.errors import (
    EXIT_REMOTE_LOST,
    EXIT_SIGNAL_BASE,
    EXIT_STAGE,
    TRANSIENT,
    RemoteExecError,
    RemoteLostError,
    StageError,
)
from remote_exec.inputs import CONTROL_DIR
from remote_exec.journal import RunRecord
from remote_exec.site.rows import FAIL, OK, Row
from remote_exec.sizes import duration_text
from remote_exec.ssh import shell

#: seconds the wrapper's exit code is awaited when the scheduler says the job ended after
#: the wrapper started: a scheduler restarted from older saved state (a controller
#: crash) may call a job that runs on CANCELLED or FAILED; a job really stopped leaves
#: its code at once (the wrapper outlives a TERM to record it)
WRAPPER_WORD_WAIT = 30.0

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


class BatchBackend(SshBackend):
    """Run the entrypoint as a batch job of the site's scheduler (``scheduler``: the
    registry's name for it: slurm, pbs, torque, pjm)."""

    def __init__(self, site: Any, run_id: str = "", resources: dict[str, Any] | None = None,
                 *, scheduler: str = "slurm", **options: Any) -> None:
        super().__init__(site, run_id, resources, **options)
        self.scheduler = scheduler_named(scheduler)
        self.name = self.scheduler.name
        self.job = Resources(**self.resources)

    # -- submit -----------------------------------------------------------------------------
    async def launch(self, run: Run) -> Launched:
        conn, sftp, rundir = await self.link.conn(), await self.link.sftp(), run.rundir
        files = {JOB_SCRIPT: render_job_script(self.scheduler, run.run_id, self.job),
                 BATCH_SCRIPT: SUBMITTER}
        if not await sftp.exists(posixpath.join(rundir, CONTROL_DIR, LAUNCHED_MARK)):
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

    def launch_text(self, run: Run, launched: Launched) -> str:
        again = " (it had been launched before)" if launched.before else ""
        return (f"submitted {self.scheduler.title} job {launched.job_id}{again}: "
                f"{run.request.entrypoint.label} ({self.job.describe()})")

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
            if await read_control(sftp, rundir, CANCELLED_MARK) is not None:
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
            hint=f"check the resources asked ({self.job.describe()}) against the "
            "site's queues and limits")

    # -- wait -------------------------------------------------------------------------------
    async def wait(self, run: Run, launched: Launched | None) -> int:
        """The job's exit code file every poll, the scheduler less often."""
        assert run.job_id is not None
        loop = asyncio.get_running_loop()
        asks = QUERY.delays()
        next_ask, unknown = 0.0, 0
        silent_since = 0.0  # when the scheduler stopped answering
        for delay in POLL.delays():
            code = await self.poll(run)
            if code is not None:
                await self._settle(run, code)
                return code
            if loop.time() >= next_ask:
                try:
                    info = await self.query(await self.link.conn(), run.job_id)
                except SchedulerUnavailable as exc:  # no answer is not "gone": wait on
                    if not silent_since:
                        run.ui.warn(f"{exc.message}; still waiting")
                    silent_since = silent_since or loop.time()
                    next_ask = loop.time() + next(asks)
                    await asyncio.sleep(delay)
                    continue
                silent_since = 0.0
                await self._note(run, info)
                unknown = unknown + 1 if info is None else 0
                if info is not None and info.terminal:
                    return await self.exit_of_ended_job(run, info)
                if unknown >= 3:
                    code = await self.poll(run)
                    if code is not None:
                        return code
                    raise RemoteLostError(
                        f"{self.scheduler.title} no longer knows job {run.job_id} and the "
                        "job left no exit code (purged from the scheduler's memory, or the "
                        "wrapper never ran)",
                        hint=f"look at {run.rundir}/{CONTROL_DIR}/scheduler.out on the host")
                next_ask = loop.time() + next(asks)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def exit_of_ended_job(self, run: Run, info: JobInfo) -> int:
        """The exit code of a job the scheduler says ended: the wrapper's if it wrote one
        (a shared file system may show it a little late), else the scheduler's."""
        tries = 4 if info.started is not None else 1
        for attempt in range(tries):
            code = await self.poll(run)
            if code is not None:
                return code
            if attempt + 1 < tries:
                await asyncio.sleep(1.0)
        if await self.wrapper_started(run):
            run.ui.warn(f"{self.scheduler.title} says job {info.job_id} ended ({info.native}) "
                        "but its wrapper, which started, recorded no exit code: waiting up "
                        f"to {WRAPPER_WORD_WAIT:.0f} s for it (a restarted controller can "
                        "be wrong about a job that runs on)")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WRAPPER_WORD_WAIT
            while loop.time() < deadline:
                await asyncio.sleep(1.0)
                code = await self.poll(run)
                if code is not None:
                    return code
        if info.state == CANCELLED:
            return info.exit_code or EXIT_SIGNAL_BASE + 15
        if info.state == COMPLETED and info.exit_code is not None:
            return info.exit_code
        # failed / timed out without the wrapper's word: never a success, even when the
        # scheduler says 0 (Slurm's NODE_FAIL, BOOT_FAIL, PREEMPTED are 0:0)
        if info.state == TIMED_OUT:
            return info.exit_code or EXIT_SIGNAL_BASE + 9
        return info.exit_code or 1

    async def _settle(self, run: Run, code: int) -> None:
        """The wrapper recorded ``code``: learn how the scheduler saw the job end (why it
        failed: walltime, cancel, memory). Bounded; a success asks once."""
        assert run.job_id is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (0 if code == 0 else 10.0)
        while True:
            try:
                info = await self.query(await self.link.conn(), run.job_id)
            except SchedulerUnavailable:
                return  # the exit code is what counts; the why is a nicety
            await self._note(run, info)
            if info is None or info.terminal or loop.time() >= deadline:
                return
            await asyncio.sleep(0.5)

    async def _note(self, run: Run, info: JobInfo | None) -> None:
        if info is not None:
            await run.note_job(info, self.describe_job(info), self.scheduler.explain(info))

    async def cancelled_remotely(self, run: Run) -> bool:
        return cancelled_by_scheduler(run) or await super().cancelled_remotely(run)

    async def wrapper_started(self, run: Run) -> bool:
        """Whether the job's wrapper started (it notes when, before the entrypoint)."""
        return await read_control(await self.link.sftp(), run.rundir, "started_at") is not None

    def failure_text(self, run: Run) -> str:
        info = run.job_info
        if info is None or not info.terminal or info.state == COMPLETED:
            return super().failure_text(run)
        text = f"{self.scheduler.title} job {info.job_id} ended {info.native}"
        if info.reason and info.reason.lower() not in ("none", info.native.lower()):
            text += f" ({info.reason})"
        if info.state == TIMED_OUT:
            limit = f" ({info.time_limit})" if info.time_limit else ""
            text += f": killed at its walltime limit{limit}"
        return f"{text}; exit code {run.exit_code}"

    # -- ask --------------------------------------------------------------------------------
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

    def describe_job(self, info: JobInfo) -> str:
        return describe_job(self.scheduler, info)

    async def probe_more(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                         record: RunRecord, state: RemoteState) -> None:
        if not record.job_id:
            state.job = f"no {self.scheduler.title} job submitted yet"
            return
        info = await self.query(conn, record.job_id)
        state.job = (self.describe_job(info) if info is not None
                     else f"{self.scheduler.title} no longer knows the job")

    # -- cancel -----------------------------------------------------------------------------
    async def stop_at(self, conn: asyncssh.SSHClientConnection, rundir: str,
                      job_id: str | None) -> str:
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

    # -- site check -------------------------------------------------------------------------
    async def check_more(self, conn: asyncssh.SSHClientConnection) -> list[Row]:
        """Whether the site's scheduler takes jobs from this login: its submit command is
        on the PATH, and what its queues say."""
        scheduler = self.scheduler
        tool = scheduler.submit_argv("job.sh")[0]
        found = await shell.run(conn, 'command -v "$1"', tool)
        if not found.ok:
            return [Row("scheduler", FAIL, f"{tool} not found ({scheduler.title})",
                        f"install {scheduler.title}'s client on the host and put it on the "
                        "PATH of a non-interactive login, or change the site's `backend`")]
        detail = f"{scheduler.title}: {found.stdout.strip()}"
        argv = scheduler.probe_argv()
        if argv:
            probe = await shell.run_argv(conn, argv)
            lines = (probe.stdout or probe.stderr).strip().splitlines()
            if probe.exit_status != 0:
                return [Row("scheduler", FAIL, f"{detail}; {' '.join(argv)}: "
                            f"{' '.join(lines[-2:]) or f'exit {probe.exit_status}'}",
                            f"is {scheduler.title} running and reachable from the host?")]
            if lines:
                detail += "; " + "; ".join(lines[:4]) + (" …" if len(lines) > 4 else "")
        return [Row("scheduler", OK, detail)]


def cancelled_by_scheduler(run: Run) -> bool:
    """Whether the job was cancelled from elsewhere (scancel / qdel / pjdel): the
    scheduler says so and the wrapper's exit code is a stopped one (a code of its own
    means the entrypoint ended by itself, whatever a restarted controller says)."""
    return (run.job_info is not None and run.job_info.state == CANCELLED
            and run.exit_code in (None, TERMINATED, KILLED, EXIT_SIGNAL_BASE + 15))


def describe_job(scheduler: Scheduler, info: JobInfo) -> str:
    """``Slurm job 12: RUNNING on node1 (queued 2 s, running 10 s)``-style text."""
    text = f"{scheduler.title} job {info.job_id}: {info.native}"
    if info.reason and info.reason.lower() not in ("none", info.native.lower()):
        text += f" ({info.reason})"
    if info.nodes:
        text += f" on {info.nodes}"
    times = []
    if info.queue_wait is not None:
        times.append(f"queued {duration_text(info.queue_wait)}")
    if info.run_time is not None:
        verb = "ran" if info.terminal else "running"
        times.append(f"{verb} {duration_text(info.run_time)}")
    if info.exit_code is not None:
        times.append(f"exit code {info.exit_code}")
    if times:
        text += "; " + ", ".join(times)
    why = scheduler.explain(info)
    if why:
        text += f": {why}"
    return text


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
