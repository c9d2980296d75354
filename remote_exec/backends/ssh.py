"""What every backend that reaches the site by SSH and shares its file system does the
same way: the run directory under the site's ``root``, staging and fetching over SFTP
or rsync, removal, the log read over SFTP, and ``cleanup`` of leftovers.

:class:`SshBackend` leaves to its subclasses how the entrypoint is started, waited for
and stopped: :mod:`.direct` (a detached process group on the host) and :mod:`.batch`
(a job of the site's scheduler).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import posixpath
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import asyncssh

from remote_exec import digests
from remote_exec import returns as return_filter
from remote_exec.backends.base import Backend, Leftover, Moved, RemoteState, Run, Trimmed
from remote_exec.backends.site_check import ssh_site_rows
from remote_exec.entrypoint import CANCELLED_MARK, EXIT_CODE_FILE, LAUNCHED_MARK, RUN_ID_RE
from remote_exec.errors import ConfigError, RemoteExecError, StageError
from remote_exec.inputs import CONTROL_DIR, LOG_NAME
from remote_exec.journal import RunRecord, opened
from remote_exec.site.rows import Row
from remote_exec.ssh import cache as site_cache
from remote_exec.ssh import shell, tarfetch, transfer
from remote_exec.ssh.link import Link, open_throttled
from remote_exec.ui import Reporter

#: how much of a followed log is read (and held) at once
LOG_CHUNK = 256 * 1024


async def read_control(sftp: asyncssh.SFTPClient, rundir: str, name: str) -> str | None:
    """The stripped content of ``.remote-exec/NAME``, or None if absent."""
    try:
        async with sftp.open(posixpath.join(rundir, CONTROL_DIR, name), "rb") as f:
            return cast(bytes, await f.read()).decode("utf-8", "replace").strip()
    except asyncssh.SFTPNoSuchFile:
        return None


async def read_exit_code(sftp: asyncssh.SFTPClient, rundir: str) -> int | None:
    """The exit code the wrapper recorded, or None if it has not finished."""
    text = await read_control(sftp, rundir, EXIT_CODE_FILE)
    try:
        return int(text) if text else None
    except ValueError:
        return None


async def resolve_root(sftp: asyncssh.SFTPClient, root: str) -> str:
    """The site's ``root`` with a leading ``~`` made absolute."""
    if root == "~" or root.startswith("~/"):
        return posixpath.join(await sftp.realpath("."), root[2:])
    return root


class OverSsh(Backend):
    """A backend that reaches the site by SSH: a run's steps travel over a
    :class:`~remote_exec.ssh.link.Link`; the commands about recorded runs connect on
    their own (``cleanup``, ``status``…)."""

    link: Link

    async def open(self, ui: Reporter, **how: Any) -> Link:
        self.link = Link(self.site, ui, run_id=self.run_id, **how)
        return self.link

    async def _connect(self) -> asyncssh.SSHClientConnection:
        return await open_throttled(self.site)

    async def _reach(self) -> asyncssh.SSHClientConnection | RemoteState:
        """A connection for ``status``, or the state that says why there is none."""
        try:
            return await asyncio.wait_for(self._connect(), self.site.connect_timeout + 5)
        except (RemoteExecError, asyncio.TimeoutError) as exc:
            return RemoteState(reachable=False, error=str(exc).splitlines()[0])


