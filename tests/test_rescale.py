"""The ``rescale`` backend end to end through the CLI, against the Rescale API simulator
(tests/rescale_sim, written from seed 004 and docs/research/rescale.md), and the SSH
``direct`` backend for comparison."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from rescale_sim import JOB_FLOW, RescaleSim
from service_env import SOLVER, ServiceEnv, tree

pytestmark = pytest.mark.timeout(120)

ENV_KEY = "REMOTE_EXEC_RESCALE_TOKEN"


class Env(ServiceEnv):
    """A configuration with a rescale site (and the loopback SSH site for comparison)."""

    site = "rs"
    cleared = ("REMOTE_EXEC", "RESCALE")
    timeout = 90

    def __init__(self, tmp: Path, sim: RescaleSim, sshd: Any = None) -> None:
        self.sim = sim
        self.section: dict[str, Any] = {
            "platform": sim.url, "hardware": {"coreType": "hpc-3", "coresPerSlot": 2,
                                              "slots": 1, "walltime": 10},
            "low_priority": True, "poll_max": 0.2}
        super().__init__(tmp, {"rs": {"backend": "rescale", "rescale": self.section,
                                      "templates": ["generic"], "retry_tries": 3,
                                      "retry_max_interval": 0.2, "cancel_grace": 2}}, sshd)
        self.secrets = {ENV_KEY: sim.token}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with RescaleSim(tmp_path_factory.mktemp("rescale-sim"), step_seconds=0.05,
                    cluster_step_seconds=0.2, kill_grace=1.0) as sim:
        yield sim


@pytest.fixture
def env(sim: RescaleSim, tmp_path: Path) -> Env:
    sim.faults.__init__()  # no faults unless a test asks
    sim.clear_requests()
    yield Env(tmp_path, sim)
    assert not sim.errors, sim.errors  # no simulator bug (a 500) went unnoticed


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "input.dat").write_text("0123456789\n")
    return work


def count(sim: RescaleSim, method: str, suffix: str) -> int:
    return len(sim.calls(method, suffix))


def test_same_outputs_as_the_ssh_backend(env: Env, work: Path, sim: RescaleSim,
                                         sshd: Any) -> None:
    (env.tmp / "ssh").mkdir()
    env = Env(env.tmp / "ssh", sim, sshd)  # the same site, and the SSH one beside it
    api = env.cli(*env.run_args("rs", "--into", "api"), cwd=work)
    assert api.returncode == 0, api.stderr
    ssh = env.cli(*env.run_args("ssh", "--into", "ssh"), cwd=work)
    assert ssh.returncode == 0, ssh.stderr
    assert tree(work / "api") == tree(work / "ssh")
    assert "solver ran with: one two words" in (work / "api" / "remote_program_exec.log"
                                                ).read_text()
    runs = [json.loads(x) for x in env.cli("list", "--json", cwd=work).stdout.splitlines()]
    run = next(r for r in runs if r["backend"] == "rescale")
    assert run["state"] == "succeeded" and run["job_id"]
    # the calls as seed 004 and the reference have them
    assert all(r.headers.get("authorization") == f"Token {sim.token}" for r in sim.requests)
    assert all(r.path.endswith("/") for r in sim.requests)
    created = sim.calls("POST", "/api/v2/jobs/")[-1].body
    analysis = created["jobanalyses"][0]
    assert created["name"] == f"remote-exec-{run['id']}" and created["isLowPriority"] is True
    assert analysis["analysis"] == {"code": "user_included", "version": "0"}
    assert analysis["hardware"] == {"coreType": {"code": "hpc-3"}, "coresPerSlot": 2,
                                    "slots": 1, "walltime": 10}
    assert len(analysis["inputFiles"]) == 1 and "run.sh" in analysis["command"]
    assert count(sim, "POST", f"/jobs/{run['job_id']}/submit/") == 1
    # the job ran once; success: it was deleted (the site's cleanup policy)
    assert run["job_id"] not in sim.jobs
    assert count(sim, "DELETE", f"/api/v2/jobs/{run['job_id']}/") == 1


def test_exit_code_propagates_and_the_job_is_kept(env: Env, work: Path,
                                                  sim: RescaleSim) -> None:
    env.solver.write_text(SOLVER.replace('exit "${EXIT:-0}"', "exit 3"))
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 3, proc.stderr
    run = env.newest()
    assert run["state"] == "failed" and run["exit_code"] == 3
    job = sim.jobs[run["job_id"]]  # kept after a failure, as on an SSH site
    assert job.returncode == 3 and job.history == list(JOB_FLOW)  # Completed, all the same
    assert (work / "result" / "summary.txt").read_text() == "sum 11\n"


def test_status_shows_rescale_history(env: Env, work: Path) -> None:
    env.solver.write_text(SOLVER.replace("#!/bin/sh\n", "#!/bin/sh\nsleep 3\n"))
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("Executing",))
    status = env.cli("status", run["id"], cwd=work)
    assert "Rescale job" in status.stdout, status.stdout
    assert "Pending → Queued → Started → Validated → Executing" in status.stdout
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_ctrl_c_stops_the_job(env: Env, work: Path, sim: RescaleSim) -> None:
    env.solver.write_text("#!/bin/sh\nsleep 60\n")
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("Executing",))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped Rescale job" in err
    job = sim.wait_job(run["job_id"])
    assert job.history[-2:] == ["Stopping", "Stopped"] and job.returncode is not None
    assert env.newest()["state"] == "cancelled"


def test_timeout_stops_the_job(env: Env, work: Path, sim: RescaleSim) -> None:
    env.solver.write_text("#!/bin/sh\nsleep 60\n")
    proc = env.cli(*env.run_args("rs", "--timeout", "4s"), cwd=work)
    assert proc.returncode == 124, proc.stderr
    run = env.newest()
    assert run["state"] == "timed_out"
    assert sim.wait_job(run["job_id"]).history[-1] == "Stopped"


def test_remote_exec_cancel(env: Env, work: Path, sim: RescaleSim) -> None:
    env.solver.write_text("#!/bin/sh\nsleep 60\n")
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("Executing",))
    proc.kill()  # nobody drives it: the cancel command calls the API itself
    proc.wait()
    cancel = env.cli("cancel", run["id"], cwd=work)
    assert cancel.returncode == 0, cancel.stderr
    assert "stopped Rescale job" in cancel.stdout + cancel.stderr
    assert sim.wait_job(run["job_id"]).history[-1] == "Stopped"


def test_cancel_racing_completion(env: Env, work: Path, sim: RescaleSim) -> None:
    """The stop answers 202 but the job completes: it counts as ended, with its code."""
    env.solver.write_text("#!/bin/sh\nsleep 2\nexit 5\n")
    sim.faults.cancel_races_completion = True
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("Executing",))
    proc.kill()
    proc.wait()
    cancel = env.cli("cancel", run["id"], cwd=work)
    assert cancel.returncode == 0, cancel.stderr
    assert "had already ended (Completed)" in cancel.stdout + cancel.stderr
    assert sim.jobs[run["job_id"]].history[-1] == "Completed"


@pytest.mark.parametrize("fault", ["5xx burst", "429", "lost create answer",
                                   "lost submit answer", "outputs still uploading",
                                   "service unpacks archives"])
def test_survives_faults(env: Env, work: Path, sim: RescaleSim, fault: str) -> None:
    faults = sim.faults
    if fault == "5xx burst":
        faults.burst_5xx = 3
    elif fault == "429":
        faults.rate_limited = 1
    elif fault == "lost create answer":
        faults.lose_create_answer = 1
    elif fault == "lost submit answer":
        faults.lose_submit_answer = 1
    elif fault == "outputs still uploading":
        faults.outputs_pending_polls = 3
    else:
        sim.unpack_archives = True
    try:
        proc = env.cli(*env.run_args("rs", "--keep"), cwd=work)
    finally:
        sim.unpack_archives = False
    assert proc.returncode == 0, proc.stderr
    assert (work / "result" / "summary.txt").read_text() == "sum 11\n"
    run = env.newest()
    # one job, submitted once: a lost answer was looked up, never repeated
    assert [j for j in sim.jobs.values() if j.body["name"].endswith(run["id"])] \
        == [sim.jobs[run["job_id"]]]
    assert count(sim, "POST", "/jobs/") == 1
    assert count(sim, "POST", "/submit/") == 1
    if fault.startswith("lost"):
        assert "answer was lost" in proc.stderr


def test_persistent_cluster_is_started_and_used(env: Env, work: Path, sim: RescaleSim) -> None:
    cluster = sim.add_cluster("Not Started")
    env.section["cluster"] = {"id": cluster.id, "start": True, "start_timeout": 30}
    env.write()
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert [s["status"] for s in cluster.statuses] == \
        ["Not Started", "Pending", "Queued", "Starting", "Started"]
    assert count(sim, "POST", f"/api/v3/clusters/{cluster.id}/start/") == 1
    run = env.newest()
    (submit,) = sim.calls("POST", f"/api/clusters/{cluster.id}/jobs/")
    assert submit.body == {"id": run["job_id"], "submit": True}
    assert count(sim, "POST", "/submit/") == 0
    assert "cluster" in proc.stderr and "Started" in proc.stderr
    # a second run finds it Started: no start
    again = env.cli(*env.run_args(), cwd=work)
    assert again.returncode == 0, again.stderr
    assert count(sim, "POST", "/start/") == 1


def test_stopped_cluster_without_leave_to_start(env: Env, work: Path, sim: RescaleSim) -> None:
    cluster = sim.add_cluster("Stopped")
    env.section["cluster"] = {"id": cluster.id}
    env.write()
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 73, proc.stderr
    assert f"cluster {cluster.id} is Stopped" in proc.stderr and "start: true" in proc.stderr
    assert count(sim, "POST", "/start/") == 0


def test_slow_cluster_start_times_out(env: Env, work: Path, sim: RescaleSim) -> None:
    cluster = sim.add_cluster("Not Started")
    env.section["cluster"] = {"id": cluster.id, "start": True, "start_timeout": 1}
    env.write()
    sim.cluster_step_seconds = 1.5
    try:
        proc = env.cli(*env.run_args(), cwd=work)
    finally:
        sim.cluster_step_seconds = 0.2
    assert proc.returncode == 73, proc.stderr
    assert "after 1 s" in proc.stderr and "start_timeout" in proc.stderr
    assert count(sim, "POST", "/submit/") + count(sim, "POST", f"/{cluster.id}/jobs/") == 0


def test_damaged_download_is_a_fetch_error(env: Env, work: Path, sim: RescaleSim) -> None:
    sim.faults.wrong_md5 = True
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 74, proc.stderr
    assert "arrived damaged" in proc.stderr
    sim.faults.wrong_md5 = False
    resumed = env.cli("resume", env.newest()["id"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert (work / "result" / "summary.txt").read_text() == "sum 11\n"


def test_return_filter_applies(env: Env, work: Path) -> None:
    env.sites["rs"]["never_return"] = ["copy.dat"]
    env.write()
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert not (work / "copy.dat").exists()
    assert (work / "result" / "summary.txt").is_file()
    assert not (work / "process_output.log").exists()  # the service's own file stays


def test_wrong_or_missing_key_is_an_auth_error(env: Env, work: Path, sim: RescaleSim) -> None:
    wrong = env.cli(*env.run_args(), cwd=work, **{ENV_KEY: "not-the-key-123"})
    assert wrong.returncode == 77, wrong.stderr
    assert "refused the API key" in wrong.stderr and "not-the-key-123" not in wrong.stderr
    env.secrets = {}
    missing = env.cli(*env.run_args(), cwd=work)
    assert missing.returncode == 77 and ENV_KEY in missing.stderr, missing.stderr


def test_key_revoked_mid_run(env: Env, work: Path, sim: RescaleSim) -> None:
    sim.faults.revoke_token_after = 3  # upload, create, submit; then refused
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 77, proc.stderr
    assert sim.token not in proc.stderr


def test_key_file(env: Env, work: Path, sim: RescaleSim) -> None:
    key = env.tmp / "rescale.token"
    key.write_text(sim.token + "\n")
    key.chmod(0o644)
    env.section["token_file"] = str(key)
    env.write()
    env.secrets = {}
    loose = env.cli(*env.run_args(), cwd=work)
    assert loose.returncode == 78 and "chmod 600" in loose.stderr, loose.stderr
    key.chmod(0o600)
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 0, proc.stderr


def test_no_key_in_any_output(env: Env, work: Path, sim: RescaleSim) -> None:
    """Debug logging on, a retry and a lost answer: the key is in no output or state file."""
    sim.faults.burst_5xx = 1
    sim.faults.lose_submit_answer = 1
    proc = env.cli(*env.run_args("rs", "--json", "--keep"), cwd=work, REMOTE_EXEC_DEBUG="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "remote-exec debug:" in proc.stderr and "remote_exec.rescale" in proc.stderr
    run = env.newest()
    status = env.cli("status", run["id"], "--json", cwd=work, REMOTE_EXEC_DEBUG="1")
    check = env.cli("site", "check", "rs", cwd=work, REMOTE_EXEC_DEBUG="1")
    texts = [proc.stdout, proc.stderr, status.stdout, status.stderr, check.stdout, check.stderr]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in env.state.rglob("*")
              if p.is_file()]
    assert all(sim.token not in text for text in texts)


def test_site_check(env: Env, work: Path, sim: RescaleSim) -> None:
    cluster = sim.add_cluster("Started")
    env.section["cluster"] = {"id": cluster.id}
    env.write()
    good = env.cli("site", "check", "rs", "--json", cwd=work)
    assert good.returncode == 0, good.stdout + good.stderr
    rows = {r["check"]: r["status"] for r in json.loads(good.stdout)}
    assert rows == {"API key": "ok", "API": "ok", "core type": "ok", "cluster": "ok",
                    "data": "warn"}, good.stdout
    env.section["hardware"]["coreType"] = "no-such-core"
    env.section["cluster"] = {"id": "nosuch"}
    env.write()
    bad = env.cli("site", "check", "rs", "--json", cwd=work)
    rows = {r["check"]: r for r in json.loads(bad.stdout)}
    assert bad.returncode == 1
    assert rows["core type"]["status"] == "FAIL" and "hpc-3" in rows["core type"]["fix"]
    assert rows["cluster"]["status"] == "FAIL"
    wrong = env.cli("site", "check", "rs", "--json", cwd=work, **{ENV_KEY: "wrong-key-1"})
    rows = {r["check"]: r for r in json.loads(wrong.stdout)}
    assert rows["API"]["status"] == "FAIL" and "refused" in rows["API"]["detail"]


def test_api_outage_interrupts_and_resume_finishes(env: Env, work: Path,
                                                   sim: RescaleSim) -> None:
    """Rescale failing past the retries while the job runs: the run is interrupted (75),
    the job goes on, and `resume` finishes it without a second job."""
    env.solver.write_text(SOLVER.replace("#!/bin/sh\n", "#!/bin/sh\nsleep 2\n"))
    proc = env.spawn(*env.run_args(), cwd=work)
    run = env.wait_job(("Executing",))
    sim.faults.burst_5xx = 10_000
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        sim.faults.burst_5xx = 0
    assert proc.returncode == 75, err
    assert env.newest()["state"] == "interrupted"
    resumed = env.cli("resume", run["id"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert (work / "result" / "summary.txt").read_text() == "sum 11\n"
    assert count(sim, "POST", "/submit/") == 1 and count(sim, "POST", "/api/v2/jobs/") == 1


def test_config_errors(env: Env, work: Path) -> None:
    del env.section["hardware"]
    env.write()
    proc = env.cli(*env.run_args(), cwd=work)
    assert proc.returncode == 78 and "hardware" in proc.stderr, proc.stderr
