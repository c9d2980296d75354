"""The test Slurm cluster itself (tests/slurm_cluster.py): a job runs, a drained node holds jobs.

Needs root and ``apt-get install -y slurm-wlm munge``; skipped otherwise.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, read_capture

# one Slurm at a time on this machine (slurmd takes the node's name): one xdist group
pytestmark = pytest.mark.xdist_group("slurm")

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    reason = SlurmCluster.available()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.up()
    yield cluster
    cluster.down()


def submit(cluster: SlurmCluster, directory: Path, body: str) -> str:
    script = directory / "job.sh"
    script.write_text("#!/bin/sh\n" + body)
    out = cluster.run("sbatch", "--parsable", str(script), cwd=directory)
    return out.stdout.strip()


def job(cluster: SlurmCluster, jobid: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", "-o", jobid)
    return dict(w.split("=", 1) for w in out.stdout.split() if "=" in w)


def wait_job(cluster: SlurmCluster, jobid: str, states: set[str], timeout: float = 20,
             reason: bool = False) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = job(cluster, jobid)
        if info["JobState"] in states and (not reason or info["Reason"] != "None"):
            return info
        assert time.monotonic() < deadline, f"job {jobid}: {info['JobState']} {info['Reason']}"
        time.sleep(0.2)


def test_job_runs_and_completes(slurm: SlurmCluster, tmp_path: Path) -> None:
    jobid = submit(slurm, tmp_path, 'echo "in $(pwd)"\n')
    assert jobid.isdigit()
    info = wait_job(slurm, jobid, FINAL)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")
    assert (tmp_path / f"slurm-{jobid}.out").read_text() == f"in {tmp_path}\n"  # runs in cwd
    assert slurm.node_state() == "idle"


def test_drained_node_holds_jobs_until_resumed(slurm: SlurmCluster, tmp_path: Path) -> None:
    slurm.drain("maintenance by test")
    try:
        assert slurm.node_state() == "drained"
        jobid = submit(slurm, tmp_path, "exit 3\n")
        info = wait_job(slurm, jobid, {"PENDING"}, reason=True)
        assert info["Reason"] == f"ReqNodeNotAvail,_UnavailableNodes:{slurm.node}"
        squeue = slurm.run("squeue", "-h", "-j", jobid, "-o", "%T|%r")
        assert squeue.stdout == f"PENDING|ReqNodeNotAvail, UnavailableNodes:{slurm.node}\n"
    finally:
        slurm.resume()
    info = wait_job(slurm, jobid, FINAL)
    assert (info["JobState"], info["Reason"], info["ExitCode"]) == (
        "FAILED", "NonZeroExitCode", "3:0")
    slurm.wait_idle(10)


def test_scancel_running_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    jobid = submit(slurm, tmp_path, "sleep 300\n")
    wait_job(slurm, jobid, {"RUNNING"})
    slurm.run("scancel", jobid)
    info = wait_job(slurm, jobid, FINAL)
    assert (info["JobState"], info["ExitCode"]) == ("CANCELLED", "0:15")
    # finished jobs: squeue lists them only with -t all; sacct has no accounting here
    assert slurm.run("squeue", "-h", "-j", jobid, "-o", "%T").stdout == ""
    assert slurm.run("squeue", "-h", "-t", "all", "-j", jobid, "-o", "%T").stdout == "CANCELLED\n"


def test_captured_outputs_are_readable() -> None:
    cap = read_capture("scontrol_unknown")
    assert (cap.returncode, cap.stdout) == (1, "")
    assert cap.stderr == "slurm_load_jobs error: Invalid job id specified\n"
    assert read_capture("sbatch_parsable").stdout.strip().isdigit()
