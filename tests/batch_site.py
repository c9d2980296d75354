"""A site whose sshd sessions reach a batch scheduler, for the scheduler backends' tests.

The loopback sshd passes the scheduler's environment to every session with
``SetEnv`` (``SLURM_CONF``, or a ``PATH`` with the PBS/PJM stand-ins first), so
the commands run exactly as on a login node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from remote_exec.sandbox import Sandbox


@dataclass
class BatchSite:
    box: Sandbox
    config: Path
    state: Path
    root: Path
    name: str
    _known: frozenset = frozenset()

    @classmethod
    def start(cls, base: Path, name: str, backend: str, env: dict[str, str],
              **site: Any) -> BatchSite:
        box = _sshd(base, env)
        root = base / "runs"
        root.mkdir()
        entry = dict(box.site_definition(), root=str(root), backend=backend, cancel_grace=2,
                     **site)
        config = base / "remote-exec.yaml"
        config.write_text(yaml.safe_dump({"sites": {name: entry}}))
        return cls(box=box, config=config, state=base / "state", root=root, name=name)

    @classmethod
    def start_locked(cls, base: Path, name: str, env: dict[str, str], **site: Any) -> BatchSite:
        """A restricted site: an ordinary site whose key `site install --apply` then locked
        to the agent (under ``base/agent``), with a key of its own; runs under
        ``base/runs``. ``env`` reaches every sshd session, as in :meth:`start`."""
        import asyncssh

        box = _sshd(base, env)
        mint_key = base / "mint_key"
        asyncssh.generate_private_key("ssh-ed25519", comment="mint key").write_private_key(
            str(mint_key))
        os.chmod(mint_key, 0o600)
        root = base / "runs"
        root.mkdir()
        entry = {"host": "127.0.0.1", "port": box.port, "user": box.site_definition()["user"],
                 "identity_file": str(mint_key), "known_hosts": str(box.known_hosts),
                 "root": str(root), "agent_dir": str(base / "agent"), "restricted": True,
                 "cancel_grace": 2, **site}
        config = base / "remote-exec.yaml"
        config.write_text(yaml.safe_dump({"sites": {name: entry}}))
        locked = cls(box=box, config=config, state=base / "state", root=root, name=name)
        proc = locked.cli("site", "install", name, "--apply", "--admin-identity",
                          str(box.user_key), "--authorized-keys", str(box.authorized_keys),
                          cwd=base)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return locked

    def env(self, holder: bool = False) -> dict[str, str]:
        return dict(os.environ, REMOTE_EXEC_CONFIG=str(self.config),
                    REMOTE_EXEC_STATE_DIR=str(self.state),
                    REMOTE_EXEC_HOLDER="1" if holder else "0", REMOTE_EXEC_HOLDER_IDLE="20")

    def cli(self, *args: str, cwd: Path, timeout: float = 180,
            holder: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=cwd,
                              env=self.env(holder), capture_output=True, text=True,
                              timeout=timeout)

    def spawn(self, *args: str, cwd: Path) -> subprocess.Popen:
        """``remote-exec ARGS`` in the background (stdout/stderr to pipes)."""
        return subprocess.Popen([sys.executable, "-m", "remote_exec", *args], cwd=cwd,
                                env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def newest(self) -> dict:
        """The newest run's ``list --json`` record."""
        return self.runs()[0]

    def runs(self) -> list[dict]:
        proc = self.cli("list", "--json", "-n", "50", cwd=self.root)
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def status(self, run_id: str, local: bool = True) -> dict:
        args = ["status", run_id, "--json"] + (["--local"] if local else [])
        proc = self.cli(*args, cwd=self.root)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def spawn_run(self, *args: str, cwd: Path) -> subprocess.Popen:
        """``remote-exec run ARGS`` in the background; :meth:`wait_job` watches it."""
        self._known = {r["id"] for r in self.runs()}
        return self.spawn("run", *args, cwd=cwd)

    def wait_job(self, states: tuple[str, ...], timeout: float = 60) -> dict:
        """Wait until the job of the run :meth:`spawn_run` started is in one of
        ``states``; that run's status."""
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            runs = [r for r in self.runs() if r["id"] not in self._known]
            if runs:
                last = self.status(runs[0]["id"])
                job = last.get("job_info") or {}
                if job.get("state") in states:
                    return last
            time.sleep(0.3)
        raise AssertionError(f"no job reached {states}: {last}")

    def stop(self) -> None:
        self.cli("holder", "stop", cwd=self.root)
        self.box.down()


def _sshd(base: Path, env: dict[str, str]) -> Sandbox:
    """The site's loopback sshd, passing ``env`` to every session."""
    setenv = " ".join(f"{k}={v}" for k, v in env.items())
    box = Sandbox(base / "sshd", extra_config=[f"SetEnv {setenv}"] if env else [])
    box.up()
    return box


def slurm_cluster(tmp_path_factory: Any, name: str, *, rest: bool = False) -> Any:
    """A started test Slurm (tests/slurm_cluster.py) for a module fixture, which stops it;
    skipped with the install line where Slurm (or slurmrestd) is missing, a failure in CI."""
    import pytest
    from slurm_cluster import SlurmCluster

    why = SlurmCluster.available() or (SlurmCluster.rest_available() if rest else None)
    if why and os.environ.get("CI"):
        pytest.fail(f"CI must run the real Slurm tests: {why} (see .ci/run)")
    if why:
        pytest.skip(why)
    return SlurmCluster(tmp_path_factory.mktemp(name), rest=rest).up()
