"""`remote-exec sandbox up|status|down`, `demo`, and `--help` on every command."""

from __future__ import annotations

import yaml


def test_sandbox_lifecycle_and_run(cli, workdir, tmp_path):
    env = {"REMOTE_EXEC_CONFIG": ""}
    try:
        up = cli("sandbox", "up", cwd=workdir, extra_env=env)
        assert up.returncode == 0, up.stderr
        user_config = tmp_path / "xdg-config" / "remote-exec" / "sites.yaml"
        site = yaml.safe_load(user_config.read_text())["sites"]["sandbox"]
        assert site["host"] == "127.0.0.1"
        status = cli("sandbox", "status", cwd=workdir, extra_env=env)
        assert status.returncode == 0 and "running" in status.stdout
        (workdir / "in.txt").write_text("hello\n")
        run = cli("run", "--site", "sandbox", "--cmd", "tr a-z A-Z < in.txt > out.txt", "in.txt",
                  cwd=workdir, extra_env=env)
        assert run.returncode == 0, run.stderr
        assert (workdir / "out.txt").read_text() == "HELLO\n"
        again = cli("sandbox", "up", cwd=workdir, extra_env=env)
        assert "already running" in again.stdout
    finally:
        down = cli("sandbox", "down", cwd=workdir, extra_env=env)
    assert down.returncode == 0
    status = cli("sandbox", "status", cwd=workdir, extra_env=env)
    assert status.returncode == 3


def test_demo_runs_the_sample_solver(cli, workdir, tmp_path):
    env = {"REMOTE_EXEC_CONFIG": ""}
    try:
        proc = cli("demo", "--into", str(tmp_path / "demo"), cwd=workdir, extra_env=env)
    finally:
        cli("sandbox", "down", cwd=workdir, extra_env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = tmp_path / "demo" / "results"
    assert (results / "Cyclic_SSCurve.csv").read_text().startswith("strain,stress_MPa\n")
    assert "K'" in (results / "summary.txt").read_text()
    assert "Cyclic_SSCurve.csv" in proc.stdout


def test_help_on_every_command(cli, workdir):
    for args in (["--help"], ["run", "--help"], ["legacy", "--help"], ["sandbox", "--help"],
                 ["sandbox", "up", "--help"], ["sandbox", "down", "--help"],
                 ["sandbox", "status", "--help"], ["demo", "--help"], ["templates", "--help"]):
        proc = cli(*args, cwd=workdir)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Usage:" in proc.stdout and len(proc.stdout.splitlines()) > 4, args


def test_templates_listing(cli, workdir):
    proc = cli("templates", cwd=workdir)
    assert proc.returncode == 0 and "generic" in proc.stdout
    proc = cli("templates", "generic", cwd=workdir)
    assert "program" in proc.stdout and "required" in proc.stdout
