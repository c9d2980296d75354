"""The pull method's site poller (``remote-side_scripts/remote_exec_poller.py``).

Everything real on loopback: the poller runs as a subprocess (as a site would run it),
drives the real restricted agent, and talks real TLS to the queue server
(``tests/pull_site.py``'s ``QueueServer``, a subprocess) while the tests play the MInt side
with a small client of the submit role (``poller_helpers.HttpSubmitter``). Where a test
must script the server's answers (503 with Retry-After, a revoked token) it uses
``poller_helpers.FakeQueue``, a stand-in for the site role in this process.

Each test has a site of its own (its own token), so runs of one test never reach the
pollers of another. Leases are short (``lease_ttl`` 3 s: a heartbeat a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from poller_helpers import (
    POLLER,
    ConnectProxy,
    FakeQueue,
    FakeSubmitter,
    HttpSubmitter,
    Site,
    wait_for,
)
from tcp_proxy import TcpProxy

try:
    from pull_site import QueueServer, make_ca
except ImportError:  # the queue server is not there (yet): the stand-in plays it
    QueueServer = make_ca = None

TTL = 3
#: with pytest-xdist these tests run on the other worker (the rest of the file, as
#: tests/conftest.py groups it, on one): the file takes half as long
SECOND = pytest.mark.xdist_group("tests/test_poller.py-second")


class Backend:
    """The queue server the tests run against, and per-test sites on it."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.fake = None
        self.server = None
        if QueueServer is not None:
            ca = make_ca(directory / "ca")
            self.server = QueueServer(directory / "server", ca, lease_ttl=TTL)
            self.server.start()
            self.url = self.server.url
            self.ca_file = str(ca.ca_file)
        else:
            self.fake = FakeQueue(directory, ttl=TTL, heartbeat=1)
            self.url = self.fake.url
            self.ca_file = self.fake.ca_file

    def site(self, base: Path, **config) -> tuple[Site, object]:
        name = "s" + uuid.uuid4().hex[:10]
        if self.server is not None:
            token = self.server.token("site", name)
            submitter = HttpSubmitter(self.url, self.ca_file,
                                      self.server.token("submit", name), name)
        else:
            token = self.fake.site_token(name)
            submitter = FakeSubmitter(self.fake, name)
        return Site(base, self.url, self.ca_file, token, **config), submitter

    def close(self):
        if self.server is not None:
            self.server.stop()
        if self.fake is not None:
            self.fake.close()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = Backend(tmp_path_factory.mktemp("queue"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    f = FakeQueue(tmp_path_factory.mktemp("fake"), ttl=TTL, heartbeat=1)
    yield f
    f.close()


@pytest.fixture
def sites():
    made = []
    yield made
    for site in made:
        site.stop()


def new_site(backend: Backend, sites: list, base: Path, **config):
    site, sub = backend.site(base, **config)
    sites.append(site)
    return site, sub


def finished(sub, run_id, timeout=30):
    return sub.wait(run_id, ("finished", "cancelled", "expired"), timeout)


# --------------------------------------------------------------------------------------
# Without a server
# --------------------------------------------------------------------------------------

def test_the_poller_is_python_3_6_code():
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed")
    proc = subprocess.run([vermin, "-t=3.6-", "--no-tips", "--violations", str(POLLER)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_token_file_others_may_read_is_refused(fake, tmp_path):
    site = Site(tmp_path, fake.url, fake.ca_file, fake.site_token("x"))
    site.set_token(fake.site_token("x"), mode=0o644)
    proc = site.poller("--once")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert b"mode 0644" in err and b"chmod 600" in err
    assert fake.site_token("x").encode() not in err + out


def test_unknown_config_keys_are_refused(fake, tmp_path):
    site = Site(tmp_path, fake.url, fake.ca_file, fake.site_token("x"), insecure=True)
    proc = site.poller("--once")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and b"unknown keys insecure" in err


def test_check_reports_what_to_fix(backend, tmp_path, sites):
    site, _ = new_site(backend, sites, tmp_path)
    proc = subprocess.run([sys.executable, str(POLLER), "--config", str(site.config),
                           "--check"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout
    assert "worker" in proc.stdout and "healthz ok" in proc.stdout
    assert "token: accepted" in proc.stdout
    site.set_token("re1_wrong")
    proc = subprocess.run([sys.executable, str(POLLER), "--config", str(site.config),
                           "--check"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "refuses the site token" in proc.stdout
    assert "re1_wrong" not in proc.stdout


# --------------------------------------------------------------------------------------
# Scripted server answers
# --------------------------------------------------------------------------------------

def test_503_is_retried_after_retry_after(fake, tmp_path, sites):
    site = Site(tmp_path, fake.url, fake.ca_file, fake.site_token("busy"))
    sites.append(site)
    sub = FakeSubmitter(fake, "busy")
    with fake.lock:
        for _ in range(1):
            fake.script.append(("POST /site/claim", 503, {"Retry-After": "1"},
                                {"error": {"code": "draining", "message": "later",
                                           "retry_after": 1}}))
    run_id = sub.submit("worker", site.params())
    start = time.monotonic()
    proc = site.poller("--once")
    run = finished(sub, run_id)
    assert run["outcome"] == "exited" and run["exit_code"] == 0
    assert time.monotonic() - start >= 0.9
    assert proc.wait(20) == 0
    assert "503" in site.log()


def test_a_revoked_token_is_retried_slowly_and_logged_once(backend, tmp_path, sites):
    if backend.server is None:
        pytest.skip("needs the queue server")
    site, sub = new_site(backend, sites, tmp_path)
    token = site.token_file.read_text().strip()
    done = backend.server.admin("token", "revoke", hashlib.sha256(token.encode()).hexdigest()[:12])
    assert done.returncode == 0, done.stderr
    # every request of the poller is a connection of its own: count them at a proxy
    port = int(backend.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    config = json.loads(site.config.read_text())
    config["server"] = backend.url.replace(f":{port}/", f":{proxy.port}/")
    site.config.write_text(json.dumps(config))
    with proxy:
        proc = site.poller(env={"REMOTE_EXEC_POLLER_AUTH_RETRY": "1"})
        time.sleep(3)
        assert proc.poll() is None  # no crash
        requests = proxy.accepted
        assert 1 <= requests <= 5, requests
        # a new token in the file is taken without a restart
        site.set_token(backend.server.token("site", sub.site))
        run_id = sub.submit("worker", site.params())
        assert finished(sub, run_id)["outcome"] == "exited"
        assert "holds a new token: using it" in site.log()
    log = site.log()
    assert log.count("token_revoked") == 1, log
    assert token not in log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


@SECOND
def test_an_input_with_another_digest_is_refused(fake, tmp_path, sites):
    site = Site(tmp_path, fake.url, fake.ca_file, fake.site_token("corrupt"))
    sites.append(site)
    sub = FakeSubmitter(fake, "corrupt")
    fake.corrupt_inputs = True
    try:
        run_id = sub.submit("worker", site.params(), {"a.in": b"abc"})
        proc = site.poller("--once")
        run = finished(sub, run_id)
        assert proc.wait(20) == 0
    finally:
        fake.corrupt_inputs = False
    assert run["outcome"] == "rejected" and run["reason"] == "input_digest_mismatch", run
    assert "input 'a.in' has sha256" in run["message"]
    assert site.starts() == [] and site.run_dirs() == [] and site.state_files() == []


def test_no_claim_while_the_allowlist_is_broken(fake, tmp_path, sites):
    site = Site(tmp_path, fake.url, fake.ca_file, fake.site_token("broken"))
    sites.append(site)
    site.allowlist.write_text("{not json")
    before = fake.count("claim")
    proc = site.poller()
    wait_for(lambda: "cannot be loaded" in site.log(), 10, "the allowlist's problem logged")
    time.sleep(0.5)
    assert fake.count("claim") == before
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert site.log().count("cannot be loaded") == 1


# --------------------------------------------------------------------------------------
# Against the queue server
# --------------------------------------------------------------------------------------

NAMES = ["result.txt", "with space.txt", "it's \"q\".txt", "sub/deeper/d.dat", "out-a.in.txt"]


def test_runs_exit_0_and_3_with_results_byte_exact(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path, slots=2)
    data = os.urandom(300_000)
    ok = sub.submit("worker", site.params(), {"a.in": data, "dir/b c.in": b"bc"})
    bad = sub.submit("worker", site.params(code="3", mode="slow"), {"a.in": b"x"})
    site.poller()
    run = finished(sub, ok)
    assert run["outcome"] == "exited" and run["exit_code"] == 0, run
    paths = {o["path"] for o in run["outputs"]}
    # an input the entrypoint left unchanged is not sent back (MInt has it)
    assert set(NAMES) <= paths and "dir/b c.in" not in paths and "a.in" not in paths
    assert sub.output(ok, "out-a.in.txt") == data
    assert sub.output(ok, "it's \"q\".txt") == b"quote\n"
    # the allowlist's never: returns.never ["*.key"]
    assert "secret.key" not in paths and run["held_back"] == ["secret.key"]
    assert b"hello from the entrypoint" in sub.log(ok)
    run = finished(sub, bad)
    assert run["outcome"] == "exited" and run["exit_code"] == 3, run
    assert sub.output(bad, "result.txt") == b"result slow\n"
    assert sorted(line.split()[1] for line in site.starts()) == sorted([ok, bad])
    # cleanup on-success: the run of exit 0 is gone, the other kept; no state left
    wait_for(lambda: site.run_dirs() == [bad] and not site.state_files(), 10, "cleanup")


def test_a_file_name_with_a_newline_comes_back(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path)
    run_id = sub.submit("worker", site.params())
    site.poller()
    run = finished(sub, run_id)
    assert run["outcome"] == "exited" and run["exit_code"] == 0, run
    assert "new\nline.txt" in {o["path"] for o in run["outputs"]}
    assert sub.output(run_id, "new\nline.txt") == b"newline\n"


def test_the_site_refuses_what_its_allowlist_does_not_allow(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path)
    allowlist = json.loads(site.allowlist.read_text())
    changed = dict(allowlist["entrypoints"]["worker"], sha256="0" * 64)
    allowlist["entrypoints"]["changed"] = changed
    site.allowlist.write_text(json.dumps(allowlist))
    unknown = sub.submit("abaqus", {})
    digest = sub.submit("changed", site.params())
    param = sub.submit("worker", site.params(mode="$(rm -rf ~)"))
    site.poller()
    for run_id, reason, words in ((unknown, "entrypoint_not_allowed", "not in the allowlist"),
                                  (digest, "digest_mismatch", "re-approve"),
                                  (param, "bad_parameter", "is not one of fast, slow")):
        run = finished(sub, run_id)
        assert run["outcome"] == "rejected" and run["reason"] == reason, run
        assert words in run["message"]
    assert site.run_dirs() == [] and site.starts() == [] and site.state_files() == []
    log = site.log()
    assert log.count("rejected (") == 3
    assert "rm -rf" not in log  # parameter values stay out of the log


def test_sigkill_of_the_poller_while_the_entrypoint_runs(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path)
    run_id = sub.submit("worker", site.params(sleep="20"), {"a.in": b"abc"})
    first = site.poller()
    sub.wait(run_id, ("running",))
    wait_for(lambda: site.starts(), 10, "the entrypoint's start")
    first.kill()
    first.wait()
    site.poller()
    run = finished(sub, run_id)
    assert run["outcome"] == "exited" and run["exit_code"] == 0, run
    assert sub.output(run_id, "out-a.in.txt") == b"abc"
    assert len(site.starts()) == 1
    assert "picked up again after a restart (phase running)" in site.log()


def test_sigterm_leaves_the_entrypoint_running(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path)
    run_id = sub.submit("worker", site.params(sleep="25"))
    first = site.poller()
    sub.wait(run_id, ("running",))
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0
    assert sub.run(run_id)["state"] == "running"
    site.poller()
    run = finished(sub, run_id)
    assert run["outcome"] == "exited" and run["exit_code"] == 0
    assert len(site.starts()) == 1


@SECOND
def test_sigkill_during_the_download_of_an_input(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path)
    data = os.urandom(6 * 1024 * 1024 + 123)
    run_id = sub.submit("worker", site.params(), {"big.in": data})
    first = site.poller(env={"REMOTE_EXEC_POLLER_TEST_DELAY": "0.3"})

    def partial():
        for top, _, files in os.walk(site.root):
            for name in files:
                if name.startswith(".re-part-") and os.path.getsize(
                        os.path.join(top, name)) > 1024 * 1024:
                    return True
        return False

    wait_for(partial, 20, "a partial download")
    first.kill()
    first.wait()
    assert site.starts() == []
    site.poller()
    run = finished(sub, run_id)
    assert run["outcome"] == "exited" and run["exit_code"] == 0, run
    assert sub.output(run_id, "out-big.in.txt") == data
    assert len(site.starts()) == 1
    assert "resuming input 'big.in' at byte" in site.log()


@SECOND
def test_sigkill_during_the_upload_of_the_results(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path)
    data = os.urandom(6 * 1024 * 1024 + 7)
    run_id = sub.submit("worker", site.params(), {"big.in": data}, returns=["out-*", "*.txt"])
    first = site.poller(env={"REMOTE_EXEC_POLLER_TEST_DELAY": "0.3"})
    sub.wait(run_id, ("uploading",), timeout=30)
    time.sleep(0.3)
    first.kill()
    first.wait()
    assert sub.run(run_id)["state"] == "uploading"
    site.poller()
    run = finished(sub, run_id)
    assert run["outcome"] == "exited" and run["exit_code"] == 0, run
    assert sub.output(run_id, "out-big.in.txt") == data
    # the job's returns: only what MInt asked for comes back (not the input itself)
    assert "big.in" not in {o["path"] for o in run["outputs"]}
    assert len(site.starts()) == 1
    assert "picked up again after a restart (phase uploading)" in site.log()


@SECOND
def test_cancel_while_staging_launches_nothing(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path)
    run_id = sub.submit("worker", site.params(), {"big.in": os.urandom(5 * 1024 * 1024)})
    site.poller(env={"REMOTE_EXEC_POLLER_TEST_DELAY": "0.5"})
    sub.wait(run_id, ("staging",))
    sub.cancel(run_id)
    run = finished(sub, run_id)
    assert run["outcome"] == "cancelled", run
    assert site.starts() == []
    wait_for(lambda: site.run_dirs() == [] and not site.state_files(), 10, "cleanup")
    assert "cancelled before launch: nothing launched" in site.log()


def test_cancel_while_running(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path)
    run_id = sub.submit("worker", site.params(sleep="300"))
    site.poller()
    sub.wait(run_id, ("running",))
    wait_for(lambda: site.starts(), 10, "the entrypoint's start")
    sub.cancel(run_id)
    run = finished(sub, run_id)
    assert run["outcome"] == "cancelled", run
    assert Path(str(site.marker) + ".term").read_text() == "got TERM\n"
    assert len(site.starts()) == 1


@SECOND
def test_a_lease_lost_before_launch_never_launches(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path)
    run_id = sub.submit("worker", site.params(), {"a.in": b"a"})
    proc = site.poller(env={"REMOTE_EXEC_POLLER_TEST_DELAY": "1"})
    sub.wait(run_id, ("staged",))
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(TTL + 1.5)  # the lease expires; the server queues the run again
    os.kill(proc.pid, signal.SIGCONT)
    run = finished(sub, run_id, timeout=40)
    assert run["outcome"] == "exited" and run["attempt"] == 2, run
    assert len(site.starts()) == 1
    log = site.log()
    assert "lease lost" in log and "abandoned" in log


def test_two_pollers_ten_runs_each_run_once(backend, tmp_path, sites):
    site, sub = new_site(backend, sites, tmp_path, slots=2)
    # the second poller: same site (token, allowlist, root), its own state directory
    config = json.loads(site.config.read_text())
    config.update(state="poller-state-2", log="poller-2.log")
    second = site.conf / "poller-2.json"
    second.write_text(json.dumps(config))
    runs = [sub.submit("worker", site.params(), {"a.in": b"%d" % i}) for i in range(10)]
    site.poller()
    proc = subprocess.Popen([sys.executable, str(POLLER), "--config", str(second)],
                            start_new_session=True)
    try:
        for i, run_id in enumerate(runs):
            run = finished(sub, run_id, timeout=60)
            assert run["outcome"] == "exited" and run["exit_code"] == 0, run
            assert sub.output(run_id, "out-a.in.txt") == b"%d" % i
        started = [line.split()[1] for line in site.starts()]
        assert sorted(started) == sorted(runs)
    finally:
        proc.terminate()
        proc.wait(15)


@SECOND
def test_through_an_http_connect_proxy(backend, tmp_path, sites):
    proxy = ConnectProxy()
    try:
        site, sub = new_site(backend, sites, tmp_path / "explicit",
                             proxy=f"http://alice:s%40cret@127.0.0.1:{proxy.port}")
        run_id = sub.submit("worker", site.params())
        site.poller("--once")
        assert finished(sub, run_id)["outcome"] == "exited"
        assert proxy.requests and all(auth == "Basic YWxpY2U6c0BjcmV0"
                                      for _, auth in proxy.requests)
        assert proxy.requests[0][0].startswith("CONNECT 127.0.0.1:")
        seen = len(proxy.requests)
        # "env": https_proxy, unless no_proxy names the host
        site, sub = new_site(backend, sites, tmp_path / "env", proxy="env")
        run_id = sub.submit("worker", site.params())
        env = {"https_proxy": f"http://127.0.0.1:{proxy.port}", "no_proxy": ""}
        site.poller("--once", env=env)
        assert finished(sub, run_id)["outcome"] == "exited"
        assert len(proxy.requests) > seen and proxy.requests[-1][1] is None
    finally:
        proxy.close()


@SECOND
def test_the_server_killed_and_restarted_mid_run(backend, tmp_path, sites):
    if backend.server is None:
        pytest.skip("needs the queue server")
    site, sub = new_site(backend, sites, tmp_path)
    run_id = sub.submit("worker", site.params(sleep="15"))
    site.poller()
    sub.wait(run_id, ("running",))
    backend.server.kill()
    time.sleep(1.5)
    backend.server.restart()
    run = finished(sub, run_id)
    assert run["outcome"] == "exited" and run["exit_code"] == 0, run
    assert len(site.starts()) == 1


@SECOND
def test_a_client_certificate_when_the_server_requires_one(tmp_path, sites):
    if QueueServer is None:
        pytest.skip("needs the queue server")
    ca = make_ca(tmp_path / "ca")
    server = QueueServer(tmp_path / "queue", ca, lease_ttl=TTL,
                         tls={"cert": str(ca.cert_file), "key": str(ca.key_file),
                              "client_ca": str(ca.ca_file)})
    server.start()
    try:
        name = "mtls" + uuid.uuid4().hex[:6]
        cert, key = ca.client_cert(name, tmp_path / "client")
        sub = HttpSubmitter(server.url, str(ca.ca_file), server.token("submit", name), name,
                            ca.client_cert("mint", tmp_path / "client"))
        # without a certificate the handshake fails: retried, logged with a hint
        site = Site(tmp_path / "site", server.url, str(ca.ca_file), server.token("site", name))
        sites.append(site)
        proc = site.poller()
        wait_for(lambda: "failed" in site.log(), 10, "a failed handshake in the log")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        config = json.loads(site.config.read_text())
        config.update(client_cert=str(cert), client_key=str(key))
        site.config.write_text(json.dumps(config))
        run_id = sub.submit("worker", site.params())
        site.poller("--once")
        assert finished(sub, run_id)["outcome"] == "exited"
    finally:
        server.stop()
