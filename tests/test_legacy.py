"""The MInt drop-in: `remote-exec legacy client_name:... client_cmd:... client_files:...`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import REPO

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d: (start|normal end|abnormal end): (\S+): unknown$"
)


def solver_lines(base: Path, site_id: str) -> list[tuple[str, str]]:
    log = base / site_id / "solver_logs" / "solver_execute.log"
    lines = log.read_text().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return [(m.group(1), m.group(2)) for m in matches]  # type: ignore[union-attr]


def test_legacy_success_writes_outputs_and_solver_log(cli, workdir, tmp_path):
    (workdir / "a").write_text("1\n")
    (workdir / "b").write_text("2\n")
    base = tmp_path / "assets"
    env = {"MISYSTEM_SITEID": "site00002", "REMOTE_EXEC_SOLVER_LOG_BASE": str(base)}
    proc = cli("legacy", "client_name:loop", "client_cmd:cat a b > out", "client_files:a,b",
               "solver:abaqus", cwd=workdir, extra_env=env)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "out").read_text() == "1\n2\n"
    assert (workdir / "remote_program_exec.log").exists()
    assert solver_lines(base, "site00002") == [("start", "abaqus"), ("normal end", "abaqus")]


def test_legacy_failure_prints_remote_log_between_markers(cli, workdir, tmp_path):
    (workdir / "a").write_text("1\n")
    base = tmp_path / "assets"
    env = {"MISYSTEM_SITEID": "site00009", "REMOTE_EXEC_SOLVER_LOG_BASE": str(base)}
    proc = cli("legacy", "client_name:loop", "client_cmd:echo solver exploded; exit 3",
               "client_files:a", cwd=workdir, extra_env=env)
    assert proc.returncode == 1
    marker = "---------- remote side log ----------------"
    assert f"{marker}\nsolver exploded\n{marker}\n" in proc.stdout
    assert solver_lines(base, "site00009") == [("start", "echo"), ("abnormal end", "echo")]


def test_legacy_without_siteid_writes_no_solver_log(cli, workdir, tmp_path):
    (workdir / "a").write_text("1\n")
    proc = cli("legacy", "client_name:loop", "client_cmd:cp a b", "client_files:a", cwd=workdir,
               extra_env={"REMOTE_EXEC_SOLVER_LOG_BASE": str(tmp_path / "assets")})
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "b").read_text() == "1\n"
    assert not (tmp_path / "assets").exists()


def test_legacy_missing_arguments_print_usage_and_exit_1(cli, workdir):
    proc = cli("legacy", "client_name:loop", cwd=workdir)
    assert proc.returncode == 1
    assert "client_files" in proc.stdout


def test_legacy_missing_input_exits_1_and_creates_nothing(cli, workdir, remote_root):
    proc = cli("legacy", "client_name:loop", "client_cmd:true", "client_files:nope.dat",
               cwd=workdir)
    assert proc.returncode == 1
    assert "nope.dat" in proc.stderr
    assert list(remote_root.iterdir()) == []


def test_old_name_wrapper_script(cli, workdir):
    (workdir / "a").write_text("x\n")
    wrapper = REPO / "scripts" / "execute_remote_command.sample.py"
    proc = subprocess.run(
        ["python3", str(wrapper), "client_name:loop", "client_cmd:cat a a > aa", "client_files:a"],
        cwd=workdir, env=cli.env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "aa").read_text() == "x\nx\n"
