"""The agent's batch mode and its ``token`` request, locally (no sshd, no Slurm).

As ``test_agent_unit`` does (whose scratch site this file uses), every request runs the
agent as sshd would, a subprocess with ``SSH_ORIGINAL_COMMAND`` set; a batch job is the
agent run the way a Slurm batch script runs it (``exec`` of the ``job_command`` that
``launch ... --batch`` printed), with ``SLURM_JOB_ID`` set and no SSH request. With
``REMOTE_EXEC_AGENT_PYTHON`` set (e.g. to a Python 3.6), the agent runs under it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_agent_unit import AGENT, Site, sha256

from remote_exec.config import Site as SiteConfig
from remote_exec.errors import RemoteExecError
from remote_exec.site.install import allowlist_text

pytestmark = pytest.mark.timeout(120)

STUBBORN = "trap '' TERM\necho up\nwhile :; do sleep 0.1; done\n"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def prepare(site: Site, entrypoint: str, params: dict) -> tuple[str, list[str]]:
    """A new run prepared for a batch job: its id and its job's command."""
    run_id = site.new_run()
    answer = site.ok(f"launch {run_id} {entrypoint} --batch", params)
    assert set(answer) == {"prepared", "job_command", "job_output"}
    assert answer["prepared"] is True and answer["job_output"].endswith(f"/{run_id}/job.out")
    return run_id, answer["job_command"]


def job_env(site: Site, job_id: str | None = "4242") -> dict:
    env = site.env(None)
    if job_id is not None:
        env["SLURM_JOB_ID"] = job_id
    return env


def run_job(site: Site, command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, env={**job_env(site), **env},
                          timeout=60, cwd=site.tmp)


def start_job(site: Site, command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=job_env(site), cwd=site.tmp)


def run_log(site: Site, run_id: str) -> str:
    path = site.root / run_id / "remote_program_exec.log"
    return path.read_text() if path.exists() else ""


def add_stubborn(site: Site) -> None:
    stubborn = site.conf / "stubborn.sh"
    stubborn.write_text(STUBBORN)
    site.spec["entrypoints"]["stubborn"] = {"path": str(stubborn), "sha256": sha256(stubborn)}
    site.save()


# ---------------------------------------------------------------------------------------
# launch --batch, then the job
# ---------------------------------------------------------------------------------------

