"""The life of one run, step by step, each step recorded before the next begins.

    planned -> created -> staged -> launched -> finished(exit code) -> fetched -> cleaned
                                  ↘ cancelled / timed_out / failed(reason) / interrupted

:func:`execute_async` drives a run from wherever its journal row says it is, so the
same code starts a new run and resumes one whose orchestrator died. Each step is
safe to repeat: creating accepts the run's own directory, staging skips files
already complete, launching is guarded remotely so the entrypoint starts at most
once, waiting reads the exit code the wrapper wrote, fetching resumes into the
same partial directory, cleaning ignores what is gone.

When the connection drops in a step, the :class:`~remote_exec.ssh.link.Link`
reconnects with backoff and the step runs again. A cancel (signal, ``remote-exec
cancel``, ``--timeout``) stops the remote process group (TERM, then KILL after
the site's grace period) and records the run as cancelled or timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncssh

from remote_exec import localfs
from remote_exec import returns as return_filter
from remote_exec.backends import agent as agent_mod
from remote_exec.backends import old_make_backend as make_backend
from remote_exec.backends.agent import AgentBackend, agent_rsync
from remote_exec.backends.batch import BatchBackend, SchedulerUnavailable
from remote_exec.backends.direct import Launched, follow_log, read_control, read_exit_code
from remote_exec.backends.scheduler import CANCELLED, COMPLETED, TIMED_OUT, JobInfo
from remote_exec.backoff import CHANNEL, POLL, QUERY
from remote_exec.errors import (
    EXIT_SIGNAL_BASE,
    EXIT_TIMEOUT,
    FINAL,
    TRANSIENT,
    ConfigError,
    FetchError,
    LinkLostError,
    RemoteExecError,
    RemoteLostError,
    RunBusyError,
    RunCancelled,
    StageError,
)
from remote_exec.inputs import CONTROL_DIR
from remote_exec.journal import PHASES, Journal, RunLock, RunRecord
from remote_exec.manage import exit_before_cancel
from remote_exec.request import RunRequest, RunResult, request_to_wire
from remote_exec.ssh import transfer
from remote_exec.ssh.link import Acquire, Link, Release, open_throttled
from remote_exec.ui import Reporter

T = TypeVar("T")

#: a channel sshd refused (MaxSessions) is opened again this many times, backing off
#: (backoff.CHANNEL) between tries: about a minute in all
CHANNEL_TRIES = 12


#: the error a step's own failure (a local or SFTP error, the agent's) is reported as
STEP_ERRORS: dict[str, type[RemoteExecError]] = {
    "creating the run directory": StageError,
    "staging": StageError,
    "launching": StageError,
    "waiting for the entrypoint": RemoteLostError,
    "fetching": FetchError,
    "cleaning up": FetchError,
}


def _step_error(name: str, exc: BaseException) -> RemoteExecError:
    """``exc`` as the error of step ``name``: a specific RemoteExecError is kept; a bare
    one, a local OSError or an SFTP error becomes the step's (73 staging, 74 fetching,
    75 the outcome could not be read), never an internal error."""
    if isinstance(exc, RemoteExecError) and type(exc) is not RemoteExecError:
        return exc
    error = STEP_ERRORS.get(name, RemoteExecError)
    text = exc.message if isinstance(exc, RemoteExecError) else _describe_os(exc)
    hint = exc.hint if isinstance(exc, RemoteExecError) else _os_hint(exc)
    return error(f"{name} failed: {text}", hint=hint)


def _describe_os(exc: BaseException) -> str:
    """An OSError or SFTP error in words, with the path it concerns when known."""
    if isinstance(exc, asyncssh.SFTPError):
        return f"the remote host answered: {exc.reason} (SFTP {type(exc).__name__[4:]})"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc) or type(exc).__name__


def _os_hint(exc: BaseException) -> str | None:
    if type(exc) is asyncssh.SFTPFailure:  # sftp-server's word for any other errno
        return ("the remote host gave no reason: often a full disk or no free inodes; "
                "check the free space under the site's `root` (`remote-exec site check`)")
    if isinstance(exc, (PermissionError, asyncssh.SFTPPermissionDenied)):
        return "check the permissions of the path named (and the site's `root`)"
    if isinstance(exc, OSError) and exc.errno == 30:  # EROFS
        return "the file system is read-only: choose another destination (--into)"
    return None


class RunControl:
    """How the outside stops a run: ``cancel`` (stop it remotely) or ``abandon``
    (stop driving it locally; the remote side goes on and ``resume`` picks it up)."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.reason: str | None = None
        self.exit_code = 0

    def cancel(self, reason: str, exit_code: int) -> None:
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code
        if self.task is not None:
            self.task.cancel()

    def abandon(self) -> None:
        if self.reason is not None:
            return  # a cancel is under way: see it through
        if self.task is not None:
            self.task.cancel()


