"""The ``fujitsu`` backend end to end against the WebAPI simulator (tests/fujitsu_sim,
following seeds/000 field by field) backed by a real S3 emulation (moto's server)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from fujitsu_sim import FujitsuSim
from service_env import SOLVER, ServiceEnv, tree

pytestmark = pytest.mark.timeout(240)


class Env(ServiceEnv):
    """A configuration with a fujitsu site (and the loopback SSH site for comparison)."""

    site = "fcs"
    cleared = ("AWS_", "REMOTE_EXEC")

    def __init__(self, tmp: Path, sim: FujitsuSim, sshd, auth: str) -> None:
        self.sim = sim
        fujitsu = {"api_url": sim.url, "bucket": sim.bucket, "s3_endpoint": sim.s3_endpoint,
                   "region": sim.region, "auth": auth, "hpc_dir": "remote-exec",
                   "poll_max": 0.5}
        super().__init__(tmp, {"fcs": {"backend": "fujitsu", "fujitsu": fujitsu,
                                       "templates": ["generic"], "retry_max_interval": 0.2,
                                       "cancel_grace": 2}}, sshd, solver_dir=tmp / "programs")
        self.secrets = {"AWS_ACCESS_KEY_ID": sim.s3_credentials["aws_access_key_id"],
                        "AWS_SECRET_ACCESS_KEY": sim.s3_credentials["aws_secret_access_key"]}
        if auth == "bearer":
            self.secrets["REMOTE_EXEC_FUJITSU_TOKEN"] = sim.token
        else:
            self.secrets["REMOTE_EXEC_FUJITSU_ACCESS_KEY"] = sim.access_key
            self.secrets["REMOTE_EXEC_FUJITSU_SECRET_KEY"] = sim.secret_key

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(AWS_EC2_METADATA_DISABLED="true", **extra)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with FujitsuSim(tmp_path_factory.mktemp("fujitsu-sim"), queue_seconds=0.3,
                    kill_grace=1.0) as sim:
        yield sim


@pytest.fixture
def env(sim: FujitsuSim, sshd, tmp_path: Path) -> Env:
    sim.faults.__init__()  # no faults unless a test asks
    return Env(tmp_path, sim, sshd, "bearer")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "input.dat").write_text("0123456789\n")
    return work


def test_same_outputs_as_the_ssh_backend(env: Env, work: Path, sim: FujitsuSim) -> None:
    api = env.cli(*env.run_args("fcs", "--into", "api"), cwd=work)
    assert api.returncode == 0, api.stderr
    ssh = env.cli(*env.run_args("ssh", "--into", "ssh"), cwd=work)
    assert ssh.returncode == 0, ssh.stderr
    assert tree(work / "api") == tree(work / "ssh")
    assert "solver ran with: one two words" in (work / "api" / "remote_program_exec.log"
                                                ).read_text()
    runs = [json.loads(x) for x in env.cli("list", "--json", cwd=work).stdout.splitlines()]
    run = next(r for r in runs if r["backend"] == "fujitsu")
    assert run["state"] == "succeeded" and run["job_id"]
    job = sim.jobs[int(run["job_id"])]
    assert job.exit_code == 0
    # every sync said its direction; the job file is the run's; the objects are gone
    syncs = [r for r in sim.requests if r.method == "POST" and r.path == "/v1/sync"]
    assert syncs and all("direction" in r.body and r.body["delete"] is False for r in syncs)
    assert [r.body["direction"] for r in syncs][-2:] == ["from_online", "to_online"]
    submits = [r.body for r in sim.requests if r.method == "POST" and r.path == "/v1/jobs"]
    assert submits[-1] == {"jobfile": f"remote-exec/{run['id']}/.remote-exec/job.sh"}
    assert not list(sim.s3_client().list_objects_v2(
        Bucket=sim.bucket, Prefix=run["id"] + "/").get("Contents", []))


def test_failing_job_exit_code_and_kept_objects(env: Env, work: Path, sim: FujitsuSim) -> None:
    proc = env.cli(*env.run_args(), cwd=work, timeout=120)
    assert proc.returncode == 0
    (work / "input.dat").write_text("x\n")
    env.solver.write_text(SOLVER.replace('exit "${EXIT:-0}"', "exit 3"))
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 3, proc.stderr
    run = env.newest()
    assert run["state"] == "failed" and run["exit_code"] == 3
    assert (work / "copy.dat").read_text() == "x\n"
    kept = sim.s3_client().list_objects_v2(Bucket=sim.bucket, Prefix=run["id"] + "/")
    assert kept.get("Contents")  # kept after a failure, as on an SSH site


def test_status_shows_the_job_while_it_runs(env: Env, work: Path, sim: FujitsuSim) -> None:
    env.solver.write_text(SOLVER.replace("#!/bin/sh\n", "#!/bin/sh\nsleep 3\n"))
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("RUN",))
    status = env.cli("status", run["id"], cwd=work)
    assert "Fujitsu HPC job" in status.stdout and "Fugaku:" in status.stdout, status.stdout
    assert "elapse_time=" in status.stdout
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_ctrl_c_cancels_the_job(env: Env, work: Path, sim: FujitsuSim) -> None:
    env.solver.write_text("#!/bin/sh\nsleep 60\n")
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("RUN",))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Cancel a Job" in err
    sim.wait_job(int(run["job_id"]))
    assert sim.jobs[int(run["job_id"])].cancelled
    assert env.newest()["state"] == "cancelled"


def test_remote_exec_cancel_and_the_race_with_completion(env: Env, work: Path,
                                                         sim: FujitsuSim) -> None:
    env.solver.write_text("#!/bin/sh\nsleep 2\n")
    sim.faults.cancel_races_completion = True
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("RUN",))
    proc.kill()  # nobody drives it: the cancel command calls the API itself
    proc.wait()
    cancel = env.cli("cancel", run["id"], cwd=work)
    assert cancel.returncode == 0, cancel.stderr
    assert "already ended" in cancel.stdout


@pytest.mark.parametrize("fault", ["slow sync", "5xx burst", "404 after submit"])
def test_survives_documented_hiccups(env: Env, work: Path, sim: FujitsuSim, fault: str) -> None:
    if fault == "slow sync":
        sim.faults.sync_waits = 4
    elif fault == "5xx burst":
        sim.faults.burst_5xx = 3
    else:
        sim.faults.detail_404_after_submit = 2
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "result" / "summary.txt").read_text() == "sum 11\n"


def test_sync_result_1_gives_the_credentials_hint(env: Env, work: Path, sim: FujitsuSim) -> None:
    sim.faults.sync_result = "1"
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 73, proc.stderr
    assert "result '1'" in proc.stderr and "§4.3" in proc.stderr
    assert (work / "input.dat").read_text() == "0123456789\n"


def test_wrong_token_is_an_auth_error(env: Env, work: Path) -> None:
    proc = env.cli(*env.run_args(), cwd=work, REMOTE_EXEC_FUJITSU_TOKEN="not-the-token")
    assert proc.returncode == 77, proc.stderr
    assert "refused the credentials" in proc.stderr and "not-the-token" not in proc.stderr


def test_hmac_scheme(sim: FujitsuSim, tmp_path: Path, work: Path) -> None:
    (tmp_path / "h").mkdir()
    with FujitsuSim(tmp_path / "hmac-sim", auth="hmac", queue_seconds=0.1) as hsim:
        env = Env(tmp_path / "h", hsim, None, "hmac")
        proc = env.cli(*env.run_args(), cwd=work)
        assert proc.returncode == 0, proc.stderr
        assert all("X-Signature" in r.headers for r in hsim.requests)


def test_no_secret_in_any_output(env: Env, work: Path, sim: FujitsuSim) -> None:
    """Debug logging on (boto3's and ours): no credential in stdout, stderr or journal."""
    sim.faults.burst_5xx = 1
    proc = env.cli(*env.run_args("fcs", "--json"), cwd=work, REMOTE_EXEC_DEBUG="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "remote-exec debug:" in proc.stderr  # the debug log was on
    run = env.newest()
    status = env.cli("status", run["id"], "--json", cwd=work)
    texts = [proc.stdout, proc.stderr, status.stdout]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in env.state.rglob("*")
              if p.is_file()]
    for name, secret in env.secrets.items():
        for text in texts:
            assert secret not in text, f"{name} leaked"


def test_manual_commands(env: Env, work: Path, sim: FujitsuSim) -> None:
    env.solver.write_text("#!/bin/sh\nsleep 30\n")
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("RUN",))
    jobs = env.cli("fujitsu", "jobs", cwd=work)
    assert jobs.returncode == 0 and run["job_id"] in jobs.stdout
    job = env.cli("fujitsu", "job", run["job_id"], cwd=work)
    assert job.returncode == 0 and '"status": "RUN"' in job.stdout
    rid = next(r.response["requestid"] for r in reversed(sim.requests)
               if r.path == "/v1/sync" and r.method == "POST")
    sync = env.cli("fujitsu", "sync-status", str(rid), "--site", "fcs", cwd=work)
    assert '"status": "complete"' in sync.stdout
    missing = env.cli("fujitsu", "sync-status", "42", cwd=work)
    assert "error: no such ID" in missing.stdout
    cancel = env.cli("fujitsu", "cancel", run["job_id"], cwd=work)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    proc.communicate(timeout=60)
    gone = env.cli("fujitsu", "job", run["job_id"], cwd=work)
    assert gone.returncode == 1 and "404" in gone.stdout