def test_batch_end_to_end(site: Site) -> None:
    run_id, command = prepare(site, "generic",
                              {"program": "~/bin/solver", "args": ["a b", "$(x)"], "n": "3",
                               "code": "3"})
    rundir = site.root / run_id
    state = site.state / run_id
    assert command[2:] == ["--allowlist", str(site.allowlist), "--batch-job", run_id]
    assert os.path.realpath(command[1]) == os.path.realpath(AGENT)
    assert os.path.isabs(command[0]) and os.access(command[0], os.X_OK)
    # the launch's records, and batch.json: only the variables the agent adds
    assert (state / "launched").is_dir()
    assert (state / "entrypoint").read_bytes() == site.generic.read_bytes()
    assert (state / "entrypoint_name").read_text() == "generic\n"
    assert (state / "params.json").is_file() and (state / "staged.json").is_file()
    assert (state / "batch.json").stat().st_mode & 0o777 == 0o600
    batch = json.loads((state / "batch.json").read_text())
    assert batch == {"entrypoint": "generic", "env": {
        "RE_program": str(site.home / "bin/solver"), "RE_args": "a b\n$(x)", "RE_n": "3",
        "RE_code": "3", "REMOTE_EXEC_RUN_ID": run_id, "REMOTE_EXEC_RUN_DIR": str(rundir),
        "REMOTE_EXEC_PARAMS": str(state / "params.json")}}
    assert not rundir.joinpath("env.txt").exists()  # nothing ran on the login host
    status = site.ok("status " + run_id)
    assert status["batch"] is True and status["launched"] is True
    assert status["job_command"] == command
    assert status["job_id"] is None and status["job_host"] is None
    assert status["pgid"] is None and status["alive"] is None
    assert status["exit_code"] is None and status["started_at"] is None
    assert site.ok("wait " + run_id) == {"exit_code": None, "batch": True}
    prepared = [line for line in site.log_lines() if "prepared for a batch job" in line]
    assert len(prepared) == 1 and prepared[0].endswith(
        "ok: prepared for a batch job (entrypoint generic; parameters: args, code, n, "
        "program)")
    assert "solver" not in site.log.read_text()  # values are never logged
    assert site.ok("list")["runs"][0]["state"] == "running"  # (its job may still come)

    # the job, as Slurm runs it
    job = run_job(site, command)
    assert job.returncode == 3, job.stderr.decode()
    assert job.stdout == b"" and job.stderr == b""
    assert (state / "exit_code").read_text() == "3\n"
    assert (rundir / "env.txt").read_text() == "n=3 flag=unset unset=3\n"
    assert (rundir / "args.txt").read_text() == "a b\n$(x)\n"
    env = dict(line.split("=", 1) for line in (rundir / "fullenv.txt").read_text().splitlines()
               if "=" in line and not line.startswith((" ", "\t")))
    assert env["REMOTE_EXEC_RUN_ID"] == run_id and env["SLURM_JOB_ID"] == "4242"
    assert "SSH_ORIGINAL_COMMAND" not in env
    assert run_log(site, run_id) == f"generic ran in {rundir}\n"
    assert not (state / "pgid").exists()
    status = site.ok("status " + run_id)
    assert status["exit_code"] == 3 and status["job_id"] == "4242"
    assert status["job_host"] == os.uname()[1] and status["started_at"]
    assert status["pgid"] is None and status["alive"] is None
    assert site.ok("wait " + run_id) == {"exit_code": 3}
    assert site.ok("list")["runs"][0]["state"] == "finished"
    journal = [line for line in site.log_lines() if "command='--batch-job " in line]
    assert len(journal) == 2 and " from=- " in journal[0]
    assert f"batch job on {os.uname()[1]} (job 4242): started entrypoint generic" in journal[0]
    assert journal[1].endswith("the entrypoint ended with exit code 3")

    # once only: a second job runs nothing
    (rundir / "env.txt").unlink()
    again = run_job(site, command, SLURM_JOB_ID="4343")
    assert again.returncode == 1
    assert b"started before; it runs only once" in again.stderr
    assert not (rundir / "env.txt").exists()
    assert "runs only once" in site.log_lines()[-1]
    assert " command='--batch-job " in site.log_lines()[-1]
    assert site.ok("status " + run_id)["job_id"] == "4242"
    assert site.ok("remove " + run_id) == {"removed": True}


def test_job_without_slurm_job_id(site: Site) -> None:
    run_id, command = prepare(site, "generic", {"program": "/bin/true"})
    job = subprocess.run(command, capture_output=True, env=job_env(site, "12; x"), timeout=60)
    assert job.returncode == 0, job.stderr
    status = site.ok("status " + run_id)
    assert status["job_id"] is None and status["exit_code"] == 0
    assert not (site.state / run_id / "job_id").exists()


def test_launch_batch_twice_and_bad_arguments(site: Site) -> None:
    run_id, _ = prepare(site, "generic", {"program": "/bin/true"})
    for command in (f"launch {run_id} generic --batch", f"launch {run_id} generic"):
        proc = site.launch(run_id, "generic --batch" if "batch" in command else "generic",
                           {"program": "/bin/true"})
        assert proc.returncode == 96, proc.stderr
        assert proc.stderr == b"remote-exec agent: this run was already launched\n"
    other = site.new_run()
    for extra in ("--bogus", "--batch x", "x --batch", "--batch --batch"):
        assert "usage" in site.refused(f"launch {other} generic {extra}",
                                       {"program": "/bin/true"})
    assert not (site.state / other / "launched").exists()
    # the same checks as launch: e.g. an entrypoint that is not approved
    assert "not in the allowlist" in site.refused(f"launch {other} nope --batch", {})
    assert not (site.state / other / "batch.json").exists()


