"""The test Slurm cluster with slurmrestd (``SlurmCluster(..., rest=True)``): the fixture itself.

Needs root and ``apt-get install -y slurm-wlm munge slurmrestd slurm-wlm-jwt-plugin``; skipped
otherwise (failed under CI). Plain urllib (``cluster.request``), API version v0.0.38. Real
answers of this daemon are kept in tests/data/slurmrest/ (see its README).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from batch_site import slurm_cluster
from slurm_cluster import SlurmCluster

# one Slurm at a time on this machine (slurmd takes the node's name): one xdist group
pytestmark = [pytest.mark.timeout(400), pytest.mark.xdist_group("slurm")]

V = "/slurm/v0.0.38"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = slurm_cluster(tmp_path_factory, "slurmrest", rest=True)
    yield cluster
    cluster.down()


@pytest.fixture(scope="module")
def token(cluster: SlurmCluster) -> str:
    return cluster.token("root", lifespan=1800)


def submit(cluster: SlurmCluster, token: str, directory: Path, body: str, **job) -> int:
    """POST /job/submit a ``#!/bin/sh`` script running in ``directory``; returns the job id."""
    request = {"script": "#!/bin/sh\n" + body,
               "job": {"name": "re-test", "partition": cluster.partition, "tasks": 1,
                       "current_working_directory": str(directory),
                       "standard_output": str(directory / "out.txt"),
                       "environment": {"PATH": "/usr/bin:/bin"},
                       "no_requeue": True, "time_limit": 5, **job}}
    status, _, answer = cluster.request("POST", f"{V}/job/submit", request, token=token)
    assert status == 200, answer
    assert isinstance(answer, dict) and isinstance(answer.get("job_id"), int), answer
    return answer["job_id"]


def get_job(cluster: SlurmCluster, token: str, job_id: int) -> dict:
    status, _, answer = cluster.request("GET", f"{V}/job/{job_id}", token=token)
    assert status == 200, answer
    (job,) = answer["jobs"]
    return job


def wait_job(cluster: SlurmCluster, token: str, job_id: int, states: set[str],
             timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(cluster, token, job_id)
        if job["job_state"] in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id}: {job['job_state']}"
        time.sleep(0.3)


def test_ping_with_token(cluster: SlurmCluster, token: str) -> None:
    assert cluster.rest_url.startswith("http://127.0.0.1:")
    status, ctype, answer = cluster.request("GET", f"{V}/ping", token=token)
    assert (status, ctype) == (200, "application/json")
    assert answer["errors"] == []
    assert answer["pings"][0]["ping"] == "UP"
    assert "SLURM_JWT" not in cluster.env  # client commands keep using munge


def test_openapi_lists_versions(cluster: SlurmCluster, token: str) -> None:
    status, _, answer = cluster.request("GET", "/openapi/v3", token=token)
    assert status == 200
    for version in ("v0.0.36", "v0.0.37", "v0.0.38"):
        assert f"/slurm/{version}/job/submit" in answer["paths"]
    assert not any("/slurmdb/" in path for path in answer["paths"])  # db plugins not loaded


def test_submit_runs_exit_codes_and_no_requeue(cluster: SlurmCluster, token: str,
                                               tmp_path: Path) -> None:
    ok = submit(cluster, token, tmp_path, 'echo "in $(pwd) PATH=$PATH"\n')
    (tmp_path / "f").mkdir()
    failed = submit(cluster, token, tmp_path / "f", "exit 3\n")
    job = wait_job(cluster, token, ok, FINAL)
    assert (job["job_state"], job["exit_code"]) == ("COMPLETED", 0)
    assert job["current_working_directory"] == str(tmp_path)
    assert (tmp_path / "out.txt").read_text() == f"in {tmp_path} PATH=/usr/bin:/bin\n"
    job = wait_job(cluster, token, failed, FINAL)
    assert (job["job_state"], job["state_reason"], job["exit_code"]) == (
        "FAILED", "NonZeroExitCode", 768)  # the raw wait status: 3 << 8
    show = cluster.run("scontrol", "show", "job", "-o", str(ok)).stdout
    assert "Requeue=0" in show.split(), show  # no_requeue: true took effect


def test_delete_cancels_running_job(cluster: SlurmCluster, token: str, tmp_path: Path) -> None:
    job_id = submit(cluster, token, tmp_path, "sleep 60\n")
    wait_job(cluster, token, job_id, {"RUNNING"})
    status, _, answer = cluster.request("DELETE", f"{V}/job/{job_id}", token=token)
    assert status == 200, answer
    assert answer["errors"] == []
    job = wait_job(cluster, token, job_id, FINAL)
    assert (job["job_state"], job["exit_code"]) == ("CANCELLED", 15)  # TERM


def test_expired_token_is_refused(cluster: SlurmCluster) -> None:
    short = cluster.token("root", lifespan=5)
    status, _, _ = cluster.request("GET", f"{V}/jobs", token=short)
    assert status == 200
    time.sleep(7)
    status, _, answer = cluster.request("GET", f"{V}/jobs", token=short)
    # 22.05.8: not a 401 but a 500 with error_number -1 (slurmctld logs "token expired")
    assert status == 500, answer
    assert [e["error_number"] for e in answer["errors"]] == [-1], answer


def test_ctld_restart_keeps_jobs(cluster: SlurmCluster, token: str, tmp_path: Path) -> None:
    job_id = submit(cluster, token, tmp_path, "exit 0\n", hold=True)
    assert get_job(cluster, token, job_id)["job_state"] == "PENDING"
    cluster.stop_ctld()
    try:
        assert cluster.run("scontrol", "ping", check=False).returncode != 0
    finally:
        cluster.start_ctld()
    job = get_job(cluster, token, job_id)
    assert (job["job_id"], job["job_state"], job["state_reason"]) == (
        job_id, "PENDING", "JobHeldUser")
    status, _, answer = cluster.request("DELETE", f"{V}/job/{job_id}", token=token)
    assert status == 200, answer
    wait_job(cluster, token, job_id, {"CANCELLED"})


def test_stop_and_start_rest(cluster: SlurmCluster, token: str) -> None:
    url = cluster.rest_url
    cluster.stop_rest()
    with pytest.raises(OSError):
        cluster.request("GET", f"{V}/ping", token=token, timeout=5)
    cluster.start_rest()
    assert cluster.rest_url == url  # same port again
    assert cluster.request("GET", f"{V}/ping", token=token)[0] == 200
