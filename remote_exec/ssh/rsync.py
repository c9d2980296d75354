"""rsync over the run's own SSH connection (see :mod:`remote_exec.ssh.rsh_bridge`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import asyncssh

from remote_exec.errors import ChannelRefusedError
from remote_exec.ssh import shell

BRIDGE = Path(__file__).with_name("rsh_bridge.py")
#: The host name rsync sees; the bridge ignores it and uses the open connection.
TUNNEL_HOST = "remote-exec"


def local_rsync() -> str | None:
    """The local rsync binary, or None."""
    return shutil.which("rsync")


async def remote_has_rsync(conn: asyncssh.SSHClientConnection) -> bool:
    """Whether the remote login shell finds an rsync (one exec on the connection)."""
    return (await shell.run(conn, "rsync --version >/dev/null 2>&1")).ok


#: the line the tunnel writes to rsync's stderr when sshd refused the channel for its remote
#: command (MaxSessions) on a connection that stays open: :func:`run_rsync` turns it into
#: a :class:`ChannelRefusedError`, so the step waits and runs rsync again, as any step
#: whose channel was refused
REFUSED_MARK = "remote-exec: sshd refused a new channel for rsync"

#: the exec request for rsync's remote command: see :func:`remote_exec.ssh.shell.sh_rsync`
RsyncRequest = Callable[[str], shell.Request]


async def _serve(conn: asyncssh.SSHClientConnection, wrap: RsyncRequest,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Run one rsync remote command on an SSH channel and relay it to the bridge.

    ``wrap`` frames the command, so that a login shell that prints (or is csh) cannot
    garble rsync's protocol: under ``/bin/sh`` on an open site, in the agent's own
    words on a restricted one."""

    def frame(kind: bytes, payload: bytes) -> None:
        writer.write(struct.pack(">cI", kind, len(payload)) + payload)

    try:
        argv = json.loads(await reader.readline())
        command = " ".join(argv)  # rsync quoted its words for a remote sh, as ssh joins them
        try:
            started = await shell.start_request(conn, wrap(command), encoding=None)
        except asyncssh.ChannelOpenError as exc:
            frame(b"e", f"{REFUSED_MARK} ({exc.reason or exc.code})\n".encode())
            frame(b"x", struct.pack(">i", 255))
            await writer.drain()
            return
        process = started.process

        async def upstream() -> None:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                process.stdin.write(data)
                await process.stdin.drain()
            process.stdin.write_eof()

        async def downstream(stream: asyncssh.SSHReader[bytes], kind: bytes) -> None:
            while True:
                data = await stream.read(65536)
                if not data:
                    break
                frame(kind, data)
                await writer.drain()

        up = asyncio.ensure_future(upstream())
        try:
            await asyncio.gather(downstream(process.stdout, b"o"),
                                 downstream(process.stderr, b"e"))
            completed = await process.wait(check=False)
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
            process.close()
        status = completed.exit_status if completed.exit_status is not None else 255
        frame(b"x", struct.pack(">i", status))
        await writer.drain()
    except (OSError, asyncssh.Error, ValueError) as exc:
        with contextlib.suppress(OSError):
            frame(b"e", f"remote-exec: rsync channel failed: {exc}\n".encode())
            frame(b"x", struct.pack(">i", 255))
            await writer.drain()
    finally:
        with contextlib.suppress(OSError):
            writer.close()


@contextlib.asynccontextmanager
async def rsync_tunnel(conn: asyncssh.SSHClientConnection,
                       wrap: RsyncRequest = shell.sh_rsync) -> AsyncIterator[str]:
    """Serve the bridge socket for the life of the block; yields the ``--rsh`` value."""
    tmp = tempfile.mkdtemp(prefix="remote-exec-rsh-")  # mode 0700: only we can connect
    sock_path = os.path.join(tmp, "s")
    server = await asyncio.start_unix_server(
        lambda r, w: _serve(conn, wrap, r, w), path=sock_path
    )
    rsh = " ".join(_rsync_quote(w) for w in (sys.executable, "-S", "-E", str(BRIDGE), sock_path))
    try:
        yield rsh
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        shutil.rmtree(tmp, ignore_errors=True)


def _rsync_quote(word: str) -> str:
    """Quote one word of rsync's ``-e`` string (rsync splits it honouring quotes)."""
    if word and all(c.isalnum() or c in "/._-+=:@%," for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: seconds rsync gets to save its partial file after TERM before it (and its bridge) is KILLed
STOP_GRACE = 3.0


async def run_rsync(rsh: str, args: Sequence[str], *, progress: bool) -> tuple[int, str]:
    """Run local rsync with ``args`` through the tunnel; returns (exit code, stderr text).

    rsync and the bridge it starts run in a process group of their own. If the task
    awaiting them is cancelled (a cancel, ``--timeout``, an abandoned run), the group
    gets TERM (rsync keeps its partial file), then KILL after :data:`STOP_GRACE`, and
    the cancel goes on only once rsync is reaped: nothing of the run keeps copying.
    """
    rsync = local_rsync() or "rsync"
    argv = [rsync, "--blocking-io", "-e", rsh, *args]
    if progress:
        argv.insert(1, "--info=progress2")
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=None if progress else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own group: stopped as one, never by the terminal
    )
    try:
        _, err = await proc.communicate()
    except BaseException:
        await _stop_group(proc)
        raise
    text = err.decode("utf-8", "replace").strip()
    if proc.returncode and REFUSED_MARK in text:
        reason = text[text.index(REFUSED_MARK) + len(REFUSED_MARK):].splitlines()[0].strip()
        raise ChannelRefusedError(
            f"the host refused a new channel for rsync {reason}".rstrip())
    return proc.returncode or 0, text


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """TERM rsync's process group, KILL it after :data:`STOP_GRACE`; reap rsync.

    Bounded even if cancelled again meanwhile: the KILL is sent in any case.
    """
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_GRACE)
    except asyncio.TimeoutError:
        pass
    finally:
        _signal_group(proc.pid, signal.SIGKILL)  # rsync if it lingers, and its bridge
        if proc.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(proc.wait(), STOP_GRACE)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def rsync_remote(path: str) -> str:
    """``HOST:PATH`` for rsync, with the tunnel's host name."""
    return f"{TUNNEL_HOST}:{path}"
