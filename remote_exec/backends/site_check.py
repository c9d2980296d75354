"""``site check`` on a site reached by SSH (the ``direct``, batch and ``agent`` backends).

One row per fact, in the order a run needs them: the host key, authentication,
which side the key reaches (a shell, or the restricted agent), the agent's version
and allowlist, rsync and Python on the host, whether the runs root is writable and
how much space it has. A failing row carries its fix.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from remote_exec.backends.agent_protocol import AgentClient, agent_request
from remote_exec.config import Site
from remote_exec.errors import AuthError, RemoteExecError
from remote_exec.site.rows import FAIL, OK, SKIP, WARN, Row, space_row
from remote_exec.ssh import rsync as rsync_mod
from remote_exec.ssh import shell
from remote_exec.ssh.connect import open_connection
from remote_exec.templates import RemotePath

#: a backend's own rows, asked on the open connection
More = Callable[[asyncssh.SSHClientConnection], Awaitable[list[Row]]]


async def ssh_site_rows(site: Site, more: More) -> list[Row]:
    """The rows of a site reached by SSH: what the key reaches (a shell or the agent),
    and on a shell, the tools and the runs root; ``more``: the backend's own rows."""
    rows: list[Row] = []
    try:
        conn = await open_connection(site)
    except AuthError as err:
        host_key = "host key" in err.message
        rows.append(Row("host key", FAIL if host_key else OK,
                        err.message if host_key else "verified", err.hint or ""))
        rows.append(Row("authentication", SKIP if host_key else FAIL,
                        "" if host_key else err.message, "" if host_key else err.hint or ""))
        return rows
    except RemoteExecError as err:
        return [Row("connection", FAIL, err.message, err.hint or "")]
    rows.append(Row("host key", OK, f"verified ({site.known_hosts or '~/.ssh/known_hosts'})"))
    rows.append(Row("authentication", OK, f"key {site.identity_file or '(ssh defaults)'}"))
    local = rsync_mod.local_rsync()
    rows.append(Row("rsync (here)", OK if local else (FAIL if site.restricted else WARN),
                    local or "not installed",
                    "" if local else "install rsync here (a restricted site needs it; "
                    "otherwise large transfers are slower over SFTP)"))
    async with conn:
        agent = AgentClient(site.name)
        try:
            hello: dict[str, Any] | None = await agent.hello(conn)
        except (RemoteExecError, asyncssh.Error):
            hello = None
        if hello is not None:
            rows += _agent_rows(site, hello)
            # the forced command starts through the login shell too: does it print?
            login = await shell.run_request(conn, agent_request("hello"))
            rows.append(_login_shell_row("the login shell", login))
            rows += await more(conn)
        else:
            rows += await _open_rows(site, conn, more)
    return rows


def _agent_rows(site: Site, hello: dict[str, Any]) -> list[Row]:
    from remote_exec.site.install import agent_version

    rows = [Row("access", OK if site.restricted else FAIL,
                "restricted: the key runs only the remote-exec agent",
                "" if site.restricted else "set `restricted: true` for the site")]
    version, ours = str(hello.get("version")), agent_version()
    rows.append(Row("agent", OK if version == ours else WARN,
                    f"version {version} (python {hello.get('python')})",
                    "" if version == ours else f"this remote-exec ships agent {ours}: "
                    f"`remote-exec site install {site.name}`"))
    entries = hello.get("entrypoints") or {}
    bad = [n for n, e in entries.items() if not e.get("digest_ok")]
    missing = [t for t in site.templates if t not in entries]
    detail = f"{hello.get('allowlist')}: {', '.join(sorted(entries)) or 'no entrypoints'}"
    if bad:
        rows.append(Row("allowlist", FAIL, f"{detail}; digest mismatch: {', '.join(bad)}",
                        "an approved entrypoint changed on the host; if the change is "
                        f"intended, re-approve it with `remote-exec site install {site.name}`"))
    elif missing:
        rows.append(Row("allowlist", WARN, f"{detail}; not approved: {', '.join(missing)}",
                        f"`remote-exec site install {site.name}` approves the site's templates"))
    else:
        rows.append(Row("allowlist", OK, detail))
    returns = hello.get("returns") or {}
    rows.append(Row("return filter", OK,
                    f"never: {', '.join(returns.get('never') or []) or '-'}; "
                    f"only: {', '.join(returns.get('only') or []) or '-'}"))
    rsync = hello.get("rsync")
    rows.append(Row("rsync (host)", OK if rsync else FAIL, rsync or "not installed",
                    "" if rsync else "install rsync on the host: a restricted site moves "
                    "files only with rsync"))
    writable = bool(hello.get("root_writable"))
    rows.append(Row("runs root", OK if writable else FAIL,
                    f"{hello.get('root')} {'writable' if writable else 'NOT writable'}",
                    "" if writable else "make it writable for the user, or change `root` "
                    "and re-install"))
    rows.append(space_row(hello.get("free_bytes")))
    forwarded = bool(hello.get("agent_forwarding"))
    rows.append(Row("forwarding", FAIL if forwarded else OK,
                    "an SSH agent was forwarded to the host" if forwarded
                    else "agent and port forwarding refused",
                    "add `restrict` to the key's authorized_keys line" if forwarded else ""))
    return rows


