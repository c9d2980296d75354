"""Remote commands and SFTP sessions that work under any login shell.

sshd runs every exec request -- and, on a stock server, the ``sftp-server`` behind
the SFTP subsystem -- as ``$SHELL -c COMMAND`` with the remote user's login shell.
Two things break there, and this module is the one place that deals with both:

* **The shell's syntax.** csh and tcsh reject sh redirections (``2>&1`` makes a file
  named ``1``), newlines inside quotes and ``!word`` (history). So every command
  remote-exec sends is one line, ``exec /bin/sh -c 'SCRIPT' sh ARG...``, quoted so
  that sh, bash, dash, ksh, zsh, csh and tcsh read it alike: the login shell only
  starts ``/bin/sh``, which does the rest.
* **The shell's start-up files.** A ``.bashrc`` or ``.cshrc`` that prints ("Welcome
  to the cluster", module lists, quota notices) puts its text in front of the
  command's own output. Every command is framed: ``/bin/sh`` first prints a line
  holding a fresh nonce on stdout and on stderr, and what comes before it is the
  *banner*, kept apart and never parsed. SFTP is opened on the subsystem first; when
  that stream is garbled by a banner, the ``sftp-server`` is started on an exec
  channel framed the same way and the SFTP client reads from after the mark.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncssh

from remote_exec.errors import NoisyShellError
from remote_exec.ssh.words import quote

#: where OpenSSH's sftp-server lives on Debian/Ubuntu, RHEL/Fedora, Arch/SUSE, BSDs
SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/sftp-server",
    "/usr/local/libexec/sftp-server",
)

#: what a user does about a login shell that prints in non-interactive sessions
QUIET_SHELL_FIX = (
    "make the remote login shell quiet when it is not interactive: put "
    "`[ -z \"$PS1\" ] && return` at the top of ~/.bashrc (csh/tcsh: "
    "`if (! $?prompt) exit` at the top of ~/.cshrc), or move the output to "
    "~/.bash_profile (csh/tcsh: ~/.login)"
)

#: how long a banner may take before the framed command's mark shows up
MARK_TIMEOUT = 60.0


def sh_line(script: str, *args: str) -> str:
    """The exec request that runs POSIX sh ``script`` with ``args`` as ``$1``...

    ``script`` is remote-exec's own code and must be a single line."""
    return " ".join(["exec /bin/sh -c", quote(script), "sh", *(quote(a) for a in args)])


#: the sh script that runs its arguments as a program (no shell syntax applies to them)
EXEC_ARGS = 'exec "$@"'


class Mark:
    """A per-command nonce line that separates the login shell's banner from output."""

    def __init__(self) -> None:
        self.text = f"remote-exec-mark-{secrets.token_hex(8)}"

    @property
    def line(self) -> bytes:
        return self.text.encode() + b"\n"

    def prefix(self, *, stderr: bool = True) -> str:
        """sh that prints the mark on stdout (and stderr), to run before the real work."""
        out = f"printf '%s\\n' {self.text}"
        return f"{out}; {out} >&2; " if stderr else f"{out}; "

    def split(self, text: str) -> tuple[str, str, bool]:
        """``(banner, output, found)`` of one stream's whole text."""
        marker = self.text + "\n"
        at = text.find(marker)
        if at < 0:
            return "", text, False
        return text[:at], text[at + len(marker):], True


@dataclass
class Result:
    """A finished remote command, its banner kept apart."""

    exit_status: int | None
    stdout: str
    stderr: str
    banner: str = ""  # what the login shell printed on stdout before the command
    banner_err: str = ""  # ... and on stderr
    framed: bool = True  # False: /bin/sh never started (the login shell refused)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


#: builds one exec request from its mark; what runs must print the mark (on stdout and
#: stderr) before anything else
Request = Callable[[Mark], str]


def sh_request(script: str, *args: str) -> Request:
    """The request that runs POSIX sh ``script`` with ``args``, under any login shell."""
    return lambda mark: sh_line(mark.prefix() + script, *args)


def sh_rsync(command: str) -> Request:
    """The request for rsync's remote command (rsync quoted its words for a remote sh)."""
    return sh_request("exec " + command)


