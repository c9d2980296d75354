"""The ``slurmrest`` backend's ``frce`` dialect end to end: the FRCE HPC API simulator
(tests/frce_sim, written from seeds/003) runs the job script locally; files travel over
a real loopback sshd whose sessions find the simulator's ``scancel`` stand-in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from batch_site import BatchSite
from frce_sim import SCANCEL, FrceSim

pytestmark = [pytest.mark.timeout(300)]
STUBS = Path(__file__).resolve().parent / "stubs"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with FrceSim(tmp_path_factory.mktemp("frce-sim"), queue_delay=0.3) as sim:
        yield sim


@pytest.fixture(scope="module")
def site(sim: FrceSim, tmp_path_factory: pytest.TempPathFactory):
    env = {"PATH": f"{SCANCEL.parent}:/usr/local/bin:/usr/bin:/bin", **sim.scancel_env()}
    site = BatchSite.start(tmp_path_factory.mktemp("frce-site"), "frce", "slurmrest", env,
                           resources={"queue": "norm", "walltime": "10m"},
                           slurmrest={"dialect": "frce", "url": sim.url, "auth": "none"})
    yield site
    site.stop()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "in.txt").write_text("hello frce\n")
    return tmp_path


def variant(site: BatchSite, work: Path, name: str, root: str = "", **rest: object
            ) -> BatchSite:
    data = yaml.safe_load(site.config.read_text())
    data["sites"][site.name]["slurmrest"].update(rest)
    if root:
        data["sites"][site.name]["root"] = root
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    return BatchSite(box=site.box, config=config, state=site.state, root=site.root,
                     name=site.name)


def submits(sim: FrceSim) -> list:
    return [r for r in sim.requests if r.method == "POST" and r.path.endswith("/submit_job")]


def test_success_and_the_request_fields(site: BatchSite, sim: FrceSim, work: Path) -> None:
    before = len(submits(sim))
    proc = site.cli("run", "--site", "frce", "-R", "tasks=2", "-R", "cpus_per_task=1",
                    "-R", "memory=1G", "--cmd",
                    'tr a-z A-Z < in.txt > out.txt; echo "job=$SLURM_JOB_ID" >> out.txt',
                    "in.txt", "--into", "back", cwd=work)
    assert proc.returncode == 0, proc.stderr
    out = (work / "back" / "out.txt").read_text()
    assert out.startswith("HELLO FRCE\njob=")
    job_id = out.split("job=")[1].strip()
    assert f"submitted FRCE job {job_id} through the FRCE API" in proc.stderr
    sent = submits(sim)[before:]
    assert len(sent) == 1
    body = sent[0].body
    assert body["partition"] == "norm" and body["ntasks"] == 2 and body["cpus-per-task"] == 1
    assert body["mem-per-node"] == "1024M" and body["timelimit"] == "00-00:10:00"
    assert body["script-body"].startswith("#!/bin/sh\n")
    assert sent[0].raw_size < 3000  # far under the API's 4 KB
    job = sim.wait_job(job_id)
    assert job.state == "COMPLETED" and job.exit_code == 0
    run = site.newest()
    assert run["backend"] == "slurmrest" and run["job_id"] == job_id
    assert run["job_info"]["native"] == "COMPLETED"
    text = site.cli("status", run["id"], cwd=work).stdout
    assert f"FRCE job {job_id}: COMPLETED" in text


def test_same_outputs_as_the_direct_backend(site: BatchSite, work: Path) -> None:
    cmd = "sort in.txt > sorted.txt; wc -c < in.txt > size.txt; mkdir d; echo x > d/f"
    frce = site.cli("run", "--site", "frce", "--cmd", cmd, "in.txt", "--into", "a", cwd=work)
    direct = site.cli("run", "--site", "frce", "--backend", "direct", "--cmd", cmd, "in.txt",
                      "--into", "b", cwd=work)
    assert frce.returncode == 0 and direct.returncode == 0, frce.stderr + direct.stderr

    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and "remote_program_exec.log" not in p.name}

    assert tree(work / "a") == tree(work / "b") and tree(work / "a")


def test_exit_code_three(site: BatchSite, sim: FrceSim, work: Path) -> None:
    proc = site.cli("run", "--site", "frce", "--cmd", "echo broken; exit 3", cwd=work,
                    holder=True)
    assert proc.returncode == 3, proc.stderr
    assert "broken" in proc.stderr
    run = site.newest()
    assert run["state"] == "failed" and run["exit_code"] == 3
    assert sim.wait_job(run["job_id"]).state == "FAILED"


def test_bad_partition(site: BatchSite, work: Path) -> None:
    proc = site.cli("run", "--site", "frce", "-R", "queue=gpu", "--cmd", "true", cwd=work)
    assert proc.returncode == 73, proc.stderr
    assert "FRCE refused the job" in proc.stderr and "bad_partition" in proc.stderr
    assert "administrators" in proc.stderr


@pytest.mark.parametrize("fault, words", [
    ("submission_failed", "Slurm refused the job (backend_query_job_submission_failed)"),
])
def test_documented_failures_are_refusals(site: BatchSite, sim: FrceSim, work: Path,
                                          fault: str, words: str) -> None:
    setattr(sim.faults, fault, 1)
    proc = site.cli("run", "--site", "frce", "--cmd", "true", cwd=work)
    assert proc.returncode == 73, proc.stderr
    assert words in proc.stderr


def test_transient_failures_are_retried(site: BatchSite, sim: FrceSim, work: Path) -> None:
    """malloc failures, a severe (text/plain) error and a lost answer: none creates a
    second job, and the run completes."""
    jobs_before = len(sim.jobs)
    sim.faults.malloc_failed = 1
    sim.faults.severe_error = 1
    proc = site.cli("run", "--site", "frce", "--retry", "5,0.5", "--cmd", "echo ok > o.txt",
                    "--into", "back", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "back" / "o.txt").read_text() == "ok\n"
    assert len(sim.jobs) == jobs_before + 1


def test_lost_submit_answer_is_found_not_resubmitted(site: BatchSite, sim: FrceSim,
                                                     work: Path) -> None:
    jobs_before = len(sim.jobs)
    sim.faults.lose_submit_answer = 1
    proc = site.cli("run", "--site", "frce", "--cmd", "echo once >> c.txt", "--into", "back",
                    cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert len(sim.jobs) == jobs_before + 1  # never submitted twice
    assert "answer was lost: found job" in proc.stderr
    assert (work / "back" / "c.txt").read_text() == "once\n"


def test_the_size_limit(site: BatchSite, sim: FrceSim, work: Path) -> None:
    deep = work / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    ours = variant(site, work, "tight", root=str(deep), body_limit=400)
    count = len(submits(sim))
    proc = ours.cli("run", "--site", "frce", "--cmd", "true", cwd=work)
    assert proc.returncode == 73, proc.stderr
    assert "over the API's 400" in proc.stderr and "shorter `root`" in proc.stderr
    assert len(submits(sim)) == count  # refused before sending
    theirs = variant(site, work, "loose", body_limit=100_000)
    sim.body_limit = 100
    try:
        proc = theirs.cli("run", "--site", "frce", "--cmd", "true", cwd=work)
    finally:
        sim.body_limit = 4096
    assert proc.returncode == 73, proc.stderr
    assert "4 KB limit (postdata_too_big)" in proc.stderr


def test_resources_the_api_cannot_carry_are_refused_before_anything(site: BatchSite,
                                                                    sim: FrceSim,
                                                                    work: Path) -> None:
    count = len(sim.requests)
    proc = site.cli("run", "--site", "frce", "-R", "nodes=2", "--cmd", "true", cwd=work)
    assert proc.returncode == 78, proc.stderr
    assert "no field for nodes" in proc.stderr
    assert len(sim.requests) == count


def test_cancel_running_through_scancel(site: BatchSite, sim: FrceSim, work: Path) -> None:
    proc = site.spawn_run("--site", "frce", "--cmd", "echo started; sleep 120", cwd=work)
    status = site.wait_job(("running",))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    job = sim.wait_job(status["job_id"], timeout=30)
    assert job.state == "CANCELLED"
    run = site.newest()
    assert run["state"] == "cancelled" and "scancel" in run["error"]


def test_cancel_by_mark_stops_a_running_job(site: BatchSite, sim: FrceSim, work: Path) -> None:
    marked = variant(site, work, "mark", cancel="mark")
    proc = marked.spawn_run("--site", "frce", "--cmd", "sleep 120", cwd=work)
    status = marked.wait_job(("running",))
    proc.kill()
    proc.wait()
    cancel = marked.cli("cancel", status["id"], cwd=work)
    assert cancel.returncode == 0, cancel.stderr
    assert "marked cancelled" in cancel.stdout + cancel.stderr
    job = sim.wait_job(status["job_id"], timeout=30)
    assert job.state in ("COMPLETED", "FAILED")  # the job script stopped it itself
    code = (Path(status["rundir"]) / ".remote-exec" / "exit_code").read_text().strip()
    assert code == "143"


def test_cancel_while_queued_never_runs_the_entrypoint(site: BatchSite, sim: FrceSim,
                                                       work: Path) -> None:
    sim.queue_delay = 8
    try:
        proc = site.spawn_run("--site", "frce", "--cmd", "touch ran", cwd=work)
        status = site.wait_job(("queued",))
        cancel = site.cli("cancel", status["id"], cwd=work)
        assert cancel.returncode == 0, cancel.stderr
        _, err = proc.communicate(timeout=60)
    finally:
        sim.queue_delay = 0.3
    assert proc.returncode == 143, err
    assert sim.wait_job(status["job_id"], timeout=30).state == "CANCELLED"
    assert not (Path(status["rundir"]) / "ran").exists()


def test_negotiate_answers_the_challenge(site: BatchSite, sim: FrceSim, work: Path) -> None:
    sim.auth = "negotiate"
    try:
        ours = variant(site, work, "kerberos", auth="negotiate")
        env = {**ours.env(), "PYTHONPATH": os.pathsep.join(
            [str(STUBS), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "remote_exec", "run", "--site", "frce",
                               "--cmd", "echo k > k.txt", "--into", "back"], cwd=work,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert sim.challenges >= 1
        assert "stub-spnego" not in proc.stderr
        # without python-gssapi the user is told what to install
        plain = ours.cli("run", "--site", "frce", "--cmd", "true", cwd=work)
        assert plain.returncode == 77, plain.stderr
        assert "remote-exec[frce]" in plain.stderr
    finally:
        sim.auth = "none"


def test_site_check(site: BatchSite, work: Path) -> None:
    proc = site.cli("site", "check", "frce", "--json", cwd=work)
    rows = {r["check"]: r for r in json.loads(proc.stdout)}
    assert rows["FRCE API"]["status"] == "ok", rows


# Requests the backend never sends (it checks them first), sent by hand so that each
# documented reason comes from the simulator and is read by the dialect's parser.
_BAD_REQUESTS = {
    "postdata_parse_error": b"{not json",
    "postdata_too_big": json.dumps({"partition": "norm",
                                    "script-body": "#!/bin/sh\n" + "#" * 5000}).encode(),
    "no_partition_given": json.dumps({"script-body": "#!/bin/sh\n"}).encode(),
    "bad_partition": json.dumps({"partition": "gpu", "script-body": "#!/bin/sh\n"}).encode(),
    "bad_number_of_tasks": json.dumps({"partition": "norm", "ntasks": 0,
                                       "script-body": "#!/bin/sh\n"}).encode(),
    "conflicting_mem_specifications": json.dumps({
        "partition": "norm", "mem-per-cpu": "1G", "mem-per-node": "4G",
        "script-body": "#!/bin/sh\n"}).encode(),
}


@pytest.mark.parametrize("reason", [*_BAD_REQUESTS, "backend_query_malloc_failed",
                                    "backend_query_job_submission_failed"])
def test_each_documented_reason_is_read(sim: FrceSim, reason: str) -> None:
    import urllib.error
    import urllib.request

    from frce_sim import DOCUMENTED_REASONS

    from remote_exec.backends.slurmrest import dialects
    from remote_exec.backends.slurmrest.client import _answer

    assert set(DOCUMENTED_REASONS) == set(dialects.FRCE_REASONS)
    body = _BAD_REQUESTS.get(reason)
    if body is None:
        setattr(sim.faults, {"backend_query_malloc_failed": "malloc_failed"}.get(
            reason, "submission_failed"), 1)
        body = json.dumps({"partition": "norm", "script-body": "#!/bin/sh\n"}).encode()
    request = urllib.request.Request(sim.url + "/submit_job", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            answer = _answer(r.status, r.headers, r.read())
    except urllib.error.HTTPError as exc:
        answer = _answer(exc.code, exc.headers, exc.read())
    job_id, why, _, later = dialects.frce_submitted(answer)
    assert job_id is None and f"({reason})" in why
    assert later == (reason == "backend_query_malloc_failed")


# -- on a restricted site: the agent prepares the run, the job runs the agent ----------------

@pytest.fixture(scope="module")
def locked(sim: FrceSim, tmp_path_factory: pytest.TempPathFactory):
    """A restricted site (its key locked to the agent by `site install --apply`) whose
    runs go to the FRCE API; the job's script is the agent's batch-job command."""
    base = tmp_path_factory.mktemp("frce-locked")
    program = base / "solve.sh"
    program.write_text("#!/bin/sh\ntouch ran\ncat in.txt > out.txt\necho s3cret > key.secret\n"
                       "sleep \"${1:-0}\"\n")
    program.chmod(0o755)
    locked = BatchSite.start_locked(
        base, "frce-locked", {}, backend="slurmrest", templates=["generic"],
        never_return=["*.secret"], resources={"queue": "norm", "walltime": "10m"},
        slurmrest={"dialect": "frce", "url": sim.url, "auth": "none"})
    locked.program = program  # type: ignore[attr-defined]
    yield locked
    locked.stop()


def test_restricted_site_runs_the_approved_entrypoint(locked: BatchSite, sim: FrceSim,
                                                      work: Path) -> None:
    before = len(submits(sim))
    proc = locked.cli("run", "--site", "frce-locked", "--template", "generic", "-p",
                      f"program={locked.program}", "in.txt", "--into", "back",  # type: ignore[attr-defined]
                      cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "back" / "out.txt").read_text() == "hello frce\n"
    assert not (work / "back" / "key.secret").exists()
    (body,) = [r.body for r in submits(sim)[before:]]
    assert "--batch-job" in body["script-body"] and body["partition"] == "norm"
    assert locked.newest()["backend"] == "slurmrest-agent"


def test_restricted_cancel_stops_the_job_at_the_agents_mark(locked: BatchSite, sim: FrceSim,
                                                            work: Path) -> None:
    proc = locked.spawn_run("--site", "frce-locked", "--template", "generic", "-p",
                            f"program={locked.program}", "-p", "args=120",  # type: ignore[attr-defined]
                            "in.txt", cwd=work)
    status = locked.wait_job(("running",))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "marked cancelled" in err or "stopped by its job" in err, err
    job = sim.wait_job(status["job_id"], timeout=30)
    assert job.state in ("COMPLETED", "FAILED")  # the agent stopped the entrypoint itself
    assert locked.newest()["state"] == "cancelled"
