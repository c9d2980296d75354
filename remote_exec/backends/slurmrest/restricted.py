"""``slurmrest`` on a restricted site: the files and the job's start through the site's
agent, the job itself through the REST API.

On a restricted site the key runs only the agent (``remote-exec site install``), so the
run directory is created, staged, fetched and removed by the agent's requests, as for
any restricted run (:class:`~remote_exec.backends.agent.AgentBackend`). What differs is
the launch: ``launch RUN ENTRYPOINT --batch`` makes the agent check the entrypoint and
its parameters against the site's allowlist, take the run's launch-once guard and record
what is to run, without starting anything; it answers with the command a batch job runs
(``python3 AGENT --allowlist FILE --batch-job RUN``). The client submits that command as
the job's script through the REST API; on the compute node the agent checks the
entrypoint's digest again, runs it, watches the run's cancel mark and records the exit
code. So what runs is still what the site approved, and a ``never_return`` file still
never leaves the host. (A REST credential itself lets its holder submit any job as the
account: the site grants that by giving one, e.g. through its allowlist's
``token_command``, which the agent's ``token`` request runs.)

The job's id, the exit code and the cancel mark live in the agent's own state for the
run: ``status`` shows them. A lost submission answer is looked up as on an open site (by
the job's name and directory, or the id the job recorded when it started).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh

from remote_exec.backends.agent import AgentBackend, AgentRefused
from remote_exec.backends.base import Launched, RemoteState, Run
from remote_exec.backends.batch import cancelled_by_scheduler
from remote_exec.backends.scheduler import RUNNING, JobInfo
from remote_exec.backends.site_check import ssh_site_rows
from remote_exec.backends.slurmrest.backend import SlurmRestBackend
from remote_exec.errors import ConfigError, RemoteExecError
from remote_exec.journal import RunRecord
from remote_exec.site.rows import FAIL, OK, Row
from remote_exec.ssh.words import quote

#: the agent feature this backend needs (an older agent refuses ``launch --batch``)
FEATURE = "batch"


class RestrictedSlurmRestBackend(AgentBackend, SlurmRestBackend):
    """Files and the launch through the site's agent; submit, ask and cancel through the
    REST API. The agent's steps come first; the REST backend's wait, query and submit
    are used where a step says so."""

    def __init__(self, site: Any, run_id: str = "", resources: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(site, run_id, resources, **options)
        self.name = "slurmrest-agent"
        self._command: list[str] = []  # what the job runs (the agent's answer)
        self._job_out = ""
        self._before: set[str] = set()  # FRCE: the jobs listed before the submission

    # -- launch: the agent records what runs, the API takes the job ----------------------
    async def launch(self, run: Run) -> Launched:
        return await SlurmRestBackend.launch(self, run)

    async def _claim(self, run: Run) -> bool:
        entry = run.request.entrypoint
        try:
            prepared = await self.agent.launch_batch(await self.link.conn(), run.run_id,
                                                     entry.text, entry.params)
        except AgentRefused as exc:
            if "unexpected arguments" in exc.message:  # an agent older than batch jobs
                raise ConfigError(
                    f"the agent of site {self.site.name!r} cannot prepare batch jobs (it "
                    "is older than this remote-exec)",
                    hint=f"`remote-exec site install {self.site.name} --apply` installs "
                    "the current agent") from None
            raise
        self._command, self._job_out = prepared.command, prepared.output
        return not prepared.before

    def _launcher(self, run: Run) -> str:
        if not self._command:
            raise RemoteExecError("the site's agent gave no command for the batch job",
                                  hint=f"`remote-exec site install {self.site.name} "
                                  "--apply` installs the current agent")
        return "#!/bin/sh\nexec " + " ".join(quote(w) for w in self._command) + "\n"

    def _job_output(self, run: Run) -> str:
        return self._job_out or "/dev/null"

    async def _cancelled_unsubmitted(self, run: Run) -> bool:
        status = await self.agent.status(await self.link.conn(), run.run_id)
        return bool(status.get("cancelled")) and not status.get("job_id") and \
            status.get("exit_code") is not None

    async def _record_submitted(self, run: Run, job_id: str) -> None:
        pass  # the journal keeps it; the job records its own id when it starts

    async def _recorded_id(self, run: Run) -> str | None:
        status = await self.agent.status(await self.link.conn(), run.run_id)
        job_id = str(status.get("job_id") or "")
        return job_id if job_id.isdigit() else None

    async def _jobs_before(self, run: Run) -> set[str]:
        return self._before  # (after a restart: empty, so every new job is waited out)

    async def _keep_jobs_before(self, run: Run, ids: list[str]) -> None:
        self._before = set(ids)

    async def _run_remote(self, argv: list[str]) -> str:
        """A token: the agent runs the command the site's allowlist names."""
        conn = self._conn or await self.link.conn()
        try:
            return await self.agent.token(conn)
        except AgentRefused as exc:
            raise AgentRefused(exc.message, hint="the site's allowlist names no token_command: "
                               f"`remote-exec site install {self.site.name} --apply` copies "
                               "the site's slurmrest.token_command into it (an administrator's "
                               "choice); or set slurmrest.token_file, or export SLURM_JWT") \
                from None

    # -- wait: the API says how the job is, the agent has the exit code -------------------
    async def wait(self, run: Run, launched: Launched | None) -> int:
        return await SlurmRestBackend.wait(self, run, launched)

    async def poll(self, run: Run) -> int | None:
        status = await self.agent.status(await self.link.conn(), run.run_id)
        code = status.get("exit_code")
        return int(code) if isinstance(code, int) else None

    async def _started_unlisted(self, conn: asyncssh.SSHClientConnection,
                                job_id: str) -> JobInfo | None:
        status = await self.agent.status(conn, self.run_id)
        if str(status.get("job_id") or "") != job_id:
            return None
        return JobInfo(job_id=job_id, native="UNLISTED", state=RUNNING,
                       reason="started; not in query_status (it lists 24 hours)")

    async def cancelled_remotely(self, run: Run) -> bool:
        return cancelled_by_scheduler(run) or await AgentBackend.cancelled_remotely(self, run)

    async def wrapper_started(self, run: Run) -> bool:
        status = await self.agent.status(await self.link.conn(), run.run_id)
        return status.get("started_at") is not None

    async def exit_before_cancel(self, run: Run, what: str) -> int | None:
        return None  # the agent's cancel answers how it found the run

    # -- cancel: the agent marks the run (its job stops the entrypoint), the API ends the job
    async def stop(self, run: Run) -> str:
        conn = await asyncio.wait_for(self.link.conn(), self.site.connect_timeout)
        return await self._stop(conn, run.run_id, run.job_id)

    async def cancel_recorded(self, record: RunRecord) -> tuple[str, int | None]:
        async with await self._connect() as conn:
            if not (await self.agent.status(conn, record.id)).get("exists"):
                return "the run directory is gone (nothing to stop)", None
            return await self._stop(conn, record.id, record.job_id), None

    async def _stop(self, conn: asyncssh.SSHClientConnection, run_id: str,
                    job_id: str | None) -> str:
        """Cancel the job through the API (Slurm sends it TERM, which the agent passes
        to the entrypoint), then mark the run through the agent: a job not started yet
        exits at its start, a running one stops (also where the API could not)."""
        self._conn = conn
        job_id = job_id or str((await self.agent.status(conn, run_id)).get("job_id") or "")
        deleted = ""
        if job_id and not self.frce:  # FRCE has no cancel: the job stops at the mark
            try:
                answer = await self._slurm("DELETE", f"job/{job_id}")
                deleted = (f"Slurm job {job_id} cancelled through slurmrestd" if answer.ok
                           else f"Slurm job {job_id} had already ended")
            except RemoteExecError as exc:
                deleted = f"could not cancel Slurm job {job_id}: {exc.message}"
        said = await self.agent.cancel(conn, run_id, self.site.cancel_grace)
        return f"{deleted}; {said}" if deleted else said

    # -- status and site check ---------------------------------------------------------------
    async def probe(self, record: RunRecord) -> RemoteState:
        state = await AgentBackend.probe(self, record)
        if state.reachable:
            try:
                async with await self._connect() as conn:
                    self._conn = conn
                    await self.probe_more(conn, None, record, state)  # type: ignore[arg-type]
            except RemoteExecError as exc:
                state.job = exc.message
        return state

    async def check(self) -> list[Row]:
        async def more(conn: asyncssh.SSHClientConnection) -> list[Row]:
            hello = await self.agent.hello(conn)
            features = hello.get("features") or []
            if FEATURE not in features:
                return [Row("batch jobs", FAIL, "the site's agent cannot prepare batch jobs",
                            f"`remote-exec site install {self.site.name} --apply`")]
            rows = [Row("batch jobs", OK, "the agent prepares them; each job starts the "
                        "approved entrypoint through the agent on its node")]
            return rows + await self.check_more(conn)
        return await ssh_site_rows(self.site, more)
