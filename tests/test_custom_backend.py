"""Adding a backend is one module and one registry line: the tests' own backend
(``tests/plugins/rx_localdir.py``), registered through the ``remote_exec.backends``
entry point group as an installed plugin would be, drives runs through the real CLI:
``run``, ``status``, ``cancel``, ``resume``, ``cleanup`` and ``site check``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from remote_exec.journal import Journal

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def local(tmp_path: Path):
    """The CLI with the plugin installed (a dist-info with its entry point on the path)
    and a site ``here`` that uses it."""
    dist = tmp_path / "dist"
    info = dist / "rx_localdir-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rx-localdir\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[remote_exec.backends]\nlocaldir = rx_localdir:LocalDirBackend\n")
    root = tmp_path / "runs"
    root.mkdir()
    config = tmp_path / "remote-exec.yaml"
    config.write_text(yaml.safe_dump({"sites": {"here": {
        "host": "localhost", "backend": "localdir", "root": str(root), "cancel_grace": 1}}}))
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.txt").write_text("input\n")
    env = {**os.environ, "REMOTE_EXEC_CONFIG": str(config),
           "REMOTE_EXEC_STATE_DIR": str(tmp_path / "state"),
           "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(dist),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    class Local:
        runs = root
        state = tmp_path / "state"
        cwd = work

        def __call__(self, *args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=work,
                                  env=env, capture_output=True, text=True, timeout=120)

        def start(self, *args: str) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "remote_exec", *args], cwd=work,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)

        def record(self):
            journal = Journal(self.state / "journal.sqlite")
            try:
                runs = journal.runs(limit=None)
                return runs[0] if runs else None
            finally:
                journal.close()

        def wait_phase(self, phase: str, run: subprocess.Popen, timeout: float = 90):
            deadline = time.monotonic() + timeout  # (generous: CI machines are loaded)
            while time.monotonic() < deadline:
                record = self.record()
                if record is not None and record.reached(phase):
                    return record
                if run.poll() is not None:
                    raise AssertionError(f"the run ended (exit {run.returncode}) before "
                                         f"{phase}: {run.communicate()}")
                time.sleep(0.1)
            raise AssertionError(f"the run never reached {phase}: {self.record()}")

    return Local()


def test_a_run_status_and_cleanup_through_the_plugin(local, tmp_path: Path) -> None:
    into = tmp_path / "into"
    proc = local("run", "--site", "here", "--into", str(into), "--keep",
                 "--cmd", "cat in.txt > out.txt; echo said", "in.txt")
    assert proc.returncode == 0, proc.stderr
    assert (into / "out.txt").read_text() == "input\n"
    assert "said" in (into / "remote_program_exec.log").read_text()
    record = local.record()
    assert (record.backend, record.state, record.phase) == ("localdir", "succeeded", "cleaned")
    status = local("status", record.id[:8])
    assert status.returncode == 0, status.stderr
    assert "backend   localdir" in status.stdout, status.stdout
    check = local("site", "check", "here")
    assert check.returncode == 0 and "writable" in check.stdout, check.stdout + check.stderr
    cleanup = local("cleanup", "here", "--older-than", "0")
    assert cleanup.returncode == 0, cleanup.stderr
    assert not (local.runs / record.id).exists()


def test_cancel_through_the_plugin(local, tmp_path: Path) -> None:
    run = local.start("run", "--site", "here", "--into", str(tmp_path / "into"),
                      "--cmd", "sleep 60")
    record = local.wait_phase("launched", run)
    pgid = (local.runs / record.id / ".remote-exec" / "pgid").read_text().strip()
    status = local("status", record.id[:8])  # a run being driven: the backend is asked
    assert "entrypoint running" in status.stdout, status.stdout + status.stderr
    cancel = local("cancel", record.id[:8])
    assert cancel.returncode == 0, cancel.stderr
    assert run.wait(60) == 128 + signal.SIGTERM, run.stderr
    assert local.record().state == "cancelled"
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pgid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pgid}"), "the entrypoint outlived the cancel"


def test_resume_through_the_plugin(local, tmp_path: Path) -> None:
    into = tmp_path / "into"
    run = local.start("run", "--site", "here", "--into", str(into), "--json",
                      "--cmd", "sleep 2; echo done > out.txt")
    record = local.wait_phase("launched", run)
    run.kill()  # the driver dies; the entrypoint goes on
    run.wait()
    assert local.record().state == "running"
    resumed = local("resume", record.id[:8])
    assert resumed.returncode == 0, resumed.stderr
    assert (into / "out.txt").read_text() == "done\n"
    final = local.record()
    assert (final.state, final.phase, final.exit_code) == ("succeeded", "cleaned", 0)
    assert (local.runs / record.id / ".remote-exec" / "launched").exists() is False
    events = json.loads(local("status", record.id[:8], "--json").stdout)
    assert events["state"] == "succeeded"
