"""What the end-to-end tests of a WebAPI backend (fujitsu, rescale) share: a tiny solver
run by the generic template, a configuration with the service's site (and the loopback
SSH site to compare with), and the real CLI run in a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

SOLVER = """#!/bin/sh
# a tiny solver: reads its input, writes results and a log
cat input.dat > copy.dat
mkdir -p result && echo "sum $(wc -c < input.dat)" > result/summary.txt
echo "solver ran with: $*"
exit "${EXIT:-0}"
"""


class ServiceEnv:
    """``sites`` (the service's under ``site``) written to a configuration of its own,
    with the SSH site ``ssh`` when ``sshd`` is given; ``secrets`` go into the CLI's
    environment, from which variables starting with ``cleared`` are removed."""

    site = ""
    cleared: tuple[str, ...] = ("REMOTE_EXEC",)
    timeout: float = 120

    def __init__(self, tmp: Path, sites: dict[str, Any], sshd: Any = None,
                 solver_dir: Path | None = None) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        solver_dir = solver_dir or tmp
        solver_dir.mkdir(exist_ok=True)
        self.solver = solver_dir / "solver.sh"
        self.solver.write_text(SOLVER)
        self.solver.chmod(0o755)
        self.sites = sites
        if sshd is not None:
            root = tmp / "ssh-runs"
            root.mkdir()
            self.sites["ssh"] = dict(sshd.site_definition(), root=str(root),
                                     templates=["generic"])
        self.config = tmp / "remote-exec.yaml"
        self.write()
        self.secrets: dict[str, str] = {}

    def write(self) -> None:
        self.config.write_text(yaml.safe_dump({"sites": self.sites}))

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(self.cleared)}
        env.update(REMOTE_EXEC_CONFIG=str(self.config), REMOTE_EXEC_STATE_DIR=str(self.state),
                   REMOTE_EXEC_HOLDER="0", **self.secrets)
        env.update(extra)
        return env

    def cli(self, *args: str, cwd: Path, timeout: float | None = None, **extra: str
            ) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=cwd,
                              env=self.env(**extra), capture_output=True, text=True,
                              timeout=timeout or self.timeout)

    def spawn(self, *args: str, cwd: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "remote_exec", *args], cwd=cwd,
                                env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run_args(self, site: str = "", *more: str) -> list[str]:
        return ["run", "--site", site or self.site, "-t", "generic",
                "-p", f"program={self.solver}", "-p", "args=one", "-p", "args=two words",
                *more, "input.dat"]

    def newest(self) -> dict:
        out = self.cli("list", "--json", "-n", "1", cwd=self.tmp).stdout
        return json.loads(out.splitlines()[0])

    def wait_job(self, states: tuple[str, ...], timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cli("list", "--json", "-n", "1", cwd=self.tmp).stdout
            if out.strip():
                run = json.loads(out.splitlines()[0])
                if (run.get("job_info") or {}).get("native") in states:
                    return run
            time.sleep(0.2)
        raise AssertionError(f"no job reached {states}")


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative name -> text)."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}

