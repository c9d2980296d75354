"""The ``direct`` backend: the entrypoint runs as a process on the SSH host itself."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import posixpath
from typing import cast

import asyncssh

from remote_exec.entrypoint import launch_command
from remote_exec.errors import RemoteLostError
from remote_exec.inputs import CONTROL_DIR, LOG_NAME
from remote_exec.ui import Reporter


class DirectBackend:
    """Launch the wrapper over the run's connection and wait for its exit code."""

    name = "direct"

    async def run(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                  rundir: str, ui: Reporter, follow: bool) -> int:
        stop = asyncio.Event()
        tail = asyncio.ensure_future(follow_log(sftp, rundir, ui, stop)) if follow else None
        try:
            result = await conn.run(launch_command(rundir), check=False)
        except (OSError, asyncssh.Error) as exc:
            raise RemoteLostError(
                f"the connection dropped while the entrypoint was running: {exc}",
                hint=f"the run directory {rundir} holds the outcome in {CONTROL_DIR}/exit_code",
            ) from None
        finally:
            stop.set()
            if tail is not None:
                with contextlib.suppress(Exception):
                    await tail
        if result.exit_status is not None and result.exit_status >= 0:
            return result.exit_status
        if result.exit_signal:
            signame = result.exit_signal[0]
            import signal

            number = getattr(signal, f"SIG{signame}", None)
            return 128 + (int(number) if number is not None else 1)
        recorded = await read_exit_code(sftp, rundir)
        if recorded is None:
            raise RemoteLostError(
                "the entrypoint ended without reporting an exit code",
                hint=f"look at {rundir}/{LOG_NAME} on the remote host",
            )
        return recorded


async def read_exit_code(sftp: asyncssh.SFTPClient, rundir: str) -> int | None:
    """The exit code the wrapper recorded, or None if it has not finished."""
    try:
        async with sftp.open(posixpath.join(rundir, CONTROL_DIR, "exit_code"), "rb") as f:
            return int((await f.read()).strip() or b"-1")
    except (asyncssh.SFTPError, ValueError):
        return None


async def follow_log(sftp: asyncssh.SFTPClient, rundir: str, ui: Reporter,
                     stop: asyncio.Event, interval: float = 0.25) -> None:
    """Stream ``remote_program_exec.log`` as it grows, until ``stop`` is set (then drain)."""
    path = posixpath.join(rundir, LOG_NAME)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = 0
    while True:
        finishing = stop.is_set()
        try:
            async with sftp.open(path, "rb") as f:
                await f.seek(offset)
                data = cast(bytes, await f.read())
        except asyncssh.SFTPNoSuchFile:
            data = b""
        if data:
            offset += len(data)
            ui.log_text(decoder.decode(data))
        if finishing:
            ui.log_text(decoder.decode(b"", True))
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
