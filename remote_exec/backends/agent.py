"""The ``agent`` backend: a restricted site, where the key runs only the remote-exec agent.

The site administrator installed ``remote-side_scripts/remote_exec_agent.py`` as the
forced command of the key (``remote-exec site install``); every step of a run is a
request to it (:mod:`.agent_protocol`), which it checks against the allowlist file
the administrator owns: no SFTP, no shell. Files move with rsync, which the agent
confines to the run's directory; a fetch is served from an outbox that holds only
what the site lets go.

The site's content cache lives with the agent (``<root>/.remote-exec-cache``): before
rsync the client lists the inputs it could take from there (name, size, sha256, time)
and the agent copies and verifies those it holds (``cache-place``); rsync's quick check
then leaves them. After rsync the agent adds the run's new inputs to the cache,
verifying each, and trims it (``cache-insert``). The client never names a cache path.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import posixpath
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh

from remote_exec import digests
from remote_exec.backends.agent_protocol import (
    MARK_WORD,
    REFUSED,
    AgentClient,
    AgentRefused,
    agent_request,
    agent_rsync,
)
from remote_exec.backends.base import Launched, Leftover, Moved, RemoteState, Run, Trimmed
from remote_exec.backends.site_check import ssh_site_rows
from remote_exec.backends.ssh import OverSsh, local_log_rest
from remote_exec.entrypoint import KILLED, TERMINATED
from remote_exec.errors import ConfigError, RemoteExecError, StageError
from remote_exec.journal import RunRecord
from remote_exec.localfs import tree_size
from remote_exec.site.rows import Row
from remote_exec.ssh.cache import Candidate, candidates
from remote_exec.ui import Reporter

__all__ = ["MARK_WORD", "REFUSED", "AgentBackend", "AgentClient", "AgentRefused",
           "agent_request", "agent_rsync"]


class AgentBackend(OverSsh):
    """Every remote step of a run on a restricted site, through the agent."""

    name = "agent"

    def __init__(self, site: Any, run_id: str = "", resources: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(site, run_id, resources, **options)
        self.agent = AgentClient(site.name)

    # -- a run's steps -----------------------------------------------------------------------
    async def create(self, run: Run) -> str:
        rundir = await self.agent.create(await self.link.conn(), run.run_id, run.retrying)
        await run.set_rundir(rundir)
        return rundir

    async def stage(self, run: Run) -> Moved:
        inputs = run.request.inputs
        wanted: list[Candidate] = []
        if self.site.cache and inputs:
            wanted = await asyncio.to_thread(candidates, inputs, run.rundir,
                                             self.site.cache_min_size)
        placed = await self._from_cache(run, wanted) if wanted else set()
        try:
            await self.agent.stage(await self.link.rsh(agent_rsync), inputs, run.run_id,
                                   run.ui.show_progress)
        except StageError as exc:
            if not run.retrying and not self.link.is_loss(exc):
                with contextlib.suppress(Exception):
                    await self.agent.remove(await self.link.conn(), run.run_id)
            raise
        if wanted and placed is not None:
            await self._cache_step(run, "could not update the site's content cache",
                                   self.agent.cache_insert, run.run_id,
                                   self._cache_files(run, wanted, placed),
                                   self.site.cache_size, self.site.cache_max_age)
        return Moved("rsync", "by rsync (confined by the site's agent)",
                     size=sum(i.size for i in inputs),
                     cached=sum(c.size for c in wanted if c.target in (placed or ())))

    # -- the site's content cache, kept by the agent --------------------------------------
    async def _from_cache(self, run: Run, wanted: list[Candidate]) -> set[str] | None:
        """Have the agent place those of ``wanted`` its cache holds (their digests are
        set on the way): the targets placed, or None when the cache is not used."""
        try:
            found = await asyncio.to_thread(digests.digests, [c.local for c in wanted])
        except OSError as exc:
            run.ui.warn(f"the site's content cache is not used: {exc}")
            return None
        for item in wanted:
            item.digest = found[item.local]
        answer = await self._cache_step(run, "the site's content cache is not used",
                                        self.agent.cache_place, run.run_id,
                                        self._cache_files(run, wanted, set()))
        if answer is None:
            return None
        names = set(answer.get("placed") or ())
        for entry in answer.get("changed") or ():
            run.ui.warn(f"the site's cache entry {entry} no longer held what its name says: "
                        "removed, the file is sent")
        return {c.target for c in wanted if self._name(run, c) in names}

    @staticmethod
    def _name(run: Run, item: Candidate) -> str:
        return posixpath.relpath(item.target, run.rundir)

    def _cache_files(self, run: Run, wanted: list[Candidate],
                     leave: set[str]) -> list[dict[str, Any]]:
        """The request's list: ``wanted`` but those in ``leave``, once per name."""
        files = {self._name(run, c): {"name": self._name(run, c), "size": c.size,
                                      "sha256": c.digest, "mtime_ns": c.mtime_ns}
                 for c in wanted if c.target not in leave}
        return list(files.values())

    async def _cache_step(self, run: Run, failed: str,
                          step: Callable[..., Awaitable[dict[str, Any]]],
                          *args: Any) -> dict[str, Any] | None:
        """One cache request to the agent: its answer, or None (with a warning) when the
        cache is not used: off on the site, or a failure that does not end the run."""
        try:
            answer = await step(await self.link.conn(), *args)
        except (RemoteExecError, asyncssh.Error, OSError) as exc:
            if self.link.is_loss(exc):
                raise
            run.ui.warn(f"{failed}: {getattr(exc, 'message', None) or exc}")
            return None
        if not answer.get("enabled"):
            if answer.get("why"):
                run.ui.warn(f"{failed}: {answer['why']}")
            return None
        return answer

    async def launch(self, run: Run) -> Launched:
        entry = run.request.entrypoint
        return await self.agent.launch(await self.link.conn(), run.run_id, entry.text,
                                       entry.params)

    async def wait(self, run: Run, launched: Launched | None) -> int:
        if launched is not None and launched.channel is not None:
            channel, launched.channel = launched.channel, None  # after a reconnect: `wait`
            try:
                await channel.wait_closed()
            finally:
                channel.close()
            status = channel.exit_status
            if status is not None and status >= 0:
                return int(status)  # the agent's launch ends with the entrypoint's code
            if (await self.link.conn()).is_closed():
                raise asyncssh.ConnectionLost("the connection closed while waiting")
        return await self.agent.wait(await self.link.conn(), run.run_id)

    async def follow_log(self, run: Run, stop: asyncio.Event) -> None:
        await follow_agent_log(self.agent, self.link.conn, run.run_id, run.ui, stop)

    async def cancelled_remotely(self, run: Run) -> bool:
        if run.exit_code not in (KILLED, TERMINATED):  # what a cancel leaves: spare an exec
            return False
        status = await self.agent.status(await self.link.conn(), run.run_id)
        return bool(status.get("cancelled"))

    async def fetch(self, run: Run, partial: Path) -> Moved:
        """The agent applies the site's return filter itself."""
        report = await self.agent.fetch(await self.link.rsh(agent_rsync), run.run_id, partial,
                                        run.ui.show_progress)
        return Moved(report.method, size=await asyncio.to_thread(tree_size, partial))

    async def remove(self, run: Run) -> bool:
        await self.agent.remove(await self.link.conn(), run.run_id)
        return True

    async def stop(self, run: Run) -> str:
        conn = await asyncio.wait_for(self.link.conn(), self.site.connect_timeout)
        return await self.agent.cancel(conn, run.run_id, self.site.cancel_grace)

    # -- commands about recorded runs --------------------------------------------------------
    async def probe(self, record: RunRecord) -> RemoteState:
        conn = await self._reach()
        if isinstance(conn, RemoteState):
            return conn
        async with conn:
            answer = await self.agent.status(conn, record.id)
        return RemoteState(reachable=True, exists=bool(answer.get("exists")),
                           exit_code=answer.get("exit_code"), alive=answer.get("alive"))

    async def read_log(self, record: RunRecord, ui: Reporter, follow: bool) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async with await self._connect() as conn:
            if not (await self.agent.status(conn, record.id)).get("exists"):
                data = local_log_rest(record, 0)
                if not data:
                    raise ConfigError(f"the run directory {self.site.name}:{record.rundir} "
                                      "is gone", hint="it was cleaned up and no fetched copy "
                                      "is left")
                ui.log_text(decoder.decode(data, True))
                return

            async def sink(data: bytes) -> None:
                ui.log_text(decoder.decode(data))

            await self.agent.read_log(conn, record.id, 0, follow, sink)
            ui.log_text(decoder.decode(b"", True))

    async def cancel_recorded(self, record: RunRecord) -> tuple[str, int | None]:
        async with await self._connect() as conn:
            if not (await self.agent.status(conn, record.id)).get("exists"):
                return "the run directory is gone (nothing to stop)", None
            return await self.agent.cancel(conn, record.id, self.site.cancel_grace), None

    async def cleanup_runs(self, decide: Callable[[Leftover], bool],
                           ui: Reporter) -> list[Leftover]:
        """The agent lists and removes its runs."""
        found: list[Leftover] = []
        async with await self._connect() as conn:
            for run in sorted(await self.agent.runs(conn), key=lambda r: str(r.get("id"))):
                name = str(run.get("id"))
                age = float(run.get("age_seconds") or 0)
                item = Leftover(path=posixpath.join(self.site.root, name), name=name,
                                age_days=age / 86400, state=str(run.get("state")))
                found.append(item)
                if decide(item):
                    try:
                        await self.agent.remove(conn, name)
                        item.verdict = "removed"
                    except RemoteExecError as err:
                        item.verdict = "failed"
                        ui.warn(f"could not remove {item.path}: {err.message}")
        return found

    async def trim_cache(self, older_than: float | None, dry_run: bool,
                         ui: Reporter) -> list[Trimmed]:
        """The agent trims its content cache (as an open site's is trimmed)."""
        max_age = self.site.cache_max_age
        if older_than is not None:
            max_age = min(max_age, older_than)
        async with await self._connect() as conn:
            try:
                answer = await self.agent.cache_trim(conn, self.site.cache_size, max_age,
                                                     dry_run)
            except (ConfigError, AgentRefused) as exc:  # (an agent older than the cache)
                ui.warn(f"the site's content cache is left alone: {exc.message}")
                return []
        if not answer.get("enabled"):
            if answer.get("why"):
                ui.warn(f"the site's content cache is left alone: {answer['why']}")
            return []
        return [Trimmed(str(t["path"]), int(t["size"]), str(t["why"]), str(t["verdict"]))
                for t in answer.get("trimmed") or ()]

    async def check(self) -> list[Row]:
        async def nothing(conn: asyncssh.SSHClientConnection) -> list[Row]:
            return []
        return await ssh_site_rows(self.site, nothing)


async def follow_agent_log(backend: AgentClient,
                     get_conn: Callable[[], Awaitable[asyncssh.SSHClientConnection]],
                     run_id: str, ui: Reporter, stop: asyncio.Event,
                     interval: float = 0.5) -> None:
    """Stream the log while the run lasts (``log --follow`` ends when the run does),
    reopening after a dropped connection; after ``stop``, drain for up to 5 s."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = 0

    async def sink(data: bytes) -> None:
        nonlocal offset
        offset += len(data)
        ui.log_text(decoder.decode(data))
        await ui.drain()

    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            try:
                conn = await get_conn()
                reading = asyncio.ensure_future(
                    backend.read_log(conn, run_id, offset, True, sink))
                await asyncio.wait({reading, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    await asyncio.wait({reading}, timeout=5)
                if not reading.done():
                    reading.cancel()
                    with contextlib.suppress(BaseException):
                        await reading
                    return
                reading.result()
                return
            except (OSError, asyncssh.Error, RemoteExecError):
                if stop.is_set():
                    return
                await asyncio.wait({stopper}, timeout=interval)
    finally:
        stopper.cancel()
        ui.log_text(decoder.decode(b"", True))
