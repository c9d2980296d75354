"""Looking after recorded runs: status, logs, cancel and cleanup of remote leftovers.

These are the library halves of ``remote-exec status / logs / cancel / cleanup``;
the CLI only prints. Each connects on its own (in this process) with the site
settings stored in the run's journal row, so they work without the configuration
file that started the run.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import posixpath
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from remote_exec.backends import old_make_backend as make_backend
from remote_exec.backends.agent import AgentBackend
from remote_exec.backends.batch import BatchBackend
from remote_exec.backends.direct import read_control, read_exit_code
from remote_exec.config import Site
from remote_exec.errors import ConfigError, RemoteExecError, RunBusyError
from remote_exec.inputs import CONTROL_DIR, LOG_NAME
from remote_exec.journal import ACTIVE_STATES, Journal, RunLock, RunRecord, opened
from remote_exec.ssh import shell
from remote_exec.ssh.link import open_throttled
from remote_exec.ui import Reporter

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def record_site(record: RunRecord) -> Site:
    return Site(**record.request_data()["site"])


def driven(record: RunRecord) -> bool:
    """Whether some remote-exec process is driving the run right now."""
    return RunLock(record.id).held_elsewhere()


# -- status -------------------------------------------------------------------------------------

@dataclass
class RemoteState:
    """What the run directory says (or why it could not be read)."""

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


async def probe(record: RunRecord) -> RemoteState:
    """Read the run directory's control files on the remote host."""
    if not record.rundir:
        return RemoteState(reachable=True)
    site = record_site(record)
    if record.backend == "fujitsu":
        return await asyncio.to_thread(_probe_fujitsu, record, site)
    try:
        conn = await asyncio.wait_for(open_throttled(site), site.connect_timeout + 5)
    except (RemoteExecError, asyncio.TimeoutError) as exc:
        return RemoteState(reachable=False, error=str(exc).splitlines()[0])
    if record.backend == "agent":
        async with conn:
            answer = await AgentBackend(site.name).status(conn, record.id)
        return RemoteState(reachable=True, exists=bool(answer.get("exists")),
                           exit_code=answer.get("exit_code"), alive=answer.get("alive"))
    async with conn, await shell.open_sftp(conn) as sftp:
        if not await sftp.exists(record.rundir):
            return RemoteState(reachable=True)
        state = RemoteState(reachable=True, exists=True,
                            exit_code=await read_exit_code(sftp, record.rundir))
        backend = make_backend(record.backend, run_id=record.id)
        if isinstance(backend, BatchBackend):
            if record.job_id:
                state.job = backend.describe(await backend.query(conn, record.job_id))
            else:
                state.job = f"no {backend.scheduler.title} job submitted yet"
            return state
        pgid = await read_control(sftp, record.rundir, "pgid")
        if state.exit_code is None and pgid and await sftp.exists("/proc/self"):
            state.alive = await sftp.exists(f"/proc/{pgid}")
        return state


def job_line(record: RunRecord) -> str | None:
    """A batch run's job as last recorded: id, scheduler state and reason, nodes,
    queue wait and run time (None for other runs)."""
    data = record.job_data()
    if not data:
        return None
    from remote_exec.backends.batch import describe_job, scheduler_named
    from remote_exec.backends.scheduler import JobInfo

    try:
        info = JobInfo.from_dict(data)
        if record.backend == "fujitsu":
            from remote_exec.backends.fujitsu.client import describe

            text = describe(info)
            fields = " ".join(f"{k}={v}" for k, v in sorted(info.extra.items()))
            return f"{text}\n          {fields}" if fields else text
        return describe_job(scheduler_named(record.backend), info)
    except (KeyError, ValueError, TypeError):
        return None


def _probe_fujitsu(record: RunRecord, site: Site) -> RemoteState:
    from remote_exec.backends.fujitsu.client import TITLE, FujitsuBackend, describe, job_info

    try:
        backend = FujitsuBackend(site, record.id)
        if not record.job_id:
            return RemoteState(reachable=True, exists=True, job=f"no {TITLE} job submitted yet")
        detail = backend.api.job(record.job_id)
    except RemoteExecError as exc:
        return RemoteState(reachable=False, error=exc.message)
    if detail is None:
        return RemoteState(reachable=True, exists=True,
                           job=f"{TITLE} job {record.job_id}: no longer queued or running")
    info = job_info({**detail, "job_id": record.job_id})
    return RemoteState(reachable=True, exists=True, alive=True, job=describe(info))


# -- logs ---------------------------------------------------------------------------------------

def local_log(record: RunRecord) -> Path | None:
    """The fetched ``remote_program_exec.log`` of a run that came back, if still there."""
    if not record.reached("fetched"):
        return None
    path = Path(record.into_dir) / LOG_NAME
    return path if path.is_file() else None


