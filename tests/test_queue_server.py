"""The queue server of the pull method (docs/pull-protocol.md), as a real subprocess over
real TLS (a trustme CA), driven by a small standard-library HTTPS client.

Each test uses sites of its own (``site_name()``), so tests share the module's servers
without seeing each other's runs. The tests that start a server of their own form a second
xdist group, so that the file's two halves run side by side on two workers.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pull_site import Ca, QueueServer, make_ca  # noqa: E402

from remote_exec.queue.paths import path_problem  # noqa: E402


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        try:
            return self.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


class Client:
    """One HTTPS connection per call (thread-safe); ``path`` is sent as given (raw)."""

    def __init__(self, server: QueueServer, token: str | None, ca_file: Path | None = None,
                 cert: tuple[Path, Path] | None = None) -> None:
        self.server = server
        self.token = token
        self.context = ssl.create_default_context(cafile=str(ca_file or server.ca.ca_file))
        if cert:
            self.context.load_cert_chain(str(cert[0]), str(cert[1]))
        self.prefix = "/" + server.url.split("//", 1)[1].split("/", 1)[1]

    def connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.server.port, context=self.context,
                                           timeout=60, blocksize=1024 * 1024)

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None, token: str | None = None) -> Answer:
        conn = self.connect()
        sent = dict(headers or {})
        if token or self.token:
            sent["Authorization"] = f"Bearer {token or self.token}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        try:
            conn.request(method, self.prefix + path, body=body, headers=sent)
            response = conn.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                          response.read())
        finally:
            conn.close()

    def put_file(self, path: str, data: bytes, lease: str | None = None,
                 sha: str | None = None) -> Answer:
        headers = {"X-RE-SHA256": sha or sha256(data), "Content-Type": "application/octet-stream"}
        if lease:
            headers["X-RE-Lease"] = lease
        return self.call("PUT", path, data, headers)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def site_name() -> str:
    return "site-" + uuid.uuid4().hex[:8]


def new_run(site: str, files: dict[str, bytes] | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "site": site, "entrypoint": "abaqus",
            "params": {"model": "beam", "loads": ["a", "b"]},
            "inputs": [{"path": p, "size": len(d), "sha256": sha256(d), "mode": 0o644}
                       for p, d in (files or {}).items()],
            "returns": ["*.dat"], **extra}


def queued(submit: Client, site: str, files: dict[str, bytes] | None = None,
           **extra: Any) -> str:
    """A run of ``site`` with its inputs uploaded, submitted; its id."""
    files = files or {}
    body = new_run(site, files, **extra)
    assert submit.call("POST", "/runs", body).status == 201
    for path, data in files.items():
        assert submit.put_file(f"/runs/{body['id']}/inputs/{quote(path)}", data).status == 201
    assert submit.call("POST", f"/runs/{body['id']}/submit", {}).status == 200
    return body["id"]


def claim(site_client: Client, wait: float = 0, poller: str = "p1") -> Answer:
    return site_client.call("POST", "/site/claim", {
        "poller": {"id": poller, "host": f"host-{poller}", "version": "1"}, "wait": wait,
        "entrypoints": ["abaqus"]})


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server(ca: Ca, tmp_path_factory: pytest.TempPathFactory):
    """Test defaults; small size limits; site `fixed` offers only `abaqus`."""
    queue = QueueServer(tmp_path_factory.mktemp("queue"), ca, max_file_size="1M",
                        max_run_bytes="3M", sites={"fixed": {"entrypoints": ["abaqus"]}})
    queue.start()
    yield queue
    queue.stop()


@pytest.fixture(scope="module")
def fast(ca: Ca, tmp_path_factory: pytest.TempPathFactory):
    """Leases of 1 s and stalled after 1.5 s, for the timed moves."""
    queue = QueueServer(tmp_path_factory.mktemp("fast"), ca, lease_ttl=1, lost_after=1.5,
                        sweep_interval=0.1)
    queue.start()
    yield queue
    queue.stop()


@pytest.fixture(scope="module")
def submit(server: QueueServer) -> Client:
    return Client(server, server.token("submit"))


def site_client(server: QueueServer, site: str) -> Client:
    return Client(server, server.token("site", site))


# -- the happy path -------------------------------------------------------------------------


def test_happy_path_both_roles(server: QueueServer, submit: Client) -> None:
    site = site_name()
    poller = site_client(server, site)
    files = {"a.dat": os.urandom(3000), "dir/it's $(x) b.dat": b"second input\n"}
    body = new_run(site, files, queue_timeout=60)
    run_id = body["id"]

    health = Client(server, None).call("GET", "/healthz")
    assert (health.status, health.body) == (200, b"ok")
    assert health.headers["x-re-server-version"] == "1"

    created = submit.call("POST", "/runs", body)
    assert created.status == 201, created.body
    assert created.json() == {"state": "created", "missing": sorted(files)} or \
        set(created.json()["missing"]) == set(files)
    assert created.headers["x-re-server-version"] == "1"
    again = submit.call("POST", "/runs", body)
    assert again.status == 200 and set(again.json()["missing"]) == set(files)
    other = submit.call("POST", "/runs", {**body, "entrypoint": "other"})
    assert (other.status, other.code) == (409, "conflict")

    early = submit.call("POST", f"/runs/{run_id}/submit", {})
    assert (early.status, early.code) == (409, "inputs_missing")
    assert set(early.json()["error"]["missing"]) == set(files)
    for path, data in files.items():
        url = f"/runs/{run_id}/inputs/{quote(path, safe='/')}"
        assert submit.put_file(url, data).status == 201
        assert submit.put_file(url, data).status == 200  # same digest: already there
    assert submit.call("POST", "/runs", body).json()["missing"] == []
    version = submit.call("POST", f"/runs/{run_id}/submit", {}).json()
    assert version["state"] == "queued"
    assert submit.call("POST", f"/runs/{run_id}/submit", {}).json()["state"] == "queued"
    late = submit.put_file(f"/runs/{run_id}/inputs/a.dat", files["a.dat"])
    assert (late.status, late.code) == (409, "state")

    # a long-poll of the run wakes when the poller claims it
    woken: dict[str, Any] = {}

    def wait_for_change() -> None:
        start = time.monotonic()
        woken["run"] = submit.call("GET", f"/runs/{run_id}?wait=5&after={version['version']}")
        woken["took"] = time.monotonic() - start

    waiter = threading.Thread(target=wait_for_change)
    waiter.start()
    time.sleep(0.5)
    answer = claim(poller, wait=1)
    assert answer.status == 200, answer.body
    job = answer.json()["job"]
    waiter.join()
    assert woken["took"] < 3 and woken["run"].json()["state"] == "claimed"
    assert set(job) == {"id", "lease", "entrypoint", "params", "inputs", "returns", "attempt",
                        "cancel_grace"}
    assert job["id"] == run_id and job["attempt"] == 1 and job["params"] == body["params"]
    assert job["lease"]["ttl"] == 3 and job["inputs"] == body["inputs"]
    lease = job["lease"]["id"]
    hdr = {"X-RE-Lease": lease}

    got = poller.call("GET", f"/site/jobs/{run_id}/inputs/a.dat", headers=hdr)
    assert got.status == 200 and got.body == files["a.dat"]
    assert got.headers["x-re-sha256"] == sha256(files["a.dat"])
    part = poller.call("GET", f"/site/jobs/{run_id}/inputs/a.dat",
                       headers={**hdr, "Range": "bytes=1000-"})
    assert part.status == 206 and part.body == files["a.dat"][1000:]
    odd = quote("dir/it's $(x) b.dat", safe="/")
    assert poller.call("GET", f"/site/jobs/{run_id}/inputs/{odd}", headers=hdr).body == \
        b"second input\n"

    for state in ("staging", "staged", "launching"):
        ok = poller.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease, "state": state})
        assert ok.status == 200 and ok.json()["cancel"] is False
    running = poller.call("POST", f"/site/jobs/{run_id}/events",
                          {"lease": lease, "state": "running", "pid": 4242, "message": "go"})
    assert running.status == 200 and "lease_expires_at" in running.json()
    back = poller.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease, "state": "staged"})
    assert (back.status, back.code) == (409, "state")
    beat = poller.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease})
    assert beat.status == 200

    # the log: idempotent appends by offset
    log = f"/site/jobs/{run_id}/log"
    assert poller.call("POST", log + "?offset=0", b"line 1\n", hdr).json() == {"log_size": 7}
    assert poller.call("POST", log + "?offset=0", b"line 1\nline 2\n", hdr).json() == \
        {"log_size": 14}
    past = poller.call("POST", log + "?offset=20", b"x", hdr)
    assert (past.status, past.code, past.json()["error"]["log_size"]) == (409, "state", 14)
    read = submit.call("GET", f"/runs/{run_id}/log?offset=7")
    assert read.body == b"line 2\n" and read.headers["x-re-log-size"] == "14"
    assert "x-re-log-final" not in read.headers

    out = os.urandom(5000)
    outputs = [{"path": "XX.dat", "size": len(out), "sha256": sha256(out)}]
    assert poller.put_file(f"/site/jobs/{run_id}/outputs/XX.dat", out, lease).status == 201
    assert poller.put_file(f"/site/jobs/{run_id}/outputs/XX.dat", out, lease).status == 200
    missing = poller.call("POST", f"/site/jobs/{run_id}/finish", {
        "lease": lease, "outcome": "exited", "exit_code": 0,
        "outputs": [*outputs, {"path": "YY.dat", "size": 1, "sha256": "0" * 64}]})
    assert (missing.status, missing.code) == (409, "outputs_missing")
    assert missing.json()["error"]["missing"] == ["YY.dat"]
    finish = {"lease": lease, "outcome": "exited", "exit_code": 3, "outputs": outputs,
              "held_back": ["secret.key"]}
    done = poller.call("POST", f"/site/jobs/{run_id}/finish", finish)
    assert done.status == 200 and done.json()["state"] == "finished"
    assert poller.call("POST", f"/site/jobs/{run_id}/finish", finish).status == 200
    other = poller.call("POST", f"/site/jobs/{run_id}/finish", {**finish, "exit_code": 4})
    assert (other.status, other.code) == (409, "state")
    late = poller.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease})
    assert (late.status, late.code) == (409, "state")

    run = submit.call("GET", f"/runs/{run_id}").json()
    assert run["state"] == "finished" and run["outcome"] == "exited" and run["exit_code"] == 3
    assert run["outputs"] == outputs and run["held_back"] == ["secret.key"]
    assert run["pid"] == 4242 and run["log_size"] == 14 and run["poller"]["host"] == "host-p1"
    assert run["site_last_seen"] and run["attempt"] == 1
    assert [e["state"] for e in run["events"]][:3] == ["created", "queued", "claimed"]
    final = submit.call("GET", f"/runs/{run_id}/log?offset=14")
    assert final.body == b"" and final.headers["x-re-log-final"] == "1"
    got = submit.call("GET", f"/runs/{run_id}/outputs/XX.dat")
    assert got.status == 200 and got.body == out and got.headers["x-re-sha256"] == sha256(out)
    part = submit.call("GET", f"/runs/{run_id}/outputs/XX.dat", headers={"Range": "bytes=4000-"})
    assert part.status == 206 and part.body == out[4000:]
    assert submit.call("GET", f"/runs/{run_id}/outputs/a.dat").status == 404

    info = submit.call("GET", f"/sites/{site}").json()
    assert info["site"] == site and info["pollers"][0]["id"] == "p1" and info["last_seen"]
    assert info["pollers"][0]["entrypoints"] == ["abaqus"] and info["queued"] == 0
    listed = submit.call("GET", f"/runs?site={site}&state=finished").json()["runs"]
    assert [r["id"] for r in listed] == [run_id]

    assert submit.call("DELETE", f"/runs/{run_id}").status == 204
    assert submit.call("GET", f"/runs/{run_id}").status == 404
    assert not (server.state_dir / "spool" / run_id).exists()


def test_long_poll_times_out_and_claim_answers_204(server: QueueServer, submit: Client) -> None:
    site = site_name()
    poller = site_client(server, site)
    start = time.monotonic()
    assert claim(poller, wait=1).status == 204
    assert 0.9 < time.monotonic() - start < 3
    body = new_run(site)
    submit.call("POST", "/runs", body)
    start = time.monotonic()
    run = submit.call("GET", f"/runs/{body['id']}?wait=1&after=1")
    assert run.status == 200 and run.json()["version"] == 1
    assert 0.9 < time.monotonic() - start < 3
    # a waiting claim wakes when a run is submitted
    result: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: result.update(answer=claim(poller, wait=5)))
    start = time.monotonic()
    waiter.start()
    time.sleep(0.5)
    submit.call("POST", f"/runs/{body['id']}/submit", {})
    waiter.join()
    assert result["answer"].status == 200 and time.monotonic() - start < 3
    bad = submit.call("GET", f"/runs/{body['id']}?wait=-1")
    assert (bad.status, bad.code) == (400, "bad_request")

    # a poller that left during its long-poll is handed nothing
    conn = poller.connect()
    conn.request("POST", poller.prefix + "/site/claim", body=json.dumps(
        {"poller": {"id": "gone"}, "wait": 5}).encode(),
        headers={"Authorization": f"Bearer {poller.token}"})
    time.sleep(0.5)
    conn.close()
    time.sleep(0.3)
    run_id = queued(submit, site)
    job = claim(poller, wait=2, poller="present").json()["job"]
    assert job["id"] == run_id and job["attempt"] == 1


# -- refusals -------------------------------------------------------------------------------


def test_schema_refusals(server: QueueServer, submit: Client) -> None:
    site = site_name()
    poller = site_client(server, site)
    body = new_run(site)
    for wrong in ({**body, "colour": "blue"}, {**body, "params": {"x": 1}},
                  {**body, "id": "../x"}, {k: v for k, v in body.items() if k != "site"},
                  {**body, "inputs": [{"path": "a", "size": 1, "sha256": "A" * 64}]},
                  {**body, "inputs": [{"path": "a", "size": 1, "sha256": "a" * 64, "x": 1}]}):
        answer = submit.call("POST", "/runs", wrong)
        assert (answer.status, answer.code) == (400, "bad_request"), wrong
        assert answer.json()["error"]["message"]
    assert submit.call("POST", "/runs", b"not json").code == "bad_request"
    assert submit.call("POST", "/runs", [1, 2]).code == "bad_request"
    refused = submit.call("POST", "/runs", {**new_run("fixed"), "entrypoint": "calc"})
    assert (refused.status, refused.code) == (400, "bad_request")
    assert "abaqus" in refused.json()["error"]["message"]
    assert submit.call("POST", "/runs", new_run("fixed")).status == 201
    assert submit.call("POST", "/runs", body).status == 201
    assert submit.call("POST", f"/runs/{body['id']}/submit", {"now": 1}).code == "bad_request"
    assert submit.call("POST", f"/runs/{body['id']}/submit").status == 200
    extra = poller.call("POST", "/site/claim", {"poller": {"id": "p", "slots": 1}, "wait": 0})
    assert (extra.status, extra.code) == (400, "bad_request")
    assert poller.call("POST", "/site/claim", {"wait": 0}).code == "bad_request"
    job = claim(poller).json()["job"]
    for wrong in ({"lease": job["lease"]["id"], "state": "flying"},
                  {"lease": job["lease"]["id"], "mood": "good"}):
        answer = poller.call("POST", f"/site/jobs/{job['id']}/events", wrong)
        assert (answer.status, answer.code) == (400, "bad_request")
    answer = poller.call("POST", f"/site/jobs/{job['id']}/finish",
                         {"lease": job["lease"]["id"], "outcome": "fine"})
    assert (answer.status, answer.code) == (400, "bad_request")
    answer = poller.call("POST", f"/site/jobs/{job['id']}/finish",
                         {"lease": job["lease"]["id"], "outcome": "exited", "log_tail": "x"})
    assert (answer.status, answer.code) == (400, "bad_request")
    assert submit.call("GET", "/no/such/call").status == 404


BAD_PATHS = ["../x", "/abs", "a/../../b", ".", "a//b", "a/", "x/./y", "..", "a\x00b"]


def test_path_rule() -> None:
    for bad in BAD_PATHS + ["/".join("a" * 17), "a" * 4097]:
        assert path_problem(bad), bad
    for good in ["a", "a/b/c.dat", "it's $(rm -rf x) \"q\"", "new\nline", "..a/b..", ".hidden",
                 "/".join("a" * 16)]:
        assert path_problem(good) is None, good


def test_path_traversal_refused(server: QueueServer, submit: Client) -> None:
    site = site_name()
    poller = site_client(server, site)
    for bad in BAD_PATHS:
        answer = submit.call("POST", "/runs", new_run(site, {bad: b"x"}))
        assert (answer.status, answer.code) == (400, "bad_request"), bad
    run_id = queued(submit, site, {"ok.dat": b"fine"})
    created = new_run(site, {"ok.dat": b"fine"})
    submit.call("POST", "/runs", created)
    job = claim(poller).json()["job"]
    assert job["id"] == run_id
    lease = job["lease"]["id"]
    for bad in ["../x", "/abs", "a/../../b", ".", "%2E%2E/x", "a/%2E%2E/%2E%2E/b", "a%00b"]:
        put = submit.put_file(f"/runs/{created['id']}/inputs/{bad}", b"x")
        assert (put.status, put.code) == (400, "bad_request"), bad
        out = poller.put_file(f"/site/jobs/{run_id}/outputs/{bad}", b"x", lease)
        assert (out.status, out.code) == (400, "bad_request"), bad
        get = poller.call("GET", f"/site/jobs/{run_id}/inputs/{bad}", headers={"X-RE-Lease": lease})
        assert (get.status, get.code) == (400, "bad_request"), bad
    not_declared = submit.put_file(f"/runs/{created['id']}/inputs/other.dat", b"x")
    assert (not_declared.status, not_declared.code) == (400, "bad_request")
    assert not list((server.state_dir.parent).glob("x")) and not Path("/abs").exists()


def test_length_digest_and_size_refusals(server: QueueServer, submit: Client) -> None:
    site = site_name()
    data = b"y" * 1000
    big = 2 * 1024 * 1024
    body = new_run(site, {"a.dat": data})
    assert submit.call("POST", "/runs", body).status == 201
    url = f"/runs/{body['id']}/inputs/a.dat"

    conn = submit.connect()  # a chunked body: no Content-Length
    conn.putrequest("PUT", submit.prefix + url)
    for name, value in (("Authorization", f"Bearer {submit.token}"),
                        ("X-RE-SHA256", sha256(data)), ("Transfer-Encoding", "chunked")):
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
    response = conn.getresponse()
    assert response.status == 411
    assert json.loads(response.read())["error"]["code"] == "length_required"
    conn.close()

    wrong = submit.put_file(url, b"z" * 1000, sha=sha256(data))
    assert (wrong.status, wrong.code) == (422, "digest_mismatch")
    assert submit.call("POST", "/runs", body).json()["missing"] == ["a.dat"]
    assert not list((server.state_dir / "tmp").iterdir())

    too_big = submit.call("POST", "/runs", new_run(site, {"big.dat": b"b" * big}))
    assert (too_big.status, too_big.code) == (413, "too_large")
    too_much = submit.call("POST", "/runs", new_run(site, {f"{i}.dat": b"b" * 1000000
                                                           for i in range(4)}))
    assert (too_much.status, too_much.code) == (413, "too_large")
    poller = site_client(server, site)
    run_id = queued(submit, site)
    lease = claim(poller).json()["job"]["lease"]["id"]
    out = poller.put_file(f"/site/jobs/{run_id}/outputs/big.dat", b"b" * big, lease)
    assert (out.status, out.code) == (413, "too_large")
    for i in range(3):
        assert poller.put_file(f"/site/jobs/{run_id}/outputs/{i}", b"c" * 1000000,
                               lease).status == 201
    over = poller.put_file(f"/site/jobs/{run_id}/outputs/3", b"c" * 1000000, lease)
    assert (over.status, over.code) == (413, "too_large")
    log = poller.call("POST", f"/site/jobs/{run_id}/log?offset=0", b"l" * (1024 * 1024 + 1),
                      {"X-RE-Lease": lease})
    assert (log.status, log.code) == (413, "too_large")


# -- claims and leases ----------------------------------------------------------------------


def test_claim_is_exclusive(server: QueueServer, submit: Client) -> None:
    site = site_name()
    poller = site_client(server, site)
    ids = {queued(submit, site) for _ in range(20)}

    def claimer(n: int) -> list[str]:
        got = []
        while True:
            answer = claim(poller, wait=0.5, poller=f"p{n}")
            if answer.status == 204:
                return got
            got.append(answer.json()["job"]["id"])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(claimer, range(8)))
    claimed = [run_id for got in results for run_id in got]
    assert sorted(claimed) == sorted(ids)


def test_lease_expiry_requeues_then_lost(fast: QueueServer) -> None:
    site = site_name()
    submit = Client(fast, fast.token("submit", site))
    poller = site_client(fast, site)
    run_id = queued(submit, site)
    first = claim(poller, poller="a").json()["job"]
    assert first["lease"]["ttl"] == 1 and first["attempt"] == 1
    time.sleep(1.5)
    old = poller.call("POST", f"/site/jobs/{run_id}/events",
                      {"lease": first["lease"]["id"], "state": "launching"})
    assert (old.status, old.code) == (409, "lease_lost")
    run = submit.call("GET", f"/runs/{run_id}").json()
    assert run["state"] == "queued" and run["attempt"] == 2 and run["poller"] is None
    second = claim(poller, poller="b").json()["job"]
    assert second["id"] == run_id and second["attempt"] == 2
    assert second["lease"]["id"] != first["lease"]["id"]
    old = poller.call("GET", f"/site/jobs/{run_id}/inputs/x",
                      headers={"X-RE-Lease": first["lease"]["id"]})
    assert (old.status, old.code) == (409, "lease_lost")
    time.sleep(1.3)  # the sweep requeues it without any call
    assert submit.call("GET", f"/runs/{run_id}").json()["attempt"] == 3
    assert claim(poller, poller="c").json()["job"]["attempt"] == 3
    time.sleep(1.3)
    run = submit.call("GET", f"/runs/{run_id}").json()
    assert (run["state"], run["outcome"], run["reason"]) == ("finished", "lost", "lease_expired")
    assert claim(poller).status == 204


def test_no_requeue_after_launching_and_stalled(fast: QueueServer) -> None:
    site = site_name()
    submit = Client(fast, fast.token("submit", site))
    poller = site_client(fast, site)
    run_id = queued(submit, site)
    job = claim(poller).json()["job"]
    lease = job["lease"]["id"]
    assert poller.call("POST", f"/site/jobs/{run_id}/events",
                       {"lease": lease, "state": "launching"}).status == 200
    time.sleep(2.2)  # past the lease and past lost_after
    run = submit.call("GET", f"/runs/{run_id}").json()
    assert run["state"] == "launching" and run["stalled"] is True and run["attempt"] == 1
    assert claim(poller, poller="other").status == 204
    beat = poller.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease, "state": "running"})
    assert beat.status == 200
    run = submit.call("GET", f"/runs/{run_id}").json()
    assert run["state"] == "running" and run["stalled"] is False


def test_queue_timeout_expires(fast: QueueServer) -> None:
    site = site_name()
    submit = Client(fast, fast.token("submit", site))
    run_id = queued(submit, site, queue_timeout=1)
    start = time.monotonic()
    run = submit.call("GET", f"/runs/{run_id}?wait=3&after=2").json()
    assert run["state"] == "expired" and time.monotonic() - start < 2.5
    assert "no poller of site" in run["message"]
    assert submit.call("POST", f"/runs/{run_id}/cancel", {}).json() == {"state": "expired"}


def test_cancel(fast: QueueServer) -> None:
    site = site_name()
    submit = Client(fast, fast.token("submit", site))
    poller = site_client(fast, site)
    run_id = queued(submit, site)
    answer = submit.call("POST", f"/runs/{run_id}/cancel", {})
    assert (answer.status, answer.json()) == (200, {"state": "cancelled"})
    assert claim(poller).status == 204
    assert submit.call("POST", f"/runs/{run_id}/cancel").json() == {"state": "cancelled"}

    run_id = queued(submit, site)  # claimed: the poller hears it and ends the run
    lease = claim(poller).json()["job"]["lease"]["id"]
    poller.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease, "state": "running"})
    answer = submit.call("POST", f"/runs/{run_id}/cancel", {})
    assert (answer.status, answer.json()) == (202, {"state": "running", "cancel_requested": True})
    beat = poller.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease})
    assert beat.json()["cancel"] is True
    busy = submit.call("DELETE", f"/runs/{run_id}")
    assert (busy.status, busy.code) == (409, "state")
    poller.call("POST", f"/site/jobs/{run_id}/finish",
                {"lease": lease, "outcome": "cancelled", "signal": 15})
    run = submit.call("GET", f"/runs/{run_id}").json()
    assert (run["state"], run["outcome"]) == ("finished", "cancelled")

    run_id = queued(submit, site)  # claimed, never launched, lease expires: cancelled
    claim(poller)
    assert submit.call("POST", f"/runs/{run_id}/cancel", {}).status == 202
    time.sleep(1.4)
    assert submit.call("GET", f"/runs/{run_id}").json()["state"] == "cancelled"


# -- tokens ---------------------------------------------------------------------------------


def test_tokens(server: QueueServer, submit: Client) -> None:
    site, other = site_name(), site_name()
    poller = site_client(server, site)
    stranger = site_client(server, other)
    run_id = queued(submit, site)
    lease = claim(poller).json()["job"]["lease"]["id"]

    none = Client(server, None).call("GET", "/runs")
    assert (none.status, none.code) == (401, "unauthenticated")
    assert none.headers["www-authenticate"].startswith("Bearer")
    assert none.headers["x-re-server-version"] == "1"
    fake = submit.call("GET", "/runs", token="re1_" + "A" * 43)
    assert (fake.status, fake.code) == (401, "unauthenticated")

    wrong_role = poller.call("GET", f"/runs/{run_id}")
    assert (wrong_role.status, wrong_role.code) == (403, "forbidden")
    assert (submit.call("POST", "/site/claim", {"poller": {"id": "x"}}).status) == 403
    hidden = stranger.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease})
    assert (hidden.status, hidden.code) == (404, "not_found")
    assert stranger.call("GET", f"/site/jobs/{run_id}/inputs/a",
                         headers={"X-RE-Lease": lease}).status == 404
    limited = Client(server, server.token("submit", other))
    assert limited.call("GET", f"/runs/{run_id}").status == 404
    assert limited.call("POST", "/runs", new_run(site)).status == 403
    assert limited.call("GET", f"/sites/{site}").status == 403
    assert limited.call("GET", "/runs").json()["runs"] == []

    short = server.token("site", site, expires="1s")
    time.sleep(1.2)
    expired = poller.call("POST", "/site/claim", {"poller": {"id": "x"}}, token=short)
    assert (expired.status, expired.code) == (401, "token_expired")
    assert "expired at 20" in expired.json()["error"]["message"]
    assert "www-authenticate" in expired.headers

    listed = server.admin("token", "list")
    assert listed.returncode == 0
    digest = hashlib.sha256(poller.token.encode()).hexdigest()
    assert digest[:12] in listed.stdout
    for token in (poller.token, stranger.token, submit.token, short):
        assert token not in listed.stdout and token[4:20] not in listed.stdout
    assert "(expired)" in listed.stdout
    revoked = server.admin("token", "revoke", digest[:12])
    assert revoked.returncode == 0, revoked.stderr
    answer = poller.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease})
    assert (answer.status, answer.code) == (401, "token_revoked")
    assert server.admin("token", "revoke", "ffffffffffff0").returncode == 2
    assert server.admin("token", "add", "--role", "site").returncode == 2


#: the tests with a server of their own: the second half of the file (see the docstring)
own_server = pytest.mark.xdist_group("test_queue_server-own-servers")


# -- restart, shutdown, TLS ------------------------------------------------------------------


@own_server
def test_kill_and_restart_keep_everything(ca: Ca, tmp_path: Path) -> None:
    queue = QueueServer(tmp_path / "queue", ca, lease_ttl=30)
    queue.start()
    try:
        site = site_name()
        submit = Client(queue, queue.token("submit"))
        poller = site_client(queue, site)
        data = os.urandom(10000)
        waiting = queued(submit, site)
        run_id = queued(submit, site, {"in.dat": data})
        assert claim(poller).json()["job"]["id"] == waiting
        job = claim(poller).json()["job"]
        lease = job["lease"]["id"]
        poller.call("POST", f"/site/jobs/{run_id}/events", {"lease": lease, "state": "running"})
        poller.call("POST", f"/site/jobs/{run_id}/log?offset=0", b"before\n", {"X-RE-Lease": lease})
        before = submit.call("GET", f"/runs/{run_id}").json()
        port = queue.port
        queue.kill()
        queue.restart()
        assert queue.port == port
        after = submit.call("GET", f"/runs/{run_id}").json()
        assert {k: v for k, v in after.items() if k not in ("site_last_seen", "poller")} == \
            {k: v for k, v in before.items() if k not in ("site_last_seen", "poller")}
        got = poller.call("GET", f"/site/jobs/{run_id}/inputs/in.dat",
                          headers={"X-RE-Lease": lease})
        assert got.body == data
        assert poller.call("POST", f"/site/jobs/{run_id}/log?offset=7", b"after\n",
                           {"X-RE-Lease": lease}).json() == {"log_size": 13}
        assert poller.call("POST", f"/site/jobs/{run_id}/finish",
                           {"lease": lease, "outcome": "signaled", "signal": 9}).status == 200
        assert submit.call("GET", f"/runs/{run_id}/log").body == b"before\nafter\n"

        # SIGTERM ends a waiting long-poll at once and exits 0
        result: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: result.update(answer=claim(poller, wait=5)))
        waiter.start()
        time.sleep(0.5)
        start = time.monotonic()
        assert queue.stop() == 0
        waiter.join()
        assert time.monotonic() - start < 4 and result["answer"].status == 204
    finally:
        queue.kill()


@own_server
def test_tls_refusals(ca: Ca, server: QueueServer, tmp_path: Path) -> None:
    other_ca = make_ca(tmp_path / "other-ca")
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(server, None, ca_file=other_ca.ca_file).call("GET", "/healthz")

    queue = QueueServer(tmp_path / "mtls", ca, tls={
        "cert": str(ca.cert_file), "key": str(ca.key_file), "client_ca": str(ca.ca_file)})
    queue.start()
    try:
        site = site_name()
        token = queue.token("site", site)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            Client(queue, token).call("POST", "/site/claim", {"poller": {"id": "x"}})
        good = Client(queue, token, cert=ca.client_cert(site, tmp_path / "certs"))
        assert good.call("POST", "/site/claim", {"poller": {"id": "x"}}).status == 204
        wrong = Client(queue, token, cert=ca.client_cert("elsewhere", tmp_path / "certs"))
        answer = wrong.call("POST", "/site/claim", {"poller": {"id": "x"}})
        assert (answer.status, answer.code) == (403, "forbidden")
    finally:
        queue.stop()


@own_server
def test_no_space_and_gc(ca: Ca, tmp_path: Path) -> None:
    queue = QueueServer(tmp_path / "queue", ca, min_free_space="1000P", retention=1)
    queue.start()
    try:
        site = site_name()
        submit = Client(queue, queue.token("submit"))
        body = new_run(site, {"a.dat": b"data"})
        submit.call("POST", "/runs", body)
        full = submit.put_file(f"/runs/{body['id']}/inputs/a.dat", b"data")
        assert (full.status, full.code) == (507, "no_space")
        assert submit.call("POST", f"/runs/{body['id']}/cancel", {}).status == 200
        keep = new_run(site)
        submit.call("POST", "/runs", keep)
        (queue.state_dir / "spool" / "orphan-run").mkdir()
        stale = queue.state_dir / "tmp" / "old.part"
        stale.write_bytes(b"x")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        time.sleep(1.1)
        dry = queue.admin("gc", "--dry-run")
        assert dry.returncode == 0 and body["id"] in dry.stdout and "orphan-run" in dry.stdout
        assert submit.call("GET", f"/runs/{body['id']}").status == 200
        done = queue.admin("gc")
        assert done.returncode == 0 and "removed 1 run(s)" in done.stdout
        assert submit.call("GET", f"/runs/{body['id']}").status == 404
        assert submit.call("GET", f"/runs/{keep['id']}").status == 200
        assert not (queue.state_dir / "spool" / "orphan-run").exists() and not stale.exists()
        table = queue.admin("runs", "--site", site)
        assert keep["id"] in table.stdout and "created" in table.stdout
    finally:
        queue.stop()


@own_server
def test_memory_does_not_grow_with_file_size(ca: Ca, tmp_path: Path) -> None:
    queue = QueueServer(tmp_path / "queue", ca, max_file_size="1G")
    queue.start()
    try:
        site = site_name()
        submit = Client(queue, queue.token("submit"))
        poller = site_client(queue, site)
        size = 256 * 1024 * 1024
        source = tmp_path / "big.bin"
        block = os.urandom(1024 * 1024)
        digest = hashlib.sha256()
        with open(source, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
                digest.update(block)
        body = new_run(site)
        body["inputs"] = [{"path": "big.bin", "size": size, "sha256": digest.hexdigest()}]
        submit.call("POST", "/runs", body)
        base = queue.peak_rss_kib()
        with open(source, "rb") as f:
            answer = submit.call("PUT", f"/runs/{body['id']}/inputs/big.bin", f, {
                "X-RE-SHA256": digest.hexdigest(), "Content-Length": str(size)})
        assert answer.status == 201, answer.body
        submit.call("POST", f"/runs/{body['id']}/submit", {})
        lease = claim(poller).json()["job"]["lease"]["id"]
        conn = poller.connect()
        conn.request("GET", poller.prefix + f"/site/jobs/{body['id']}/inputs/big.bin",
                     headers={"Authorization": f"Bearer {poller.token}", "X-RE-Lease": lease})
        response = conn.getresponse()
        check = hashlib.sha256()
        while chunk := response.read(1024 * 1024):
            check.update(chunk)
        conn.close()
        assert response.status == 200 and check.hexdigest() == digest.hexdigest()
        growth = queue.peak_rss_kib() - base
        print(f"peak RSS: {base} KiB before, grew by {growth} KiB for 256 MiB up and down")
        assert growth < 64 * 1024, f"peak RSS grew by {growth} KiB"
    finally:
        queue.stop()


# -- configuration --------------------------------------------------------------------------


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_exec", "queue", "serve", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)


@own_server
def test_serve_refuses_bad_configuration(ca: Ca, tmp_path: Path) -> None:
    tls = f"{{cert: {ca.cert_file}, key: {ca.key_file}}}"
    cases = {
        "unknown key": ("listen: 127.0.0.1:0\ntls: " + tls + "\ncolour: blue\n", "colour"),
        "no tls": ("listen: 127.0.0.1:0\n", "tls"),
        "both": ("listen: 127.0.0.1:0\nplain_http: true\ntls: " + tls + "\n", "plain_http"),
        "size": ("listen: 127.0.0.1:0\nmax_file_size: 1.5G\ntls: " + tls + "\n", "max_file_size"),
        "cert": ("listen: 127.0.0.1:0\ntls: {cert: missing.pem, key: missing.key}\n",
                 "missing.pem"),
        "bad key": (f"listen: 127.0.0.1:0\ntls: {{cert: {ca.cert_file}, key: {ca.ca_file}}}\n",
                    "tls"),
    }
    for name, (text, word) in cases.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(text + f"state_dir: {tmp_path / 'state'}\n")
        done = _serve(config)
        assert done.returncode == 2 and word in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        config = tmp_path / "taken.yaml"
        config.write_text(f"listen: 127.0.0.1:{taken.getsockname()[1]}\ntls: {tls}\n"
                          f"state_dir: {tmp_path / 'state'}\n")
        done = _serve(config)
        assert done.returncode == 2 and "in use" in done.stderr, done.stderr
    missing = _serve(tmp_path / "nothing.yaml")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@own_server
def test_sigint_exits_zero(ca: Ca, tmp_path: Path) -> None:
    queue = QueueServer(tmp_path / "queue", ca).start()
    assert queue.proc is not None
    queue.proc.send_signal(signal.SIGINT)
    assert queue.proc.wait(10) == 0


def test_the_cli_does_not_import_aiohttp() -> None:
    code = ("import sys; from click.testing import CliRunner; from remote_exec.cli import main; "
            "out = CliRunner().invoke(main, ['queue', 'token', 'add', '--help']).output; "
            "assert '--role' in out, out; assert 'aiohttp' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
