"""The ``pbs``, ``torque`` and ``pjm`` backends end to end, through a real loopback sshd,
against stand-in commands (tests/fakesched) that behave like the real tools and print
their documented output formats (samples and sources in tests/data/)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from batch_site import BatchSite
from fakesched import install

pytestmark = pytest.mark.timeout(300)

FLAVORS = {  # backend -> (title, stand-in flavor, how the tool names a held queue)
    "pbs": ("PBS", "pbspro"),
    "torque": ("Torque", "torque"),
    "pjm": ("PJM", ""),
}


@pytest.fixture(scope="module", params=sorted(FLAVORS))
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    backend = request.param
    base = tmp_path_factory.mktemp(f"sched-{backend}")
    install(base / "bin")
    (base / "sched").mkdir()
    env = {"PATH": f"{base / 'bin'}:/usr/local/bin:/usr/bin:/bin",
           "FAKESCHED_DIR": str(base / "sched"), "FAKESCHED_START_DELAY": "0.3"}
    if FLAVORS[backend][1] == "torque":
        env["FAKESCHED_FLAVOR"] = "torque"
    site = BatchSite.start(base, "cluster", backend, env, resources={"walltime": "10m"})
    site.backend = backend
    site.sched_env = env
    yield site
    site.stop()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "in.txt").write_text("hello batch\n")
    return tmp_path


def title(site: BatchSite) -> str:
    return FLAVORS[site.backend][0]


def test_success(site: BatchSite, work: Path) -> None:
    proc = site.cli("run", "--site", "cluster", "-R", "nodes=1", "--cmd",
                    "cat in.txt > out.txt; pwd > where.txt", "in.txt", "--into", "back",
                    cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "back" / "out.txt").read_text() == "hello batch\n"
    run = site.runs()[0]
    assert (work / "back" / "where.txt").read_text().strip() == run["rundir"]
    assert f"submitted {title(site)} job {run['job_id']}" in proc.stderr
    assert run["job_info"]["state"] == "completed", run["job_info"]
    status = site.cli("status", run["id"], cwd=work).stdout
    assert f"job       {title(site)} job {run['job_id']}" in status


def test_failure_exit_code(site: BatchSite, work: Path) -> None:
    proc = site.cli("run", "--site", "cluster", "--cmd", "echo bad; exit 3", cwd=work)
    assert proc.returncode == 3, proc.stderr
    run = site.runs()[0]
    assert run["exit_code"] == 3 and run["state"] == "failed"


def test_held_job_warns_and_cancel_deletes_it(site: BatchSite, work: Path) -> None:
    proc = site.spawn_run("--site", "cluster", "-R", "queue=held", "--cmd", "touch ran",
                          cwd=work)
    status = site.wait_job(("queued",))
    cancel = site.cli("cancel", status["id"], cwd=work)
    assert cancel.returncode == 0, cancel.stderr
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "warning" in err and ("held" in err.lower() or "HLD" in err)
    assert site.runs()[0]["state"] == "cancelled"
    assert not (Path(status["rundir"]) / "ran").exists()


def test_ctrl_c_while_running(site: BatchSite, work: Path) -> None:
    proc = site.spawn_run("--site", "cluster", "--cmd", "sleep 60", cwd=work)
    status = site.wait_job(("running",))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    run = site.runs()[0]
    assert run["state"] == "cancelled"
    tool = {"pbs": "qdel", "torque": "qdel", "pjm": "pjdel"}[site.backend]
    assert tool in run["error"], run["error"]
    assert run["job_id"] == status["job_id"]


def test_walltime_kill(site: BatchSite, work: Path) -> None:
    proc = site.cli("run", "--site", "cluster", "-R", "walltime=2s", "--cmd",
                    "echo working; sleep 60", cwd=work, timeout=120)
    assert proc.returncode != 0, proc.stderr
    assert "walltime" in proc.stderr, proc.stderr
    run = site.runs()[0]
    assert run["job_info"]["state"] == "timed_out", run["job_info"]


def test_killed_driver_then_resume(site: BatchSite, work: Path) -> None:
    proc = site.spawn_run("--site", "cluster", "--cmd", "sleep 2; echo ok > r.txt; exit 4",
                          "--into", "back", cwd=work)
    status = site.wait_job(("running", "queued"))
    proc.kill()
    proc.wait()
    resumed = site.cli("resume", status["id"], cwd=work)
    assert resumed.returncode == 4, resumed.stderr
    assert (work / "back" / "r.txt").read_text() == "ok\n"


def test_refused_job(site: BatchSite, work: Path) -> None:
    """A submit command that fails is the scheduler refusing the job: exit 73, its words."""
    broken = Path(site.sched_env["PATH"].split(":")[0])
    tool = {"pbs": "qsub", "torque": "qsub", "pjm": "pjsub"}[site.backend]
    saved = (broken / tool).read_text()
    (broken / tool).write_text("#!/bin/sh\necho 'qsub: Unknown queue' >&2\nexit 170\n")
    try:
        proc = site.cli("run", "--site", "cluster", "--cmd", "true", cwd=work)
    finally:
        (broken / tool).write_text(saved)
    assert proc.returncode == 73, proc.stderr
    assert "refused the job" in proc.stderr and "Unknown queue" in proc.stderr


def test_no_scheduler_on_the_host(sshd, tmp_path: Path, work: Path) -> None:
    """The plain loopback sshd has no qsub: a clear error, and site check says so."""
    import yaml

    root = tmp_path / "runs"
    root.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sites": {"nosched": dict(
        sshd.site_definition(), root=str(root), backend="torque")}}))
    site = BatchSite(box=sshd, config=config, state=tmp_path / "state", root=root,
                     name="nosched")
    proc = site.cli("run", "--site", "nosched", "--cmd", "true", cwd=work)
    assert proc.returncode == 73, proc.stderr
    assert "qsub was not found" in proc.stderr
    check = site.cli("site", "check", "nosched", cwd=work)
    assert check.returncode == 1 and "qsub not found" in check.stdout