class _JournalReporter(Reporter):
    """Passes everything to ``ui`` and keeps events and warnings in the journal."""

    def __init__(self, ui: Reporter, journal: Journal, run_id: str) -> None:  # noqa: D107
        self.ui, self.journal, self.run_id = ui, journal, run_id
        self.show_progress = ui.show_progress

    def event(self, kind: str, message: str, **fields: Any) -> None:
        self.journal.event(self.run_id, kind, message)
        self.ui.event(kind, message, **fields)

    def warn(self, message: str) -> None:
        self.journal.event(self.run_id, "warning", message)
        self.ui.warn(message)

    def log_text(self, data: str) -> None:
        self.ui.log_text(data)

    async def drain(self) -> None:
        await self.ui.drain()

    def progress_start(self, label: str, total: int) -> None:
        self.ui.progress_start(label, total)

    def progress_update(self, name: str, done: int, total: int) -> None:
        self.ui.progress_update(name, done, total)

    def progress_stop(self) -> None:
        self.ui.progress_stop()

    @property
    def progress_fn(self) -> Any:
        return self.ui.progress_fn


async def execute_async(request: RunRequest, ui: Reporter, *, resume: bool = False,
                        control: RunControl | None = None, acquire: Acquire = open_throttled,
                        release: Release | None = None, driver_pid: int | None = None,
                        ) -> RunResult:
    """Drive ``request`` to its end (or resume it, with ``resume=True``)."""
    control = control or RunControl()
    control.task = asyncio.current_task()
    lock = RunLock(request.run_id)
    if not lock.acquire():
        raise RunBusyError(f"run {request.run_id} is being driven by another remote-exec "
                           "process", hint="watch it with `remote-exec logs -f`, or stop it "
                           "with `remote-exec cancel`")
    journal = Journal()
    try:
        record = journal.get(request.run_id)
        if request.backend == "fujitsu" and record is None:  # settings and credentials,
            make_backend("fujitsu", run_id=request.run_id, site=request.site)  # before a record
        if record is None:
            if resume:
                raise ConfigError(f"run {request.run_id} is not in the journal")
            journal.create(run_id=request.run_id, site=request.site.name,
                           host=request.site.host, label=request.entrypoint.label,
                           backend=request.backend, into_dir=str(request.into),
                           request=request_to_wire(request),
                           driver_pid=driver_pid or os.getpid())
            record = journal.get(request.run_id)
            assert record is not None
        else:
            if not resume:
                raise ConfigError(f"run {request.run_id} already exists in the journal")
            _check_resumable(record, journal)
            journal.update(request.run_id, state="running", error=None,
                           driver_pid=driver_pid or os.getpid())
        reporter = _JournalReporter(ui, journal, request.run_id)
        if request.backend == "fujitsu":  # no SSH at all: the WebAPI and its bucket
            from remote_exec.backends.fujitsu.driver import FujitsuDriver

            return await FujitsuDriver(request, reporter, journal, None, record, control,
                                       resumed=resume).drive()
        link = Link(request.site, ui, run_id=request.run_id, acquire=acquire,
                    **({"release": release} if release else {}))
        driver = _Driver(request, _JournalReporter(ui, journal, request.run_id), journal,
                         link, record, control, resumed=resume)
        try:
            return await driver.drive()
        finally:
            await link.close()
    finally:
        journal.close()
        lock.release()


def record_error(journal: Journal, run_id: str, err: RemoteExecError) -> RemoteExecError:
    """Record in the journal the end of run ``run_id`` by ``err``, from its disposition
    (so the exit code, the state and what ``resume`` does agree); the error to raise. A
    transient error that outlived its retries interrupts the run, like a lost link."""
    if err.disposition == TRANSIENT:
        err = LinkLostError(err.message, hint=f"`remote-exec resume {run_id[:8]}` continues "
                            "the run" + (f"; {err.hint}" if err.hint else ""))
    journal.update(run_id, state=err.journal_state, error=err.message)
    return err


def _check_resumable(record: RunRecord, journal: Journal) -> None:
    """Refuse to resume a run that ended for good. A run whose entrypoint finished but
    whose results were never fetched (the fetch failed, or a cancel or timeout came
    during it) is resumable: only the fetch and the cleanup are left to do."""
    if record.state == "succeeded":
        raise ConfigError(f"run {record.id} already succeeded; nothing to resume")
    destroyed = journal.destroyed(record.id)
    if destroyed:
        raise ConfigError(f"run {record.id} cannot be resumed: {destroyed}",
                          hint="start a new run")
    if record.awaits_fetch:
        return
    if record.state in ("cancelled", "timed_out"):
        raise ConfigError(f"run {record.id} was {record.state.replace('_', ' ')} before its "
                          "entrypoint finished; it cannot be resumed", hint="start a new run")
    if record.state == "failed" and not record.reached("finished"):
        raise ConfigError(
            f"run {record.id} failed before its entrypoint finished: {record.error}",
            hint="fix the cause and start a new run",
        )


