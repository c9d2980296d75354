"""The ``slurmrest`` backend against a real slurmrestd: Debian's ``slurmrestd`` with
``rest_auth/jwt`` in front of the loopback Slurm of tests/slurm_cluster.py, reached
through a small HTTP relay that can lose an answer on cue. Files travel over a real
loopback sshd; the token comes from ``scontrol token`` run over that SSH connection."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from batch_site import BatchSite, slurm_cluster
from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.timeout(400), pytest.mark.xdist_group("slurm")]


class Relay:
    """An HTTP relay in front of slurmrestd: counts requests by method and path, and
    can forward the next submission yet drop its answer (as when a link dies)."""

    def __init__(self, target_port: int) -> None:
        relay = self
        self.target_port = target_port
        self.seen: list[tuple[str, str, int]] = []
        self.lose_next_submit = False
        self.unavailable = 0  # answer this many requests 503 without forwarding

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if relay.unavailable > 0:
                    relay.unavailable -= 1
                    relay.seen.append((self.command, self.path, 503))
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", relay.target_port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                relay.seen.append((self.command, self.path, answer.status))
                if self.command == "POST" and self.path.endswith("/job/submit") \
                        and relay.lose_next_submit:
                    relay.lose_next_submit = False
                    self.close_connection = True
                    self.connection.close()  # submitted, but the answer never arrives
                    return
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection",
                                           "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _relay

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str, tail: str) -> int:
        return sum(1 for m, p, _ in self.seen if m == method and p.endswith(tail))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = slurm_cluster(tmp_path_factory, "slurmrest", rest=True)
    yield cluster
    cluster.down()


@pytest.fixture(scope="module")
def relay(cluster: SlurmCluster):
    relay = Relay(int(cluster.rest_url.rsplit(":", 1)[1]))
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def site(cluster: SlurmCluster, relay: Relay, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("slurmrest-site")
    log = base / "tokens.log"
    # the token command runs over the site's SSH: log each call, then ask Slurm for one
    command = ["/bin/sh", "-c", f'echo x >> "{log}"; exec scontrol token lifespan=${{1:-3600}}',
               "token"]
    site = BatchSite.start(base, "rest", "slurmrest", {"SLURM_CONF": str(cluster.conf)},
                           resources={"walltime": "10m"},
                           slurmrest={"url": relay.url, "token_command": command})
    site.token_log = log  # type: ignore[attr-defined]
    yield site
    site.stop()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "in.txt").write_text("hello rest\n")
    return tmp_path


def jobs_named(cluster: SlurmCluster, run_id: str) -> list[str]:
    name = "re-" + run_id.replace("-", "")[:8]
    return cluster.run("squeue", "-h", "-n", name, "-t", "all", "-o", "%i").stdout.split()


def variant(site: BatchSite, work: Path, name: str, **changes: object) -> BatchSite:
    """The same site under another configuration file, with ``changes`` to its entry
    (``slurmrest`` changes are merged into its section)."""
    data = yaml.safe_load(site.config.read_text())
    entry = data["sites"][site.name]
    rest = changes.pop("slurmrest", None)
    entry.update(changes)
    if rest:
        entry["slurmrest"] = {**entry["slurmrest"], **rest}  # type: ignore[dict-item]
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    return BatchSite(box=site.box, config=config, state=site.state, root=site.root,
                     name=site.name)


# -- the tests ----------------------------------------------------------------------------------

def test_success_through_the_rest_api(site: BatchSite, cluster: SlurmCluster, relay: Relay,
                                      work: Path) -> None:
    submits = relay.count("POST", "/job/submit")
    proc = site.cli("run", "--site", "rest", "-R", "cpus_per_task=1", "--cmd",
                    'cat in.txt > out.txt; echo "job=$SLURM_JOB_ID" >> out.txt', "in.txt",
                    "--into", "back", cwd=work, holder=True)
    assert proc.returncode == 0, proc.stderr
    out = (work / "back" / "out.txt").read_text()
    assert out.startswith("hello rest\njob=")
    job_id = out.split("job=")[1].strip()
    assert f"submitted Slurm job {job_id} through slurmrestd v0.0.38" in proc.stderr
    assert relay.count("POST", "/job/submit") == submits + 1
    run = site.newest()
    assert run["backend"] == "slurmrest" and run["job_id"] == job_id
    job = run["job_info"]
    assert job["native"] == "COMPLETED" and job["state"] == "completed"
    assert job["queue_wait"] is not None and job["run_time"] is not None
    fields = cluster.job(job_id)
    assert fields["JobState"] == "COMPLETED" and fields["Requeue"] == "0"  # no_requeue
    assert fields["JobName"] == "re-" + run["id"].replace("-", "")[:8]
    assert fields["TimeLimit"] == "00:10:00"
    text = site.cli("status", run["id"], cwd=work).stdout
    assert f"Slurm job {job_id}: COMPLETED" in text and "queued" in text


def test_exit_code_three(site: BatchSite, cluster: SlurmCluster, work: Path) -> None:
    proc = site.cli("run", "--site", "rest", "--cmd", "echo broken; exit 3", cwd=work)
    assert proc.returncode == 3, proc.stderr
    assert "broken" in proc.stderr
    run = site.newest()
    assert run["state"] == "failed" and run["exit_code"] == 3
    assert run["job_info"]["native"] == "FAILED" and run["job_info"]["exit_code"] == 3
    assert cluster.job(run["job_id"])["ExitCode"] == "3:0"


def test_bad_partition_is_refused_with_slurms_reason(site: BatchSite, work: Path) -> None:
    proc = site.cli("run", "--site", "rest", "-R", "queue=nosuch", "--cmd", "true", cwd=work)
    assert proc.returncode == 73, proc.stderr
    assert "Slurm refused the job" in proc.stderr
    assert "Invalid partition name specified" in proc.stderr
    assert (work / "in.txt").read_text() == "hello rest\n"


def test_cancel_while_pending(site: BatchSite, cluster: SlurmCluster, work: Path) -> None:
    blocker = cluster.hold_node()
    try:
        proc = site.spawn_run("--site", "rest", "--cmd", "touch ran", cwd=work)
        status = site.wait_job(("queued",))
        assert status["job_info"]["native"] == "PENDING"
        cancel = site.cli("cancel", status["id"], cwd=work)
        assert cancel.returncode == 0, cancel.stderr
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        assert cluster.job(status["job_id"])["JobState"] == "CANCELLED"
        run = site.newest()
        assert run["state"] == "cancelled" and "cancelled through slurmrestd" in run["error"]
        assert not (Path(status["rundir"]) / "ran").exists()
    finally:
        cluster.run("scancel", blocker, check=False)


def test_ctrl_c_while_running_cancels_the_job(site: BatchSite, cluster: SlurmCluster,
                                              work: Path) -> None:
    proc = site.spawn_run("--site", "rest", "--cmd", "echo started; sleep 120", cwd=work)
    status = site.wait_job(("running",))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    cluster.wait_job_state(status["job_id"], "CANCELLED")
    run = site.newest()
    assert run["state"] == "cancelled" and "slurmrestd" in run["error"]


def test_walltime_kill_is_reported_as_timed_out(site: BatchSite, cluster: SlurmCluster,
                                                work: Path) -> None:
    proc = site.spawn_run("--site", "rest", "-R", "walltime=1", "--cmd",
                          "echo working; sleep 600", cwd=work)
    status = site.wait_job(("running",))
    assert cluster.job(status["job_id"])["TimeLimit"] == "00:01:00"
    # as in test_slurm: a limit lowered to 0 is enforced at the next check, not 60-90 s later
    cluster.run("scontrol", "update", f"JobId={status['job_id']}", "TimeLimit=0")
    try:
        _, err = proc.communicate(timeout=200)
    finally:
        proc.kill()
    assert proc.returncode not in (0, None), err
    assert "TIMEOUT" in err and "walltime" in err
    run = site.newest()
    assert run["job_info"]["state"] == "timed_out" and run["state"] == "failed"


def test_token_that_expires_mid_run_is_renewed(site: BatchSite, work: Path) -> None:
    short = variant(site, work, "short", slurmrest={"token_command": [
        *yaml.safe_load(site.config.read_text())["sites"]["rest"]["slurmrest"]
        ["token_command"], "6"]})
    before = len(site.token_log.read_text().splitlines())  # type: ignore[attr-defined]
    proc = short.cli("run", "--site", "rest", "--cmd", "sleep 14; echo done > d.txt",
                     "--into", "back", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "back" / "d.txt").read_text() == "done\n"
    calls = len(site.token_log.read_text().splitlines()) - before  # type: ignore[attr-defined]
    assert calls >= 2, f"the token was fetched {calls} time(s) in a run longer than its life"


def settle_after_a_crash(cluster: SlurmCluster, job_id: str) -> None:
    """Once slurmctld has settled the job it recovered (ended, perhaps a moment after the
    run did), resume the node it drained on the way, as an administrator would: the
    module's later tests need it."""
    deadline = time.monotonic() + 60
    while job_id and time.monotonic() < deadline:
        if cluster.job(job_id).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING",
                                                       "COMPLETING"):
            break
        time.sleep(0.5)
    time.sleep(1)
    if "drain" in cluster.node_state():
        cluster.resume()
    cluster.wait_idle(60)