async def run(conn: asyncssh.SSHClientConnection, script: str, *args: str,
              input: str | None = None) -> Result:
    """Run sh ``script`` with ``args`` on the host; its output without the banner."""
    return await run_request(conn, sh_request(script, *args), input=input)


async def run_request(conn: asyncssh.SSHClientConnection, request: Request,
                      input: str | None = None) -> Result:
    """Run one framed request; its output without the banner."""
    mark = Mark()
    done = await conn.run(request(mark), input=input, check=False)
    banner, out, found = mark.split(str(done.stdout or ""))
    banner_err, err, found_err = mark.split(str(done.stderr or ""))
    return Result(done.exit_status, out, err, banner, banner_err, found and found_err)


async def run_argv(conn: asyncssh.SSHClientConnection, argv: Sequence[str],
                   input: str | None = None) -> Result:
    """Run the program ``argv`` on the host (``argv[0]`` looked up in the login PATH)."""
    return await run(conn, EXEC_ARGS, *argv, input=input)


@dataclass
class Started:
    """A command started on a channel, its output read past the login shell's banner."""

    process: asyncssh.SSHClientProcess[Any]
    banner: bytes | str  # what the login shell printed on stdout first
    banner_err: bytes | str  # ... and on stderr (all of stderr when not ``framed``)
    framed: bool  # False: the channel ended before /bin/sh printed the mark


async def start(conn: asyncssh.SSHClientConnection, script: str, *args: str,
                encoding: str | None = "utf-8", **kwargs: Any) -> Started:
    """Start sh ``script`` on a channel, its stdout and stderr read past the banner."""
    return await start_request(conn, sh_request(script, *args), encoding=encoding, **kwargs)


async def start_request(conn: asyncssh.SSHClientConnection, request: Request,
                        encoding: str | None = "utf-8", **kwargs: Any) -> Started:
    """Start one framed request on a channel, its stdout and stderr read past the banner.

    When the channel ends before the mark, both streams are at EOF and the banners
    hold all they said."""
    mark = Mark()
    process = await conn.create_process(request(mark), encoding=encoding, **kwargs)
    bound_receive_window(process.channel)
    separator: bytes | str = mark.line if encoding is None else mark.line.decode()
    banner, found = await skip_banner(process.stdout, separator)
    banner_err, _ = await skip_banner(process.stderr, separator)  # printed right after
    return Started(process, banner, banner_err, found)


def bound_receive_window(channel: Any) -> bool:
    """Keep what a channel holds for a slow reader within its receive window.

    asyncssh (2.24) re-opens a channel's window each time it hands one packet to a
    reader that paused, counting the packets still queued in the channel as read: a
    sender faster than the reader grows that queue without bound. Fetching 1 GiB by
    rsync through the tunnel (the bridge and rsync slower than AES-GCM) grew the
    holder by 90-250 MiB. Here the queued bytes count as still outstanding, so the
    queue and the sender's allowance together never exceed the window. It relies on
    asyncssh internals (``_deliver_data``, ``_recv_window``, ``_init_recv_window``,
    ``_recv_buf``): when one is missing it changes nothing and says so (False), and a
    test checks that it applies to the installed asyncssh."""
    deliver = getattr(channel, "_deliver_data", None)
    if deliver is None or not all(hasattr(channel, name) for name in
                                  ("_recv_window", "_init_recv_window", "_recv_buf")):
        return False

    def bounded(data: Any, datatype: Any) -> None:
        queued = sum(len(item[0]) for item in channel._recv_buf)
        allowed = channel._recv_window  # what the sender may still send
        window = channel._init_recv_window
        reopens = allowed + queued < window / 2
        channel._recv_window = allowed + queued  # (asyncssh adjusts by window - this)
        try:
            deliver(data, datatype)
        finally:
            channel._recv_window = window - queued if reopens else allowed

    channel._deliver_data = bounded
    return True


async def skip_banner(stream: asyncssh.SSHReader[Any],
                      separator: bytes | str) -> tuple[Any, bool]:
    """Read ``stream`` up to and including ``separator``: ``(what came before, found)``.

    At EOF without the separator, everything read is returned and the stream is
    left at EOF."""
    try:
        data = await asyncio.wait_for(stream.readuntil(separator), MARK_TIMEOUT)
    except asyncio.IncompleteReadError as exc:
        return exc.partial, False
    return data[:-len(separator)], True


