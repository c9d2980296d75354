"""The ``slurmrest`` backend: the run directory over the site's SSH, the job through a
Slurm REST API.

Staging and fetching are the SSH backends' (the login node shares the file system
with the compute nodes): what differs from the ``slurm`` backend is who submits,
asks and cancels — an HTTP request instead of ``sbatch``/``squeue``/``scancel`` over
SSH. The job script is the same ``run.sh`` wrapper, so the exit code, ``resume``,
``cancel``, ``status`` and the journal behave as for ``slurm``.

Submitting at most once: the client takes the same launch-once guard (an SFTP
``mkdir`` of ``.remote-exec/launched``, atomic on the host) before it sends the
submission, and records the job id in ``.remote-exec/submit.out`` after. A later
attempt that finds the guard but no id knows the answer was lost: it looks the job up
(slurmrestd: by its name and working directory in ``GET /jobs``; FRCE, whose job
records carry neither: the job id the job script writes when it starts) and submits
again only when Slurm has no such job.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
from typing import Any

import asyncssh

from remote_exec.backends.base import Launched, Run
from remote_exec.backends.batch import (
    BATCH_SCRIPT,
    JOB_SCRIPT,
    SUBMITTER,
    BatchBackend,
    SchedulerUnavailable,
    SubmitError,
    job_name,
    render_job_script,
)
from remote_exec.backends.scheduler import RUNNING, SCHEDULER_OUTPUT, JobInfo
from remote_exec.backends.slurm import SlurmScheduler
from remote_exec.backends.slurmrest import dialects
from remote_exec.backends.slurmrest.auth import JwtAuth, NegotiateAuth, NoAuth
from remote_exec.backends.slurmrest.client import Answer, NoAnswer, RestClient, summary
from remote_exec.backends.slurmrest.settings import SlurmRestSettings
from remote_exec.backends.ssh import read_control
from remote_exec.backoff import POLL, REQUEST_RETRY
from remote_exec.entrypoint import CANCELLED_MARK, EXIT_CODE_FILE, KILLED, LAUNCHED_MARK, TERMINATED
from remote_exec.errors import AuthError, RemoteExecError, RemoteLostError
from remote_exec.inputs import CONTROL_DIR
from remote_exec.paths import local_user
from remote_exec.site.rows import FAIL, OK, Row
from remote_exec.ssh import shell, transfer
from remote_exec.ssh.words import quote

#: what the job script records when it starts (the job finds itself after a lost answer)
JOB_ID_FILE = f"{CONTROL_DIR}/job_id"
#: the FRCE jobs listed before a submission (to find one whose answer was lost)
BEFORE_FILE = "submit.before"
BEFORE_FILE_PATH = f"{CONTROL_DIR}/{BEFORE_FILE}"
#: seconds between two looks of the job script at the cancel mark (``cancel: mark``)
MARK_TICK = 2


class _NotSent(Exception):
    """A submission that was not sent (what it needed first failed)."""


class RestScheduler(SlurmScheduler):
    """Slurm's states, reasons and job names, under the API's own title."""

    def __init__(self, title: str) -> None:
        self.title = title  # type: ignore[misc]

    @property
    def template(self) -> str:
        return "slurmrest.sh.j2"


class SlurmRestBackend(BatchBackend):
    """A Slurm job submitted, asked about and cancelled through a REST API."""

    def __init__(self, site: Any, run_id: str = "", resources: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(site, run_id, resources, scheduler="slurm", **options)
        self.name = "slurmrest"
        self.settings = SlurmRestSettings.from_site(site.settings.get("slurmrest"),
                                                    f"site {site.name!r}")
        self.frce = self.settings.dialect == "frce"
        self.scheduler = RestScheduler("FRCE" if self.frce else "Slurm")
        self._client: RestClient | None = None
        self._version = ""
        self._conn: asyncssh.SSHClientConnection | None = None  # for a token command
        self._rundir = ""  # the run being waited for (an unlisted FRCE job's directory)

    def validate(self) -> None:
        if self.frce:  # resources the API cannot carry are refused before anything runs
            dialects.frce_body("", self.job)

    # -- the API -----------------------------------------------------------------------------
    @property
    def client(self) -> RestClient:
        if self._client is None:
            settings = self.settings
            auth: Any
            if settings.auth == "jwt":
                auth = JwtAuth(settings, settings.user or self.site.user or local_user(),
                               self.site.name, self._run_remote)
            elif settings.auth == "negotiate":
                auth = NegotiateAuth(settings.url)
            else:
                auth = NoAuth()
            self._client = RestClient(settings.url, auth, timeout=settings.request_timeout,
                                      ca_file=settings.ca_file, tries=self.site.retry_tries,
                                      max_interval=self.site.retry_max_interval,
                                      what="the FRCE API" if self.frce else "slurmrestd")
        return self._client

    async def _run_remote(self, argv: list[str]) -> str:
        """A token command, over the site's SSH connection."""
        conn = self._conn or await self.link.conn()
        result = await shell.run_argv(conn, argv)
        if result.exit_status != 0:
            said = str(result.stderr or result.stdout or "").strip()[-300:]
            raise AuthError(f"the token command {' '.join(argv)} failed on "
                            f"{self.site.display} (exit {result.exit_status}): {said}",
                            hint="check slurmrest.token_command (JWT must be enabled on the "
                            "cluster: AuthAltTypes=auth/jwt)")
        return str(result.stdout or "")

    async def version(self) -> str:
        """The slurmrestd API version to speak (asked once per backend)."""
        if not self._version:
            answer = await self.client.call("GET", "/openapi/v3")
            paths = answer.body.get("paths", {}) if isinstance(answer.body, dict) else {}
            if answer.status != 200 and self.settings.api_version == "auto":
                raise SchedulerUnavailable(f"slurmrestd did not list its API versions "
                                           f"(HTTP {answer.status}: {summary(answer)})")
            self._version = dialects.choose_version(dialects.offered_versions(paths),
                                                    self.settings.api_version)
        return self._version

    async def _slurm(self, method: str, tail: str, body: Any = None,
                     retry: bool = True) -> Answer:
        """A slurmrestd request under the chosen version; a -1 answer (slurmctld refused
        the token, or did not answer) is asked again once with a fresh token."""
        path = f"/slurm/{await self.version()}/{tail}"
        answer = await self.client.call(method, path, body, retry=retry)
        auth = self.client.auth
        if (answer.status == 500 and dialects.NO_ANSWER in dialects.error_numbers(answer.body)
                and isinstance(auth, JwtAuth) and auth.renewable()):
            answer = await self.client.call(method, path, body, retry=retry, renew=True)
        return answer

    # -- submit ------------------------------------------------------------------------------
    async def launch(self, run: Run) -> Launched:
        try:
            return await self._launch(run)
        except SchedulerUnavailable as exc:  # the API, not the SSH link: no reconnect
            raise RemoteLostError(
                exc.message, hint=f"`remote-exec resume {run.run_id[:8]}` once the API "
                "answers again (the job is never submitted twice)") from None

    async def _launch(self, run: Run) -> Launched:
        if not await self._claim(run):
            if await self._cancelled_unsubmitted(run):
                raise SubmitError("the run was cancelled before its job was submitted")
            job_id = await self._find_lost(run)
            if job_id:
                return Launched(job_id=job_id, before=True)
            run.ui.warn("an earlier attempt took the submit guard but Slurm has no job of "
                        "this run: submitting it now")
        job_id = await self._submit(run)
        await self._record_submitted(run, job_id)
        return Launched(job_id=job_id)

    # -- where the run's control files are: the run directory, over SFTP ---------------------
    # (a restricted site's agent keeps them itself: :mod:`.restricted` overrides these)
    async def _claim(self, run: Run) -> bool:
        """Take the submit-once guard (writing the job script first): False if an
        earlier attempt took it."""
        sftp, rundir = await self.link.sftp(), run.rundir
        control = posixpath.join(rundir, CONTROL_DIR)
        if not await sftp.exists(posixpath.join(control, LAUNCHED_MARK)):
            await self._write(sftp, {JOB_SCRIPT: self._job_script(rundir),
                                     BATCH_SCRIPT: SUBMITTER}, rundir)
        try:
            await sftp.mkdir(posixpath.join(control, LAUNCHED_MARK))  # the guard
        except asyncssh.SFTPError:
            return False
        return True

    async def _cancelled_unsubmitted(self, run: Run) -> bool:
        sftp = await self.link.sftp()
        return (await read_control(sftp, run.rundir, CANCELLED_MARK) is not None
                and await read_control(sftp, run.rundir, "submit.rc") is None)

    async def _record_submitted(self, run: Run, job_id: str) -> None:
        await self._write(await self.link.sftp(), {f"{CONTROL_DIR}/submit.out": f"{job_id}\n",
                                                   f"{CONTROL_DIR}/submit.err": "",
                                                   f"{CONTROL_DIR}/submit.rc": "0\n"},
                          run.rundir)

    async def _recorded_id(self, run: Run) -> str | None:
        return await self._recorded_in(await self.link.sftp(), run.rundir)

    async def _jobs_before(self, run: Run) -> set[str]:
        """FRCE: the jobs :meth:`_note_jobs_before` noted before the submission."""
        sftp = await self.link.sftp()
        return set(json.loads(await read_control(sftp, run.rundir, BEFORE_FILE) or "[]"))

    async def _keep_jobs_before(self, run: Run, ids: list[str]) -> None:
        await self._write(await self.link.sftp(), {BEFORE_FILE_PATH: json.dumps(ids)},
                          run.rundir)

    def _job_output(self, run: Run) -> str:
        """Where Slurm writes the job's own output."""
        return posixpath.join(run.rundir, SCHEDULER_OUTPUT)

    def _job_script(self, rundir: str) -> str:
        return render_job_script(
            self.scheduler, self.run_id, self.job, rundir=quote(rundir),
            job_id_file=JOB_ID_FILE, cancelled=f"{CONTROL_DIR}/{CANCELLED_MARK}",
            exit_code=f"{CONTROL_DIR}/{EXIT_CODE_FILE}", killed=str(KILLED),
            terminated=str(TERMINATED),
            grace_ticks=str(max(1, int(self.site.cancel_grace))),
            watch=self.frce and self.settings.cancel == "mark", tick=str(MARK_TICK))

    def _launcher(self, run: Run) -> str:
        """The script body the API receives: a shebang and the job script's path."""
        return f"#!/bin/sh\nexec /bin/sh {quote(posixpath.join(run.rundir, JOB_SCRIPT))}\n"

    async def _submit(self, run: Run) -> str:
        """Send the submission; an answer that leaves it unknown whether Slurm took the
        job (none, or a 5xx without a definite error) is looked up before sending again,
        and a lookup that cannot tell waits: a job is never submitted twice."""
        tries = max(self.site.retry_tries, 1)
        uncertain, why = False, ""
        for attempt, delay in enumerate(REQUEST_RETRY.capped(
                self.site.retry_max_interval).delays()):
            if attempt > tries:
                break
            if attempt:
                await asyncio.sleep(delay)
            if uncertain:
                try:
                    found = await self._find_lost(run)
                except SchedulerUnavailable as exc:
                    why = exc.message
                    continue  # cannot tell yet: never submit blindly
                if found:
                    run.ui.event("found", f"the submission's answer was lost: found job "
                                 f"{found} (not submitted again)", job_id=found)
                    return found
            try:
                job_id, why, hint, definite = await self._post(run)
            except _NotSent as exc:
                why = str(exc)
                continue
            except NoAnswer as exc:
                uncertain, why = True, exc.message
                continue
            if job_id:
                return job_id
            if definite:
                raise SubmitError(f"{self.scheduler.title} refused the job: {why}",
                                  hint=hint or f"check the resources asked "
                                  f"({self.job.describe()}) against the site's partitions "
                                  "and limits")
            uncertain = True
        raise SchedulerUnavailable(f"could not submit the job to {self.scheduler.title}: {why}")

    async def _post(self, run: Run) -> tuple[str | None, str, str, bool]:
        """One submission: (job id, why not, hint, whether the refusal is definite)."""
        script = self._launcher(run)
        if self.frce:
            body = dialects.frce_body(script, self.job)
            self._check_size(body)
            try:
                await self._note_jobs_before(run)
            except (NoAnswer, ValueError) as exc:
                raise _NotSent(getattr(exc, "message", str(exc))) from None
            answer = await self.client.call("POST", "/submit_job", body, retry=False)
            job_id, why, hint, later = dialects.frce_submitted(answer)
            return job_id, why, hint, not later
        try:
            await self.version()
        except SchedulerUnavailable as exc:
            raise _NotSent(exc.message) from None
        body = dialects.submit_body(script, name=job_name(run.run_id), rundir=run.rundir,
                                    output=self._job_output(run), r=self.job)
        answer = await self._slurm("POST", "job/submit", body, retry=False)
        return (dialects.parse_submitted(answer), summary(answer) or f"HTTP {answer.status}",
                "", not dialects.transient(answer))

    def _check_size(self, body: dict[str, Any]) -> None:
        size = len(json.dumps(body).encode("utf-8"))
        if size > self.settings.body_limit:
            raise SubmitError(f"the submission would be {size} bytes, over the API's "
                              f"{self.settings.body_limit}",
                              hint="use a shorter `root` for the site")

    async def _recorded_in(self, sftp: asyncssh.SFTPClient, rundir: str) -> str | None:
        """The job id an earlier attempt recorded, or the job script wrote at its start."""
        if await read_control(sftp, rundir, "submit.rc") == "0":
            text = await read_control(sftp, rundir, "submit.out") or ""
            if text.strip().isdigit():
                return text.strip()
        text = await read_control(sftp, rundir, posixpath.basename(JOB_ID_FILE)) or ""
        return text.strip() if text.strip().isdigit() else None

    async def _find_lost(self, run: Run) -> str | None:
        """The job of a submission whose answer was lost; None when Slurm surely has
        none. Raises SchedulerUnavailable when that cannot be told now."""
        recorded = await self._recorded_id(run)
        if recorded or not self.frce:
            if recorded:
                return recorded
            answer = await self._slurm("GET", "jobs")
            if answer.status != 200:
                raise SchedulerUnavailable(f"slurmrestd could not list jobs: "
                                           f"{summary(answer) or answer.status}")
            return dialects.find_job(answer, job_name(run.run_id), run.rundir) or \
                await self._recorded_id(run)
        # FRCE's records carry no name nor directory: a job that appeared since the
        # submission may be ours; the job script says so when it starts. Wait until it
        # does, or until every such job ended without saying so (then none was ours).
        before = await self._jobs_before(run)
        waited = False
        for delay in POLL.capped(30.0).delays():
            answer = await self.client.call("GET", "/query_status")
            try:
                live = dialects.frce_new_jobs(answer, before, self.job.queue)
            except ValueError as exc:
                raise SchedulerUnavailable(f"the FRCE API did not list jobs: {exc}") from None
            found = await self._recorded_id(run)
            if found or not live:
                return found
            if not waited:
                waited = True
                run.ui.warn(f"the FRCE API's answer was lost; job(s) {', '.join(live)} "
                            "appeared since: waiting for ours to start and say its id")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _note_jobs_before(self, run: Run) -> None:
        """FRCE: the jobs listed before a submission (a lost answer's job is a new one)."""
        answer = await self.client.call("GET", "/query_status")
        await self._keep_jobs_before(
            run, dialects.frce_new_jobs(answer, set(), None, live_only=False))

    async def _write(self, sftp: asyncssh.SFTPClient, files: dict[str, str],
                     rundir: str) -> None:
        for rel, text in files.items():
            await transfer.write_atomically(sftp, posixpath.join(rundir, rel),
                                            text.encode("utf-8"))

    def launch_text(self, run: Run, launched: Launched) -> str:
        again = " (it had been submitted before)" if launched.before else ""
        how = "the FRCE API" if self.frce else f"slurmrestd {self._version}".strip()
        return (f"submitted {self.scheduler.title} job {launched.job_id} through {how}"
                f"{again}: {run.request.entrypoint.label} ({self.job.describe()})")

    # -- ask ---------------------------------------------------------------------------------
    async def query(self, conn: asyncssh.SSHClientConnection, job_id: str) -> JobInfo | None:
        self._conn = conn
        try:
            if self.frce:
                answer = await self.client.call("GET", "/query_status")
                info = dialects.frce_job(answer, job_id)
                if info is None:
                    info = await self._started_unlisted(conn, job_id)
                return info
            answer = await self._slurm("GET", f"job/{job_id}")
            return dialects.parse_job(answer, job_id)
        except (NoAnswer, ValueError) as exc:
            text = exc.message if isinstance(exc, RemoteExecError) else str(exc)
            raise SchedulerUnavailable(f"{self.scheduler.title} did not answer about job "
                                       f"{job_id}: {text}") from None

    async def _started_unlisted(self, conn: asyncssh.SSHClientConnection,
                                job_id: str) -> JobInfo | None:
        """An FRCE job that started but is no longer listed (query_status shows 24 hours):
        running as far as anyone can tell, until its exit code appears."""
        rundir = self._rundir
        if not rundir:
            return None
        async with await shell.open_sftp(conn) as sftp:
            if await read_control(sftp, rundir, posixpath.basename(JOB_ID_FILE)) != job_id:
                return None
        return JobInfo(job_id=job_id, native="UNLISTED", state=RUNNING,
                       reason="started; not in query_status (it lists 24 hours)")

    async def wait(self, run: Run, launched: Launched | None) -> int:
        self._rundir = run.rundir
        return await super().wait(run, launched)

    # -- cancel ------------------------------------------------------------------------------
    async def stop_at(self, conn: asyncssh.SSHClientConnection, rundir: str,
                      job_id: str | None) -> str:
        self._conn = conn
        mark = await shell.run_argv(conn, ["/bin/sh", posixpath.join(rundir, BATCH_SCRIPT),
                                           "cancel"])
        if mark.exit_status == 0 and str(mark.stdout or "").strip() == "not submitted":
            return "the job was not submitted yet (it never will be)"
        if not job_id:
            async with await shell.open_sftp(conn) as sftp:
                job_id = await self._recorded_in(sftp, rundir)
        if not job_id:
            return ("the run is marked cancelled: its job, if Slurm has one, ends as soon as "
                    "it starts")
        if self.frce:
            if self.settings.cancel == "mark":
                return (f"FRCE job {job_id}: marked cancelled (the API cannot cancel): a "
                        f"running job stops within {MARK_TICK} s; a queued one exits when "
                        "it starts")
            result = await shell.run_argv(conn, ["scancel", job_id])
            said = (str(result.stderr or "") + str(result.stdout or "")).strip()
            if result.exit_status == 0:
                return f"scancel {job_id}: done"
            return (f"scancel {job_id} exit {result.exit_status}: {said[-300:]} (the run is "
                    "marked cancelled: the job script stops the entrypoint)")
        try:
            answer = await self._slurm("DELETE", f"job/{job_id}")
        except SchedulerUnavailable as exc:
            return (f"WARNING: could not cancel Slurm job {job_id}: {exc.message}; the run "
                    f"is marked cancelled (scancel {job_id} on the site stops the job)")
        if answer.ok:
            return f"Slurm job {job_id} cancelled through slurmrestd"
        if dialects.NO_SUCH_JOB in dialects.error_numbers(answer.body):
            return f"Slurm job {job_id} had already ended"
        return f"slurmrestd could not cancel job {job_id}: {summary(answer)}"

    # -- site check --------------------------------------------------------------------------
    async def check_more(self, conn: asyncssh.SSHClientConnection) -> list[Row]:
        self._conn = conn
        title = "FRCE API" if self.frce else "slurmrestd"
        try:
            if self.frce:
                answer = await self.client.call("GET", "/query_status")
                dialects.frce_job(answer, "0")
                detail = f"{self.settings.url}: query_status answers"
            else:
                version = await self.version()
                answer = await self._slurm("GET", "ping")
                if not answer.ok:
                    raise ValueError(summary(answer) or f"HTTP {answer.status}")
                meta = answer.body.get("meta", {}) if isinstance(answer.body, dict) else {}
                release = meta.get("Slurm", {}).get("release", "?") if isinstance(meta, dict) \
                    else "?"
                detail = f"{self.settings.url}: API {version}, Slurm {release}"
                auth = self.client.auth
                if isinstance(auth, JwtAuth):
                    detail += f"; token {auth.expiry_text()}"
        except (RemoteExecError, ValueError) as exc:
            text = exc.message if isinstance(exc, RemoteExecError) else str(exc)
            fix = getattr(exc, "hint", None) or "check the site's slurmrest section"
            return [Row(title, FAIL, text, fix)]
        return [Row(title, OK, detail)]