def test_slurmctld_killed_and_restarted_mid_run(site: BatchSite, cluster: SlurmCluster,
                                                work: Path) -> None:
    """A crash right after the job started, before slurmctld saved that: restarted, it
    thinks the job pending, fails to start it again on the node that runs it ("Duplicate
    jobid": the node is drained) and calls it CANCELLED, while the job runs on. The
    wrapper's own exit code is the run's, not Slurm's word."""
    proc = site.spawn_run("--site", "rest", "--cmd", "sleep 8; echo ok > r.txt; exit 4",
                          "--into", "back", cwd=work)
    job_id = ""
    try:
        job_id = site.wait_job(("running",))["job_id"]
        cluster.stop_ctld(kill=True)  # a crash: SIGKILL
        time.sleep(4)
        cluster.start_ctld()
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
        settle_after_a_crash(cluster, job_id)
    assert proc.returncode == 4, err
    assert (work / "back" / "r.txt").read_text() == "ok\n"
    assert site.newest()["state"] == "failed"  # exit 4: not "cancelled remotely"


def test_lost_submit_answer_finds_the_job(site: BatchSite, cluster: SlurmCluster,
                                          relay: Relay, work: Path) -> None:
    submits = relay.count("POST", "/job/submit")
    relay.lose_next_submit = True
    proc = site.cli("run", "--site", "rest", "--cmd", "echo once >> count.txt",
                    "--into", "back", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert not relay.lose_next_submit
    assert relay.count("POST", "/job/submit") == submits + 1  # never sent twice
    assert "answer was lost: found job" in proc.stderr
    run = site.newest()
    assert jobs_named(cluster, run["id"]) == [run["job_id"]]
    assert (work / "back" / "count.txt").read_text() == "once\n"


def test_api_unavailable_for_a_while_is_waited_out(site: BatchSite, relay: Relay,
                                                   work: Path) -> None:
    relay.unavailable = 3
    proc = site.cli("run", "--site", "rest", "--cmd", "echo fine > f.txt", "--into", "back",
                    cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert relay.unavailable == 0
    assert (work / "back" / "f.txt").read_text() == "fine\n"


def test_ssh_link_cut_during_staging(site: BatchSite, cluster: SlurmCluster, work: Path) -> None:
    from tcp_proxy import TcpProxy

    payload = os.urandom(8_000_000)
    (work / "big.bin").write_bytes(payload)
    with TcpProxy(site.box.port) as tcp:
        kind, blob = Path(f"{site.box.host_key}.pub").read_text().split()[:2]
        known = work / "proxied.known_hosts"
        known.write_text(f"[127.0.0.1]:{tcp.port} {kind} {blob}\n")
        proxied = variant(site, work, "proxied", port=tcp.port, known_hosts=str(known),
                          retry_max_interval=0.5)
        tcp.cut_after(up=3_000_000)
        proc = proxied.cli("run", "--site", "rest", "--transfer", "sftp", "--cmd",
                           "sha256sum big.bin > sum; echo x >> ran", "big.bin",
                           "--into", "back", cwd=work)
        assert tcp.cuts >= 1
    assert proc.returncode == 0, proc.stderr
    assert "lost during staging" in proc.stderr
    import hashlib

    assert (work / "back" / "sum").read_text().split()[0] == hashlib.sha256(payload).hexdigest()
    assert (work / "back" / "ran").read_text() == "x\n"
    run = site.newest()
    assert jobs_named(cluster, run["id"]) == [run["job_id"]]


def test_site_check_shows_the_api(site: BatchSite, work: Path) -> None:
    proc = site.cli("site", "check", "rest", "--json", cwd=work)
    rows = {r["check"]: r for r in json.loads(proc.stdout)}
    row = rows["slurmrestd"]
    assert row["status"] == "ok", row
    assert "v0.0.38" in row["detail"] and "22.05" in row["detail"]
    assert "token expires" in row["detail"]


def test_no_token_in_any_output(site: BatchSite, work: Path) -> None:
    env_site = variant(site, work, "debug")
    proc = env_site.cli("run", "--site", "rest", "--cmd", "true", cwd=work)
    assert proc.returncode == 0, proc.stderr
    # the token is a JWT: three base64url parts, the first always starts eyJ
    assert "eyJ" not in proc.stderr + proc.stdout
    for path in site.state.rglob("*"):
        if path.is_file():
            assert b"eyJhbGciOi" not in path.read_bytes(), path


def test_driver_killed_then_resume_submits_once(site: BatchSite, cluster: SlurmCluster,
                                                 relay: Relay, work: Path) -> None:
    submits = relay.count("POST", "/job/submit")
    proc = site.spawn_run("--site", "rest", "--cmd", "sleep 5; echo done > result.txt; exit 5",
                          "--into", "back", cwd=work)
    status = site.wait_job(("running",))
    proc.kill()
    proc.wait()
    resumed = site.cli("resume", status["id"], cwd=work)
    assert resumed.returncode == 5, resumed.stderr
    assert (work / "back" / "result.txt").read_text() == "done\n"
    run = site.newest()
    assert run["exit_code"] == 5 and run["job_info"]["native"] == "FAILED"
    assert relay.count("POST", "/job/submit") == submits + 1
    assert jobs_named(cluster, run["id"]) == [run["job_id"]]


def test_cancel_command_reaches_slurm_without_a_driver(site: BatchSite, cluster: SlurmCluster,
                                                       work: Path) -> None:
    proc = site.spawn_run("--site", "rest", "--cmd", "sleep 120", cwd=work)
    status = site.wait_job(("running",))
    proc.kill()  # nobody drives it now: the cancel command asks slurmrestd itself
    proc.wait()
    cancel = site.cli("cancel", status["id"], cwd=work)
    assert cancel.returncode == 0, cancel.stderr
    assert "cancelled through slurmrestd" in cancel.stdout, cancel.stdout + cancel.stderr
    cluster.wait_job_state(status["job_id"], "CANCELLED")


def test_api_down_longer_than_the_retries_interrupts_then_resume(
        site: BatchSite, cluster: SlurmCluster, relay: Relay, work: Path) -> None:
    impatient = variant(site, work, "impatient", retry_tries=1, retry_max_interval=0.2)
    relay.unavailable = 4  # two tries of the submission, each asking the version twice
    seen, submits = len(relay.seen), relay.count("POST", "/job/submit")
    proc = impatient.cli("run", "--site", "rest", "--cmd", "echo later > l.txt",
                         "--into", "back", cwd=work)
    assert proc.returncode == 75, (proc.stderr, relay.seen[seen:])
    assert relay.count("POST", "/job/submit") == submits
    assert "lost" not in proc.stderr  # the API, not the SSH link
    run = impatient.newest()
    assert run["state"] == "interrupted" and "remote-exec resume" in proc.stderr
    resumed = impatient.cli("resume", run["id"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert (work / "back" / "l.txt").read_text() == "later\n"
    assert jobs_named(cluster, run["id"]) == [impatient.newest()["job_id"]]


# -- on a restricted site: the agent stages, fetches and starts the approved entrypoint -------

@pytest.fixture(scope="module")
def locked(cluster: SlurmCluster, relay: Relay, tmp_path_factory: pytest.TempPathFactory):
    """A restricted site (`site install --apply` locked the key to the agent) whose runs
    are Slurm jobs submitted through slurmrestd; the token comes from the agent, which
    runs the allowlist's token_command."""
    base = tmp_path_factory.mktemp("slurmrest-locked")
    scripts = base / "site-scripts"
    scripts.mkdir()
    for name, body in {
        "work.sh": 'cat in.txt > out.txt; echo "job=$SLURM_JOB_ID" >> out.txt\n'
                   "echo s3cret > key.secret\nexit \"${1:-0}\"\n",
        "nap.sh": "touch ran\necho napping\nexec sleep 120\n",
        "slow.sh": "echo working\nsleep 6\necho done > result.txt\nexit 5\n",
    }.items():
        (scripts / name).write_text("#!/bin/sh\n" + body)
        (scripts / name).chmod(0o755)
    locked = BatchSite.start_locked(
        base, "locked", {"SLURM_CONF": str(cluster.conf)}, backend="slurmrest",
        templates=["generic"], never_return=["*.secret"], resources={"walltime": "10m"},
        slurmrest={"url": relay.url, "token_command": ["scontrol", "token", "lifespan=3600"]})
    locked.scripts = scripts  # type: ignore[attr-defined]
    locked.agent_log = base / "agent" / "agent.log"  # type: ignore[attr-defined]
    yield locked
    locked.stop()


def approved(locked: BatchSite, program: str, *args: str) -> list[str]:
    """``run`` arguments of the site's approved `generic` entrypoint running ``program``."""
    words = ["run", "--site", "locked", "--template", "generic",
             "-p", f"program={locked.scripts / program}"]  # type: ignore[attr-defined]
    for arg in args:
        words += ["-p", f"args={arg}"]
    return words


def test_restricted_site_runs_the_approved_entrypoint_as_a_job(
        locked: BatchSite, cluster: SlurmCluster, relay: Relay, work: Path) -> None:
    submits = relay.count("POST", "/job/submit")
    proc = locked.cli(*approved(locked, "work.sh"), "in.txt", "--into", "back", cwd=work)
    assert proc.returncode == 0, proc.stderr
    out = (work / "back" / "out.txt").read_text()
    assert out.startswith("hello rest\njob=")
    job_id = out.split("job=")[1].strip()
    assert f"submitted Slurm job {job_id} through slurmrestd" in proc.stderr
    assert not (work / "back" / "key.secret").exists()  # the site's never_return holds
    assert relay.count("POST", "/job/submit") == submits + 1
    run = locked.newest()
    assert run["backend"] == "slurmrest-agent" and run["job_id"] == job_id
    assert run["job_info"]["native"] == "COMPLETED"
    fields = cluster.job(job_id)
    assert fields["Requeue"] == "0" and fields["TimeLimit"] == "00:10:00"
    # the job ran the agent, which checked the entrypoint again and ran it
    log = locked.agent_log.read_text()  # type: ignore[attr-defined]
    assert "--batch" in log and "batch job" in log
    assert "eyJ" not in proc.stderr + proc.stdout + log  # the token never shows
    text = locked.cli("status", run["id"], cwd=work).stdout
    assert f"Slurm job {job_id}: COMPLETED" in text


def test_restricted_exit_code_three(locked: BatchSite, work: Path) -> None:
    proc = locked.cli(*approved(locked, "work.sh", "3"), "in.txt", cwd=work)
    assert proc.returncode == 3, proc.stderr
    run = locked.newest()
    assert run["state"] == "failed" and run["job_info"]["exit_code"] == 3


def test_restricted_refusals_submit_nothing(locked: BatchSite, relay: Relay,
                                            work: Path) -> None:
    submits = relay.count("POST", "/job/submit")
    proc = locked.cli("run", "--site", "locked", "--template", "python", "-p",
                      "script=x.py", cwd=work)
    assert proc.returncode == 78 and "not allowed" in proc.stderr  # not a site template
    proc = locked.cli(*approved(locked, "work.sh"), "--backend", "slurm", cwd=work)
    assert proc.returncode != 0 and "slurmrest" in proc.stderr, proc.stderr
    proc = locked.cli("run", "--site", "locked", "--template", "generic",
                      "-p", "program=/bin/sh;id", cwd=work)
    assert proc.returncode == 78 and "does not match the pattern" in proc.stderr
    # the site's own check: an approved entrypoint changed on the host
    entrypoint = locked.agent_log.parent / "entrypoints" / "generic.sh"  # type: ignore[attr-defined]
    approved_bytes = entrypoint.read_bytes()
    entrypoint.write_bytes(approved_bytes + b"\nid\n")
    try:
        proc = locked.cli(*approved(locked, "work.sh"), cwd=work)
    finally:
        entrypoint.write_bytes(approved_bytes)
    assert proc.returncode == 77 and "re-approve" in proc.stderr, proc.stderr
    assert relay.count("POST", "/job/submit") == submits


def test_restricted_cancel_while_pending(locked: BatchSite, cluster: SlurmCluster,
                                         work: Path) -> None:
    blocker = cluster.hold_node()
    try:
        proc = locked.spawn_run(*approved(locked, "nap.sh")[1:], cwd=work)
        status = locked.wait_job(("queued",))
        cancel = locked.cli("cancel", status["id"], cwd=work)
        assert cancel.returncode == 0, cancel.stderr
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        assert cluster.job(status["job_id"])["JobState"] == "CANCELLED"
        assert not (Path(status["rundir"]) / "ran").exists()
    finally:
        cluster.run("scancel", blocker, check=False)


def test_restricted_ctrl_c_while_running(locked: BatchSite, cluster: SlurmCluster,
                                         work: Path) -> None:
    proc = locked.spawn_run(*approved(locked, "nap.sh")[1:], cwd=work)
    status = locked.wait_job(("running",))
    deadline = time.monotonic() + 30
    while not (Path(status["rundir"]) / "ran").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    cluster.wait_job_state(status["job_id"], "CANCELLED")
    assert locked.newest()["state"] == "cancelled"


def test_restricted_driver_killed_then_resume_submits_once(
        locked: BatchSite, cluster: SlurmCluster, relay: Relay, work: Path) -> None:
    submits = relay.count("POST", "/job/submit")
    proc = locked.spawn_run(*approved(locked, "slow.sh")[1:], "--into", "back", cwd=work)
    status = locked.wait_job(("running",))
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    logs = locked.cli("logs", status["id"], cwd=work)
    while "working" not in logs.stdout and time.monotonic() < deadline:
        time.sleep(0.5)
        logs = locked.cli("logs", status["id"], cwd=work)
    assert "working" in logs.stdout, logs.stdout + logs.stderr  # the agent serves the log
    resumed = locked.cli("resume", status["id"], cwd=work)
    assert resumed.returncode == 5, resumed.stderr
    assert (work / "back" / "result.txt").read_text() == "done\n"
    run = locked.newest()
    assert run["exit_code"] == 5 and run["job_info"]["native"] == "FAILED"
    assert relay.count("POST", "/job/submit") == submits + 1
    assert jobs_named(cluster, run["id"]) == [run["job_id"]]


def test_restricted_lost_submit_answer_finds_the_job(locked: BatchSite, cluster: SlurmCluster,
                                                     relay: Relay, work: Path) -> None:
    submits = relay.count("POST", "/job/submit")
    relay.lose_next_submit = True
    proc = locked.cli(*approved(locked, "work.sh"), "in.txt", "--into", "back", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert relay.count("POST", "/job/submit") == submits + 1
    assert "answer was lost: found job" in proc.stderr
    run = locked.newest()
    assert jobs_named(cluster, run["id"]) == [run["job_id"]]


def test_restricted_site_check(locked: BatchSite, work: Path) -> None:
    proc = locked.cli("site", "check", "locked", "--json", cwd=work)
    rows = {r["check"]: r for r in json.loads(proc.stdout)}
    assert rows["access"]["status"] == "ok"
    assert rows["batch jobs"]["status"] == "ok", rows["batch jobs"]
    assert rows["slurmrestd"]["status"] == "ok", rows["slurmrestd"]
    assert "token expires" in rows["slurmrestd"]["detail"]
