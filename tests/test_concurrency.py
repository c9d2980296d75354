"""Many runs at once against one sshd left at its defaults (MaxStartups 10:30:100,
MaxSessions 10): MInt starts many module runs together on one host, and today's flow
loses most of them at the handshake (../shared/docs/baseline.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from remote_exec.journal import Journal

RUNS = 100


@pytest.mark.parametrize("mode", ["holder", "no-holder"])
def test_hundred_runs_at_once_all_succeed(cli, tmp_path: Path, mode: str) -> None:
    runs = RUNS if mode == "holder" else RUNS // 4  # each in-process run imports asyncssh
    env = dict(cli.env)
    if mode == "no-holder":
        env["REMOTE_EXEC_HOLDER"] = "0"
    procs = []
    for i in range(runs):
        work = tmp_path / f"w{i}"
        work.mkdir()
        (work / "a").write_text(f"run {i}\n")
        procs.append((work, subprocess.Popen(
            [sys.executable, "-m", "remote_exec", "run", "--site", "loop", "--quiet",
             "--cmd", "cat a a > out", "a"],
            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )))
    failures = []
    for work, proc in procs:
        try:
            _out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            failures.append(f"{work.name}: timed out")
            continue
        expected = (work / "a").read_text() * 2
        if proc.returncode != 0 or (work / "out").read_text() != expected:
            failures.append(f"{work.name}: exit {proc.returncode}: {err.strip()[-300:]}")
    assert not failures, f"{len(failures)} of {runs} failed:\n" + "\n".join(failures[:5])
    journal = Journal(cli.state / "journal.sqlite")
    try:
        states = [r.state for r in journal.runs(limit=None)]
    finally:
        journal.close()
    assert states.count("succeeded") == runs
