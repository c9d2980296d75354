"""The run's link to its host: one SSH connection, reopened with backoff when it drops.

A :class:`Link` hands out the current connection, its SFTP client and (on first
use) the rsync tunnel. When a step of the run fails because the connection died
(a cut, a stall caught by the keepalive, an sshd restart), the run calls
:meth:`Link.reconnect`, which waits with exponential backoff and jitter (1 s
doubling up to the site's ``retry_max_interval``) and tries ``retry_tries`` times
before giving up with :class:`LinkLostError`. A changed host key or a refused key
ends the run at once: retrying cannot fix those.

Opening connections is throttled per host across processes (:func:`handshake_slot`):
sshd drops unauthenticated connections beyond ``MaxStartups`` (10 by default), so
at most ``HANDSHAKE_SLOTS`` handshakes to one host run at once for this user,
and the drops sshd still makes are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import asyncssh

from remote_exec.backoff import HANDSHAKE, RECONNECT, SLOT
from remote_exec.config import Site
from remote_exec.errors import (
    TRANSIENT,
    AuthError,
    ChannelRefusedError,
    ConfigError,
    ConnectError,
    LinkLostError,
    RemoteExecError,
    SftpRefusedError,
)
from remote_exec.paths import state_dir
from remote_exec.ssh.connect import open_connection
from remote_exec.ssh.rsync import RsyncRequest, rsync_tunnel
from remote_exec.ssh.shell import drop_shared_sftp, sh_rsync, shared_sftp
from remote_exec.ui import Reporter

#: handshakes to one host at once for all of a user's processes: below sshd's
#: MaxStartups 10 (where its random drops begin)
HANDSHAKE_SLOTS = 6
#: the holder's share of them, so that ``status``, ``cancel`` and runs without the
#: holder still find a slot while it opens connections
HOLDER_HANDSHAKES = 4

#: exceptions that mean the transport is gone, whatever the step was doing (a refused
#: channel, asyncssh.ChannelOpenError, is not one: see :meth:`Link.refused_channel`)
LOSS_ERRORS: tuple[type[BaseException], ...] = (
    asyncssh.ConnectionLost, asyncssh.DisconnectError, asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection, ConnectionError, TimeoutError, EOFError,
)

#: refusals by policy: never a network fault, never retried
REFUSALS: tuple[type[BaseException], ...] = (AuthError, ConfigError)

#: ``acquire(site, tries)``: a connection; ``tries`` bounds the handshakes sshd may drop
Acquire = Callable[[Site, int], Awaitable[asyncssh.SSHClientConnection]]
Release = Callable[[asyncssh.SSHClientConnection, bool], None]


@contextlib.asynccontextmanager
async def handshake_slot(host: str, slots: int = HANDSHAKE_SLOTS) -> AsyncIterator[None]:
    """Hold one of ``slots`` per-host lock files in the state directory while connecting."""
    import fcntl

    directory = state_dir() / "slots"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in host)[:100]
    handles = [str(directory / f"{safe}.{i}.lock") for i in range(slots)]
    while True:
        for path in random.sample(handles, len(handles)):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                continue
            try:
                yield
            finally:
                os.close(fd)  # releases the lock
            return
        await asyncio.sleep(SLOT.delay(0))


#: handshakes a first connection may try when sshd drops them (MaxStartups)
FIRST_CONNECT_TRIES = 8


async def open_throttled(site: Site, tries: int = FIRST_CONNECT_TRIES,
                         caller_env: Mapping[str, str] | None = None,
                         ) -> asyncssh.SSHClientConnection:
    """Open a connection within a handshake slot, retrying sshd's pre-authentication drops.

    A reconnect passes ``tries=1``: there, each try counts against the run's retry budget.
    ``caller_env``: see :func:`remote_exec.ssh.connect.connect_options`.
    """
    for attempt in range(tries):
        try:
            async with handshake_slot(site.host):
                return await open_connection(site, caller_env)
        except ConnectError as exc:
            if not exc.retryable or attempt == tries - 1:
                raise
        await asyncio.sleep(HANDSHAKE.delay(attempt))
    raise AssertionError("unreachable")


def _close(conn: asyncssh.SSHClientConnection, broken: bool) -> None:
    conn.close()


class Link:
    """The current connection of one run, with what was opened on it."""

    def __init__(self, site: Site, ui: Reporter, *, run_id: str = "",
                 acquire: Acquire = open_throttled, release: Release = _close,
                 tries: int | None = None, max_interval: float | None = None) -> None:
        self.site = site
        self.ui = ui
        self.run_id = run_id
        self._acquire = acquire
        self._release = release
        self.tries = site.retry_tries if tries is None else tries
        self.max_interval = site.retry_max_interval if max_interval is None else max_interval
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._tunnel: contextlib.AsyncExitStack | None = None
        self._rsh: dict[RsyncRequest, str] = {}  # rsync's --rsh value per framing

    # -- what steps use ---------------------------------------------------------------------
    async def conn(self) -> asyncssh.SSHClientConnection:
        if self._conn is None:
            self._conn = await self._acquire(self.site, FIRST_CONNECT_TRIES)
        return self._conn

    async def sftp(self) -> asyncssh.SFTPClient:
        if self._sftp is None:
            conn = await self.conn()
            try:
                self._sftp = await shared_sftp(conn)
            except asyncssh.ChannelOpenError as exc:
                raise self.channel_refused(exc) from None
            except (OSError, asyncssh.Error) as exc:
                await asyncio.sleep(0)  # let the connection notice that it closed
                if conn.is_closed():
                    raise
                raise SftpRefusedError(
                    f"{self.site.display} refused an SFTP session ({_describe(exc)})",
                    hint="a restricted site (its key runs only the remote-exec agent) needs "
                    "`restricted: true` in the site's configuration; otherwise enable sshd's "
                    f"`Subsystem sftp` (`remote-exec site check {self.site.name}` shows it)",
                ) from None
        return self._sftp

    def channel_refused(self, exc: asyncssh.ChannelOpenError) -> ChannelRefusedError:
        """sshd refused a new channel on the open connection (MaxSessions)."""
        return ChannelRefusedError(
            f"{self.site.display} refused a new channel ({exc.reason or exc.code})")

    async def open_sftp(self) -> asyncssh.SFTPClient:
        """The SFTP client if one is open now (never connects: for side tasks)."""
        if self._sftp is None or self._conn is None or self._conn.is_closed():
            raise ConnectionError("no open connection")
        return self._sftp

    async def rsh(self, wrap: RsyncRequest = sh_rsync) -> str:
        """rsync's ``--rsh`` value for a tunnel over the current connection; ``wrap``
        frames rsync's remote command (a restricted site's agent has its own)."""
        if wrap not in self._rsh:
            conn = await self.conn()
            if self._tunnel is None:
                self._tunnel = contextlib.AsyncExitStack()
            self._rsh[wrap] = await self._tunnel.enter_async_context(rsync_tunnel(conn, wrap))
        return self._rsh[wrap]

    def is_loss(self, exc: BaseException) -> bool:
        """Whether ``exc`` came from the connection dying (so a reconnect may help).

        A refusal (authentication, the site's agent, configuration) never is; nor is a
        channel sshd refused on a connection that is still open (:meth:`refused_channel`).
        """
        if isinstance(exc, REFUSALS):
            return False
        if self._conn is not None and self._conn.is_closed():
            return True
        if self.refused_channel(exc):
            return False
        if isinstance(exc, RemoteExecError):
            return exc.disposition == TRANSIENT
        return isinstance(exc, LOSS_ERRORS)

    def refused_channel(self, exc: BaseException) -> bool:
        """Whether sshd refused a channel while the connection stays open: wait and open
        it again on the same connection (other runs may share it)."""
        if self._conn is None or self._conn.is_closed():
            return False
        return isinstance(exc, (ChannelRefusedError, asyncssh.ChannelOpenError))

    # -- when it breaks --------------------------------------------------------------------
    async def reconnect(self, during: str, cause: BaseException) -> None:
        """Drop the dead connection and open a new one, with backoff; or LinkLostError."""
        await self._drop(broken=True)
        last: BaseException = cause
        for attempt in range(self.tries):
            delay = RECONNECT.capped(self.max_interval).delay(attempt)
            self.ui.warn(f"connection to {self.site.display} lost during {during} "
                         f"({_describe(last)}); reconnecting in {delay:.1f} s "
                         f"(try {attempt + 1} of {self.tries})")
            await asyncio.sleep(delay)
            try:
                self._conn = await self._acquire(self.site, 1)
            except AuthError:
                raise
            except ConnectError as exc:
                last = exc
                continue
            self.ui.event("reconnected", f"reconnected to {self.site.display}",
                          run_id=self.run_id, attempt=attempt + 1)
            return
        raise LinkLostError(
            f"lost the connection to {self.site.display} during {during} and could not "
            f"reconnect in {self.tries} tries (last error: {_describe(last)})",
            hint="the entrypoint, if it started, keeps running on the remote host; "
            f"when the host is reachable again, `remote-exec resume {self.run_id[:8]}` "
            "picks the run up where it stopped",
        )

    async def close(self) -> None:
        await self._drop(broken=False)

    async def _drop(self, broken: bool) -> None:
        if self._tunnel is not None:
            with contextlib.suppress(Exception):
                await self._tunnel.aclose()
        self._tunnel = None
        self._rsh = {}
        if self._sftp is not None and self._conn is not None and broken:
            with contextlib.suppress(Exception):
                drop_shared_sftp(self._conn)  # (others on the connection reopen theirs)
        self._sftp = None  # else it stays open for the next run on the connection
        if self._conn is not None:
            self._release(self._conn, broken or self._conn.is_closed())
        self._conn = None


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if "Keepalive timeout" in text:
        return "no data from the host within the stall timeout"
    return text.splitlines()[0][:300]
