"""``remote-exec site install SITE``: prepare a restricted remote side.

Over an unrestricted login (the site administrator's key, ``--admin-identity``, or
the site's own key before it is locked), this puts in ``agent_dir`` on the host:

  remote_exec_agent.py     the agent (one standard-library file, Python >= 3.6);
  entrypoints/NAME.sh      each template the site allows, rendered without values
                           (it reads its parameters from ``$RE_<name>``);
  allowlist.json           what the agent may run: each entrypoint's path, sha256,
                           parameter declarations and return patterns, the runs
                           root, and the site's never/only return patterns.

The site's own program (``entrypoint``), if present on the host, is pinned as the
entrypoint ``site`` (run when no ``--template`` is given). Then it prints the
``authorized_keys`` line that locks the site's key to the agent::

    command="python3 .../remote_exec_agent.py --allowlist .../allowlist.json",restrict KEY

and with ``--apply`` replaces that key's line in the remote ``authorized_keys``
(or appends it), then checks that the locked key reaches the agent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import shlex
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from remote_exec import templates
from remote_exec.agent_file import AGENT_FILE, agent_module
from remote_exec.config import Site
from remote_exec.errors import ConfigError, RemoteExecError
from remote_exec.paths import shipped_dir
from remote_exec.ssh import shell, transfer
from remote_exec.ssh.connect import open_connection

ALLOWLIST = "allowlist.json"
SITE_ENTRY = "site"
DEFAULT_AUTHORIZED_KEYS = "~/.ssh/authorized_keys"


@dataclass
class InstallReport:
    agent_path: str
    allowlist_path: str
    python: str
    entrypoints: dict[str, str] = field(default_factory=dict)  # name -> sha256
    key_line: str = ""
    applied_to: str | None = None
    verified: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def public_key_line(identity_file: str | None) -> str:
    """``TYPE BASE64 COMMENT`` of the site's key (from its private key file)."""
    if not identity_file:
        raise ConfigError("the site has no identity_file, so there is no key to lock",
                          hint="set identity_file for the site (the key MInt uses)")
    try:
        key = asyncssh.read_private_key(identity_file)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"cannot read the site's key {identity_file}: {exc}") from None
    return key.export_public_key("openssh").decode("ascii").strip()


def forced_command(python: str, agent: str, allowlist: str) -> str:
    """The command sshd runs for the locked key (its words quoted for the login shell)."""
    return " ".join(shlex.quote(w) for w in (python, agent, "--allowlist", allowlist))


def key_line(command: str, public_key: str) -> str:
    escaped = command.replace("\\", "\\\\").replace('"', '\\"')
    return f'command="{escaped}",restrict {public_key}'


def _expand(path: str, home: str) -> str:
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path


async def _run(conn: asyncssh.SSHClientConnection, *words: str) -> str:
    result = await shell.run_argv(conn, words)
    if not result.ok:
        raise RemoteExecError(f"`{' '.join(words)}` failed on the host: "
                              f"{(result.stderr or result.stdout).strip()[:300]}")
    return result.stdout.strip()


async def _find_python(conn: asyncssh.SSHClientConnection) -> str:
    for candidate in ("python3", "/usr/bin/python3", "/usr/local/bin/python3"):
        result = await shell.run_argv(conn, [
            candidate, "-c", 'import sys; print(sys.executable); '
            'print("%d.%d" % sys.version_info[:2])'])
        lines = result.stdout.split()
        if result.ok and len(lines) == 2:
            major, minor = (int(x) for x in lines[1].split("."))
            if (major, minor) >= (3, 6):
                return lines[0]
    raise ConfigError("no Python 3.6 or newer on the host; the agent needs one",
                      hint="ask the site administrator to install python3")


