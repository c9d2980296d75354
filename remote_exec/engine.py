"""The life of one run, step by step, each step recorded before the next begins.

    planned -> created -> staged -> launched -> finished(exit code) -> fetched -> cleaned
                                  ↘ cancelled / timed_out / failed(reason) / interrupted

:func:`execute_async` drives a run from wherever its journal row says it is, so the
same code starts a new run and resumes one whose orchestrator died. Each step is
safe to repeat: creating accepts the run's own directory, staging skips files
already complete, launching is guarded remotely so the entrypoint starts at most
once, waiting reads the exit code the wrapper wrote, fetching resumes into the
same partial directory, cleaning ignores what is gone.

Every step is the backend's (:class:`remote_exec.backends.base.Backend`); this module
is the loop over them and names no backend. When the link drops in a step, the
backend's session reconnects with backoff and the step runs again. A cancel (signal, ``remote-exec
cancel``, ``--timeout``) stops the remote process group (TERM, then KILL after
the site's grace period) and records the run as cancelled or timed out.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncssh

from remote_exec import backends, localfs
from remote_exec.backends.base import Backend, Launched, Run, Session
from remote_exec.backends.scheduler import JobInfo
from remote_exec.backoff import CHANNEL
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
from remote_exec.journal import PHASES, Journal, RunLock, RunRecord
from remote_exec.request import RunRequest, RunResult, request_to_wire
from remote_exec.sizes import size_text
from remote_exec.ssh.link import Acquire, Release, open_throttled
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
        self.journal.event_soon(self.run_id, kind, message)  # (in order, off the loop)
        self.ui.event(kind, message, **fields)

    def warn(self, message: str) -> None:
        self.journal.event_soon(self.run_id, "warning", message)
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
    journal = await Journal.aopen()  # (its writes go through its own thread)
    try:
        backend = backends.make_backend(request.backend, request.site, request.run_id,
                                        request.resources)
        record = await asyncio.to_thread(journal.get, request.run_id)
        if record is None:
            if resume:
                raise ConfigError(f"run {request.run_id} is not in the journal")
            await asyncio.to_thread(backend.validate)  # settings, credentials: before a record
            await asyncio.to_thread(
                journal.create, run_id=request.run_id, site=request.site.name,
                host=request.site.host, label=request.entrypoint.label,
                backend=request.backend, into_dir=str(request.into),
                request=request_to_wire(request), driver_pid=driver_pid or os.getpid())
            record = await asyncio.to_thread(journal.get, request.run_id)
            assert record is not None
        else:
            if not resume:
                raise ConfigError(f"run {request.run_id} already exists in the journal")
            await asyncio.to_thread(_check_resumable, record, journal)
            await journal.aupdate(request.run_id, state="running", error=None,
                                  driver_pid=driver_pid or os.getpid())
        how = {"acquire": acquire, **({"release": release} if release else {})}
        session = await backend.open(ui, **how)
        try:
            return await _Driver(request, _JournalReporter(ui, journal, request.run_id),
                                 journal, backend, session, record, control,
                                 resumed=resume).drive()
        finally:
            await session.close()
    finally:
        await journal.aclose()
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
    """The phase loop of one run: each step the backend's, each recorded before the next."""

    def __init__(self, request: RunRequest, ui: Reporter, journal: Journal, backend: Backend,
                 session: Session, record: RunRecord, control: RunControl,
                 resumed: bool) -> None:
        self.request = request
        self.site = request.site
        self.run_id = request.run_id
        self.ui = ui
        self.journal = journal
        self.backend = backend
        self.session = session
        self.control = control
        self.resumed = resumed
        self.phase = record.phase
        job = record.job_data()
        self.result = RunResult(run_id=self.run_id, rundir=record.rundir or "", exit_code=-1,
                                fetched=[], remote_kept=True)
        self.run = Run(request, ui, self._record, rundir=record.rundir or "",
                       job_id=record.job_id, exit_code=record.exit_code,
                       job_info=JobInfo.from_dict(job) if job else None, retrying=resumed,
                       result=self.result)
        self.launched: Launched | None = None

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
                await self.journal.aupdate(self.run_id, driver_pid=None)
                raise
            await self._cancel_remote()
            raise self._cancelled_error() from None
        except RemoteExecError as err:
            raise await self._record_error(err) from err.__cause__
        finally:
            if deadline is not None:
                deadline.cancel()
            await self.run.settle(stop=True)  # (a run that ended before its cleanup)
        code = self.run.exit_code
        assert code is not None
        failure = self.backend.failure_text(self.run)
        await self.journal.aupdate(self.run_id, state="succeeded" if code == 0 else "failed",
                                   error=failure or None)
        self.result.failure = failure
        self.result.exit_code = code
        self.result.rundir = self.run.rundir
        self.result.place = f"{self.backend.place_noun} {self.backend.where(self.run)}"
        return self.result

    async def _record_error(self, err: RemoteExecError) -> RemoteExecError:
        """Record the run's end by ``err`` (see :func:`record_error`); the error to raise,
        saying how ``resume`` fetches results that are waiting."""
        err = await asyncio.to_thread(record_error, self.journal, self.run_id, err)
        if err.disposition == FINAL and self._awaits_fetch() \
                and "remote-exec resume" not in (err.hint or ""):
            later = self._resume_fetch_text()
            err.hint = f"{err.hint}; once that is fixed, {later}" if err.hint else later
        return err

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

    async def _record(self, **fields: Any) -> None:
        await self.journal.aupdate(self.run_id, **fields)

    async def _advance(self, phase: str, **fields: Any) -> None:
        self.phase = phase
        await self._record(phase=phase, **fields)

    async def _step(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn``; when the link drops, reconnect (with backoff) and run it again;
        when a channel is refused on a working link (MaxSessions), wait and run it again.
        Anything else is final, in the step's words."""
        failures = refusals = 0
        while True:
            try:
                return await fn()
            except (asyncio.CancelledError, LinkLostError):
                raise
            except (RemoteExecError, OSError, asyncssh.Error) as exc:
                await asyncio.sleep(0)  # let the connection notice that it closed
                if self.session.refused_channel(exc):
                    refusals += 1
                    await self._wait_for_channel(name, refusals)
                    continue
                if not self.session.is_loss(exc):
                    error = _step_error(name, exc)
                    if error is exc:
                        raise
                    raise error from exc
                failures += 1
                if failures > 2 * self.session.tries + 1:
                    raise LinkLostError(
                        f"the connection to {self.site.display} keeps dropping during {name}",
                        hint=f"`remote-exec resume {self.run_id[:8]}` once the link is stable",
                    ) from None
                self.run.retrying = True
                await self.session.reconnect(name, exc)

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
        self.run.retrying = True
        await asyncio.sleep(delay)

    # -- steps ------------------------------------------------------------------------------
    async def _create(self) -> None:
        where = await self.backend.create(self.run)
        await self._advance("created")
        self.ui.event("created", f"run {self.run_id} on {self.site.name}: {where}",
                      run_id=self.run_id, rundir=self.run.rundir, site=self.site.name)

    async def _stage(self) -> None:
        moved = await self.backend.stage(self.run)
        inputs = self.request.inputs
        self.result.stage_method = moved.method
        await self._advance("staged")
        sent = moved.size - moved.cached
        self.ui.event("staged", f"staged {len(inputs)} input(s), {size_text(moved.size)}: "
                      f"{size_text(moved.cached)} from the site's cache, {size_text(sent)} "
                      f"sent {moved.how}", inputs=[i.name for i in inputs], bytes=moved.size,
                      method=moved.method, cached_bytes=moved.cached, sent_bytes=sent)

    async def _launch(self) -> None:
        self.launched = await self.backend.launch(self.run)
        self.run.job_id = self.launched.job_id
        await self._advance("launched", job_id=self.run.job_id)
        self.ui.event("launched", self.backend.launch_text(self.run, self.launched),
                      run_id=self.run_id, job_id=self.run.job_id)

    async def _wait(self) -> None:
        stop = asyncio.Event()
        tail = None
        if self.request.follow:
            tail = asyncio.ensure_future(self.backend.follow_log(self.run, stop))
        try:
            code = await self.backend.wait(self.run, self.launched)
        finally:
            stop.set()
            if tail is not None:
                try:
                    await tail
                except Exception:  # noqa: BLE001, S110 - the log is a courtesy; the run goes on
                    pass
        self.run.exit_code = code
        if await self.backend.cancelled_remotely(self.run):
            # cancel.sh ran (e.g. its caller exited at once on a second signal)
            self.control.reason = self.control.reason or "cancelled remotely"
            self.control.exit_code = self.control.exit_code or EXIT_SIGNAL_BASE + 15
            await self._advance("finished", exit_code=code)
            raise asyncio.CancelledError
        await self._advance("finished", exit_code=code)
        self.ui.event("finished", f"entrypoint exited with {code}",
                      run_id=self.run_id, exit_code=code)

    async def _fetch(self) -> None:
        where = self.backend.where(self.run)
        try:
            partial = localfs.partial_dir(self.request.into, self.run_id)
        except OSError as exc:
            raise localfs.unwritable_error(self.request.into, exc, self.run_id, where) from None
        try:
            moved = await self.backend.fetch(self.run, partial)
        except (FetchError, OSError) as exc:
            if localfs.out_of_space(exc):  # kept: `resume` continues into the partial dir
                raise localfs.out_of_space_error(partial, self.run_id, where,
                                                 self.run.fetch_total) from None
            raise
        dropped = [f"not fetched: {item}" for item in moved.skipped]
        for message in dropped:
            self.ui.warn(message)
        said: list[str] = []  # what the local pass drops or renames (said after it)
        try:
            placed = await asyncio.to_thread(localfs.place, partial, self.request.into,
                                             inputs=self.request.inputs, warn=said.append)
        except OSError as exc:
            raise localfs.unwritable_error(self.request.into, exc, self.run_id, where) from None
        finally:
            for message in said:
                self.ui.warn(message)
        self.result.fetched, self.result.fetch_method = placed, moved.method
        self.result.skipped = dropped + said
        await self._advance("fetched")
        self.ui.event("fetched", f"fetched {len(placed)} item(s), {moved.size} bytes, "
                      f"{moved.how} into {self.request.into}", fetched=placed,
                      bytes=moved.size, method=moved.method)

    async def _cleanup(self) -> None:
        """Remove the run place per policy (once the work steps left beside them ends)."""
        await self.run.settle()
        policy, code = self.site.cleanup, self.run.exit_code
        remove = (policy == "always") or (policy == "on-success" and code == 0)
        where = self.backend.where(self.run)
        if self.request.keep or not remove:
            why = "--keep" if self.request.keep else ("the entrypoint failed" if code
                                                      else policy)
            self.ui.event("kept", f"{self.backend.place_noun} kept ({why}): {where}",
                          rundir=self.run.rundir)
            self.result.remote_kept = True
        elif await self.backend.remove(self.run):
            self.result.remote_kept = False
            self.ui.event("cleaned", f"removed {where}", rundir=self.run.rundir)
        await self._advance("cleaned")

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
            what = f"the entrypoint was stopped (exit code {self.run.exit_code})"
        elif self._done("finished"):
            what = "the entrypoint had already finished"
        await self.journal.aupdate(self.run_id, state=state,
                                   error=f"{self._reason_text()}: {what}")
        self.ui.event(state, f"run {self.run_id} {state.replace('_', ' ')} "
                      f"({self._reason_text()}); remote: {what}", run_id=self.run_id)

    async def _stop_remote(self) -> str:
        """Stop the entrypoint or job (bounded in time); what was done, in words. An
        entrypoint that ended on its own before the stop reached it counts as finished
        (with its exit code): its results are kept for ``resume``."""
        what = str(await asyncio.wait_for(self.backend.stop(self.run),
                                          self.site.cancel_grace + 30
                                          + self.site.connect_timeout))
        code = await self.backend.exit_before_cancel(self.run, what)
        if code is not None:
            self.run.exit_code = code
            await self._advance("finished", exit_code=code)
        return what

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
        where = self.backend.where(self.run) if self.run.rundir else "nowhere yet"
        if self._awaits_fetch():
            hint = (f"the entrypoint had finished (exit code {self.run.exit_code}); its "
                    f"results are kept at {where}; {self._resume_fetch_text()}")
        else:
            localfs.discard(localfs.partial_path(self.request.into, self.run_id))
            hint = (f"the {self.backend.place_noun} is kept at {where}; "
                    f"`remote-exec cleanup {self.site.name}` removes leftovers")
        return RunCancelled(f"run {self.run_id} stopped: {self._reason_text()}",
                            exit_code=self.control.exit_code, hint=hint)