async def remote_log(record: RunRecord, ui: Reporter, follow: bool) -> None:
    """Print the run's remote log; with ``follow``, until the entrypoint ends.

    If the run directory disappears meanwhile (the run came back and was cleaned
    up), the rest is read from the fetched copy.
    """
    if not record.rundir:
        raise ConfigError(f"run {record.id} has no remote directory yet")
    if record.backend == "fujitsu":
        raise ConfigError(f"run {record.id} runs through the Fujitsu HPC WebAPI: its log "
                          "comes back with its files, after the job",
                          hint=f"`remote-exec status {record.id[:8]}` shows the job meanwhile")
    site = record_site(record)
    path = posixpath.join(record.rundir, LOG_NAME)
    offset = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    conn = await open_throttled(site)
    if record.backend == "agent":
        async with conn:
            agent = AgentBackend(site.name)
            if not (await agent.status(conn, record.id)).get("exists"):
                data = _local_rest(record, 0)
                if not data:
                    raise ConfigError(f"the run directory {site.name}:{record.rundir} is gone",
                                      hint="it was cleaned up and no fetched copy is left")
                ui.log_text(decoder.decode(data, True))
                return
            async def sink(data: bytes) -> None:
                ui.log_text(decoder.decode(data))

            await agent.read_log(conn, record.id, 0, follow, sink)
            ui.log_text(decoder.decode(b"", True))
        return
    async with conn, await shell.open_sftp(conn) as sftp:
        if not await sftp.exists(record.rundir):
            raise ConfigError(f"the run directory {site.name}:{record.rundir} is gone",
                              hint="it was cleaned up; a fetched copy may be in "
                              f"{record.into_dir}/{LOG_NAME}")
        while True:
            ended = await read_exit_code(sftp, record.rundir) is not None
            try:
                async with sftp.open(path, "rb") as f:
                    await f.seek(offset)
                    data = await f.read()
            except asyncssh.SFTPNoSuchFile:
                data = b""
                if not await sftp.exists(record.rundir):  # came back and cleaned up
                    data = _local_rest(record, offset)
                    ended = True
            if data:
                offset += len(data)
                ui.log_text(decoder.decode(data))
            if ended or not follow:
                ui.log_text(decoder.decode(b"", True))
                return
            await asyncio.sleep(0.5)


