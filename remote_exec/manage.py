"""Looking after recorded runs: status, logs, cancel and cleanup of remote leftovers.

These are the library halves of ``remote-exec status / logs / cancel / cleanup``;
the CLI only prints, and the run's backend does the remote part. Each connects on
its own (in this process) with the site settings stored in the run's journal row,
so they work without the configuration file that started the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_exec import backends
from remote_exec.backends.base import Backend, Leftover, RemoteState, Trimmed
from remote_exec.backends.scheduler import JobInfo
from remote_exec.config import Site
from remote_exec.errors import ConfigError, RemoteExecError, RunBusyError
from remote_exec.inputs import LOG_NAME
from remote_exec.journal import ACTIVE_STATES, Journal, RunLock, RunRecord, opened
from remote_exec.ui import Reporter


def record_site(record: RunRecord) -> Site:
    return Site.from_wire(record.request_data()["site"])


def driven(record: RunRecord) -> bool:
    """Whether some remote-exec process is driving the run right now."""
    return RunLock(record.id).held_elsewhere()


# -- status -------------------------------------------------------------------------------------

def backend_of(record: RunRecord) -> Backend:
    """The backend of a recorded run, with the site settings stored with it."""
    return backends.make_backend(record.backend, record_site(record), record.id)


async def probe(record: RunRecord) -> RemoteState:
    """What the run place says now (the backend reads it)."""
    if not record.rundir:
        return RemoteState(reachable=True)
    return await backend_of(record).probe(record)


def job_line(record: RunRecord) -> str | None:
    """A job's last recorded state in one line: id, state and reason, nodes, queue wait
    and run time (None for runs without a job)."""
    data = record.job_data()
    if not data:
        return None
    try:
        return backend_of(record).describe_job(JobInfo.from_dict(data))
    except (KeyError, ValueError, TypeError, RemoteExecError):
        return None


# -- logs ---------------------------------------------------------------------------------------

def local_log(record: RunRecord) -> Path | None:
    """The fetched ``remote_program_exec.log`` of a run that came back, if still there."""
    if not record.reached("fetched"):
        return None
    path = Path(record.into_dir) / LOG_NAME
    return path if path.is_file() else None


async def remote_log(record: RunRecord, ui: Reporter, follow: bool) -> None:
    """Print the run's remote log; with ``follow``, until the entrypoint ends.

    If the run place disappears meanwhile (the run came back and was cleaned up),
    the rest is read from the fetched copy.
    """
    if not record.rundir:
        raise ConfigError(f"run {record.id} has no remote directory yet")
    await backend_of(record).read_log(record, ui, follow)


# -- cancel -------------------------------------------------------------------------------------

def cancel(record: RunRecord, ui: Reporter, wait: float = 60.0) -> str:
    """Stop a run: through its driving process if one lives, else remotely from here."""
    if record.ended:
        return f"run {record.id} already ended ({record.state.replace('_', ' ')})"
    lock = RunLock(record.id)
    if not lock.acquire():
        pid = record.driver_pid
        if pid and _is_remote_exec(pid):
            ui.event("cancelling", f"asking the process driving the run (pid {pid}) to cancel it")
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait + record_site(record).cancel_grace
        while time.monotonic() < deadline:
            if lock.acquire():
                break
            time.sleep(0.2)
        else:
            raise RunBusyError(f"run {record.id} is still driven by another process",
                               hint="stop that process, then cancel again")
    try:
        with contextlib.closing(Journal()) as journal:
            fresh = journal.get(record.id)
            assert fresh is not None
            if fresh.ended:
                return f"run {record.id} {fresh.state.replace('_', ' ')}"
            what, finished = (asyncio.run(backend_of(fresh).cancel_recorded(fresh)) if fresh.rundir
                              else ("nothing started", None))
            fields: dict[str, Any] = {}
            if finished is not None and not fresh.reached("finished"):
                fields = {"phase": "finished", "exit_code": finished}
                what += (f" (exit code {finished}); its results are kept: "
                         f"`remote-exec resume {record.id[:8]}` fetches them")
            journal.update(record.id, state="cancelled", error=f"remote-exec cancel: {what}",
                           **fields)
            journal.event(record.id, "cancelled", f"cancelled by remote-exec cancel: {what}")
            return f"run {record.id} cancelled; remote: {what}"
    finally:
        lock.release()


def _is_remote_exec(pid: int) -> bool:
    """Whether ``pid`` is a remote-exec process (guards against a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc: trust the journal
    return b"remote_exec" in cmdline or b"remote-exec" in cmdline


# -- cleanup ------------------------------------------------------------------------------------

@dataclass
class Guards:
    """What this machine's journal says about the runs whose directories ``cleanup`` finds."""

    active: set[str] = field(default_factory=set)  # running or interrupted: never removed
    unfetched: dict[str, RunRecord] = field(default_factory=dict)  # removed only with force

    @classmethod
    def from_journal(cls) -> Guards:
        with opened() as journal:
            records = journal.runs(limit=None)
        return cls(active={r.id for r in records if r.state in ACTIVE_STATES},
                   unfetched={r.id: r for r in records if r.awaits_fetch})


async def cleanup(site: Site, older_than: float, dry_run: bool, ui: Reporter,
                  guards: Guards, force: bool = False) -> list[Leftover]:
    """Remove run places on the site that remote-exec made and no one uses.

    A place qualifies when its name is a run id, it holds ``.remote-exec/``, it is
    older than ``older_than`` seconds, the journal does not list it as running or
    interrupted, and its entrypoint is not running. One whose results the journal
    has not placed yet (the fetch failed or was cancelled) is kept unless ``force``;
    removing it is recorded in the journal, so ``resume`` says why it cannot.
    """
    backend = backends.make_backend(backends.for_site(site), site)
    found = await backend.cleanup_runs(
        lambda item: _removable(item, guards, older_than, dry_run, force), ui)
    _record_destroyed(found, guards)
    return found


async def trim_cache(site: Site, older_than: float | None, dry_run: bool,
                     ui: Reporter) -> list[Trimmed]:
    """Trim the site's content cache to its limits (``cache_size``, ``cache_max_age``)
    and, if given, remove entries unused for ``older_than`` seconds."""
    backend = backends.make_backend(backends.for_site(site), site)
    return await backend.trim_cache(older_than, dry_run, ui)


def _removable(item: Leftover, guards: Guards, older_than: float, dry_run: bool,
               force: bool) -> bool:
    """Whether to remove ``item`` now; if not, its verdict says why."""
    unfetched = guards.unfetched.get(item.run_id)
    if item.run_id in guards.active or item.state == "running":
        item.verdict = "kept (active)"
    elif item.age_days * 86400 < older_than:
        item.verdict = "too recent"
    elif unfetched is not None and not force:
        item.verdict = "kept (unfetched)"
    else:
        if unfetched is not None:
            item.note = (f"run {unfetched.id}: its results were never fetched (entrypoint "
                         f"exit code {unfetched.exit_code}); they exist only in {item.path}"
                         + (", which --force would destroy" if dry_run
                            else ", destroyed by --force"))
        if not dry_run:
            return True
        item.verdict = "would remove"
    return False


def _record_destroyed(found: list[Leftover], guards: Guards) -> None:
    """Note in the journal each run whose unfetched results ``cleanup --force`` removed."""
    gone = [item for item in found if item.verdict == "removed"
            and item.run_id in guards.unfetched]
    if not gone:
        return
    with opened() as journal:
        for item in gone:
            journal.mark_destroyed(item.run_id, f"its remote directory {item.path} was "
                                   "removed by `remote-exec cleanup --force` before its "
                                   "results were fetched")


def summary(record: RunRecord) -> dict[str, Any]:
    """The record as plain data (for ``--json``)."""
    data = {k: v for k, v in record.__dict__.items() if k != "request"}
    data["job_info"] = record.job_data()
    data["driven"] = driven(record)
    return data
