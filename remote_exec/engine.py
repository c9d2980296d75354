"""The steps of one run over a single SSH connection: create, stage, launch, fetch, clean.

    planned -> staged -> launched -> finished(exit code) -> fetched -> cleaned
                                ↘ failed(reason)

``execute`` walks that life; each step is a small function below so the order is
visible in one place. Everything that talks to the remote host goes through the
one connection opened in ``execute``: SFTP (no remote shell) for directories and
small files, rsync tunnelled through the same connection for large payloads, and
one exec request for the entrypoint.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Awaitable, Callable

import asyncssh

from remote_exec import localfs
from remote_exec.backends import BACKENDS
from remote_exec.config import Site
from remote_exec.errors import ConnectError, RemoteExecError, StageError, StaleConnectionError
from remote_exec.inputs import CONTROL_DIR
from remote_exec.run import RunRequest, RunResult
from remote_exec.ssh import transfer
from remote_exec.ssh.connect import open_connection
from remote_exec.ssh.rsync import rsync_tunnel
from remote_exec.ui import Reporter

#: opens the rsync tunnel on first use and returns rsync's ``--rsh`` value
RshFactory = Callable[[], Awaitable[str]]


async def execute_async(request: RunRequest, ui: Reporter,
                        conn: asyncssh.SSHClientConnection | None = None) -> RunResult:
    """Run ``request``; on ``conn`` if given (left open), else on a connection of its own."""
    site = request.site
    async with contextlib.AsyncExitStack() as owned:
        reused = conn is not None
        if conn is None:
            conn = await owned.enter_async_context(await open_connection(site))
        try:
            sftp = await conn.start_sftp_client()
        except (OSError, asyncssh.Error) as exc:
            error = StaleConnectionError if reused else ConnectError
            raise error(f"{site.display}: cannot open a session: {exc}",
                        hint="sshd may limit sessions per connection (MaxSessions)",
                        retryable=True) from None
        async with sftp:
            rundir = await _create_rundir(sftp, site, request.run_id)
            ui.event("created", f"run {request.run_id} on {site.name}: {rundir}",
                     run_id=request.run_id, rundir=rundir, site=site.name)
            rsync_cache: dict[str, bool] = {}
            async with contextlib.AsyncExitStack() as stack:
                tunnel: list[str] = []

                async def rsh() -> str:
                    if not tunnel:
                        tunnel.append(await stack.enter_async_context(rsync_tunnel(conn)))
                    return tunnel[0]

                try:
                    stage_method = await _stage(conn, sftp, request, rundir, ui, rsync_cache, rsh)
                except StageError:
                    with contextlib.suppress(Exception):
                        await transfer.remove_tree(sftp, rundir)
                    raise
                ui.event("launched", f"running {request.entrypoint.label}", run_id=request.run_id)
                backend = BACKENDS[request.backend]()
                exit_code = await backend.run(conn, sftp, rundir, ui, request.follow)
                ui.event("finished", f"entrypoint exited with {exit_code}",
                         run_id=request.run_id, exit_code=exit_code)
                fetched, fetch_method, skipped = await _fetch(
                    conn, sftp, request, rundir, ui, rsync_cache, rsh
                )
            kept = await _cleanup(sftp, site, request, rundir, exit_code, ui)
    return RunResult(
        run_id=request.run_id, rundir=rundir, exit_code=exit_code, fetched=fetched,
        remote_kept=kept, stage_method=stage_method, fetch_method=fetch_method, skipped=skipped,
    )


async def _create_rundir(sftp: asyncssh.SFTPClient, site: Site, run_id: str) -> str:
    """Make ``<root>/<uuid>`` (mode 700) and its control directory; refuse an existing one."""
    root = site.root
    if root == "~" or root.startswith("~/"):
        root = posixpath.join(await sftp.realpath("."), root[2:])
    rundir = posixpath.join(root, run_id)
    try:
        await sftp.mkdir(rundir, asyncssh.SFTPAttrs(permissions=0o700))
    except asyncssh.SFTPNoSuchFile:
        raise StageError(
            f"the site's root {root} does not exist on {site.display}",
            hint="create it on the remote host or set another `root` for the site",
        ) from None
    except asyncssh.SFTPError as exc:
        exists = await _exists(sftp, rundir)
        raise StageError(
            f"cannot create the run directory {rundir}: "
            + ("it already exists (refusing to reuse it)" if exists else exc.reason),
            hint="check that the site's root is writable" if not exists else None,
        ) from None
    await sftp.mkdir(posixpath.join(rundir, CONTROL_DIR), asyncssh.SFTPAttrs(permissions=0o700))
    return rundir


async def _exists(sftp: asyncssh.SFTPClient, path: str) -> bool:
    try:
        await sftp.lstat(path)
        return True
    except asyncssh.SFTPError:
        return False


async def _stage(conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                 request: RunRequest, rundir: str, ui: Reporter,
                 rsync_cache: dict[str, bool], rsh: RshFactory) -> str:
    """Write the control files, then copy the inputs; returns the method used."""
    for name, data in request.entrypoint.control_files().items():
        async with sftp.open(posixpath.join(rundir, CONTROL_DIR, name), "wb") as f:
            await f.write(data)
    inputs = request.inputs
    size = sum(i.size for i in inputs)
    method = await transfer.choose_method(
        conn, request.site.transfer, size, request.site.rsync_threshold, rsync_cache
    )
    ui.progress_start("staging", size)
    try:
        if not inputs:
            pass
        elif method == "rsync":
            await transfer.stage_rsync(await rsh(), inputs, rundir, ui.show_progress)
        else:
            await transfer.stage_sftp(sftp, inputs, rundir, ui.progress_fn)
    finally:
        ui.progress_stop()
    ui.event("staged", f"staged {len(inputs)} input(s), {size} bytes, by {method}",
             inputs=[i.name for i in inputs], bytes=size, method=method)
    return method


async def _fetch(conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                 request: RunRequest, rundir: str, ui: Reporter,
                 rsync_cache: dict[str, bool], rsh: RshFactory) -> tuple[list[str], str, list[str]]:
    """Pull the run directory into a partial directory beside the destination, then place it."""
    size = await transfer.remote_size(sftp, rundir)
    method = await transfer.choose_method(
        conn, request.site.transfer, size, request.site.rsync_threshold, rsync_cache
    )
    partial = localfs.partial_dir(request.into, request.run_id)
    ui.progress_start("fetching", size)
    try:
        if method == "rsync":
            report = await transfer.fetch_rsync(await rsh(), rundir, partial, ui.show_progress)
        else:
            report = await transfer.fetch_sftp(sftp, rundir, partial, ui.progress_fn)
    except RemoteExecError:
        localfs.discard(partial)
        raise
    finally:
        ui.progress_stop()
    placed = localfs.place(partial, request.into)
    for skipped in report.skipped:
        ui.warn(f"not fetched: {skipped}")
    ui.event("fetched", f"fetched {len(placed)} item(s), {size} bytes, by {method} "
             f"into {request.into}", fetched=placed, bytes=size, method=method)
    return placed, method, report.skipped


async def _cleanup(sftp: asyncssh.SFTPClient, site: Site, request: RunRequest, rundir: str,
                   exit_code: int, ui: Reporter) -> bool:
    """Remove the remote directory per policy; returns whether it was kept."""
    policy = site.cleanup
    remove = (policy == "always") or (policy == "on-success" and exit_code == 0)
    if request.keep or not remove:
        why = "--keep" if request.keep else ("the entrypoint failed" if exit_code else policy)
        ui.event("kept", f"remote directory kept ({why}): {site.name}:{rundir}", rundir=rundir)
        return True
    try:
        await transfer.remove_tree(sftp, rundir)
    except (OSError, asyncssh.SFTPError) as exc:
        ui.warn(f"could not remove {rundir} on {site.name}: {exc}")
        return True
    ui.event("cleaned", f"removed {rundir}", rundir=rundir)
    return False