def _local_rest(record: RunRecord, offset: int) -> bytes:
    """What the fetched copy of the log holds beyond ``offset`` (waits briefly for it)."""
    local = Path(record.into_dir) / LOG_NAME
    for _ in range(40):
        with opened() as journal:
            fresh = journal.get(record.id)
        if fresh is None or fresh.reached("fetched") or fresh.ended:
            break
        time.sleep(0.25)
    try:
        with open(local, "rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""


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
            what, finished = (asyncio.run(_cancel_remote(fresh)) if fresh.rundir
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


async def _cancel_remote(record: RunRecord) -> tuple[str, int | None]:
    """Stop the run remotely: what was done, in words, and the exit code of an
    entrypoint that had ended on its own before the cancel reached it (else None)."""
    site = record_site(record)
    if record.backend == "fujitsu":
        return await _cancel_fujitsu(record, site), None
    conn = await open_throttled(site)
    async with conn:
        backend = make_backend(record.backend, run_id=record.id)
        if isinstance(backend, AgentBackend):
            backend.site = site.name
            if not (await backend.status(conn, record.id)).get("exists"):
                return "the run directory is gone (nothing to stop)", None
            return await backend.cancel(conn, record.rundir or "", site.cancel_grace), None
        async with await shell.open_sftp(conn) as sftp:
            if not await sftp.exists(posixpath.join(record.rundir or "", CONTROL_DIR,
                                                    "cancel.sh")):
                return "the run directory holds no entrypoint (nothing to stop)", None
        if isinstance(backend, BatchBackend):
            return await backend.cancel(conn, record.rundir or "", site.cancel_grace,
                                        job_id=record.job_id), None
        what = await backend.cancel(conn, record.rundir or "", site.cancel_grace)
        async with await shell.open_sftp(conn) as sftp:
            return what, await exit_before_cancel(sftp, record.rundir or "", what)


#: what cancel.sh answers when the entrypoint had ended on its own before it could stop it
ENDED_ON_ITS_OWN = ("already finished", "already gone")


async def exit_before_cancel(sftp: asyncssh.SFTPClient, rundir: str, what: str) -> int | None:
    """The exit code of an entrypoint that ended on its own before a cancel reached it
    (``what`` is cancel.sh's answer), else None. Such a run's results are worth fetching:
    it counts as finished, so ``cleanup`` keeps them and ``resume`` fetches them."""
    if what not in ENDED_ON_ITS_OWN:
        return None
    return await read_exit_code(sftp, rundir)


async def _cancel_fujitsu(record: RunRecord, site: Site) -> str:
    from remote_exec.backends.batch import job_name
    from remote_exec.backends.fujitsu.client import FujitsuBackend

    backend = FujitsuBackend(site, record.id)
    job_id = record.job_id
    if not job_id:  # a submission may have landed before the driver died
        name = job_name(record.id)
        jobs = await asyncio.to_thread(backend.api.jobs)
        job_id = next((str(j.get("job_id")) for j in jobs
                       if str(j.get("job_name")) == name), None)
        if job_id is None:
            return "no job of the run is queued or running"
    done = await asyncio.to_thread(backend.api.cancel, job_id)
    return (f"Cancel a Job {job_id}: cancelled" if done
            else f"Cancel a Job {job_id}: it had already ended (404)")


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
class Leftover:
    path: str
    age_days: float
    state: str  # finished | not launched | running | dead
    verdict: str = ""  # removed | would remove | kept (active) | kept (unfetched)
    #                    | too recent | failed
    note: str = ""  # what removing it destroys (results never fetched), if anything

    @property
    def run_id(self) -> str:
        return posixpath.basename(self.path)


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
    """Remove run directories under the site's root that remote-exec made and no one uses.

    A directory qualifies when its name is a run id, it holds ``.remote-exec/``, it
    is older than ``older_than`` seconds, the journal does not list it as running
    or interrupted, and its entrypoint is not running. One whose results the journal
    has not placed yet (the fetch failed or was cancelled) is kept unless ``force``;
    removing it is recorded in the journal, so ``resume`` says why it cannot.
    """
    from remote_exec.ssh import transfer

    conn = await open_throttled(site)
    if site.restricted:
        async with conn:
            found = await _cleanup_agent(conn, site, older_than, dry_run, ui, guards, force)
        _record_destroyed(found, guards)
        return found
    found: list[Leftover] = []
    async with conn, await shell.open_sftp(conn) as sftp:
        root = site.root
        if root == "~" or root.startswith("~/"):
            root = posixpath.join(await sftp.realpath("."), root[2:])
        now = time.time()
        try:
            entries = [e async for e in sftp.scandir(root)]
        except asyncssh.SFTPError as exc:
            raise ConfigError(f"cannot list the site's root {root}: {exc.reason}") from None
        proc = await sftp.exists("/proc/self")
        for entry in sorted(entries, key=lambda e: str(e.filename)):
            name = str(entry.filename)
            if not UUID_RE.match(name) or entry.attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
                continue
            path = posixpath.join(root, name)
            if not await sftp.isdir(posixpath.join(path, CONTROL_DIR)):
                continue  # not ours
            age = (now - (entry.attrs.mtime or now)) / 86400
            state = await _leftover_state(sftp, path, proc)
            item = Leftover(path=path, age_days=age, state=state)
            found.append(item)
            if _removable(item, guards, older_than, dry_run, force):
                try:
                    await transfer.remove_tree(sftp, path)
                    item.verdict = "removed"
                except asyncssh.SFTPError as exc:
                    item.verdict = "failed"
                    ui.warn(f"could not remove {path}: {exc.reason}")
    _record_destroyed(found, guards)
    return found


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


async def _cleanup_agent(conn: asyncssh.SSHClientConnection, site: Site, older_than: float,
                         dry_run: bool, ui: Reporter, guards: Guards,
                         force: bool) -> list[Leftover]:
    """:func:`cleanup` on a restricted site: the agent lists and removes its runs."""
    agent = AgentBackend(site.name)
    found: list[Leftover] = []
    for run in sorted(await agent.runs(conn), key=lambda r: str(r.get("id"))):
        name = str(run.get("id"))
        age = float(run.get("age_seconds") or 0)
        item = Leftover(path=posixpath.join(site.root, name), age_days=age / 86400,
                        state=str(run.get("state")))
        found.append(item)
        if _removable(item, guards, older_than, dry_run, force):
            try:
                await agent.remove(conn, name)
                item.verdict = "removed"
            except RemoteExecError as err:
                item.verdict = "failed"
                ui.warn(f"could not remove {item.path}: {err.message}")
    return found


async def _leftover_state(sftp: asyncssh.SFTPClient, path: str, proc: bool) -> str:
    if await read_exit_code(sftp, path) is not None:
        return "finished"
    if not await sftp.isdir(posixpath.join(path, CONTROL_DIR, "launched")):
        return "not launched"
    pgid = await read_control(sftp, path, "pgid")
    if pgid and proc:
        return "running" if await sftp.exists(f"/proc/{pgid}") else "dead"
    return "running"  # cannot tell: leave it


def summary(record: RunRecord) -> dict[str, Any]:
    """The record as plain data (for ``--json``)."""
    data = {k: v for k, v in record.__dict__.items() if k != "request"}
    data["job_info"] = record.job_data()
    data["driven"] = driven(record)
    return data