def test_batch_job_is_never_an_ssh_request(site: Site) -> None:
    run_id, command = prepare(site, "generic", {"program": "/bin/true"})
    for request in ("hello", command[-2] + " " + run_id, ""):
        proc = run_job(site, command, SSH_ORIGINAL_COMMAND=request)
        assert proc.returncode == 2
        assert proc.stderr == (b"remote-exec agent: refused: --batch-job is run by a batch "
                               b"job, never through SSH\n")
    assert not (site.state / run_id / "job_started").exists()
    assert not (site.root / run_id / "env.txt").exists()
    # through SSH, --batch-job is no request at all
    assert "is not an agent command" in site.refused(f"--batch-job {run_id}")
    # a run that was not prepared for a batch job
    plain = site.new_run()
    proc = run_job(site, command[:-1] + [plain])
    assert proc.returncode == 2 and b"not prepared for a batch job" in proc.stderr


# ---------------------------------------------------------------------------------------
# Stopping a batch run
# ---------------------------------------------------------------------------------------

def test_cancel_before_the_job_starts(site: Site) -> None:
    run_id, command = prepare(site, "generic", {"program": "/bin/true"})
    assert site.ok("cancel " + run_id) == {
        "result": "marked cancelled: its job exits as soon as it starts"}
    assert site.ok("list")["runs"][0]["state"] == "dead"
    job = run_job(site, command)
    assert job.returncode == 0, job.stderr
    assert site.ok("status " + run_id)["exit_code"] == 143
    assert not (site.root / run_id / "env.txt").exists()
    assert run_log(site, run_id) == ""
    assert site.ok("cancel " + run_id) == {"result": "already finished"}
    (line,) = [line for line in site.log_lines() if "command='--batch-job" in line]
    assert line.endswith("the run was cancelled; not started")


def test_cancel_not_launched_and_cancelled_prepare(site: Site) -> None:
    run_id = site.new_run()
    assert site.ok("cancel " + run_id) == {"result": "not started"}
    assert "cancelled" in site.refused(f"launch {run_id} generic --batch",
                                       {"program": "/bin/true"})
    assert not (site.state / run_id / "batch.json").exists()


def test_cancel_mark_while_running(site: Site) -> None:
    run_id, command = prepare(site, "sleeper", {"seconds": "300"})
    job = start_job(site, command)
    site.wait_for(lambda: "tick 1" in run_log(site, run_id))
    assert "still running" in site.refused("remove " + run_id)
    started = time.monotonic()
    assert site.ok(f"cancel {run_id} 5") == {"result": "stopped by its job"}
    assert time.monotonic() - started < 4
    assert job.wait(timeout=10) == 143
    assert site.ok("status " + run_id)["exit_code"] == 143
    assert not (site.state / run_id / "pgid").exists()
    assert site.ok("remove " + run_id) == {"removed": True}


def test_term_ignoring_entrypoint_is_killed_after_the_grace(site: Site) -> None:
    add_stubborn(site)
    run_id, command = prepare(site, "stubborn", {})
    job = start_job(site, command)
    site.wait_for(lambda: "up" in run_log(site, run_id))
    started = time.monotonic()
    assert site.ok(f"cancel {run_id} 1") == {"result": "stopped by its job"}
    assert 0.9 < time.monotonic() - started < 4
    assert job.wait(timeout=10) == 137
    assert (site.state / run_id / "exit_code").read_text() == "137\n"
    assert not (site.state / run_id / "pgid").exists()


def test_cancel_waits_grace_plus_slack_then_leaves_it_to_the_job(site: Site) -> None:
    add_stubborn(site)
    run_id, command = prepare(site, "stubborn", {})
    (site.state / run_id / "job_started").mkdir()  # a job that started, then hangs
    started = time.monotonic()
    assert site.ok(f"cancel {run_id} 0") == {
        "result": "marked cancelled: its job stops the entrypoint"}
    assert 2.5 < time.monotonic() - started < 6
    assert site.ok("status " + run_id)["exit_code"] is None


def test_sigterm_to_the_job(site: Site) -> None:
    run_id, command = prepare(site, "sleeper", {"seconds": "300"})
    job = start_job(site, command)
    site.wait_for(lambda: "tick 1" in run_log(site, run_id))
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=10) == 143
    assert site.ok("status " + run_id)["exit_code"] == 143
    assert site.ok("wait " + run_id) == {"exit_code": 143}
    ticks = run_log(site, run_id)
    time.sleep(0.5)
    assert run_log(site, run_id) == ticks  # its whole group is gone
    ended = [line for line in site.log_lines() if "command='--batch-job" in line][-1]
    assert ended.endswith(f"ended with exit code 143 (stopped: signal {int(signal.SIGTERM)})")


