"""The pull method on one machine: a local queue server and a poller, so that a newcomer
can try a pull run (``remote-exec sandbox up --pull``, ``remote-exec demo --backend pull``).

Everything lives under ``<state>/sandbox-pull``:

  tls/                 a CA of its own and a certificate for 127.0.0.1 (real, verified TLS);
  queue/queue.yaml     the queue server's configuration (a fixed loopback port), its
                       state and spool, ``server.log``, ``server.pid``;
  site/                the site as ``site install --poller`` writes it (poller, agent,
                       allowlist pinning the sample entrypoint and the `generic`
                       template, poller.json, token), plus the sample site program;
  runs/                the site's run root;
  submit.token         the MInt side's token (0600).

The site ``sandbox-pull`` (``backend: pull``) is recorded in the user configuration.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from remote_exec.errors import ConfigError
from remote_exec.paths import shipped_dir, state_dir
from remote_exec.sandbox import ENTRYPOINT_NAME, free_port, record_site

SITE_NAME = "sandbox-pull"
PREFIX = "/re-pull/v1"


class PullSandbox:
    """A queue server and a poller on this machine, in ``directory``."""

    #: the site it serves, and what it is (for ``remote-exec demo``)
    site_name = SITE_NAME
    title = "a queue server and a site poller"

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = Path(directory) if directory else state_dir() / "sandbox-pull"
        self.queue = self.dir / "queue"
        self.site = self.dir / "site"
        self.runs = self.dir / "runs"
        self.submit_token = self.dir / "submit.token"

    # -- what it is ------------------------------------------------------------------------
    @property
    def port(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.queue / "port").read_text())
        return None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{PREFIX}"

    def describe(self, definition: dict[str, Any]) -> str:
        return f"queue server {definition['pull']['server']}, site files in {self.site}"

    def site_definition(self) -> dict[str, Any]:
        """The ``sites.sandbox-pull`` entry of the configuration."""
        return {
            "backend": "pull",
            "root": str(self.runs),
            "entrypoint": str(self.site / ENTRYPOINT_NAME),
            "templates": ["generic"],
            "description": "local queue server and poller started by "
                           "`remote-exec sandbox up --pull`",
            "pull": {"server": self.url, "token_file": str(self.submit_token),
                     "ca_file": str(self.dir / "tls" / "ca.pem"), "queue_timeout": "2m",
                     "poll_wait": 20},
        }

    def running(self) -> bool:
        return all(_alive(self._pid(name)) for name in ("server", "poller"))

    # -- up and down -----------------------------------------------------------------------
    def up(self) -> dict[str, Any]:
        """Start what is not running; the site's definition."""
        from remote_exec.queue.certs import make_loopback_tls

        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca, cert, key = make_loopback_tls(self.dir / "tls")
        self.queue.mkdir(exist_ok=True, mode=0o700)
        self.runs.mkdir(exist_ok=True, mode=0o700)
        if not _alive(self._pid("server")):
            port = self.port or free_port()
            (self.queue / "port").write_text(f"{port}\n")
            config = self.queue / "queue.yaml"
            config.write_text(
                f"listen: 127.0.0.1:{port}\ntls: {{cert: {cert}, key: {key}}}\n"
                f"prefix: {PREFIX}\nstate_dir: {self.queue / 'state'}\n", encoding="utf-8")
            self._spawn("server", [sys.executable, "-m", "remote_exec", "queue", "serve",
                                   "--config", str(config)])
            self._wait_healthy(ca)
        if not self.submit_token.is_file():
            _write_private(self.submit_token, self._token("submit"))
        if not (self.site / "poller.json").is_file():
            self._install_site()
        if not _alive(self._pid("poller")):
            self._spawn("poller", [sys.executable, str(self.site / "remote_exec_poller.py"),
                                   "--config", str(self.site / "poller.json")])
        return self.site_definition()

    def down(self) -> bool:
        """Stop the poller and the server; whether anything was running."""
        stopped = False
        for name in ("poller", "server"):
            pid = self._pid(name)
            if _alive(pid):
                assert pid is not None
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not _alive(pid):
                        break
                    time.sleep(0.05)
                stopped = True
            (self.dir / f"{name}.pid").unlink(missing_ok=True)
        return stopped

    def write_user_config(self, path: Path | None = None) -> Path:
        return record_site(SITE_NAME, self.site_definition(), path)

    # -- helpers ---------------------------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.dir / f"{name}.pid").read_text())
        return None

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        (self.dir / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _wait_healthy(self, ca: Path, timeout: float = 30.0) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/healthz", context=context,  # noqa: S310
                                            timeout=2) as answer:
                    if answer.status == 200:
                        return
            if not _alive(self._pid("server")):
                break
            time.sleep(0.2)
        log = (self.dir / "server.log").read_text(errors="replace")[-2000:]
        raise ConfigError("the sandbox's queue server did not start",
                          hint=f"its log ({self.dir / 'server.log'}) ends with:\n{log}")

    def _token(self, role: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "remote_exec", "queue", "token", "add", "--config",
             str(self.queue / "queue.yaml"), "--role", role, "--site", SITE_NAME],
            capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"could not make a {role} token for the sandbox: "
                              f"{done.stderr.strip()}")
        return done.stdout.strip()

    def _install_site(self) -> None:
        """The site's files as ``site install --poller`` writes them, the sample
        program beside them (pinned as the entrypoint ``site``), and the site token."""
        from remote_exec.config import Config
        from remote_exec.site.poller_bundle import bundle

        shutil.rmtree(self.site, ignore_errors=True)
        site = Config(path=None, sites={SITE_NAME: self.site_definition()}, defaults={},
                      legacy={}).site(SITE_NAME)
        scripts = shipped_dir("remote-side_scripts")
        program = scripts / "execute_remote-side_program_ssh.sample.sh"
        bundle(site, self.site, str(self.site), program,
               python=sys.executable, user=os.environ.get("USER", "root"))
        for source, target in ((program, ENTRYPOINT_NAME),
                               (scripts / "sample_solver.py", "sample_solver.py")):
            shutil.copy(source, self.site / target)
            os.chmod(self.site / target, 0o755)  # noqa: S103 - site scripts
        _write_private(self.site / "token", self._token("site"))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie of ours is not alive
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")


__all__ = ["SITE_NAME", "PullSandbox"]
