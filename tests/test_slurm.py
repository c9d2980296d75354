"""The ``slurm`` backend against a real Slurm: ``slurmctld``, ``slurmd`` and ``munge``
from Debian's packages on loopback (tests/slurm_cluster.py), reached over a real
loopback sshd whose sessions see the cluster's ``SLURM_CONF``."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from batch_site import BatchSite, slurm_cluster
from slurm_cluster import SlurmCluster

# one Slurm at a time on this machine (slurmd takes the node's name): one xdist group
pytestmark = [pytest.mark.timeout(400), pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = slurm_cluster(tmp_path_factory, "slurm")
    yield cluster
    cluster.down()


@pytest.fixture(scope="module")
def site(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory):
    site = BatchSite.start(tmp_path_factory.mktemp("slurm-site"), "hpc", "slurm",
                           {"SLURM_CONF": str(cluster.conf)},
                           resources={"walltime": "10m"})
    yield site
    site.stop()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "in.txt").write_text("hello slurm\n")
    return tmp_path


def test_success_runs_as_a_slurm_job(site: BatchSite, cluster: SlurmCluster, work: Path) -> None:
    proc = site.cli("run", "--site", "hpc", "-R", "cpus_per_task=1", "--cmd",
                    'cat in.txt > out.txt; echo "job=$SLURM_JOB_ID" >> out.txt', "in.txt",
                    "--into", "back", cwd=work, holder=True)  # through the holder
    assert proc.returncode == 0, proc.stderr
    out = (work / "back" / "out.txt").read_text()
    assert out.startswith("hello slurm\njob=")
    job_id = out.split("job=")[1].strip()
    assert f"submitted Slurm job {job_id}" in proc.stderr
    run = site.newest()
    assert run["backend"] == "slurm" and run["job_id"] == job_id
    job = run["job_info"]
    assert job["native"] == "COMPLETED" and job["state"] == "completed"
    assert job["queue_wait"] is not None and job["run_time"] is not None
    assert cluster.job(job_id)["JobState"] == "COMPLETED"
    assert cluster.job(job_id)["JobName"] == "re-" + run["id"].replace("-", "")[:8]
    text = site.cli("status", run["id"], cwd=work).stdout
    assert f"job       Slurm job {job_id}: COMPLETED" in text and "queued" in text


def test_failing_job_exit_code_is_the_runs(site: BatchSite, cluster: SlurmCluster,
                                           work: Path) -> None:
    proc = site.cli("run", "--site", "hpc", "--cmd", "echo broken; exit 3", cwd=work)
    assert proc.returncode == 3, proc.stderr
    assert "broken" in proc.stderr  # the remote log's tail
    run = site.newest()
    assert run["state"] == "failed" and run["exit_code"] == 3
    assert run["job_info"]["native"] == "FAILED"
    assert cluster.job(run["job_id"])["ExitCode"] == "3:0"
    assert "Slurm job" in run["error"] and "FAILED" in run["error"]


def test_refused_submission_is_clear(site: BatchSite, work: Path) -> None:
    proc = site.cli("run", "--site", "hpc", "-R", "queue=nosuch", "--cmd", "true", cwd=work)
    assert proc.returncode == 73, proc.stderr
    assert "Slurm refused the job" in proc.stderr and "partition" in proc.stderr.lower()
    assert (work / "in.txt").read_text() == "hello slurm\n"


def test_bad_resource_refused_before_connecting(site: BatchSite, work: Path) -> None:
    proc = site.cli("run", "--site", "hpc", "-R", "walltime=soon", "--cmd", "true", cwd=work)
    assert proc.returncode == 78 and "walltime" in proc.stderr


def test_cancel_while_pending(site: BatchSite, cluster: SlurmCluster, work: Path) -> None:
    blocker = cluster.hold_node()
    try:
        proc = site.spawn_run("--site", "hpc", "--cmd", "touch ran", "--into", "back",
                          cwd=work)
        status = site.wait_job(("queued",))
        assert status["job_info"]["native"] == "PENDING"
        assert status["job_info"]["reason"]  # e.g. Resources / Priority
        text = site.cli("status", status["id"], cwd=work).stdout
        assert "PENDING" in text
        cancel = site.cli("cancel", status["id"], cwd=work)
        assert cancel.returncode == 0, cancel.stderr
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        job_id = status["job_id"]
        assert cluster.job(job_id)["JobState"] == "CANCELLED"
        assert site.newest()["state"] == "cancelled"
        assert not (Path(status["rundir"]) / "ran").exists()
    finally:
        cluster.run("scancel", blocker, check=False)


def test_ctrl_c_while_running_cancels_the_job(site: BatchSite, cluster: SlurmCluster,
                                              work: Path) -> None:
    proc = site.spawn_run("--site", "hpc", "--cmd", "echo started; sleep 120", cwd=work)
    status = site.wait_job(("running",))
    job_id = status["job_id"]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    deadline = time.monotonic() + 30
    while cluster.job(job_id)["JobState"] not in ("CANCELLED", "COMPLETED", "FAILED"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert cluster.job(job_id)["JobState"] == "CANCELLED"
    run = site.newest()
    assert run["state"] == "cancelled" and "scancel" in run["error"]


def test_remote_exec_cancel_while_running(site: BatchSite, cluster: SlurmCluster,
                                          work: Path) -> None:
    proc = site.spawn_run("--site", "hpc", "--cmd", "sleep 120", cwd=work)
    status = site.wait_job(("running",))
    proc.kill()  # nobody drives it now: cancel goes to Slurm from the cancel command
    proc.wait()
    cancel = site.cli("cancel", status["id"], cwd=work)
    assert cancel.returncode == 0 and "scancel" in cancel.stdout, cancel.stdout + cancel.stderr
    deadline = time.monotonic() + 30
    while cluster.job(status["job_id"])["JobState"] != "CANCELLED":
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_driver_killed_while_running_loses_nothing(site: BatchSite, cluster: SlurmCluster,
                                                   work: Path) -> None:
    proc = site.spawn_run("--site", "hpc", "--cmd", "sleep 6; echo done > result.txt; "
                      "exit 5", "in.txt", "--into", "back", cwd=work)
    status = site.wait_job(("running",))
    proc.kill()
    proc.wait()
    resumed = site.cli("resume", status["id"], cwd=work)
    assert resumed.returncode == 5, resumed.stderr
    assert (work / "back" / "result.txt").read_text() == "done\n"
    run = site.newest()
    assert run["exit_code"] == 5 and run["job_info"]["native"] == "FAILED"
    assert "launched" in json.dumps(run) and run["job_id"] == status["job_id"]
    # the job was submitted once
    jobs = cluster.run("squeue", "-h", "-n", "re-" + run["id"].replace("-", "")[:8],
                       "-t", "all", "-o", "%i").stdout.split()
    assert jobs in ([], [run["job_id"]])


def test_drained_node_gives_a_clear_message(site: BatchSite, cluster: SlurmCluster,
                                            work: Path) -> None:
    cluster.drain("maintenance by the test")
    try:
        proc = site.cli("run", "--site", "hpc", "--timeout", "8s", "--cmd", "touch ran",
                        cwd=work, timeout=90)
        assert proc.returncode == 124, proc.stderr
        assert "drained" in proc.stderr and "sinfo -R" in proc.stderr
        run = site.newest()
        assert run["state"] == "timed_out"
        assert cluster.job(run["job_id"])["JobState"] == "CANCELLED"
    finally:
        cluster.resume()
        cluster.wait_idle(30)


def test_walltime_kill_is_reported(site: BatchSite, cluster: SlurmCluster, work: Path) -> None:
    proc = site.spawn_run("--site", "hpc", "-R", "walltime=1", "--cmd",
                          "echo working; sleep 600", cwd=work)
    status = site.wait_job(("running",))
    assert cluster.job(status["job_id"])["TimeLimit"] == "00:01:00"
    # Slurm's smallest limit is a minute, checked every 30 s: lowering it to 0 now makes
    # the same walltime kill come at the next check instead of 60-90 s later
    cluster.run("scontrol", "update", f"JobId={status['job_id']}", "TimeLimit=0")
    try:
        _, err = proc.communicate(timeout=200)
    finally:
        proc.kill()
    assert proc.returncode not in (0, None), err
    assert "TIMEOUT" in err and "walltime" in err
    run = site.newest()
    assert run["job_info"]["state"] == "timed_out" and run["state"] == "failed"
    assert cluster.job(run["job_id"])["JobState"] == "TIMEOUT"


def test_site_check_shows_the_scheduler(site: BatchSite, cluster: SlurmCluster,
                                        work: Path) -> None:
    proc = site.cli("site", "check", "hpc", "--json", cwd=work)
    rows = {r["check"]: r for r in json.loads(proc.stdout)}
    row = rows["scheduler"]
    assert row["status"] == "ok", row
    assert "sbatch" in row["detail"] and cluster.partition in row["detail"]


def test_link_cut_while_queued_and_running_loses_nothing(site: BatchSite,
                                                         cluster: SlurmCluster,
                                                         work: Path) -> None:
    """The SSH link dies while the job waits behind another and again while it runs:
    remote-exec reconnects, the job is submitted once, its exit code comes back."""
    import yaml
    from tcp_proxy import TcpProxy

    blocker = cluster.hold_node()
    with TcpProxy(site.box.port) as tcp:
        data = yaml.safe_load(site.config.read_text())
        kind, blob = Path(f"{site.box.host_key}.pub").read_text().split()[:2]
        known = work / "proxied.known_hosts"  # the same host key, at the proxy's port
        known.write_text(f"[127.0.0.1]:{tcp.port} {kind} {blob}\n")
        data["sites"]["hpc"].update(port=tcp.port, known_hosts=str(known),
                                    retry_max_interval=0.5)
        proxied = BatchSite(box=site.box, config=work / "proxied.yaml", state=site.state,
                            root=site.root, name="hpc")
        proxied.config.write_text(yaml.safe_dump(data))
        proc = proxied.spawn_run("--site", "hpc", "--cmd", "sleep 3; echo ok > r.txt; exit 6",
                                 "--into", "back", cwd=work)
        queued = proxied.wait_job(("queued",))
        tcp.cut()
        cluster.run("scancel", blocker)
        proxied.wait_job(("running",))
        tcp.cut()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 6, err
    assert "reconnect" in err.lower(), err
    assert (work / "back" / "r.txt").read_text() == "ok\n"
    name = "re-" + queued["id"].replace("-", "")[:8]
    jobs = cluster.run("squeue", "-h", "-t", "all", "-n", name, "-o", "%i").stdout.split()
    assert jobs == [queued["job_id"]]  # submitted once