def test_sigterm_to_the_job_of_a_term_ignoring_entrypoint(site: Site) -> None:
    add_stubborn(site)
    run_id, command = prepare(site, "stubborn", {})
    (site.state / run_id / "cancel_grace").write_text("0\n")
    job = start_job(site, command)
    site.wait_for(lambda: "up" in run_log(site, run_id))
    job.send_signal(signal.SIGHUP)
    assert job.wait(timeout=10) == 137


# ---------------------------------------------------------------------------------------
# The entrypoint is checked again on the compute node
# ---------------------------------------------------------------------------------------

def test_changed_entrypoint_is_not_run(site: Site) -> None:
    run_id, command = prepare(site, "generic", {"program": "/bin/true"})
    with site.generic.open("a") as f:
        f.write("echo changed\n")
    job = run_job(site, command)
    assert job.returncode == 126, job.stderr
    assert (site.state / run_id / "exit_code").read_text() == "126\n"
    assert not (site.root / run_id / "env.txt").exists()
    assert "entrypoint generic changed after it was checked; not run" in run_log(site, run_id)
    ended = [line for line in site.log_lines() if "command='--batch-job" in line][-1]
    assert ended.endswith("not run (exit 126)")


def test_reapproved_entrypoint_is_not_the_one_launched(site: Site) -> None:
    run_id, command = prepare(site, "generic", {"program": "/bin/true"})
    with site.generic.open("a") as f:
        f.write("echo changed\n")
    site.spec["entrypoints"]["generic"]["sha256"] = sha256(site.generic)
    site.save()
    job = run_job(site, command)
    assert job.returncode == 126
    assert "is not the one approved at launch" in run_log(site, run_id)
    assert not (site.root / run_id / "env.txt").exists()


def test_a_job_that_cannot_start_still_records_an_exit_code(site: Site) -> None:
    run_id, command = prepare(site, "generic", {"program": "/bin/true"})
    (site.state / run_id / "batch.json").write_text('["not what launch wrote"]')
    job = run_job(site, command)
    assert job.returncode == 1 and b"is not what launch --batch writes" in job.stderr
    assert site.ok("status " + run_id)["exit_code"] == 127
    assert "the batch job could not start the entrypoint" in run_log(site, run_id)
    assert not (site.root / run_id / "env.txt").exists()


# ---------------------------------------------------------------------------------------
# token, hello
# ---------------------------------------------------------------------------------------

def test_token(site: Site) -> None:
    script = site.conf / "token.sh"
    script.write_text("#!/bin/sh\necho SLURM_JWT=a.b.c\n"
                      f"echo \"${{SSH_ORIGINAL_COMMAND-unset}}\" > {site.tmp}/soc\n")
    script.chmod(0o755)
    assert "its allowlist has no token_command" in site.refused("token")
    site.spec["token_command"] = [str(script)]
    site.save()
    proc = site.run("token")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"SLURM_JWT=a.b.c\n"
    assert (site.tmp / "soc").read_text() == "unset\n"
    assert "usage" in site.refused("token x")
    failing = site.conf / "failing.sh"
    failing.write_text("#!/bin/sh\necho SLURM_JWT=x.y.z\necho first >&2\n"
                       "echo 'scontrol: token disabled' >&2\necho >&2\nexit 3\n")
    failing.chmod(0o755)
    site.spec["token_command"] = [str(failing), "lifespan=60"]
    site.save()
    err = site.refused("token", code=1)
    assert err == (f"remote-exec agent: error: the token command {failing} failed with exit "
                   "status 3: scontrol: token disabled\n")
    site.spec["token_command"] = [str(site.conf / "missing")]
    site.save()
    assert "cannot be started" in site.refused("token", code=1)
    text = site.log.read_text()
    assert "a.b.c" not in text and "x.y.z" not in text
    assert "command='token' ok: printed the token command's output (16 bytes)" in text