# -- SFTP ---------------------------------------------------------------------------------

#: connections whose SFTP subsystem was seen garbled: go straight to the framed server
_GARBLED: weakref.WeakSet[asyncssh.SSHClientConnection] = weakref.WeakSet()


#: one SFTP client per connection, shared by the runs on it (see :func:`shared_sftp`)
_SHARED: weakref.WeakKeyDictionary[asyncssh.SSHClientConnection,
                                   asyncio.Future[asyncssh.SFTPClient]] = \
    weakref.WeakKeyDictionary()


async def shared_sftp(conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient:
    """The connection's SFTP client, opened once and shared by every run on it.

    On a stock server each SFTP session costs a login shell (sshd starts sftp-server
    through it), as much as a bare ``ssh host true``; a warm connection of the
    holder pays it once, not once per run. Close it with :func:`drop_shared_sftp`."""
    opening = _SHARED.get(conn)
    if opening is None or (opening.done() and not _opened(opening)):
        opening = asyncio.ensure_future(open_sftp(conn))
        _SHARED[conn] = opening
    return await asyncio.shield(opening)


def drop_shared_sftp(conn: asyncssh.SSHClientConnection) -> None:
    """Close the connection's shared SFTP client (a run saw it fail); the next user
    of the connection opens a new one."""
    opening = _SHARED.pop(conn, None)
    if opening is not None and opening.done() and _opened(opening):
        opening.result().exit()


def _opened(opening: asyncio.Future[asyncssh.SFTPClient]) -> bool:
    """Whether a finished :func:`open_sftp` gave a client (not an error, not cancelled)."""
    return not opening.cancelled() and opening.exception() is None


def subsystem_garbled(conn: asyncssh.SSHClientConnection) -> bool:
    """Whether :func:`open_sftp` found the SFTP subsystem garbled on ``conn``."""
    return conn in _GARBLED


async def open_sftp(conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient:
    """An SFTP client on ``conn``, also when the login shell garbles the subsystem."""
    if conn not in _GARBLED:
        try:
            return await conn.start_sftp_client()
        except asyncssh.SFTPBadMessage:
            if conn.is_closed():
                raise
        _GARBLED.add(conn)
    return await _framed_sftp(conn)


async def _framed_sftp(conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient:
    mark = Mark()
    servers = " ".join(quote(p) for p in SFTP_SERVERS)
    script = (f"for p in {servers}; do if [ -x \"$p\" ]; then {mark.prefix(stderr=False)}"
              "exec \"$p\"; fi; done; echo 'no sftp-server found' >&2; exit 127")
    writer, reader, _ = await conn.open_session(sh_line(script), encoding=None)
    banner, found = await skip_banner(reader, mark.line)
    if not found:
        writer.close()
        raise NoisyShellError(
            "the remote login shell prints text in non-interactive sessions, which breaks "
            "SFTP, and no sftp-server was found to start past it "
            f"(it printed: {describe_banner(banner)})",
            hint=QUIET_SHELL_FIX,
        )
    return await _sftp_client(conn, reader, writer)


async def _sftp_client(conn: asyncssh.SSHClientConnection, reader: asyncssh.SSHReader[bytes],
                       writer: asyncssh.SSHWriter[bytes]) -> asyncssh.SFTPClient:
    """asyncssh's own SFTP client start-up on a channel we opened (its internal helper:
    the keywords are matched to the installed version's signature)."""
    from asyncssh.sftp import start_sftp_client

    wanted: dict[str, Any] = {
        "conn": conn, "loop": asyncio.get_running_loop(), "reader": reader, "writer": writer,
        "utf8_decode_errors": "strict", "path_encoding": "utf-8", "path_errors": "strict",
        "sftp_version": 3,
    }
    params = inspect.signature(start_sftp_client).parameters
    return cast(asyncssh.SFTPClient,
                await start_sftp_client(**{k: v for k, v in wanted.items() if k in params}))


def describe_banner(banner: bytes | str) -> str:
    """A short quote of a banner for messages and ``site check``."""
    text = banner.decode("utf-8", "replace") if isinstance(banner, bytes) else banner
    text = " ".join(text.split())
    return repr(text[:120] + ("…" if len(text) > 120 else ""))
