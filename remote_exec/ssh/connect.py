"""Opening the one SSH connection of a run, with errors that say what to do.

asyncssh reads ``~/.ssh/config`` itself (Host aliases, HostName, Port, User,
IdentityFile, ProxyJump, ProxyCommand, UserKnownHostsFile); values set on the site
in remote-exec's configuration take precedence. Host keys are always verified.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncssh

from remote_exec.config import Site
from remote_exec.errors import AuthError, ConnectError

#: the ciphers offered, in this order: asyncssh's own, with AES-GCM first. asyncssh
#: prefers chacha20-poly1305 (as OpenSSH does, in C), which it computes in two calls per
#: packet; AES-GCM (AES-NI through OpenSSL) moved 1.5-1.6x the bytes per second through
#: one channel on the loopback sshd (README *Measured*). The same set as asyncssh's
#: default, so every server that accepts one accepts the other. Not offered when
#: ~/.ssh/config sets ``Ciphers``: asyncssh applies that itself.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                     "chacha20-poly1305@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr")

#: OpenSSH's default identities, tried when neither the site nor ~/.ssh/config names one
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa", "id_ed25519_sk", "id_ecdsa_sk")


def connect_options(site: Site, caller_env: Mapping[str, str] | None = None,
                    ) -> dict[str, Any]:
    """The keyword arguments for :func:`asyncssh.connect`; unset values defer to ssh config.

    ``caller_env`` is the environment of whoever the connection is for (the holder
    passes each client's); None means this process's own. Its ``SSH_AUTH_SOCK`` is the
    ssh-agent asked for keys, and without one no agent is used.
    """
    options: dict[str, Any] = {
        "connect_timeout": site.connect_timeout,
        # a stalled link is declared dead after about stall_timeout seconds of silence
        "keepalive_interval": max(site.stall_timeout / 3, 0.5),
        "keepalive_count_max": 3,
        "agent_forwarding": False,
        # an encrypted identity_file is skipped, not fatal: the agent may hold it
        # (remote-exec never asks for a passphrase; see _auth_error)
        "ignore_encrypted": True,
    }
    if caller_env is not None:
        options["agent_path"] = caller_env.get("SSH_AUTH_SOCK") or None
    if site.port:
        options["port"] = site.port
    if site.user:
        options["username"] = site.user
    if site.identity_file:
        options["client_keys"] = [site.identity_file]
    if site.known_hosts:
        options["known_hosts"] = site.known_hosts
    if not _configures_ciphers():
        options["encryption_algs"] = list(PREFERRED_CIPHERS)
    return options


def _configures_ciphers() -> bool:
    """Whether ~/.ssh/config names ``Ciphers`` anywhere (then it decides, not us)."""
    try:
        text = (Path.home() / ".ssh" / "config").read_text(errors="replace")
    except OSError:
        return False
    return any(line.strip().lower().startswith("ciphers") for line in text.splitlines())


async def open_connection(site: Site, caller_env: Mapping[str, str] | None = None,
                          ) -> asyncssh.SSHClientConnection:
    """Connect and authenticate to ``site``, or raise a :class:`RemoteExecError`."""
    options = connect_options(site, caller_env)
    try:
        return await asyncssh.connect(site.host, **options)
    except asyncssh.HostKeyNotVerifiable as exc:
        raise _host_key_error(site, exc) from None
    except asyncssh.PermissionDenied:
        agent = options.get("agent_path", os.environ.get("SSH_AUTH_SOCK"))
        raise await _auth_error(site, agent) from None
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
            hint="identity_file must be a private key file (OpenSSH or PEM format)",
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


async def _auth_error(site: Site, agent: str | None) -> AuthError:
    """Why authentication failed: a passphrase-protected key no agent holds, or the
    key is not accepted by the host."""
    agent_keys = await _agent_public_keys(agent)
    for path in _identity_files(site):
        if _is_encrypted(path) and not _held(path, agent_keys):
            start = "" if agent else "start one with `eval $(ssh-agent)`, then "
            return AuthError(
                f"{site.display}: authentication failed: the key {path} is encrypted "
                f"(it has a passphrase) and no ssh-agent holds it",
                hint=f"{start}load it with `ssh-add {path}` and run again "
                "(remote-exec never asks for a passphrase)",
            )
    key = site.identity_file or "your default keys (~/.ssh/id_*, ssh-agent)"
    return AuthError(
        f"{site.display}: authentication failed with {key}",
        hint="check that the public key is in the remote ~/.ssh/authorized_keys "
        "and that the site's identity_file/user are right; try `ssh -v` with the same key",
    )


def _identity_files(site: Site) -> list[Path]:
    """The private keys a connection to ``site`` offers: the site's, else those of
    ~/.ssh/config, else OpenSSH's defaults (existing files only)."""
    if site.identity_file:
        return [Path(site.identity_file)]
    resolved = _as_configured(site)
    named = list(resolved.config.get("IdentityFile") or []) if resolved else []
    if not named:
        named = [str(Path.home() / ".ssh" / name) for name in DEFAULT_IDENTITIES]
    return [path for path in (Path(n).expanduser() for n in named) if path.is_file()]


def _as_configured(site: Site) -> asyncssh.SSHClientConnectionOptions | None:
    """``site`` as ~/.ssh/config completes it (HostName, Port, User, IdentityFile), read
    by asyncssh as a connection reads it; None without a readable file."""
    config = Path.home() / ".ssh" / "config"
    if not config.is_file():
        return None
    given = {key: value for key, value in (("port", site.port), ("username", site.user))
             if value}
    try:
        return asyncssh.SSHClientConnectionOptions(host=site.host, config=[str(config)],
                                                   client_keys=None, **given)
    except (OSError, ValueError, asyncssh.Error):
        return None


def _is_encrypted(path: Path) -> bool:
    """Whether the private key at ``path`` needs a passphrase to be read."""
    try:
        asyncssh.read_private_key(str(path))
    except asyncssh.KeyImportError as exc:
        return "passphrase" in str(exc).lower()
    except (OSError, ValueError):
        return False
    return False


def _public_key(path: Path) -> bytes | None:
    """The public key beside an encrypted private key (``KEY.pub``), if there is one."""
    with contextlib.suppress(OSError, ValueError, asyncssh.KeyImportError):
        return asyncssh.read_public_key(f"{path}.pub").public_data
    return None


def _held(path: Path, agent_keys: set[bytes]) -> bool:
    """Whether the agent holds the key at ``path`` (judged by ``path.pub``; without
    one, an agent holding any key is given the benefit of the doubt)."""
    public = _public_key(path)
    return public in agent_keys if public is not None else bool(agent_keys)


async def _agent_public_keys(agent: str | None) -> set[bytes]:
    """The public keys ``agent`` holds (none if it is unset or does not answer)."""
    if not agent:
        return set()
    try:
        client = await asyncssh.connect_agent(agent)
    except (OSError, asyncssh.Error):
        return set()
    try:
        return {key.public_data for key in await client.get_keys()}
    except (OSError, asyncssh.Error):
        return set()
    finally:
        client.close()
        await client.wait_closed()


def _known_hosts_files(site: Site, resolved: Any) -> list[Path]:
    """Where the host keys are looked up: the site's file, else ~/.ssh/config's
    UserKnownHostsFile, else OpenSSH's defaults."""
    if site.known_hosts:
        return [Path(site.known_hosts)]
    configured = resolved.config.get("UserKnownHostsFile") if resolved else None
    if configured:
        return [Path(name).expanduser() for name in configured]
    return [Path.home() / ".ssh" / "known_hosts", Path("/etc/ssh/ssh_known_hosts")]


def _host_key_error(site: Site, exc: Exception) -> AuthError:
    """Tell an unknown host from a changed host key, and say how to fix either."""
    resolved = _as_configured(site)
    host = resolved.host if resolved else site.host
    port = resolved.port if resolved else (site.port or 22)
    entry = host if port == 22 else f"[{host}]:{port}"
    known_files = _known_hosts_files(site, resolved)
    for path in known_files:
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
    files = ", ".join(str(p) for p in known_files)
    target = known_files[0]
    return AuthError(
        f"{site.display}: host key is not known (looked in {files}); refusing to connect",
        hint=f"check the fingerprint with the site administrator, then record it by connecting "
        f"once with `ssh -o UserKnownHostsFile={target} -p {port} {host}`, or with "
        f"`ssh-keyscan -p {port} {host} >> {target}` after comparing the fingerprint",
    )