@pytest.mark.parametrize("bad", [[], [""], "scontrol token", [1], ["x"] * 17])
def test_bad_token_command(site: Site, bad: object) -> None:
    site.spec["token_command"] = bad
    site.save()
    err = site.refused("hello", code=1)
    assert "'token_command' must be a list of 1 to 16 non-empty strings" in err


def test_hello_features(site: Site) -> None:
    hello = site.ok("hello")
    assert {"batch", "token"} <= set(hello["features"])
    assert hello["agent"] == "remote-exec-agent" and "entrypoints" in hello


# ---------------------------------------------------------------------------------------
# remote-exec's side: the allowlist a site install writes
# ---------------------------------------------------------------------------------------

def test_allowlist_text_token_command() -> None:
    command = ["scontrol", "token", "lifespan=3600"]
    site = SiteConfig(name="hpc", host="login", restricted=True,
                      settings={"slurmrest": {"token_command": command}})
    allowlist = json.loads(allowlist_text(site, "/scratch/runs", "/home/u/.agent", {}))
    assert allowlist["token_command"] == command
    plain = SiteConfig(name="hpc", host="login", restricted=True)
    assert "token_command" not in json.loads(allowlist_text(plain, "/r", "/a", {}))
    other = SiteConfig(name="hpc", host="login", settings={"slurmrest": {"url": "x"}})
    assert "token_command" not in json.loads(allowlist_text(other, "/r", "/a", {}))


# ---------------------------------------------------------------------------------------
# remote-exec's side: the client of the protocol (AgentClient), over a stand-in connection
# ---------------------------------------------------------------------------------------

class AgentConnection:
    """Stands in for an SSH connection whose key runs only the agent: ``run`` runs the
    agent with the request as ``SSH_ORIGINAL_COMMAND``, as sshd would."""

    def __init__(self, site: Site) -> None:
        self.site = site

    async def run(self, command: str, input: str | None = None,
                  check: bool = False) -> SimpleNamespace:
        proc = self.site.run(command, (input or "").encode())
        return SimpleNamespace(exit_status=proc.returncode, stdout=proc.stdout.decode(),
                               stderr=proc.stderr.decode())

    def is_closed(self) -> bool:
        return False


def test_agent_client_launch_batch_and_token(site: Site) -> None:
    from remote_exec.backends.agent_protocol import AgentClient, AgentRefused

    client = AgentClient("hpc")
    conn = AgentConnection(site)
    run_id = site.new_run()
    prepared = asyncio.run(client.launch_batch(conn, run_id, "generic",
                                               {"program": "/bin/true"}))
    assert prepared.command[2:] == ["--allowlist", str(site.allowlist), "--batch-job", run_id]
    assert prepared.output.endswith(f"/{run_id}/job.out") and not prepared.before
    # a retried request (ALREADY_LAUNCHED) answers what the run was prepared with
    again = asyncio.run(client.launch_batch(conn, run_id, "generic", {"program": "/bin/true"}))
    assert (again.command, again.output, again.before) == (prepared.command, prepared.output,
                                                           True)
    plain = site.new_run()
    assert site.launch(plain, "generic", {"program": "/bin/true"}).returncode == 0
    with pytest.raises(RemoteExecError, match="already launched, not for a batch job"):
        asyncio.run(client.launch_batch(conn, plain, "generic", {"program": "/bin/true"}))
    with pytest.raises(AgentRefused, match="not in the allowlist"):
        asyncio.run(client.launch_batch(conn, site.new_run(), "nope", {}))
    with pytest.raises(AgentRefused, match="no token_command"):
        asyncio.run(client.token(conn))
    script = site.conf / "token.sh"
    script.write_text("#!/bin/sh\necho SLURM_JWT=a.b.c\n")
    script.chmod(0o755)
    site.spec["token_command"] = [str(script)]
    site.save()
    assert asyncio.run(client.token(conn)) == "SLURM_JWT=a.b.c\n"
    assert run_job(site, prepared.command).returncode == 0
    status = asyncio.run(client.status(conn, run_id))
    assert status["batch"] is True and status["exit_code"] == 0