def test_site_check(env: Env, work: Path) -> None:
    good = env.cli("site", "check", "fcs", "--json", cwd=work)
    rows = {r["check"]: r["status"] for r in json.loads(good.stdout)}
    assert rows == {"credentials": "ok", "WebAPI": "ok", "bucket": "ok"}, good.stdout
    bad = env.cli("site", "check", "fcs", "--json", cwd=work,
                  REMOTE_EXEC_FUJITSU_TOKEN="wrong-token")
    rows = {r["check"]: r for r in json.loads(bad.stdout)}
    assert bad.returncode == 1 and rows["WebAPI"]["status"] == "FAIL"
    assert "refused the credentials" in rows["WebAPI"]["detail"]


def test_credentials_file_and_custom_paths(env: Env, work: Path, sim: FujitsuSim) -> None:
    """Credentials from a 0600 file (a looser mode is refused); paths set per site."""
    creds = env.tmp / "fujitsu.env"
    creds.write_text(f"# the WebAPI token\nexport REMOTE_EXEC_FUJITSU_TOKEN='{sim.token}'\n")
    creds.chmod(0o644)
    data = yaml.safe_load(env.config.read_text())
    fujitsu = data["sites"]["fcs"]["fujitsu"]
    fujitsu["credentials_file"] = str(creds)
    fujitsu["api_url"] = sim.url.rsplit("/v1", 1)[0]  # the base without /v1 ...
    fujitsu["paths"] = {"sync": "/v1/sync", "sync_status": "/v1/sync/{requestid}",
                        "jobs": "/v1/jobs", "job": "/v1/jobs/{job_id}"}  # ... in the paths
    env.config.write_text(yaml.safe_dump(data))
    del env.secrets["REMOTE_EXEC_FUJITSU_TOKEN"]
    loose = env.cli(*env.run_args(), cwd=work)
    assert loose.returncode == 78 and "chmod 600" in loose.stderr, loose.stderr
    creds.chmod(0o600)
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert sim.token not in proc.stderr


def test_api_outage_interrupts_and_resume_finishes(env: Env, work: Path,
                                                   sim: FujitsuSim) -> None:
    """The WebAPI failing past the retries while the job runs: the run is interrupted
    (exit 75), the job goes on, and `resume` finishes it without a second job."""
    env.solver.write_text(SOLVER.replace("#!/bin/sh\n", "#!/bin/sh\nsleep 2\n"))
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("RUN",))
    sim.faults.burst_5xx = 10_000
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        sim.faults.burst_5xx = 0
    assert proc.returncode == 75, err
    assert env.newest()["state"] == "interrupted"
    submitted = sum(1 for r in sim.requests if r.method == "POST" and r.path == "/v1/jobs")
    resumed = env.cli("resume", run["id"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert (work / "result" / "summary.txt").read_text() == "sum 11\n"
    assert sum(1 for r in sim.requests
               if r.method == "POST" and r.path == "/v1/jobs") == submitted