class _Driver:
    """The steps of one run over one link, from the phase the journal records."""

    def __init__(self, request: RunRequest, ui: Reporter, journal: Journal, link: Link,
                 record: RunRecord, control: RunControl, resumed: bool) -> None:
        self.request = request
        self.site = request.site
        self.run_id = request.run_id
        self.ui = ui
        self.journal = journal
        self.link = link
        self.control = control
        self.resumed = resumed
        self.phase = record.phase
        self.rundir = record.rundir or ""
        self.job_id = record.job_id
        self.exit_code = record.exit_code
        self.backend = make_backend(request.backend, run_id=self.run_id,
                                    resources=request.resources, site=request.site)
        #: a restricted site: every step goes through its agent (no SFTP, no shell)
        self.agent = self.backend if isinstance(self.backend, AgentBackend) else None
        #: a batch job: submitted to the site's scheduler, asked about while it waits
        self.batch = self.backend if isinstance(self.backend, BatchBackend) else None
        job = record.job_data()
        self.job_info: JobInfo | None = JobInfo.from_dict(job) if job else None
        if self.agent is not None:
            self.agent.site = self.site.name
        self.launched: Launched | None = None
        self.retrying = resumed  # steps run a second time: be idempotent
        self._rsync_cache: dict[str, bool] = {}
        self.result = RunResult(run_id=self.run_id, rundir=self.rundir, exit_code=-1,
                                fetched=[], remote_kept=True)

    # -- the life ---------------------------------------------------------------------------
    async def drive(self) -> RunResult:
        deadline = self._arm_timeout()
        try:
            if self.resumed:
                self.ui.event("resumed", f"resuming run {self.run_id} after {self.phase}",
                              run_id=self.run_id, phase=self.phase)
            steps = (("created", "creating the run directory", self._create),
                     ("staged", "staging", self._stage),
                     ("launched", "launching", self._launch),
                     ("finished", "waiting for the entrypoint", self._wait),
                     ("fetched", "fetching", self._fetch),
                     ("cleaned", "cleaning up", self._cleanup))
            for phase, name, step in steps:  # each step ends by recording its phase
                if not self._done(phase):
                    await self._step(name, step)
        except asyncio.CancelledError:
            if self.control.reason is None:  # abandoned: the remote side carries on
                self.journal.update(self.run_id, driver_pid=None)
                raise
            await self._cancel_remote()
            raise self._cancelled_error() from None
        except RemoteExecError as err:
            raise self._record_error(err) from err.__cause__
        finally:
            if deadline is not None:
                deadline.cancel()
        assert self.exit_code is not None
        failure = self._failure_text()
        self.journal.update(self.run_id, state="succeeded" if self.exit_code == 0 else "failed",
                            error=failure or None)
        self.result.failure = failure
        self.result.exit_code = self.exit_code
        self.result.rundir = self.rundir
        return self.result

    def _record_error(self, err: RemoteExecError) -> RemoteExecError:
        """Record the run's end by ``err`` (see :func:`record_error`); the error to raise,
        saying how ``resume`` fetches results that are waiting."""
        err = record_error(self.journal, self.run_id, err)
        if err.disposition == FINAL and self._awaits_fetch():
            later = self._resume_fetch_text()
            err.hint = f"{err.hint}; once that is fixed, {later}" if err.hint else later
        return err

    def _failure_text(self) -> str:
        """Why the run failed, in the words of whoever knows best ("" if it did not)."""
        code, info = self.exit_code, self.job_info
        if self.batch is not None and info is not None and info.terminal \
                and info.state != COMPLETED:
            title = self.batch.scheduler.title
            text = f"{title} job {info.job_id} ended {info.native}"
            if info.reason and info.reason.lower() not in ("none", info.native.lower()):
                text += f" ({info.reason})"
            if info.state == "timed_out":
                limit = f" ({info.time_limit})" if info.time_limit else ""
                text += f": killed at its walltime limit{limit}"
            return f"{text}; exit code {code}"
        return "" if code == 0 else f"the entrypoint exited with {code}"

    def _awaits_fetch(self) -> bool:
        """Whether the entrypoint finished and its results are not in place yet."""
        return self._done("finished") and not self._done("fetched")

    def _resume_fetch_text(self) -> str:
        """How ``resume`` brings the results back, naming the partial directory it uses."""
        partial = localfs.partial_path(self.request.into, self.run_id)
        kept = f" (what came back so far stays in {partial})" if partial.exists() else ""
        return (f"`remote-exec resume {self.run_id[:8]}` fetches the results{kept}; "
                "the entrypoint does not run again")

    def _done(self, phase: str) -> bool:
        return PHASES.index(self.phase) >= PHASES.index(phase)

    def _advance(self, phase: str, **fields: Any) -> None:
        self.phase = phase
        self.journal.update(self.run_id, phase=phase, **fields)

    async def _step(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn``; when the connection drops, reconnect (with backoff) and run it
        again; when sshd refuses a channel on the open connection (MaxSessions), wait and
        run it again on the same connection. Anything else is final, in the step's words."""
        failures = refusals = 0
        while True:
            try:
                return await fn()
            except (asyncio.CancelledError, LinkLostError):
                raise
            except (RemoteExecError, OSError, asyncssh.Error) as exc:
                await asyncio.sleep(0)  # let the connection notice that it closed
                if self.link.refused_channel(exc):
                    refusals += 1
                    await self._wait_for_channel(name, refusals)
                    continue
                if not self.link.is_loss(exc):
                    error = _step_error(name, exc)
                    if error is exc:
                        raise
                    raise error from exc
                failures += 1
                if failures > 2 * self.link.tries + 1:
                    raise LinkLostError(
                        f"the connection to {self.site.display} keeps dropping during {name}",
                        hint=f"`remote-exec resume {self.run_id[:8]}` once the link is stable",
                    ) from None
                self.retrying = True
                await self.link.reconnect(name, exc)

    async def _wait_for_channel(self, name: str, refusals: int) -> None:
        """Back off before opening a refused channel again: the connection is kept (the
        runs sharing it share one SFTP session, so a channel frees when another run's
        launch ends); past ``CHANNEL_TRIES`` the run is interrupted, for ``resume``."""
        if refusals > CHANNEL_TRIES:
            raise LinkLostError(
                f"{self.site.display} kept refusing new channels during {name} "
                f"({CHANNEL_TRIES} tries): too many sessions on the connection (MaxSessions)",
                hint=f"`remote-exec resume {self.run_id[:8]}` once fewer runs share the host, "
                "or raise MaxSessions in its sshd_config") from None
        delay = CHANNEL.delay(refusals - 1)
        if refusals == 1:
            self.ui.warn(f"{self.site.display} refused a new channel during {name} "
                         f"(MaxSessions reached?); opening it again in {delay:.1f} s")
        self.retrying = True
        await asyncio.sleep(delay)

    # -- steps ------------------------------------------------------------------------------
    async def _create(self) -> None:
        if self.agent is not None:
            self.rundir = await self.agent.create(await self.link.conn(), self.run_id,
                                                  self.retrying)
            self.journal.update(self.run_id, rundir=self.rundir)
            self._advance("created")
            self.ui.event("created", f"run {self.run_id} on {self.site.name}: {self.rundir}",
                          run_id=self.run_id, rundir=self.rundir, site=self.site.name)
            return
        sftp = await self.link.sftp()
        if not self.rundir:
            root = self.site.root
            if root == "~" or root.startswith("~/"):
                root = posixpath.join(await sftp.realpath("."), root[2:])
            self.rundir = posixpath.join(root, self.run_id)
            self.journal.update(self.run_id, rundir=self.rundir)  # before it exists
        try:
            await sftp.mkdir(self.rundir, asyncssh.SFTPAttrs(permissions=0o700))
        except asyncssh.SFTPNoSuchFile:
            raise StageError(
                f"the site's root {posixpath.dirname(self.rundir)} does not exist on "
                f"{self.site.display}",
                hint="create it on the remote host or set another `root` for the site",
            ) from None
        except asyncssh.SFTPError as exc:
            try:
                exists = await sftp.lexists(self.rundir)
            except asyncssh.SFTPError:
                exists = False
            if not (exists and self.retrying):  # a retried mkdir may have landed before
                raise StageError(
                    f"cannot create the run directory {self.rundir}: "
                    + ("it already exists (refusing to reuse it)" if exists else exc.reason),
                    hint=None if exists else "check that the site's root is writable",
                ) from None
        with contextlib.suppress(asyncssh.SFTPFailure):
            await sftp.mkdir(posixpath.join(self.rundir, CONTROL_DIR),
                             asyncssh.SFTPAttrs(permissions=0o700))
        self._advance("created")
        self.ui.event("created", f"run {self.run_id} on {self.site.name}: {self.rundir}",
                      run_id=self.run_id, rundir=self.rundir, site=self.site.name)

    async def _stage(self) -> None:
        if self.agent is not None:
            await self._stage_agent(self.agent)
            return
        sftp = await self.link.sftp()
        async def write(name: str, data: bytes) -> None:
            async with sftp.open(posixpath.join(self.rundir, CONTROL_DIR, name), "wb") as f:
                await f.write(data)

        await asyncio.gather(*(write(name, data) for name, data
                               in self.request.entrypoint.control_files().items()))
        inputs = self.request.inputs
        size = sum(i.size for i in inputs)
        method = await self._method(size)
        self.ui.progress_start("staging", size)
        try:
            if not inputs:
                pass
            elif method == "rsync":
                await transfer.stage_rsync(await self.link.rsh(), inputs, self.rundir,
                                           self.ui.show_progress)
            else:
                await transfer.stage_sftp(sftp, inputs, self.rundir, self.ui.progress_fn,
                                          resume=self.retrying)
        except StageError as exc:
            if not self.retrying and not self.link.is_loss(exc):
                with contextlib.suppress(Exception):
                    await transfer.remove_tree(sftp, self.rundir)
            raise
        finally:
            self.ui.progress_stop()
        self.result.stage_method = method
        self._advance("staged")
        self.ui.event("staged", f"staged {len(inputs)} input(s), {size} bytes, by {method}",
                      inputs=[i.name for i in inputs], bytes=size, method=method)

    async def _launch(self) -> None:
        conn = await self.link.conn()
        if self.agent is not None:
            entry = self.request.entrypoint
            self.launched = await self.agent.launch(conn, self.run_id, entry.text, entry.params)
        else:
            self.launched = await self.backend.launch(conn, await self.link.sftp(), self.rundir)
        self.job_id = self.launched.job_id
        self._advance("launched", job_id=self.job_id)
        again = " (it had been launched before)" if self.launched.before else ""
        if self.batch is not None:
            self.ui.event("launched", f"submitted {self.batch.scheduler.title} job "
                          f"{self.job_id}{again}: {self.request.entrypoint.label} "
                          f"({self.batch.resources.describe()})",
                          run_id=self.run_id, job_id=self.job_id)
            return
        self.ui.event("launched", f"running {self.request.entrypoint.label}{again}",
                      run_id=self.run_id, job_id=self.job_id)

    async def _wait(self) -> None:
        stop = asyncio.Event()
        tail = None
        if self.request.follow and self.agent is not None:
            tail = asyncio.ensure_future(agent_mod.follow_log(
                self.agent, self.link.conn, self.run_id, self.ui, stop))
        elif self.request.follow:
            tail = asyncio.ensure_future(
                follow_log(self.link.open_sftp, self.rundir, self.ui, stop))
        try:
            code = await self._wait_for_exit()
        finally:
            stop.set()
            if tail is not None:
                with contextlib.suppress(Exception):
                    await tail
        self.exit_code = code
        if await self._cancelled_remotely():
            # cancel.sh ran (e.g. its caller exited at once on a second signal)
            self.control.reason = self.control.reason or "cancelled remotely"
            self.control.exit_code = self.control.exit_code or EXIT_SIGNAL_BASE + 15
            self._advance("finished", exit_code=code)
            raise asyncio.CancelledError
        self._advance("finished", exit_code=code)
        self.ui.event("finished", f"entrypoint exited with {code}",
                      run_id=self.run_id, exit_code=code)

    async def _cancelled_remotely(self) -> bool:
        if self.batch is not None and self.job_info is not None \
                and self.job_info.state == CANCELLED:
            return True  # scancel / qdel / pjdel from elsewhere
        if self.agent is not None:
            if self.exit_code not in (137, 143):  # what a cancel leaves: spare an exec
                return False
            status = await self.agent.status(await self.link.conn(), self.run_id)
            return bool(status.get("cancelled"))
        return await read_control(await self.link.sftp(), self.rundir, "cancelled") is not None

    async def _wait_for_exit(self) -> int:
        if self.agent is not None:
            return await self._wait_agent(self.agent)
        if self.batch is not None:
            return await self._wait_batch(self.batch)
        launched = self.launched
        if launched is not None and launched.channel is not None:
            channel, launched.channel = launched.channel, None  # after a reconnect: poll
            try:
                await channel.wait_closed()
            finally:
                channel.close()  # (if abandoned, launch.sh may go on waiting; harmless)
            status = channel.exit_status
            attached = status if status is not None and status >= 0 else None
            if attached is None and (await self.link.conn()).is_closed():
                raise asyncssh.ConnectionLost("the connection closed while waiting")
            recorded = await read_exit_code(await self.link.sftp(), self.rundir)
            if recorded is not None:
                return recorded
            if attached is not None:
                return attached
        for delay in POLL.delays():
            code = await self.backend.poll(await self.link.sftp(), self.rundir, self.job_id)
            if code is not None:
                return code
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _fetch(self) -> None:
        try:
            partial = localfs.partial_dir(self.request.into, self.run_id)
        except OSError as exc:
            raise self._unwritable(exc) from None
        if self.agent is not None:  # the agent applies the site's return filter
            try:
                report = await self.agent.fetch(await self.link.rsh(agent_rsync), self.run_id,
                                                partial, self.ui.show_progress)
            except (FetchError, OSError) as exc:
                if localfs.out_of_space(exc):  # kept: `resume` continues into the partial dir
                    raise self._disk_full(partial, None) from None
                raise
            method, size = report.method, localfs.tree_size(partial)
        else:
            method, size, report = await self._fetch_open(partial)
        dropped = [f"not fetched: {item}" for item in report.skipped]
        for message in dropped:
            self.ui.warn(message)

        def warn(message: str) -> None:  # what the local pass drops or renames
            dropped.append(message)
            self.ui.warn(message)

        try:
            placed = localfs.place(partial, self.request.into, inputs=self.request.inputs,
                                   warn=warn)
        except OSError as exc:
            raise self._unwritable(exc) from None
        self.result.fetched, self.result.fetch_method = placed, method
        self.result.skipped = dropped
        self._advance("fetched")
        self.ui.event("fetched", f"fetched {len(placed)} item(s), {size} bytes, by {method} "
                      f"into {self.request.into}", fetched=placed, bytes=size, method=method)

    async def _fetch_open(self, partial: Any) -> tuple[str, int, transfer.FetchReport]:
        """Fetch over SFTP or rsync what the template and the site return, but the
        inputs the entrypoint left unchanged."""
        sftp = await self.link.sftp()
        site, returns = self.site, self.request.returns
        keep = None
        if not return_filter.is_trivial(returns, site.never_return, site.only_return):
            keep = return_filter.predicate(returns, site.never_return, site.only_return)
        plan = transfer.plan_fetch(await transfer.walk_remote(sftp, self.rundir), keep,
                                   self.request.inputs)
        if plan.unchanged:
            self.ui.event("unchanged", f"{plan.unchanged} input file(s) came back unchanged: "
                          "not transferred", unchanged=plan.unchanged)
        method = await self._method(plan.size)
        self.ui.progress_start("fetching", plan.size)
        try:
            if method == "rsync":
                report = await transfer.fetch_rsync(await self.link.rsh(), self.rundir,
                                                    partial, self.ui.show_progress, plan)
            else:
                report = await transfer.fetch_sftp(sftp, self.rundir, partial,
                                                   self.ui.progress_fn, plan)
        except (FetchError, OSError) as exc:
            if localfs.out_of_space(exc):  # kept: `resume` continues into the partial dir
                raise self._disk_full(partial, plan.size) from None
            raise
        finally:
            self.ui.progress_stop()
        report.skipped = plan.skipped
        return method, plan.size, report

    def _disk_full(self, partial: Any, size: int | None) -> FetchError:
        return localfs.out_of_space_error(partial, self.run_id,
                                          f"{self.site.name}:{self.rundir}", size)

    def _unwritable(self, exc: OSError) -> FetchError:
        return localfs.unwritable_error(self.request.into, exc, self.run_id,
                                        f"{self.site.name}:{self.rundir}")

    async def _cleanup(self) -> None:
        """Remove the remote directory per policy."""
        policy = self.site.cleanup
        remove = (policy == "always") or (policy == "on-success" and self.exit_code == 0)
        if self.request.keep or not remove:
            why = ("--keep" if self.request.keep
                   else ("the entrypoint failed" if self.exit_code else policy))
            self.ui.event("kept", f"remote directory kept ({why}): {self.site.name}:"
                          f"{self.rundir}", rundir=self.rundir)
            self.result.remote_kept = True
        elif self.agent is not None:
            removed = await self.agent.remove(await self.link.conn(), self.run_id)
            self.result.remote_kept = False
            if removed:
                self.ui.event("cleaned", f"removed {self.rundir}", rundir=self.rundir)
        else:
            try:
                await transfer.remove_tree(await self.link.sftp(), self.rundir)
            except asyncssh.SFTPNoSuchFile:
                pass
            except asyncssh.SFTPError as exc:
                self.ui.warn(f"could not remove {self.rundir} on {self.site.name}: {exc}")
            else:
                self.result.remote_kept = False
                self.ui.event("cleaned", f"removed {self.rundir}", rundir=self.rundir)
        self._advance("cleaned")

    async def _stage_agent(self, agent: AgentBackend) -> None:
        inputs = self.request.inputs
        size = sum(i.size for i in inputs)
        try:
            await agent.stage(await self.link.rsh(agent_rsync), inputs, self.run_id,
                              self.ui.show_progress)
        except StageError as exc:
            if not self.retrying and not self.link.is_loss(exc):
                with contextlib.suppress(Exception):
                    await agent.remove(await self.link.conn(), self.run_id)
            raise
        self.result.stage_method = "rsync"
        self._advance("staged")
        self.ui.event("staged", f"staged {len(inputs)} input(s), {size} bytes, by rsync "
                      "(confined by the site's agent)",
                      inputs=[i.name for i in inputs], bytes=size, method="rsync")

    async def _wait_agent(self, agent: AgentBackend) -> int:
        launched = self.launched
        if launched is not None and launched.channel is not None:
            channel, launched.channel = launched.channel, None  # after a reconnect: `wait`
            try:
                await channel.wait_closed()
            finally:
                channel.close()
            status = channel.exit_status
            if status is not None and status >= 0:
                return status  # the agent's launch ends with the entrypoint's exit code
            if (await self.link.conn()).is_closed():
                raise asyncssh.ConnectionLost("the connection closed while waiting")
        return await agent.wait(await self.link.conn(), self.run_id)

    async def _wait_batch(self, batch: BatchBackend) -> int:
        """Wait for the job: its exit code file every poll, the scheduler less often."""
        assert self.job_id is not None
        loop = asyncio.get_running_loop()
        asks = QUERY.delays()  # the exit code file is read every poll, the scheduler less often
        next_ask, unknown = 0.0, 0
        silent_since = 0.0  # when the scheduler stopped answering
        for delay in POLL.delays():
            code = await batch.poll(await self.link.sftp(), self.rundir, self.job_id)
            if code is not None:
                await self._settle_job(batch, code)
                return code
            if loop.time() >= next_ask:
                try:
                    info = await batch.query(await self.link.conn(), self.job_id)
                except SchedulerUnavailable as exc:  # no answer is not "gone": wait on
                    if not silent_since:
                        self.ui.warn(f"{exc.message}; still waiting")
                    silent_since = silent_since or loop.time()
                    next_ask = loop.time() + next(asks)
                    await asyncio.sleep(delay)
                    continue
                silent_since = 0.0
                self._note_job(batch, info)
                unknown = unknown + 1 if info is None else 0
                if info is not None and info.terminal:
                    return await self._exit_of_ended_job(batch, info)
                if unknown >= 3:
                    code = await batch.poll(await self.link.sftp(), self.rundir, self.job_id)
                    if code is not None:
                        return code
                    raise RemoteLostError(
                        f"{batch.scheduler.title} no longer knows job {self.job_id} and the "
                        "job left no exit code (purged from the scheduler's memory, or the "
                        "wrapper never ran)",
                        hint=f"look at {self.rundir}/{CONTROL_DIR}/scheduler.out on the host")
                next_ask = loop.time() + next(asks)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _exit_of_ended_job(self, batch: BatchBackend, info: JobInfo) -> int:
        """The exit code of a job the scheduler says ended: the wrapper's if it wrote one
        (a shared file system may show it a little late), else the scheduler's."""
        tries = 4 if info.started is not None else 1
        for attempt in range(tries):
            code = await batch.poll(await self.link.sftp(), self.rundir, self.job_id)
            if code is not None:
                return code
            if attempt + 1 < tries:
                await asyncio.sleep(1.0)
        if info.state == CANCELLED:
            return info.exit_code or EXIT_SIGNAL_BASE + 15
        if info.state == COMPLETED and info.exit_code is not None:
            return info.exit_code
        # failed / timed out without the wrapper's word: never a success, even when the
        # scheduler says 0 (Slurm's NODE_FAIL, BOOT_FAIL, PREEMPTED are 0:0)
        if info.state == TIMED_OUT:
            return info.exit_code or EXIT_SIGNAL_BASE + 9
        return info.exit_code or 1

    async def _settle_job(self, batch: BatchBackend, code: int) -> None:
        """The wrapper recorded ``code``: learn how the scheduler saw the job end (why it
        failed: walltime, cancel, memory). Bounded; a success asks once."""
        assert self.job_id is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (0 if code == 0 else 10.0)
        while True:
            try:
                info = await batch.query(await self.link.conn(), self.job_id)
            except SchedulerUnavailable:
                return  # the exit code is what counts; the why is a nicety
            self._note_job(batch, info)
            if info is None or info.terminal or loop.time() >= deadline:
                return
            await asyncio.sleep(0.5)

    def _note_job(self, batch: BatchBackend, info: JobInfo | None) -> None:
        """Record what the scheduler said; an event (and a warning when the job is stuck)
        each time its state, reason or nodes change."""
        if info is None:
            return
        last = self.job_info
        self.job_info = info
        self.journal.update(self.run_id, job_info=json.dumps(info.to_dict()))
        if last is not None and (last.native, last.reason, last.nodes) == \
                (info.native, info.reason, info.nodes):
            return
        text = batch.describe(info)
        if batch.scheduler.explain(info):  # stuck: say so loudly, once per reason
            self.ui.warn(f"{text}; `remote-exec cancel {self.run_id[:8]}` gives up")
        else:
            self.ui.event("job", text, job_id=info.job_id, state=info.state,
                          native=info.native, reason=info.reason)

    async def _method(self, size: int) -> str:
        return await transfer.choose_method(
            await self.link.conn(), self.site.transfer, size, self.site.rsync_threshold,
            self._rsync_cache,
        )

    # -- stopping ---------------------------------------------------------------------------
    def _arm_timeout(self) -> asyncio.TimerHandle | None:
        timeout = self.request.timeout
        if not timeout:
            return None
        created = self.request.created_at or time.time()
        remaining = max(created + timeout - time.time(), 0.0)
        return asyncio.get_running_loop().call_later(
            remaining, self.control.cancel, "timeout", EXIT_TIMEOUT)

    async def _cancel_remote(self) -> None:
        """Stop what runs remotely (bounded in time), then record the run as ended."""
        reason = self.control.reason or "cancel"
        state = "timed_out" if reason == "timeout" else "cancelled"
        what = "nothing was running yet"
        if self.phase in ("staged", "launched"):  # (staged: a launch may be in flight)
            try:
                what = await self._stop_remote()
            except (asyncio.TimeoutError, OSError, asyncssh.Error, RemoteExecError) as exc:
                what = f"could not reach the host to stop it ({exc})"
                self.ui.warn(f"the remote process of run {self.run_id} may still be running: "
                             f"{what}; try `remote-exec cancel {self.run_id[:8]}` later")
        elif reason == "cancelled remotely":
            what = f"the entrypoint was stopped (exit code {self.exit_code})"
        elif self._done("finished"):
            what = "the entrypoint had already finished"
        self.journal.update(self.run_id, state=state, error=f"{self._reason_text()}: {what}")
        self.ui.event(state, f"run {self.run_id} {state.replace('_', ' ')} "
                      f"({self._reason_text()}); remote: {what}", run_id=self.run_id)

    async def _stop_remote(self) -> str:
        """Stop the entrypoint or job (bounded in time); what was done, in words."""
        conn = await asyncio.wait_for(self.link.conn(), self.site.connect_timeout)
        if self.batch is not None:
            stopping = self.batch.cancel(conn, self.rundir, self.site.cancel_grace,
                                         job_id=self.job_id)
        else:  # (the agent backend takes the run id from the run directory)
            stopping = self.backend.cancel(conn, self.rundir, self.site.cancel_grace)
        what = str(await asyncio.wait_for(stopping, self.site.cancel_grace + 30))
        await self._note_exit_before_cancel(what)
        return what

    async def _note_exit_before_cancel(self, what: str) -> None:
        """An entrypoint that ended on its own before the cancel reached it counts as
        finished (with its exit code): its results are kept for ``resume``."""
        if self.batch is not None or self.agent is not None:
            return
        sftp = await asyncio.wait_for(self.link.sftp(), self.site.connect_timeout)
        code = await exit_before_cancel(sftp, self.rundir, what)
        if code is not None:
            self.exit_code = code
            self._advance("finished", exit_code=code)

    def _reason_text(self) -> str:
        reason = self.control.reason or "cancel"
        if reason == "timeout":
            return f"the run exceeded its time limit (--timeout {self.request.timeout:g} s)"
        if reason.startswith("SIG"):
            return f"{reason} received"
        return reason

    def _cancelled_error(self) -> RunCancelled:
        """The error a cancel ends with: what is kept where, and what can be done with it.
        A local partial directory stays only if ``resume`` will fetch into it."""
        if self._awaits_fetch():
            hint = (f"the entrypoint had finished (exit code {self.exit_code}); its results "
                    f"are kept at {self.site.name}:{self.rundir}; {self._resume_fetch_text()}")
        else:
            localfs.discard(localfs.partial_path(self.request.into, self.run_id))
            where = f"{self.site.name}:{self.rundir}" if self.rundir else "nowhere yet"
            hint = (f"the remote directory is kept at {where}; "
                    f"`remote-exec cleanup {self.site.name}` removes leftovers")
        return RunCancelled(f"run {self.run_id} stopped: {self._reason_text()}",
                            exit_code=self.control.exit_code, hint=hint)