async def install(site: Site, *, apply: bool, admin_identity: str | None = None,
                  authorized_keys: str = DEFAULT_AUTHORIZED_KEYS) -> InstallReport:
    """Install the agent, the approved entrypoints and the allowlist on ``site``."""
    public_key = public_key_line(site.identity_file)
    admin = dataclasses.replace(site, identity_file=admin_identity or site.identity_file,
                                restricted=False)
    conn = await open_connection(admin)
    async with conn, await shell.open_sftp(conn) as sftp:
        home = await sftp.realpath(".")
        agent_dir = _expand(site.agent_dir, home)
        root = _expand(site.root, home)
        python = await _find_python(conn)
        await _run(conn, "mkdir", "-p", "-m", "700", agent_dir,
                   posixpath.join(agent_dir, "entrypoints"))
        agent_path = posixpath.join(agent_dir, AGENT_FILE)
        source = (shipped_dir("remote-side_scripts") / AGENT_FILE).read_bytes()
        await transfer.write_atomically(sftp, agent_path, source, 0o700)
        report = InstallReport(agent_path=agent_path,
                               allowlist_path=posixpath.join(agent_dir, ALLOWLIST),
                               python=python)
        entries: dict[str, Any] = {}
        for name, path, body, entry in template_entries(site, agent_dir):
            await transfer.write_atomically(sftp, path, body, 0o500)
            entries[name] = entry
        program = _expand(site.entrypoint, home)
        if await sftp.isfile(program):
            async with sftp.open(program, "rb") as f:
                entries[SITE_ENTRY] = site_entry(program, await f.read())
        else:
            report.warnings.append(
                f"the site's entrypoint {program} is not on the host: runs without "
                "--template will be refused until it is installed and approved")
        await transfer.write_atomically(sftp, report.allowlist_path,
                                        allowlist_text(site, root, agent_dir, entries), 0o600)
        report.entrypoints = {n: e["sha256"] for n, e in entries.items()}
        report.key_line = key_line(
            forced_command(python, agent_path, report.allowlist_path), public_key)
        if apply:
            report.applied_to = _expand(authorized_keys, home)
            await _apply(sftp, report.applied_to, public_key, report.key_line)
    if apply:
        report.verified = await verify(site)
    return report


def template_entries(site: Site, agent_dir: str) -> list[tuple[str, str, bytes, dict[str, Any]]]:
    """Each template the site allows as an approved entrypoint: its name, its path under
    ``agent_dir``, the script (rendered without values: it reads ``$RE_<name>``) and its
    allowlist entry (pinned by sha256)."""
    found = []
    for name in site.templates:
        tpl = templates.load_template(name)
        body = tpl.render_body().encode("utf-8")
        path = posixpath.join(agent_dir, "entrypoints", f"{name}.sh")
        found.append((name, path, body, {
            "path": path, "sha256": hashlib.sha256(body).hexdigest(),
            "interpreter": ["/bin/sh"], "parameters": tpl.declarations(),
            "returns": tpl.returns}))
    return found


def site_entry(path: str, data: bytes) -> dict[str, Any]:
    """The allowlist entry of the site's own program (``site``), pinned by sha256."""
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "interpreter": [],
            "parameters": {}, "returns": templates.return_all()}


def allowlist_text(site: Site, root: str, agent_dir: str, entries: dict[str, Any]) -> bytes:
    """The agent's allowlist.json: the runs root, the agent's state and log, the
    approved entrypoints and the site's never/only return patterns; and the command
    that prints a Slurm REST token (``token``) when the site's ``slurmrest`` section
    has a ``token_command``."""
    allowlist = {
        "version": 1,
        "root": root,
        "state": posixpath.join(agent_dir, "state"),
        "log": posixpath.join(agent_dir, "agent.log"),
        "entrypoints": entries,
        "returns": {"never": list(site.never_return), "only": list(site.only_return)},
    }
    token_command = site.settings.get("slurmrest", {}).get("token_command")
    if isinstance(token_command, list) and token_command:  # a Slurm REST site's tokens
        allowlist["token_command"] = [str(word) for word in token_command]
    return (json.dumps(allowlist, indent=2) + "\n").encode("utf-8")


async def _apply(sftp: asyncssh.SFTPClient, path: str, public_key: str, line: str) -> None:
    """Put ``line`` in ``path`` in place of any line holding the same key."""
    blob = public_key.split()[1]
    try:
        async with sftp.open(path, "rb") as f:
            current = (await f.read()).decode("utf-8", "replace").splitlines()
    except asyncssh.SFTPNoSuchFile:
        current = []
        directory = posixpath.dirname(path)
        if not await sftp.isdir(directory):
            await sftp.mkdir(directory, asyncssh.SFTPAttrs(permissions=0o700))
    kept = [entry for entry in current if blob not in entry.split()]
    text = "\n".join([*kept, line]) + "\n"
    await transfer.write_atomically(sftp, path, text.encode("utf-8"), 0o600)


async def verify(site: Site) -> dict[str, Any]:
    """Connect with the site's (now locked) key and ask the agent who it is."""
    from remote_exec.backends.agent_protocol import AgentClient

    conn = await open_connection(dataclasses.replace(site, restricted=True))
    async with conn:
        return await AgentClient(site.name).hello(conn)


def agent_version() -> str:
    """The version of the agent this remote-exec ships."""
    return str(agent_module().AGENT_VERSION)
