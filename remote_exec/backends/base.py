"""The one interface every way of running implements, and the types its steps share.

A run's life (see :mod:`remote_exec.engine`, the phase loop) is the same for every
backend; each step below is one method with one signature:

  ``open``         the session the steps travel over (an SSH :class:`~remote_exec.ssh.link.Link`,
                   a WebAPI client): it says which errors are a lost link (the step is
                   repeated after a reconnect) and which a refused channel (waited for);
  ``create``       make the run place (records ``run.rundir`` before it exists);
  ``stage``        put the control files and the inputs there;
  ``launch``       start the entrypoint *at most once*, however often it is called;
  ``wait``         until it ends: its exit code (polling, or an event);
  ``follow_log``   stream its log while it runs (``run --follow``);
  ``fetch``        bring what may come back into a partial directory (resumable);
  ``remove``       remove the run place (the cleanup policy is the engine's);
  ``stop``         cancel what runs remotely; what was done, in words.

And for the commands around recorded runs, which have a journal record but no driver:
``probe`` (``status``), ``read_log`` (``logs``), ``cancel_recorded`` (``cancel``),
``cleanup_runs`` (``cleanup``), ``check`` (``site check``) and ``describe_job``.

Each step's errors carry their meaning (:mod:`remote_exec.errors`): transient (the
engine repeats the step), resumable (the run is *interrupted*) or final.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from remote_exec.errors import ConfigError

if TYPE_CHECKING:
    from remote_exec.backends.scheduler import JobInfo
    from remote_exec.config import Site
    from remote_exec.journal import RunRecord
    from remote_exec.request import RunRequest, RunResult
    from remote_exec.site.rows import Row
    from remote_exec.ui import Reporter


class Session(Protocol):
    """What a run's steps travel over, as far as the engine must know it."""

    #: how many times a lost link is re-established before the run is interrupted
    tries: int

    def is_loss(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the link dropped (repeat the step after ``reconnect``)."""

    def refused_channel(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a refused channel on a link that still works (wait)."""

    async def reconnect(self, during: str, cause: BaseException) -> None:
        """Re-establish the link, or raise LinkLostError (the run is interrupted)."""

    async def close(self) -> None:
        """Let go of the link."""


class NoSession:
    """The session of a backend whose calls retry on their own (a WebAPI client):
    an error it marks as a lost link interrupts the run at once."""

    tries = 0

    def __init__(self, is_loss: Callable[[BaseException], bool], hint: str = "") -> None:
        self._is_loss = is_loss
        self.hint = hint

    def is_loss(self, exc: BaseException) -> bool:
        return self._is_loss(exc)

    def refused_channel(self, exc: BaseException) -> bool:
        return False

    async def reconnect(self, during: str, cause: BaseException) -> None:
        from remote_exec.errors import LinkLostError

        text = getattr(cause, "message", None) or str(cause) or type(cause).__name__
        raise LinkLostError(f"{during}: {text}", hint=self.hint or None) from None

    async def close(self) -> None:
        return None


@dataclass
class Launched:
    """A started entrypoint: its job id (a process group, a batch job) and, if this
    process started it, a channel that ends when it does."""

    job_id: str | None
    channel: Any = None
    before: bool = False  # it had been launched by an earlier attempt


@dataclass
class Moved:
    """How a transfer went: its method (``rsync``, ``sftp``, ``object storage``) and the
    words for the event (``by rsync``)."""

    method: str
    how: str = ""
    size: int = 0
    skipped: list[str] = field(default_factory=list)  # what was left behind, and why
    cached: int = 0  # of ``size``, the bytes the site's content cache supplied (not sent)

    def __post_init__(self) -> None:
        self.how = self.how or f"by {self.method}"


@dataclass
class RemoteState:
    """What the run place says (or why it could not be read): ``status``'s remote line."""

    reachable: bool
    exists: bool = False
    exit_code: int | None = None
    alive: bool | None = None
    error: str = ""
    job: str = ""  # a batch job: what its scheduler says now

    def describe(self) -> str:
        if not self.reachable:
            return f"unreachable ({self.error})"
        if self.job and self.exit_code is None:
            return self.job
        if not self.exists:
            return "run directory absent"
        if self.exit_code is not None:
            return f"entrypoint finished with exit code {self.exit_code}"
        if self.alive:
            return "entrypoint running"
        if self.alive is False:
            return "entrypoint not running and no exit code recorded"
        return "not launched"


@dataclass
class Leftover:
    """A run place ``cleanup`` found."""

    path: str
    age_days: float
    state: str  # finished | not launched | running | dead
    verdict: str = ""  # removed | would remove | kept (active) | kept (unfetched)
    #                    | too recent | failed
    note: str = ""  # what removing it destroys (results never fetched), if anything
    name: str = ""  # the run id (the last part of the path unless given)

    @property
    def run_id(self) -> str:
        return self.name or self.path.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class Trimmed:
    """An entry of a site's content cache (or an unfinished insertion) that ``cleanup``
    or a run's trim let go, and why."""

    path: str
    size: int
    why: str  # "unused for N days", "over the cache's size cap", "unfinished insertion"
    verdict: str = "removed"  # removed | would remove | failed


class Run:
    """One run as its steps see it: the request, where the run is, and the record.

    Steps read and set ``rundir``, ``job_id``, ``exit_code`` and ``job_info``; what
    must survive a crash they record with ``await run.record(field=value)`` (the
    journal row, written off the event loop).
    """

    def __init__(self, request: RunRequest, ui: Reporter,
                 record: Callable[..., Awaitable[None]], *,
                 rundir: str = "", job_id: str | None = None, exit_code: int | None = None,
                 job_info: JobInfo | None = None, retrying: bool = False,
                 result: RunResult | None = None) -> None:
        self.request = request
        self.ui = ui
        self.record = record
        self.rundir = rundir
        self.job_id = job_id
        self.exit_code = exit_code
        self.job_info = job_info
        #: a step runs a second time (after a reconnect or a resume): be idempotent
        self.retrying = retrying
        self.result = result
        #: the bytes a fetch will bring, once the backend knows (for a full local disk)
        self.fetch_total: int | None = None
        #: how many entries the run place held when it was last listed (None: unknown)
        self.remote_entries: int | None = None
        self._beside: list[asyncio.Task[None]] = []

    def beside(self, work: Coroutine[Any, Any, None]) -> None:
        """Go on with ``work`` beside the next steps instead of waiting for it (a step's
        own afterthought, such as adding the inputs just sent to the site's cache). It
        must report its own failures (it never ends the run); the engine awaits it
        before the run place is removed or kept, and stops it when the run ends
        otherwise (:meth:`settle`)."""
        self._beside.append(asyncio.ensure_future(work))

    async def settle(self, stop: bool = False) -> None:
        """Wait for the work :meth:`beside` started (``stop``: cancel it first)."""
        tasks, self._beside = self._beside, []
        if stop:
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def site(self) -> Site:
        return self.request.site

    @property
    def run_id(self) -> str:
        return self.request.run_id

    async def set_rundir(self, rundir: str) -> None:
        """The run place, recorded before it is made (so cleanup and resume find it)."""
        self.rundir = rundir
        await self.record(rundir=rundir)

    async def note_job(self, info: JobInfo, text: str, stuck: str = "") -> None:
        """Record what the scheduler or service says of the job; an event (a warning when
        ``stuck`` says why it will not start) each time its state, reason or nodes change."""
        import json

        last, self.job_info = self.job_info, info
        await self.record(job_info=json.dumps(info.to_dict()))
        if last is not None and (last.native, last.reason, last.nodes) == \
                (info.native, info.reason, info.nodes):
            return
        if stuck:
            self.ui.warn(f"{text}; `remote-exec cancel {self.run_id[:8]}` gives up")
        else:
            self.ui.event("job", text, job_id=info.job_id, state=info.state,
                          native=info.native, reason=info.reason)


class Backend(ABC):
    """A way of running. One instance serves one run (or one command about runs) on
    one site; see the module docstring for what each step promises."""

    #: the registry name (set on instances from the registry line)
    name: ClassVar[str] = ""
    #: what the run's place is called in messages
    place_noun: ClassVar[str] = "remote directory"

    def __init__(self, site: Site, run_id: str = "", resources: dict[str, Any] | None = None,
                 **options: Any) -> None:
        self.site = site
        self.run_id = run_id
        self.resources = dict(resources or {})

    def validate(self) -> None:
        """Check what can be checked before a new run is recorded (settings,
        credentials); a ConfigError says what to fix."""
        return None

    # -- the session -----------------------------------------------------------------------
    @abstractmethod
    async def open(self, ui: Reporter, **how: Any) -> Session:
        """The session this run's steps use (``how``: the holder's connection pool)."""

    # -- a run's steps ---------------------------------------------------------------------
    @abstractmethod
    async def create(self, run: Run) -> str:
        """Make the run place (set ``run.rundir`` first); where it is, in words."""

    @abstractmethod
    async def stage(self, run: Run) -> Moved:
        """Put the entrypoint's control files and the inputs in the run place."""

    @abstractmethod
    async def launch(self, run: Run) -> Launched:
        """Start the entrypoint, at most once for the run place."""

    def launch_text(self, run: Run, launched: Launched) -> str:
        again = " (it had been launched before)" if launched.before else ""
        return f"running {run.request.entrypoint.label}{again}"

    @abstractmethod
    async def wait(self, run: Run, launched: Launched | None) -> int:
        """Until the entrypoint ends: its exit code. ``launched`` is None on a resume."""

    async def follow_log(self, run: Run, stop: asyncio.Event) -> None:
        """Stream the log to ``run.ui`` until ``stop`` is set (then drain)."""
        await stop.wait()

    async def cancelled_remotely(self, run: Run) -> bool:
        """Whether the entrypoint that just ended was stopped by a cancel from elsewhere."""
        return False

    @abstractmethod
    async def fetch(self, run: Run, partial: Path) -> Moved:
        """Bring what may come back into ``partial`` (resumable: it may hold a part)."""

    @abstractmethod
    async def remove(self, run: Run) -> bool:
        """Remove the run place; False if it could not (after a warning)."""

    def where(self, run: Run) -> str:
        """The run place, for messages."""
        return f"{self.site.name}:{run.rundir}"

    @abstractmethod
    async def stop(self, run: Run) -> str:
        """Stop what runs remotely (bounded in time by the engine); what was done."""

    async def exit_before_cancel(self, run: Run, what: str) -> int | None:
        """The exit code of an entrypoint that ended on its own before the cancel reached
        it (``what``: :meth:`stop`'s answer), else None: such a run counts as finished."""
        return None

    def failure_text(self, run: Run) -> str:
        """Why the run failed, when more is known than the exit code ("" if not)."""
        return "" if run.exit_code == 0 else f"the entrypoint exited with {run.exit_code}"

    # -- commands about recorded runs ------------------------------------------------------
    @abstractmethod
    async def probe(self, record: RunRecord) -> RemoteState:
        """What the run place says now (``status``)."""

    @abstractmethod
    async def read_log(self, record: RunRecord, ui: Reporter, follow: bool) -> None:
        """Print the run's remote log (``logs``); with ``follow``, until it ends."""

    @abstractmethod
    async def cancel_recorded(self, record: RunRecord) -> tuple[str, int | None]:
        """Stop a run no process drives (``cancel``): what was done, and the exit code of
        an entrypoint that had ended on its own before (else None)."""

    @abstractmethod
    async def cleanup_runs(self, decide: Callable[[Leftover], bool],
                           ui: Reporter) -> list[Leftover]:
        """The run places on the site; each one ``decide`` approves is removed."""

    async def trim_cache(self, older_than: float | None, dry_run: bool,
                         ui: Reporter) -> list[Trimmed]:
        """``cleanup``'s part for the site's content cache, if the backend keeps one:
        remove entries over its limits (and unused for ``older_than`` seconds, if given);
        with ``dry_run`` only say which."""
        return []

    @abstractmethod
    async def check(self) -> list[Row]:
        """``site check``'s rows: is the site ready for this backend, and if not, how to."""

    def describe_job(self, info: JobInfo) -> str:
        """A recorded job in one line (``status``)."""
        return f"job {info.job_id}: {info.native}"


class WebApiBackend(Backend):
    """A backend that reaches its service through an API client of its own, no SSH
    (fujitsu, rescale): the service (settings, credentials, client) is made once, on first
    use, and checked before the run is recorded; an answer that never came (after the
    client's own retries) interrupts the run, for ``resume``."""

    #: who answers, in the hint of an interrupted run ("Rescale", "the WebAPI")
    answers: ClassVar[str] = "the service"

    def __init__(self, site: Site, run_id: str = "", resources: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(site, run_id, resources, **options)
        self._service: Any = None

    @abstractmethod
    def make_service(self) -> Any:
        """The site's service: settings, credentials and ``api`` (called once)."""

    @abstractmethod
    def lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the service did not answer (a lost link)."""

    @property
    def service(self) -> Any:
        if self._service is None:
            self._service = self.make_service()
        return self._service

    @property
    def api(self) -> Any:
        return self.service.api

    def validate(self) -> None:
        self.service  # noqa: B018 - settings and credentials, before the run is recorded

    async def open(self, ui: Reporter, **how: Any) -> NoSession:
        return NoSession(self.lost, hint=f"`remote-exec resume {self.run_id[:8]}` once "
                         f"{self.answers} answers again")


__all__ = ["Backend", "Launched", "Leftover", "Moved", "NoSession", "RemoteState", "Run",
           "Session", "Trimmed", "WebApiBackend"]


# -- what a backend without a remote shell answers (a WebAPI: fujitsu, rescale) ----------
def no_live_log(record: RunRecord, runs_as: str) -> ConfigError:
    """``logs``/``--follow`` of a run whose log comes back only with its files."""
    return ConfigError(f"run {record.id} runs {runs_as}: its log comes back with its files, "
                       "after the job",
                       hint=f"`remote-exec status {record.id[:8]}` shows the job meanwhile")


def no_leftover_listing(site: Site, runs_as: str, hint: str) -> ConfigError:
    """``cleanup SITE`` where there are no run directories to list (``hint``: what
    removes a run's remains instead)."""
    return ConfigError(f"site {site.name!r} runs {runs_as}: `cleanup` removes leftover run "
                       "directories over SSH", hint=hint)

