"""The ``direct`` backend: the entrypoint runs as a detached process on the SSH host.

``launch.sh`` (see :mod:`remote_exec.entrypoint`) starts the wrapper in its own
session and process group, so it survives a dropped connection, and then waits
for it on the exec channel: a short run needs no polling at all. After a
reconnect the exit code is polled from ``.remote-exec/exit_code`` over SFTP.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import posixpath
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import asyncssh

from remote_exec.entrypoint import ALREADY_LAUNCHED, control_argv
from remote_exec.errors import RemoteLostError, StageError
from remote_exec.inputs import CONTROL_DIR, LOG_NAME
from remote_exec.ssh import shell
from remote_exec.ui import Reporter


@dataclass
class Launched:
    """A started entrypoint: its job id (the process group) and, if this process
    started it, the channel that ends when it does."""

    job_id: str | None
    channel: asyncssh.SSHClientProcess | None = None
    before: bool = False  # it had been launched by an earlier attempt


class DirectBackend:
    """Run the entrypoint on the SSH host itself."""

    name = "direct"

    async def launch(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                     rundir: str) -> Launched:
        started = await shell.start(conn, shell.EXEC_ARGS, *control_argv(rundir, "launch.sh"),
                                    stdin=asyncssh.DEVNULL)
        process = started.process
        line = cast(str, await process.stdout.readline()) if started.framed else ""
        if line.startswith("started "):
            return Launched(job_id=line.split()[1], channel=process)
        await process.wait_closed()
        if process.exit_status is None and conn.is_closed():
            raise asyncssh.ConnectionLost("the connection closed while launching")
        pgid = await read_control(sftp, rundir, "pgid")
        if process.exit_status == ALREADY_LAUNCHED or pgid:
            # launched, by an earlier attempt or by this one whose answer got lost: wait
            # for that process; never start the entrypoint a second time
            return Launched(job_id=pgid, before=True)
        err = cast(str, await process.stderr.read()) if started.framed else started.banner_err
        raise StageError(
            f"could not launch the entrypoint (launch.sh exit {process.exit_status}): "
            f"{str(err).strip()[-500:]}",
            hint=f"look at {rundir}/{CONTROL_DIR} on the remote host; /bin/sh must exist there",
        )

    async def poll(self, sftp: asyncssh.SFTPClient, rundir: str,
                   job_id: str | None) -> int | None:
        code = await read_exit_code(sftp, rundir)
        if code is not None or not job_id:
            return code
        if await sftp.exists("/proc/self") and not await sftp.exists(f"/proc/{job_id}"):
            code = await read_exit_code(sftp, rundir)  # it may have ended just now
            if code is None:
                raise RemoteLostError(
                    f"the entrypoint's process group {job_id} is gone and left no exit code "
                    "(was the remote host rebooted, or the process killed with KILL?)",
                    hint=f"look at {rundir}/{LOG_NAME} on the remote host",
                )
        return code

    async def cancel(self, conn: asyncssh.SSHClientConnection, rundir: str,
                     grace: float) -> str:
        result = await shell.run_argv(conn, control_argv(rundir, "cancel.sh", int(grace)))
        return result.stdout.strip() or f"cancel.sh exit {result.exit_status}"


async def read_control(sftp: asyncssh.SFTPClient, rundir: str, name: str) -> str | None:
    """The stripped content of ``.remote-exec/NAME``, or None if absent."""
    try:
        async with sftp.open(posixpath.join(rundir, CONTROL_DIR, name), "rb") as f:
            return cast(bytes, await f.read()).decode("utf-8", "replace").strip()
    except asyncssh.SFTPNoSuchFile:
        return None


async def read_exit_code(sftp: asyncssh.SFTPClient, rundir: str) -> int | None:
    """The exit code the wrapper recorded, or None if it has not finished."""
    text = await read_control(sftp, rundir, "exit_code")
    try:
        return int(text) if text else None
    except ValueError:
        return None



#: how much of a followed log is read (and held) at once
LOG_CHUNK = 256 * 1024


async def follow_log(get_sftp: Callable[[], Awaitable[asyncssh.SFTPClient]], rundir: str,
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
