"""The ``direct`` backend: the entrypoint runs as a detached process on the SSH host.

``launch.sh`` (see :mod:`remote_exec.entrypoint`) starts the wrapper in its own
session and process group, so it survives a dropped connection, and then waits
for it on the exec channel: a short run needs no polling at all. After a
reconnect the exit code is polled from ``.remote-exec/exit_code`` over SFTP.
``cancel.sh`` stops the process group (TERM, then KILL after the site's grace).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import weakref
from typing import cast

import asyncssh

from remote_exec.backends.base import Launched, RemoteState, Run
from remote_exec.backends.ssh import SshBackend, read_control, read_exit_code
from remote_exec.backoff import POLL
from remote_exec.entrypoint import ALREADY_LAUNCHED, LAUNCH_SERVER, PGID_FILE, control_argv
from remote_exec.errors import NoisyShellError, RemoteLostError, StageError
from remote_exec.inputs import CONTROL_DIR, LOG_NAME
from remote_exec.journal import RunRecord
from remote_exec.ssh import shell

#: what cancel.sh answers when the entrypoint had ended on its own before it could stop it
ENDED_ON_ITS_OWN = ("already finished", "already gone")


class Attached:
    """A run started by a connection's :class:`LaunchServer`, waited for like the channel
    of its own exec request: :meth:`wait_closed`, then :attr:`exit_status` (None when
    the answer never came: the server's channel ended)."""

    def __init__(self, server: LaunchServer, tag: str) -> None:
        self.server, self.tag = server, tag
        self.pid: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.exit_status: int | None = None
        self._ended = asyncio.Event()

    def answer(self, words: list[str]) -> None:
        if words[:1] == ["started"] and len(words) == 2 and not self.pid.done():
            self.pid.set_result(words[1])
        elif words[:1] == ["exit"] and len(words) == 2:
            with contextlib.suppress(ValueError):
                self.exit_status = int(words[1])
            self.close()

    def close(self) -> None:
        """No more answers are awaited (the run ended, the server's channel did, or the
        caller gave up: the entrypoint itself goes on)."""
        self.server.waiting.pop(self.tag, None)
        if not self.pid.done():
            self.pid.set_result(None)
        self._ended.set()

    async def wait_closed(self) -> None:
        await self._ended.wait()


class LaunchServer:
    """One exec channel per connection running :data:`LAUNCH_SERVER`: it starts each
    run's ``launch.sh`` without another exec request, so without another login shell
    (the cost of a bare ``ssh host true`` but the handshake). Answers come back tagged."""

    def __init__(self, started: shell.Started) -> None:
        self.process = started.process
        self.waiting: dict[str, Attached] = {}
        self.alive = True
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while line := cast(str, await self.process.stdout.readline()):
                tag, *words = line.split()
                attached = self.waiting.get(tag)
                if attached is not None:
                    attached.answer(words)
        except (asyncssh.Error, OSError):
            pass
        finally:
            self.alive = False
            for attached in list(self.waiting.values()):
                attached.close()
            self.process.close()

    def launch(self, rundir: str) -> Attached:
        tag = secrets.token_hex(8)
        attached = self.waiting[tag] = Attached(self, tag)
        self.process.stdin.write(f"{tag}\n{rundir}\n")
        return attached


#: the launch server of each connection (see :func:`launch_server`)
_SERVERS: weakref.WeakKeyDictionary[asyncssh.SSHClientConnection,
                                    asyncio.Future[LaunchServer | None]] = \
    weakref.WeakKeyDictionary()


async def launch_server(conn: asyncssh.SSHClientConnection) -> LaunchServer | None:
    """The connection's launch server, started on first use; None when it cannot run
    (the login shell refused /bin/sh: the launch then goes by its own exec request,
    which reports why)."""
    opening = _SERVERS.get(conn)
    if opening is not None and opening.done() and not opening.cancelled() \
            and opening.exception() is None and not (opening.result() or _GONE).alive:
        opening = None  # its channel ended: start another
    if opening is None or (opening.done() and (opening.cancelled()
                                               or opening.exception() is not None)):
        opening = asyncio.ensure_future(_start_server(conn))
        _SERVERS[conn] = opening
    return await asyncio.shield(opening)


async def _start_server(conn: asyncssh.SSHClientConnection) -> LaunchServer | None:
    started = await shell.start(conn, LAUNCH_SERVER)
    if not started.framed:
        started.process.close()
        return None
    return LaunchServer(started)


class _Gone:
    alive = False


_GONE = _Gone()


class DirectBackend(SshBackend):
    """Run the entrypoint on the SSH host itself."""

    name = "direct"

    async def launch(self, run: Run) -> Launched:
        rundir = run.rundir
        if "\n" not in rundir:
            launched = await self._launch_served(rundir)
            if launched is not None:
                return launched
        return await self._launch_exec(run)

    async def _launch_served(self, rundir: str) -> Launched | None:
        """Launch through the connection's launch server; None when it gave no ``started``
        (it could not start, its channel ended, launch.sh refused: the launch by exec
        request then says why, and launch.sh's guard keeps it to one start)."""
        conn = await self.link.conn()
        try:
            server = await launch_server(conn)
        except (asyncssh.ChannelOpenError, NoisyShellError):
            return None
        if server is None or not server.alive:
            return None
        attached = server.launch(rundir)
        try:
            pid = await attached.pid
        except BaseException:
            attached.close()
            raise
        if pid is None:
            attached.close()
            return None
        return Launched(job_id=pid, channel=attached)

    async def _launch_exec(self, run: Run) -> Launched:
        """Launch by an exec request of its own (launch.sh's answer on the channel)."""
        conn, rundir = await self.link.conn(), run.rundir
        started = await shell.start(conn, shell.EXEC_ARGS, *control_argv(rundir, "launch.sh"),
                                    stdin=asyncssh.DEVNULL)
        process = started.process
        line = cast(str, await process.stdout.readline()) if started.framed else ""
        if line.startswith("started "):
            return Launched(job_id=line.split()[1], channel=process)
        await process.wait_closed()
        if process.exit_status is None and conn.is_closed():
            raise asyncssh.ConnectionLost("the connection closed while launching")
        pgid = await read_control(await self.link.sftp(), rundir, PGID_FILE)
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

    async def wait(self, run: Run, launched: Launched | None) -> int:
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
            recorded = await read_exit_code(await self.link.sftp(), run.rundir)
            if recorded is not None:
                return recorded
            if attached is not None:
                return attached
        for delay in POLL.delays():
            code = await self.poll(run)
            if code is not None:
                return code
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def poll(self, run: Run) -> int | None:
        sftp, rundir, pgid = await self.link.sftp(), run.rundir, run.job_id
        code = await read_exit_code(sftp, rundir)
        if code is not None or not pgid:
            return code
        if await sftp.exists("/proc/self") and not await sftp.exists(f"/proc/{pgid}"):
            code = await read_exit_code(sftp, rundir)  # it may have ended just now
            if code is None:
                raise RemoteLostError(
                    f"the entrypoint's process group {pgid} is gone and left no exit code "
                    "(was the remote host rebooted, or the process killed with KILL?)",
                    hint=f"look at {rundir}/{LOG_NAME} on the remote host",
                )
        return code

    async def stop_at(self, conn: asyncssh.SSHClientConnection, rundir: str,
                      job_id: str | None) -> str:
        result = await shell.run_argv(conn, control_argv(rundir, "cancel.sh",
                                                         int(self.site.cancel_grace)))
        return result.stdout.strip() or f"cancel.sh exit {result.exit_status}"

    async def ended_before(self, sftp: asyncssh.SFTPClient, rundir: str,
                           what: str) -> int | None:
        """An entrypoint that ended on its own before the cancel reached it counts as
        finished (with its exit code): its results are kept for ``resume``."""
        if what not in ENDED_ON_ITS_OWN:
            return None
        return await read_exit_code(sftp, rundir)

    async def probe_more(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                         record: RunRecord, state: RemoteState) -> None:
        pgid = await read_control(sftp, record.rundir or "", PGID_FILE)
        if state.exit_code is None and pgid and await sftp.exists("/proc/self"):
            state.alive = await sftp.exists(f"/proc/{pgid}")

    async def leftover_state(self, sftp: asyncssh.SFTPClient, path: str, proc: bool) -> str:
        state = await super().leftover_state(sftp, path, proc)
        if state != "running":
            return state
        pgid = await read_control(sftp, path, PGID_FILE)
        if pgid and proc:
            return "running" if await sftp.exists(f"/proc/{pgid}") else "dead"
        return state
