"""Opening the one SSH connection of a run, with errors that say what to do.

asyncssh reads ``~/.ssh/config`` itself (Host aliases, HostName, Port, User,
IdentityFile, ProxyJump, ProxyCommand, UserKnownHostsFile); values set on the site
in remote-exec's configuration take precedence. Host keys are always verified.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import asyncssh

from remote_exec.config import Site
from remote_exec.errors import AuthError, ConnectError


def connect_options(site: Site) -> dict[str, Any]:
    """The keyword arguments for :func:`asyncssh.connect`; unset values defer to ssh config."""
    options: dict[str, Any] = {
        "connect_timeout": site.connect_timeout,
        # a stalled link is declared dead after about stall_timeout seconds of silence
        "keepalive_interval": max(site.stall_timeout / 3, 0.5),
        "keepalive_count_max": 3,
        "agent_forwarding": False,
    }
    if site.port:
        options["port"] = site.port
    if site.user:
        options["username"] = site.user
    if site.identity_file:
        options["client_keys"] = [site.identity_file]
    if site.known_hosts:
        options["known_hosts"] = site.known_hosts
    return options


async def open_connection(site: Site) -> asyncssh.SSHClientConnection:
    """Connect and authenticate to ``site``, or raise a :class:`RemoteExecError`."""
    try:
        return await asyncssh.connect(site.host, **connect_options(site))
    except asyncssh.HostKeyNotVerifiable as exc:
        raise _host_key_error(site, exc) from None
    except asyncssh.PermissionDenied:
        key = site.identity_file or "your default keys (~/.ssh/id_*, ssh-agent)"
        raise AuthError(
            f"{site.display}: authentication failed with {key}",
            hint="check that the public key is in the remote ~/.ssh/authorized_keys "
            "and that the site's identity_file/user are right; try `ssh -v` with the same key",
        ) from None
    except socket.gaierror as exc:
        raise ConnectError(
            f"{site.display}: unknown host ({exc.strerror})",
            hint="check the site's host, or the Host/HostName entry in ~/.ssh/config",
        ) from None
    except (TimeoutError, asyncssh.misc.ChannelOpenError) as exc:
        raise ConnectError(
            f"{site.display}: connection timed out or was refused ({exc})",
            hint="check that the host is up and that sshd listens on that port",
        ) from None
    except ConnectionRefusedError:
        raise ConnectError(
            f"{site.display}: connection refused",
            hint="check the port, and that sshd is running on the remote host",
        ) from None
    except asyncssh.KeyImportError as exc:
        raise AuthError(
            f"cannot read the private key {site.identity_file}: {exc}",
            hint="use an unencrypted key or load it into ssh-agent",
        ) from None
    except FileNotFoundError as exc:
        raise AuthError(
            f"{exc.filename}: no such file",
            hint="fix identity_file / known_hosts in the site configuration",
        ) from None
    except (ConnectionResetError, BrokenPipeError, asyncssh.ConnectionLost,
            asyncssh.DisconnectError) as exc:
        raise ConnectError(
            f"{site.display}: the server closed the connection during the handshake ({exc})",
            hint="sshd drops connections beyond its MaxStartups limit when many open at once; "
            "try again, or check the host with `ssh -v`",
            retryable=True,
        ) from None
    except (OSError, asyncssh.Error) as exc:
        raise ConnectError(
            f"{site.display}: cannot connect: {exc}",
            hint="check the host with `ssh -v`",
        ) from None


def _known_hosts_files(site: Site) -> list[Path]:
    if site.known_hosts:
        return [Path(site.known_hosts)]
    return [Path.home() / ".ssh" / "known_hosts", Path("/etc/ssh/ssh_known_hosts")]


def _host_key_error(site: Site, exc: Exception) -> AuthError:
    """Tell an unknown host from a changed host key, and say how to fix either."""
    port = site.port or 22
    host = site.host
    entry = host if port == 22 else f"[{host}]:{port}"
    for path in _known_hosts_files(site):
        if not path.is_file():
            continue
        try:
            known = asyncssh.read_known_hosts(str(path))
            host_keys = known.match(host, "", port)[0]
        except (OSError, ValueError, asyncssh.Error):
            continue
        if host_keys:
            return AuthError(
                f"{site.display}: the host key has CHANGED since it was recorded in {path}; "
                "refusing to connect (this can mean someone is intercepting the connection)",
                hint=f"if the host was reinstalled and you trust the new key, remove the old one "
                f"with `ssh-keygen -R '{entry}' -f {path}` and connect once with ssh to record it",
            )
    files = ", ".join(str(p) for p in _known_hosts_files(site))
    target = _known_hosts_files(site)[0]
    return AuthError(
        f"{site.display}: host key is not known (looked in {files}); refusing to connect",
        hint=f"check the fingerprint with the site administrator, then record it by connecting "
        f"once with `ssh -o UserKnownHostsFile={target} -p {port} {host}`, or with "
        f"`ssh-keyscan -p {port} {host} >> {target}` after comparing the fingerprint",
    )
