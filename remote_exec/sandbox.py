"""A throwaway OpenSSH server on 127.0.0.1, so a real run needs no remote host.

``remote-exec sandbox up`` generates a host key and a user key under the state
directory, starts ``sshd`` on a free loopback port that accepts only that user key,
pins the host key in a known_hosts file of its own, installs the sample site-side
scripts, and records a site named ``sandbox``. The tests use the same class to
start their servers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from remote_exec.errors import ConfigError, ConnectError
from remote_exec.paths import local_user, shipped_dir, state_dir, user_config_file

SITE_NAME = "sandbox"
ENTRYPOINT_NAME = "execute_remote-side_program_ssh.sh"


def find_sshd() -> str:
    """The sshd binary, or a ConfigError that says how to install it."""
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(
        "sshd (the OpenSSH server) is not installed, so the sandbox cannot start",
        hint="install it: `sudo apt-get install -y openssh-server` (Debian/Ubuntu)",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PortTaken(Exception):
    """sshd could not bind the port it was given."""


class Sandbox:
    """One loopback sshd and its keys, living in ``directory``."""

    #: the site it serves, and what it is (for ``remote-exec demo``)
    site_name = SITE_NAME
    title = "the sandbox sshd"

    def __init__(self, directory: Path | None = None, *, extra_config: list[str] | None = None,
                 wrapper: list[str] | None = None, internal_sftp: bool = False) -> None:
        self.dir = Path(directory) if directory else state_dir() / "sandbox"
        self.extra_config = list(extra_config or [])
        self.wrapper = list(wrapper or [])  # e.g. a namespace wrapper in the tests
        #: serve SFTP inside sshd; by default, as a stock server does, the external
        #: sftp-server, which sshd starts through the user's login shell
        self.internal_sftp = internal_sftp

    # -- files -------------------------------------------------------------------------
    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def user_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def pid_file(self) -> Path:
        return self.dir / "sshd.pid"

    @property
    def port_file(self) -> Path:
        return self.dir / "port"

    @property
    def log_file(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def site_dir(self) -> Path:
        """What a site administrator would install: the entrypoint and its helpers."""
        return self.dir / "site"

    @property
    def runs_root(self) -> Path:
        return self.dir / "runs"

    @property
    def port(self) -> int | None:
        try:
            return int(self.port_file.read_text())
        except (OSError, ValueError):
            return None

    # -- life --------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The sshd pid if it is running."""
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        port = self.port
        return self.pid() is not None and port is not None and self._listening(port)

    def up(self, port: int | None = None) -> dict[str, Any]:
        """Start the server if it is not running; returns the site definition.

        ``port`` reuses a given port (the tests restart a server where it was)."""
        if self.running():
            return self.site_definition()
        sshd = find_sshd()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.runs_root.mkdir(exist_ok=True, mode=0o700)
        self._make_keys()
        self._install_site_scripts()
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        tries = 1 if port else 5
        for attempt in range(tries):
            try:
                self._start_on(sshd, port or free_port())
                break
            except _PortTaken as exc:  # another process took the free port meanwhile
                if attempt == tries - 1:
                    raise ConnectError(f"the sandbox sshd could not listen: {exc}") from None
        return self.site_definition()

    def _start_on(self, sshd: str, port: int) -> None:
        self.port_file.write_text(str(port))
        config = self.dir / "sshd_config"
        config.write_text(self._sshd_config(port))
        kind, blob = Path(f"{self.host_key}.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[127.0.0.1]:{port} {kind} {blob}\n")
        self.log_file.write_text("")
        proc = subprocess.Popen(
            [*self.wrapper, sshd, "-D", "-f", str(config), "-E", str(self.log_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                said = f"{err.strip()} {self.log_file.read_text(errors='replace').strip()}"
                if "Address already in use" in said:
                    raise _PortTaken(said)
                raise ConnectError(f"the sandbox sshd exited at once: {said}")
            if self._listening(port):
                return
            time.sleep(0.05)
        self.down()
        raise ConnectError(f"the sandbox sshd did not listen on 127.0.0.1:{port} within 10 s")

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    def down(self) -> bool:
        """Stop the server; returns whether one was running."""
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGTERM)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            with contextlib.suppress(OSError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    def describe(self, definition: dict[str, Any]) -> str:
        return f"sshd on port {definition['port']}, keys in {self.dir}"

    def site_definition(self) -> dict[str, Any]:
        """The ``sites.sandbox`` entry of the configuration."""
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": local_user(),
            "identity_file": str(self.user_key),
            "known_hosts": str(self.known_hosts),
            "root": str(self.runs_root),
            "entrypoint": str(self.site_dir / ENTRYPOINT_NAME),
            "templates": ["generic"],
            "description": "throwaway loopback sshd started by `remote-exec sandbox up`",
        }

    def write_user_config(self, path: Path | None = None) -> Path:
        """Record the ``sandbox`` site in the user configuration file."""
        return record_site(SITE_NAME, self.site_definition(), path)

    # -- helpers -----------------------------------------------------------------------
    def _make_keys(self) -> None:
        import asyncssh

        for key_path in (self.host_key, self.user_key):
            if key_path.exists():
                continue
            key = asyncssh.generate_private_key(
                "ssh-ed25519", comment=f"remote-exec {key_path.name}"
            )
            key.write_private_key(str(key_path))
            key.write_public_key(str(key_path) + ".pub")
            os.chmod(key_path, 0o600)
        self.authorized_keys.write_text(Path(str(self.user_key) + ".pub").read_text())
        os.chmod(self.authorized_keys, 0o600)

    def _install_site_scripts(self) -> None:
        self.site_dir.mkdir(exist_ok=True)
        scripts = shipped_dir("remote-side_scripts")
        for name, target in (
            ("execute_remote-side_program_ssh.sample.sh", ENTRYPOINT_NAME),
            ("sample_solver.py", "sample_solver.py"),
        ):
            source = scripts / name
            if source.is_file():
                shutil.copy(source, self.site_dir / target)
                os.chmod(self.site_dir / target, 0o755)  # noqa: S103 - site scripts

    def _sftp_server(self) -> str:
        """What a stock sshd_config names: the external sftp-server where installed."""
        from remote_exec.ssh.shell import SFTP_SERVERS

        if not self.internal_sftp:
            for path in SFTP_SERVERS:
                if os.access(path, os.X_OK):
                    return path
        return "internal-sftp"

    def _sshd_config(self, port: int) -> str:
        lines = [
            *self.extra_config,  # first: sshd keeps the first value of each keyword
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            # the sandbox's key for its own user; other accounts (the tests make some)
            # use their own ~/.ssh/authorized_keys, as on any host
            f"AuthorizedKeysFile {self.authorized_keys} .ssh/authorized_keys",
            f"PidFile {self.dir / 'sshd.daemon.pid'}",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "AllowTcpForwarding no",
            f"Subsystem sftp {self._sftp_server()}",
        ]
        return "\n".join(lines) + "\n"


def record_site(name: str, definition: dict[str, Any], path: Path | None = None) -> Path:
    """Record site ``name`` in the user configuration file (a backup of it is kept)."""
    import yaml

    path = path or user_config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if path.is_file():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        shutil.copy2(path, path.with_suffix(".yaml.bak"))
    data.setdefault("sites", {})
    if data["sites"] is None:
        data["sites"] = {}
    data["sites"][name] = definition
    header = "# remote-exec sites (see `remote-exec run --help`).\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
