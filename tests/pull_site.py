"""Shared helpers for tests of the pull method: a throwaway CA and a real queue server.

Plain helpers, no pytest fixtures: each test file builds its own.

    ca = make_ca(tmp / "ca")                  # ca.pem, server.pem, server.key
    server = QueueServer(tmp / "queue", ca, lease_ttl=2)
    server.start()                            # `remote-exec queue serve` in a subprocess
    token = server.token("site", "corp-lab")  # through `remote-exec queue token add`
    ... server.url (https://127.0.0.1:PORT/re-pull/v1), ca.ca_file ...
    server.kill(); server.restart(); server.stop()
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
import yaml

LISTENING = re.compile(r"^remote-exec queue: listening on (\S+)$")
DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:0", "lease_ttl": 3, "claim_wait_max": 5, "lost_after": 6,
    "sweep_interval": 0.2, "min_free_space": 0,
}


@dataclass
class Ca:
    """A trustme CA with a server certificate for 127.0.0.1 and localhost."""

    authority: trustme.CA
    directory: Path
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_cert(self, name: str, directory: Path) -> tuple[Path, Path]:
        """A client certificate whose CN and SAN are ``name`` (for mTLS tests)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert = self.authority.issue_cert(name, common_name=name)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        return cert_path, key_path


def make_ca(directory: Path) -> Ca:
    """A fresh CA in ``directory``: ``ca.pem``, ``server.pem``, ``server.key``."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA()
    ca_file = directory / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    server = authority.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    server.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    server.private_key_pem.write_to_path(str(key_file))
    return Ca(authority, directory, ca_file, cert_file, key_file)


class QueueServer:
    """``remote-exec queue serve`` in a subprocess, with its queue.yaml in ``directory``."""

    def __init__(self, directory: Path, ca: Ca, **settings: Any) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.state_dir = self.directory / "state"
        self.config = self.directory / "queue.yaml"
        self.settings: dict[str, Any] = {
            **DEFAULTS, "state_dir": str(self.state_dir),
            "tls": {"cert": str(ca.cert_file), "key": str(ca.key_file), "client_ca": None},
            **settings,
        }
        self.url = ""
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self._write()

    def _write(self) -> None:
        self.config.write_text(yaml.safe_dump(self.settings))

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "remote_exec", "queue", *args, "--config", str(self.config)]

    def start(self, timeout: float = 30) -> QueueServer:
        """Start the server and wait for its listening line."""
        self.stderr_path = self.directory / "server.stderr"
        stderr = open(self.stderr_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self._command("serve"), stdout=subprocess.PIPE,
                                     stderr=stderr, text=True, env=dict(os.environ))
        stderr.close()
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                line = self.proc.stdout.readline()
                match = LISTENING.match(line.strip())
                if match:
                    self.url = match.group(1)
                    self.port = int(self.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                    selector.close()
                    return self
                if not line and self.proc.poll() is not None:
                    break
            elif self.proc.poll() is not None:
                break
        selector.close()
        self.kill()
        raise RuntimeError(f"the queue server did not start (got {line!r}); stderr:\n"
                           f"{self.stderr_path.read_text(errors='replace')}")

    def token(self, role: str, site: str | None = None, expires: str | None = None) -> str:
        """A new token through the real CLI (`queue token add`)."""
        args = ["token", "add", "--role", role]
        if site:
            args += ["--site", site]
        if expires:
            args += ["--expires", expires]
        done = self.admin(*args)
        if done.returncode != 0:
            raise RuntimeError(f"queue token add failed: {done.stderr}")
        return done.stdout.strip()

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``remote-exec queue ARGS --config queue.yaml``."""
        return subprocess.run(self._command(*args), capture_output=True, text=True,
                              env=dict(os.environ), timeout=60)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM and wait; the exit code (None if it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        if self.proc.stdout:
            self.proc.stdout.close()
        return code

    def kill(self) -> None:
        """SIGKILL (nothing is cleaned up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()

    def restart(self) -> QueueServer:
        """Start again on the same port (after stop() or kill())."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        if self.port:
            host = str(self.settings["listen"]).rsplit(":", 1)[0]
            self.settings["listen"] = f"{host}:{self.port}"
            self._write()
        return self.start()

    def peak_rss_kib(self) -> int:
        """The server process's peak resident memory (VmHWM), in KiB."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.M).group(1))