async def _open_rows(site: Site, conn: asyncssh.SSHClientConnection, more: More) -> list[Row]:
    rows: list[Row] = []
    if site.restricted:
        rows.append(Row("access", FAIL, "the site is marked restricted but the key reaches "
                        "a shell, not the agent",
                        f"`remote-exec site install {site.name} --apply` locks the key"))
    else:
        rows.append(Row("access", WARN, "open: the key can run any command on the host",
                        f"`remote-exec site install {site.name} --apply` restricts it to the "
                        "agent and the site's approved templates"))
    login = await shell.run(conn, 'printf "%s\\n" "${SHELL:-/bin/sh}"')
    rows.append(_login_shell_row(login.stdout.strip() or "unknown", login))
    rsync = await shell.run(conn, "rsync --version")
    first = rsync.stdout.splitlines()[:1]
    rows.append(Row("rsync (host)", OK if rsync.ok else WARN,
                    first[0] if rsync.ok and first else "not found",
                    "" if rsync.ok else "install rsync on the host for large "
                    "transfers (SFTP is used meanwhile)"))
    python = await shell.run(conn, "python3 --version 2>&1")
    rows.append(Row("python (host)", OK if python.ok else WARN,
                    python.stdout.strip() if python.ok else "not found",
                    "" if python.ok else "needed only for the restricted agent"))
    try:
        sftp = await shell.open_sftp(conn)
    except RemoteExecError as err:
        rows.append(Row("sftp", FAIL, err.message, err.hint or ""))
        return rows
    except (OSError, asyncssh.Error) as exc:
        rows.append(Row("sftp", FAIL, str(exc), "enable the sftp subsystem in sshd_config"))
        return rows
    rows.append(Row("sftp", OK, "sftp-server started past the login shell's output "
                    "(the SFTP subsystem itself is garbled by it)"
                    if shell.subsystem_garbled(conn) else "subsystem"))
    async with sftp:
        root = site.root
        if root == "~" or root.startswith("~/"):
            root = posixpath.join(await sftp.realpath("."), root[2:])
        probe = posixpath.join(root, f".remote-exec-check-{uuid.uuid4().hex[:8]}")
        try:
            await sftp.mkdir(probe)
            await sftp.rmdir(probe)
            rows.append(Row("runs root", OK, f"{root} writable"))
        except asyncssh.SFTPError as exc:
            rows.append(Row("runs root", FAIL, f"{root}: {exc.reason}",
                            f"create {root} and make it writable, or set another `root`"))
        try:
            vfs = await sftp.statvfs(root)
            rows.append(space_row(vfs.bavail * vfs.frsize))
        except asyncssh.SFTPError:
            rows.append(space_row(None))
        rows += await more(conn)
        program = site.entrypoint
        found = await shell.run(conn, f"test -x {RemotePath(program).shell()}")
        rows.append(Row("site entrypoint", OK if found.ok else WARN,
                        program + ("" if found.ok else " not found"),
                        "" if found.ok else "install it, or use --template / --cmd"))
    return rows


def _login_shell_row(name: str, login: shell.Result) -> Row:
    """The login shell ``name``, and whether it prints in a non-interactive session
    (``login``: a framed command's result): text on stdout garbles the SFTP subsystem
    and rsync for any client that does not frame its streams as remote-exec does; text
    on stderr only clutters messages."""
    if not login.framed:
        return Row("login shell", FAIL, f"{name}: it did not start /bin/sh "
                   f"({(login.banner_err or login.stdout).strip()[-200:]})",
                   "the account's login shell must be able to run commands (`ssh HOST true`)")
    said = [f"{len(text.encode())} bytes on {stream} ({shell.describe_banner(text)})"
            for stream, text in (("stdout", login.banner), ("stderr", login.banner_err))
            if text]
    if not said:
        return Row("login shell", OK, f"{name}, quiet in non-interactive sessions")
    affected = ("the SFTP subsystem and rsync are garbled for ordinary clients (sftp, scp, "
                "rsync -e ssh); remote-exec frames its streams and carries on"
                if login.banner else "messages carry the text; nothing breaks")
    return Row("login shell", WARN, f"{name} prints {' and '.join(said)} in non-interactive "
               f"sessions: {affected}", shell.QUIET_SHELL_FIX)