class SshBackend(OverSsh):
    """A run directory on the SSH host's file system; how the entrypoint runs is the
    subclass's (:meth:`launch`, :meth:`wait`, :meth:`stop`)."""

    def __init__(self, site: Any, run_id: str = "", resources: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(site, run_id, resources, **options)
        self._rsync_cache: dict[str, bool] = {}
        self._uid: int | None = None  # the SSH user's, as the run directory says

    # -- the run directory -------------------------------------------------------------------
    async def create(self, run: Run) -> str:
        sftp = await self.link.sftp()
        if not run.rundir:
            root = await resolve_root(sftp, self.site.root)
            await run.set_rundir(posixpath.join(root, run.run_id))  # before it exists
        try:
            await sftp.mkdir(run.rundir, asyncssh.SFTPAttrs(permissions=0o700))
        except asyncssh.SFTPNoSuchFile:
            raise StageError(
                f"the site's root {posixpath.dirname(run.rundir)} does not exist on "
                f"{self.site.display}",
                hint="create it on the remote host or set another `root` for the site",
            ) from None
        except asyncssh.SFTPError as exc:
            try:
                exists = await sftp.lexists(run.rundir)
            except asyncssh.SFTPError:
                exists = False
            if not (exists and run.retrying):  # a retried mkdir may have landed before
                raise StageError(
                    f"cannot create the run directory {run.rundir}: "
                    + ("it already exists (refusing to reuse it)" if exists else exc.reason),
                    hint=None if exists else "check that the site's root is writable",
                ) from None
        with contextlib.suppress(asyncssh.SFTPFailure):
            await sftp.mkdir(posixpath.join(run.rundir, CONTROL_DIR),
                             asyncssh.SFTPAttrs(permissions=0o700))
        return run.rundir

    async def write_control(self, run: Run, files: dict[str, bytes]) -> None:
        """Write ``.remote-exec/NAME`` files of the run directory."""
        sftp = await self.link.sftp()

        async def write(name: str, data: bytes) -> None:
            async with sftp.open(posixpath.join(run.rundir, CONTROL_DIR, name), "wb") as f:
                await f.write(data)

        await asyncio.gather(*(write(name, data) for name, data in files.items()))

    async def stage(self, run: Run) -> Moved:
        await self.write_control(run, run.request.entrypoint.control_files())
        sftp = await self.link.sftp()
        inputs = run.request.inputs
        size = sum(i.size for i in inputs)
        wanted: list[site_cache.Candidate] = []
        if self.site.cache and inputs:  # (files too small for the cache: none of it)
            wanted = await asyncio.to_thread(site_cache.candidates, inputs, run.rundir,
                                             self.site.cache_min_size)
        cache = await self._open_cache(run) if wanted else None
        placed: list[site_cache.Candidate] = []
        if cache is not None:
            placed = await self._from_cache(run, cache, wanted)
        cached = sum(c.size for c in placed)
        # (a local tree is walked in a thread, and only as far as the choice needs)
        files = await asyncio.to_thread(transfer.count_entries, inputs,
                                        transfer.AUTO_RSYNC_FILES)
        many_small = (self.site.transfer == "auto" and not placed and bool(inputs)
                      and transfer.auto_wants_tar(size, files, self.site.rsync_threshold))
        # (one tar stream needs no rsync: the remote is asked about it only if tar fails)
        method = "tar" if many_small else await self._method(size - cached, files)
        run.ui.progress_start("staging", size - cached)
        try:
            if not inputs:
                pass
            elif many_small and await transfer.stage_tar(await self.link.conn(), inputs,
                                                         run.rundir, run.ui.progress_fn):
                pass
            else:
                if many_small:  # (no tar at one end)
                    method = await self._method(size - cached, files)
                if method == "rsync":  # (placed copies have the inputs' size and time:
                    #                     rsync's quick check leaves them)
                    await transfer.stage_rsync(await self.link.rsh(), inputs, run.rundir,
                                               run.ui.show_progress)
                else:
                    await transfer.stage_sftp(
                        sftp, inputs, run.rundir, run.ui.progress_fn, resume=run.retrying,
                        placed=None if cache is None else {c.target for c in placed})
        except StageError as exc:
            if not run.retrying and not self.link.is_loss(exc):
                with contextlib.suppress(Exception):
                    await transfer.remove_tree(sftp, run.rundir)
            raise
        finally:
            run.ui.progress_stop()
        if cache is not None:  # (beside the run: the copy is checked against the digest,
            #                      so an entrypoint changing its input meanwhile only
            #                      keeps that input out of the cache)
            done = {id(c) for c in placed}
            run.beside(self._into_cache(run, cache, [c for c in wanted
                                                     if c.digest and id(c) not in done]))
        return Moved(method, size=size, cached=cached)

    # -- the site's content cache (remote_exec/ssh/cache.py) ----------------------------------
    async def _open_cache(self, run: Run) -> site_cache.SiteCache | None:
        """The site's cache for this run, or None (with a warning saying why)."""
        try:
            sftp = await self.link.sftp()
            cache = site_cache.SiteCache(await self.link.conn(), sftp,
                                         posixpath.dirname(run.rundir), run.ui)
            self._uid = (await sftp.stat(run.rundir)).uid
            why = await cache.usable(self._uid)
        except (asyncssh.Error, OSError) as exc:
            if self.link.is_loss(exc):
                raise
            why = str(exc)
        if why:
            run.ui.warn(f"the site's content cache is not used: {why}")
            return None
        return cache

    async def _from_cache(self, run: Run, cache: site_cache.SiteCache,
                          wanted: list[site_cache.Candidate]) -> list[site_cache.Candidate]:
        """Place those of ``wanted`` the cache holds (their digests are set on the way):
        the ones placed."""
        try:
            found = await asyncio.to_thread(digests.digests, [c.local for c in wanted])
            for item in wanted:
                item.digest = found[item.local]
            return await cache.place(await cache.lookup(wanted), run.rundir)
        except (asyncssh.Error, OSError, site_cache.CacheError) as exc:
            if self.link.is_loss(exc):
                raise
            run.ui.warn(f"the site's content cache is not used: {exc}")
            return []

    async def _into_cache(self, run: Run, cache: site_cache.SiteCache,
                          staged: list[site_cache.Candidate]) -> None:
        """Add the cacheable inputs just sent to the cache, then trim it (beside the
        run's next steps: a failure, a lost link included, is a warning)."""
        try:
            if staged:
                await cache.insert(staged, run.rundir, run.run_id, self._uid)
            await cache.trim(self.site.cache_size, self.site.cache_max_age)
        except (asyncssh.Error, OSError, site_cache.CacheError) as exc:
            run.ui.warn(f"could not update the site's content cache: {exc}")

    async def fetch(self, run: Run, partial: Path) -> Moved:
        """Fetch by one tar stream, rsync or SFTP what the template and the site return,
        but the inputs the entrypoint left unchanged."""
        sftp = await self.link.sftp()
        site, returns = self.site, run.request.returns
        keep = None
        if not return_filter.is_trivial(returns, site.never_return, site.only_return):
            keep = return_filter.predicate(returns, site.never_return, site.only_return)
        # (inputs of many entries: the run directory holds more, and find lists it at once)
        many = await asyncio.to_thread(transfer.count_entries, run.request.inputs,
                                       transfer.MANY_ENTRIES) > transfer.MANY_ENTRIES
        entries = await self.list_rundir(run.rundir, many=many)
        run.remote_entries = len(entries)
        plan = transfer.plan_fetch(entries, keep, run.request.inputs)
        del entries  # (what the plan left out, unchanged inputs mostly, need not stay)
        if plan.unchanged:
            run.ui.event("unchanged", f"{plan.unchanged} input file(s) came back unchanged: "
                         "not transferred", unchanged=plan.unchanged)
        # (what an interrupted tar fetch left: never placed, whatever fetches now)
        await asyncio.to_thread(tarfetch.clear_tmp, partial)
        method = await self._method(plan.size, len(plan.entries), tar=True)
        run.fetch_total = plan.size
        run.ui.progress_start("fetching", plan.size)
        try:
            if method == "tar":
                if not await tarfetch.fetch_tar(await self.link.conn(), run.rundir, partial,
                                                run.ui.progress_fn, plan.entries):
                    self._rsync_cache["tar"] = False
                    method = await self._method(plan.size, len(plan.entries))
                    run.ui.event("no-tar", f"no usable tar on {site.display}: fetching by "
                                 f"{method} instead", method=method)
            if method == "rsync":
                await transfer.fetch_rsync(await self.link.rsh(), run.rundir, partial,
                                           run.ui.show_progress, plan)
            elif method == "sftp":
                await transfer.fetch_sftp(sftp, run.rundir, partial, run.ui.progress_fn, plan)
        finally:
            run.ui.progress_stop()
        return Moved(method, size=plan.size, skipped=list(plan.skipped))

    async def list_rundir(self, rundir: str, many: bool = False) -> transfer.Entries:
        """The run directory's entries: over SFTP, or by one remote ``find`` when it holds
        many (see transfer.MANY_ENTRIES; with ``many``, known to: no SFTP walk first)."""
        sftp = await self.link.sftp()
        entries = None
        if not many:
            entries = await transfer.walk_remote(sftp, rundir, limit=transfer.MANY_ENTRIES)
        if entries is None:
            entries = await transfer.list_remote(await self.link.conn(), rundir)
        if entries is None:
            entries = await transfer.walk_remote(sftp, rundir)
        assert entries is not None
        return entries

    async def remove(self, run: Run) -> bool:
        many = (run.remote_entries or 0) > transfer.MANY_ENTRIES
        try:
            if not (many and await transfer.remove_by_command(await self.link.conn(),
                                                              run.rundir)):
                await transfer.remove_tree(await self.link.sftp(), run.rundir)
        except asyncssh.SFTPNoSuchFile:
            return True
        except asyncssh.SFTPError as exc:
            run.ui.warn(f"could not remove {run.rundir} on {self.site.name}: {exc}")
            return False
        return True

    async def _method(self, size: int, files: int, tar: bool = False) -> str:
        """The method for ``files`` entries of ``size`` bytes (see transfer.choose_method);
        with ``tar`` (a fetch), ``tar`` for many small files under ``transfer: auto``
        (:func:`transfer.auto_wants_tar`; rsync or not: README *Measured*) unless the
        remote was found to have no usable tar. Choosing tar asks the remote nothing."""
        if (tar and self.site.transfer == "auto" and self._rsync_cache.get("tar", True)
                and transfer.auto_wants_tar(size, files, self.site.rsync_threshold)):
            return "tar"
        return await transfer.choose_method(
            await self.link.conn(), self.site.transfer, size, self.site.rsync_threshold,
            self._rsync_cache, files=files)

    # -- while it runs -----------------------------------------------------------------------
    async def follow_log(self, run: Run, stop: asyncio.Event) -> None:
        await follow_sftp_log(self.link.open_sftp, run.rundir, run.ui, stop)

    async def cancelled_remotely(self, run: Run) -> bool:
        return await read_control(await self.link.sftp(), run.rundir, CANCELLED_MARK) is not None

    async def poll(self, run: Run) -> int | None:
        """The exit code the wrapper recorded, or None (raises RemoteLostError when the
        entrypoint vanished without one, where that can be told)."""
        return await read_exit_code(await self.link.sftp(), run.rundir)

    # -- commands about recorded runs --------------------------------------------------------
    async def probe(self, record: RunRecord) -> RemoteState:
        conn = await self._reach()
        if isinstance(conn, RemoteState):
            return conn
        async with conn, await shell.open_sftp(conn) as sftp:
            rundir = record.rundir or ""
            if not await sftp.exists(rundir):
                return RemoteState(reachable=True)
            state = RemoteState(reachable=True, exists=True,
                                exit_code=await read_exit_code(sftp, rundir))
            await self.probe_more(conn, sftp, record, state)
            return state

    async def probe_more(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                         record: RunRecord, state: RemoteState) -> None:
        """What the subclass adds to ``status``'s remote line (the process, the job)."""

    async def read_log(self, record: RunRecord, ui: Reporter, follow: bool) -> None:
        rundir = record.rundir or ""
        path = posixpath.join(rundir, LOG_NAME)
        offset = 0
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        conn = await self._connect()
        async with conn, await shell.open_sftp(conn) as sftp:
            if not await sftp.exists(rundir):
                raise ConfigError(f"the run directory {self.site.name}:{rundir} is gone",
                                  hint="it was cleaned up; a fetched copy may be in "
                                  f"{record.into_dir}/{LOG_NAME}")
            while True:
                ended = await read_exit_code(sftp, rundir) is not None
                try:
                    async with sftp.open(path, "rb") as f:
                        await f.seek(offset)
                        data = await f.read()
                except asyncssh.SFTPNoSuchFile:
                    data = b""
                    if not await sftp.exists(rundir):  # came back and cleaned up
                        data = local_log_rest(record, offset)
                        ended = True
                if data:
                    offset += len(data)
                    ui.log_text(decoder.decode(data))
                if ended or not follow:
                    ui.log_text(decoder.decode(b"", True))
                    return
                await asyncio.sleep(0.5)

    async def cancel_recorded(self, record: RunRecord) -> tuple[str, int | None]:
        rundir = record.rundir or ""
        conn = await self._connect()
        async with conn:
            async with await shell.open_sftp(conn) as sftp:
                if not await sftp.exists(posixpath.join(rundir, CONTROL_DIR, "cancel.sh")):
                    return "the run directory holds no entrypoint (nothing to stop)", None
            what = await self.stop_at(conn, rundir, record.job_id)
            async with await shell.open_sftp(conn) as sftp:
                return what, await self.ended_before(sftp, rundir, what)

    async def stop(self, run: Run) -> str:
        conn = await asyncio.wait_for(self.link.conn(), self.site.connect_timeout)
        return await self.stop_at(conn, run.rundir, run.job_id)

    async def stop_at(self, conn: asyncssh.SSHClientConnection, rundir: str,
                      job_id: str | None) -> str:
        """Stop the entrypoint of ``rundir`` on ``conn``; what was done, in words."""
        raise NotImplementedError

    async def ended_before(self, sftp: asyncssh.SFTPClient, rundir: str,
                           what: str) -> int | None:
        """The exit code of an entrypoint that had ended before the stop reached it."""
        return None

    async def exit_before_cancel(self, run: Run, what: str) -> int | None:
        sftp = await asyncio.wait_for(self.link.sftp(), self.site.connect_timeout)
        return await self.ended_before(sftp, run.rundir, what)

    async def cleanup_runs(self, decide: Callable[[Leftover], bool],
                           ui: Reporter) -> list[Leftover]:
        found: list[Leftover] = []
        conn = await self._connect()
        async with conn, await shell.open_sftp(conn) as sftp:
            root = await resolve_root(sftp, self.site.root)
            now = time.time()
            try:
                entries = [e async for e in sftp.scandir(root)]
            except asyncssh.SFTPError as exc:
                raise ConfigError(f"cannot list the site's root {root}: {exc.reason}") from None
            proc = await sftp.exists("/proc/self")
            for entry in sorted(entries, key=lambda e: str(e.filename)):
                name = str(entry.filename)
                if not RUN_ID_RE.fullmatch(name) \
                        or entry.attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
                    continue
                path = posixpath.join(root, name)
                if not await sftp.isdir(posixpath.join(path, CONTROL_DIR)):
                    continue  # not ours
                age = (now - (entry.attrs.mtime or now)) / 86400
                item = Leftover(path=path, age_days=age,
                                state=await self.leftover_state(sftp, path, proc))
                found.append(item)
                if decide(item):
                    try:  # a leftover may be large: one rm -rf, SFTP if that fails
                        if not await transfer.remove_by_command(conn, path):
                            await transfer.remove_tree(sftp, path)
                        item.verdict = "removed"
                    except asyncssh.SFTPError as exc:
                        item.verdict = "failed"
                        ui.warn(f"could not remove {path}: {exc.reason}")
        return found

    async def trim_cache(self, older_than: float | None, dry_run: bool,
                         ui: Reporter) -> list[Trimmed]:
        conn = await self._connect()
        async with conn, await shell.open_sftp(conn) as sftp:
            cache = site_cache.SiteCache(conn, sftp, await resolve_root(sftp, self.site.root),
                                         ui)
            why = await cache.usable(None)
            if why:
                ui.warn(f"the site's content cache is left alone: {why}")
            if why or not cache.present:
                return []
            max_age = self.site.cache_max_age
            if older_than is not None:
                max_age = min(max_age, older_than)
            return await cache.trim(self.site.cache_size, max_age, dry_run=dry_run)

    async def leftover_state(self, sftp: asyncssh.SFTPClient, path: str, proc: bool) -> str:
        """finished | not launched | running | dead (when it can be told)."""
        if await read_exit_code(sftp, path) is not None:
            return "finished"
        if not await sftp.isdir(posixpath.join(path, CONTROL_DIR, LAUNCHED_MARK)):
            return "not launched"
        return "running"  # cannot tell: leave it

    async def check(self) -> list[Row]:
        return await ssh_site_rows(self.site, self.check_more)

    async def check_more(self, conn: asyncssh.SSHClientConnection) -> list[Row]:
        """Rows the subclass adds to ``site check`` (its scheduler)."""
        return []


async def follow_sftp_log(get_sftp: Callable[[], Awaitable[asyncssh.SFTPClient]], rundir: str,
                          ui: Reporter, stop: asyncio.Event, interval: float = 0.25) -> None:
    """Stream ``remote_program_exec.log`` as it grows until ``stop`` is set (then drain).

    Errors (a dropped connection) are ignored: the next tick asks for the SFTP
    client again, which the run's link reopens.
    """
    path = posixpath.join(rundir, LOG_NAME)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = 0
    while True:
        finishing = stop.is_set()
        with contextlib.suppress(OSError, asyncssh.Error):  # (no log yet, a dropped link)
            sftp = await get_sftp()
            async with sftp.open(path, "rb") as f:
                await f.seek(offset)
                while chunk := cast(bytes, await f.read(LOG_CHUNK)):
                    offset += len(chunk)
                    ui.log_text(decoder.decode(chunk))
                    await ui.drain()  # a reader that lags slows this loop
        if finishing:
            ui.log_text(decoder.decode(b"", True))
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def local_log_rest(record: RunRecord, offset: int) -> bytes:
    """What the fetched copy of the log holds beyond ``offset`` (waits briefly for it:
    the run may be placing its results right now)."""
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
