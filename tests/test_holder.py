"""The per-user connection holder: same results as an in-process run, and observable."""

from __future__ import annotations


def test_holder_and_in_process_runs_agree(cli, workdir, tmp_path):
    (workdir / "x").write_bytes(bytes(range(256)) * 40)
    outs = {}
    for mode, extra in (("holder", []), ("direct", ["--no-holder"])):
        dest = tmp_path / mode
        proc = cli("run", "--site", "loop", *extra, "--into", str(dest), "--cmd",
                   "sha256sum x > sum; cp x y", "x", cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        outs[mode] = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert outs["holder"] == outs["direct"]
    assert outs["holder"]["y"] == (workdir / "x").read_bytes()


def test_holder_status_and_stop(cli, workdir):
    assert cli("holder", "status", cwd=workdir).returncode == 3
    proc = cli("run", "--site", "loop", "--cmd", "true", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    status = cli("holder", "status", cwd=workdir)
    assert status.returncode == 0
    assert "1 done" in status.stdout and "127.0.0.1" in status.stdout
    assert "stopping" in cli("holder", "stop", cwd=workdir).stdout


def test_env_disables_holder(cli, workdir):
    proc = cli("run", "--site", "loop", "--cmd", "true", cwd=workdir,
               extra_env={"REMOTE_EXEC_HOLDER": "0"})
    assert proc.returncode == 0, proc.stderr
    assert cli("holder", "status", cwd=workdir).returncode == 3
