"""The Fujitsu HPC WebAPI simulator (tests/fujitsu_sim), spoken to as a client would:
plain urllib for the WebAPI, boto3 for the object storage (moto's S3 server).

Every request/response of the guide's §6 (shared/seeds/000), both auth schemes, each fault.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from fujitsu_sim import JOB_KEYS, NOT_FOUND, Faults, FujitsuSim

pytestmark = pytest.mark.timeout(120)

TOKEN = "test-token-abc"
ACCESS_KEY = "AKTESTACCESS"
SECRET_KEY = "test-secret-xyz"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_NOBODY = object()
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")
HMS = re.compile(r"^\d{4}:\d\d:\d\d$")


# ----------------------------------------------------------------------------- client side


def hmac_auth(
    method: str,
    path: str,
    body: bytes,
    *,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The documented recipe, written out independently of the simulator's code."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    to_sign = "\n".join([method, path, ts, hashlib.sha256(body).hexdigest()])
    sig = hmac.new(secret_key.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    return {"X-Access-Key": access_key, "X-Timestamp": ts, "X-Signature": sig}


@dataclass
class Resp:
    status: int
    raw: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class Api:
    def __init__(self, sim: FujitsuSim):
        self.sim = sim

    def call(
        self,
        method: str,
        path: str,
        body: Any = _NOBODY,
        *,
        raw: bytes | None = None,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Resp:
        url = self.sim.url + path
        data = raw if raw is not None else (b"" if body is _NOBODY else json.dumps(body).encode())
        hdrs: dict[str, str] = {}
        if data:
            hdrs["Content-Type"] = content_type
        if auth:
            if self.sim.auth == "bearer":
                hdrs["Authorization"] = f"Bearer {TOKEN}"
            else:
                hdrs.update(hmac_auth(method, urlsplit(url).path, data))
        hdrs.update(headers or {})
        req = urllib.request.Request(url, data=data or None, method=method, headers=hdrs)
        try:
            with _OPENER.open(req, timeout=60) as r:
                return Resp(r.status, r.read(), dict(r.headers))
        except urllib.error.HTTPError as e:
            return Resp(e.code, e.read(), dict(e.headers))

    # the documented operations
    def start_sync(self, body: dict) -> int:
        r = self.call("POST", "/sync", body)
        assert r.status == 200, r
        rid = r.json["requestid"]
        assert isinstance(rid, int) and not isinstance(rid, bool)
        return rid

    def sync_status(self, rid: Any) -> dict:
        r = self.call("GET", f"/sync/{rid}")
        assert r.status == 200, r
        return r.json

    def wait_sync(self, rid: int, timeout: float = 20) -> list[dict]:
        answers = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answers.append(self.sync_status(rid))
            if answers[-1]["status"] != "waiting":
                return answers
            time.sleep(0.05)
        raise AssertionError(f"sync {rid} still waiting: {answers[-3:]}")

    def sync(self, body: dict) -> dict:
        return self.wait_sync(self.start_sync(body))[-1]

    def submit(self, jobfile: str, **extra: Any) -> int:
        r = self.call("POST", "/jobs", {"jobfile": jobfile, **extra})
        assert r.status == 201, r
        job_id = r.json["job_id"]
        assert isinstance(job_id, int) and not isinstance(job_id, bool)
        return job_id

    def detail(self, job_id: Any) -> Resp:
        return self.call("GET", f"/jobs/{job_id}")

    def jobs(self) -> list[dict]:
        r = self.call("GET", "/jobs")
        assert r.status == 200, r
        return r.json

    def wait_status(self, job_id: int, states: tuple[str, ...], timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.detail(job_id)
            if r.status == 200 and r.json["status"] in states:
                return r.json
            time.sleep(0.03)
        raise AssertionError(f"job {job_id} never in {states}")

    def wait_gone(self, job_id: int, timeout: float = 20) -> list[str]:
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.detail(job_id)
            if r.status == 404:
                assert r.json == NOT_FOUND
                return seen
            assert r.status == 200, r
            seen.append(r.json["status"])
            time.sleep(0.03)
        raise AssertionError(f"job {job_id} still there: {seen[-3:]}")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bearer_sim(tmp_path_factory: pytest.TempPathFactory):
    sim = FujitsuSim(tmp_path_factory.mktemp("fsim-bearer"), auth="bearer", token=TOKEN)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def hmac_sim(tmp_path_factory: pytest.TempPathFactory):
    with FujitsuSim(
        tmp_path_factory.mktemp("fsim-hmac"),
        auth="hmac",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
    ) as sim:
        yield sim


def _reset(sim: FujitsuSim) -> FujitsuSim:
    sim.faults = Faults()
    sim.queue_seconds = 0.2
    sim.clear_requests()
    s3 = sim.s3_client()
    for obj in s3.list_objects_v2(Bucket=sim.bucket).get("Contents", []):
        s3.delete_object(Bucket=sim.bucket, Key=obj["Key"])
    return sim


@pytest.fixture
def sim(bearer_sim: FujitsuSim):
    yield _reset(bearer_sim)
    bearer_sim.wait_idle(30)


@pytest.fixture
def hsim(hmac_sim: FujitsuSim):
    yield _reset(hmac_sim)
    hmac_sim.wait_idle(30)


@pytest.fixture
def api(sim: FujitsuSim) -> Api:
    return Api(sim)


@pytest.fixture(scope="module")
def bearer_s3(bearer_sim: FujitsuSim):
    """A client's own boto3 client, made from what the simulator advertises."""
    return boto3.client(
        "s3",
        endpoint_url=bearer_sim.s3_endpoint,
        region_name=bearer_sim.region,
        **bearer_sim.s3_credentials,
    )


@pytest.fixture
def s3(sim: FujitsuSim, bearer_s3: Any):
    return bearer_s3


def keys(s3: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def put_script(sim: FujitsuSim, rel: str, text: str) -> str:
    """Write a job script straight onto the HPC side (as if synced); returns its jobfile path."""
    path = sim.hpc_root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return rel


# ----------------------------------------------------------------------------- basics


def test_properties(sim: FujitsuSim, s3: Any) -> None:
    assert sim.url.startswith("http://127.0.0.1:") and sim.url.endswith("/v1")
    assert sim.s3_endpoint.startswith("http://127.0.0.1:")
    assert sim.region == "us-east-1"
    assert set(sim.s3_credentials) == {"aws_access_key_id", "aws_secret_access_key"}
    assert sim.hpc_root.is_dir()
    s3.head_bucket(Bucket=sim.bucket)  # created at start
    assert sim.startup_seconds is not None and sim.startup_seconds < 20


def test_requests_are_recorded(sim: FujitsuSim, api: Api) -> None:
    api.call("POST", "/sync", {"path": "rec", "direction": "from_online"})
    api.call("GET", "/jobs?limit=3")
    first, second = sim.requests[-2:]
    assert (first.method, first.path, first.status) == ("POST", "/v1/sync", 200)
    assert first.body == {"path": "rec", "direction": "from_online"}
    assert first.headers["authorization"] == f"Bearer {TOKEN}"  # look-ups ignore case
    assert first.headers["Content-Type"] == "application/json"
    assert (second.method, second.path, second.query) == ("GET", "/v1/jobs", "limit=3")
    assert second.body is None and second.response == []
    sim.wait_idle()


def test_unknown_route_and_method(api: Api) -> None:
    r = api.call("GET", "/nothing")
    assert r.status == 404 and r.json == NOT_FOUND
    r = api.call("PUT", "/jobs", {})
    assert r.status == 405 and r.json["code"] == "Client.MethodNotAllowed"
    assert "POST" in r.headers["Allow"]


def test_post_needs_json(api: Api) -> None:
    r = api.call("POST", "/jobs", raw=b'{"jobfile": "x"}', content_type="text/plain")
    assert r.status == 415
    r = api.call("POST", "/jobs", raw=b"{not json")
    assert r.status == 400 and r.json["code"] == "Client.InvalidParameter"
    r = api.call("POST", "/sync", ["path", "x"])
    assert r.status == 400


# ----------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/sync"),
        ("GET", "/sync/1"),
        ("POST", "/jobs"),
        ("GET", "/jobs"),
        ("GET", "/jobs/1"),
        ("DELETE", "/jobs/1"),
    ],
)
def test_bearer_missing_on_every_endpoint(api: Api, method: str, path: str) -> None:
    body = {"path": "x"} if method == "POST" else _NOBODY
    r = api.call(method, path, body, auth=False)
    assert r.status == 401
    assert r.json["code"] == "Client.Unauthorized" and r.json["message"]


@pytest.mark.parametrize("value", ["Bearer wrong", f"Basic {TOKEN}", TOKEN, f"bearer{TOKEN}"])
def test_bearer_wrong(api: Api, value: str) -> None:
    r = api.call("GET", "/jobs", auth=False, headers={"Authorization": value})
    assert r.status == 401 and r.json["code"] == "Client.Unauthorized"


def test_bearer_good(api: Api) -> None:
    r = api.call("GET", "/jobs", auth=False, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200 and r.json == []


def test_hmac_good(hsim: FujitsuSim) -> None:
    api = Api(hsim)
    r = api.call("GET", "/jobs")
    assert r.status == 200 and r.json == []
    # a body is covered by its hash; the query string is not signed
    assert api.start_sync({"path": "h", "direction": "from_online", "delete": False}) > 0
    signed = hmac_auth("GET", "/v1/jobs", b"")
    r = api.call("GET", "/jobs?page=2", auth=False, headers=signed)
    assert r.status == 200
    # the simulator's own helper gives the same recipe
    r = api.call("GET", "/jobs", auth=False, headers=hsim.auth_headers("GET", "/v1/jobs"))
    assert r.status == 200
    hsim.wait_idle()


def _hmac_cases() -> list[tuple[str, dict[str, str]]]:
    body = b'{"path": "h"}'
    now = int(time.time())
    good = hmac_auth("POST", "/v1/sync", body)
    return [
        ("wrong secret", hmac_auth("POST", "/v1/sync", body, secret_key="nope")),
        ("wrong access key", hmac_auth("POST", "/v1/sync", body, access_key="OTHER")),
        ("old timestamp", hmac_auth("POST", "/v1/sync", body, timestamp=now - 400)),
        ("future timestamp", hmac_auth("POST", "/v1/sync", body, timestamp=now + 400)),
        ("other body", hmac_auth("POST", "/v1/sync", b'{"path": "other"}')),
        ("other method", hmac_auth("PUT", "/v1/sync", body)),
        ("other path", hmac_auth("POST", "/v1/jobs", body)),
        ("path without prefix", hmac_auth("POST", "/sync", body)),
        ("uppercase hex", {**good, "X-Signature": good["X-Signature"].upper()}),
        ("non-integer timestamp", {**good, "X-Timestamp": good["X-Timestamp"] + ".0"}),
        ("no signature", {k: v for k, v in good.items() if k != "X-Signature"}),
        ("no timestamp", {k: v for k, v in good.items() if k != "X-Timestamp"}),
        ("no access key", {k: v for k, v in good.items() if k != "X-Access-Key"}),
        ("bearer instead", {"Authorization": f"Bearer {TOKEN}"}),
    ]


def test_hmac_bad(hsim: FujitsuSim) -> None:
    api = Api(hsim)
    for what, headers in _hmac_cases():
        r = api.call("POST", "/sync", raw=b'{"path": "h"}', auth=False, headers=headers)
        assert r.status == 401, what
        assert r.json["code"] == "Client.Unauthorized", what
    # the timestamp window is 300 s
    ok = hmac_auth("POST", "/v1/sync", b'{"path": "h"}', timestamp=int(time.time()) - 250)
    assert api.call("POST", "/sync", raw=b'{"path": "h"}', auth=False, headers=ok).status == 200
    hsim.wait_idle()


# ----------------------------------------------------------------------------- sync


def test_sync_from_online(sim: FujitsuSim, api: Api, s3: Any) -> None:
    s3.put_object(Bucket=sim.bucket, Key="scripts/my_script.sh", Body=b"echo hi\n")
    s3.put_object(Bucket=sim.bucket, Key="data/in/input.txt", Body=b"42\n")
    rid = api.start_sync({"path": "my_directory", "direction": "from_online", "delete": False})
    answers = api.wait_sync(rid)
    assert answers[-1] == {"result": "0", "status": "complete"}
    assert all(a == {"status": "waiting"} for a in answers[:-1])
    assert (sim.hpc_root / "my_directory/scripts/my_script.sh").read_bytes() == b"echo hi\n"
    assert (sim.hpc_root / "my_directory/data/in/input.txt").read_bytes() == b"42\n"
    # a requestid stays valid
    assert api.sync_status(rid) == {"result": "0", "status": "complete"}


def test_sync_to_online(sim: FujitsuSim, api: Api, s3: Any) -> None:
    out = sim.hpc_root / "todir/result/log.txt"
    out.parent.mkdir(parents=True)
    out.write_text("result\n")
    (sim.hpc_root / "todir/top.txt").write_text("top\n")
    assert api.sync({"path": "todir", "direction": "to_online", "delete": False}) == {
        "result": "0",
        "status": "complete",
    }
    assert keys(s3, sim.bucket) == ["result/log.txt", "top.txt"]
    got = s3.get_object(Bucket=sim.bucket, Key="result/log.txt")["Body"].read()
    assert got == b"result\n"


def test_sync_delete_from_online(sim: FujitsuSim, api: Api, s3: Any) -> None:
    s3.put_object(Bucket=sim.bucket, Key="a.txt", Body=b"a")
    s3.put_object(Bucket=sim.bucket, Key="sub/b.txt", Body=b"b")
    api.sync({"path": "del1", "direction": "from_online"})
    s3.delete_object(Bucket=sim.bucket, Key="sub/b.txt")
    b = sim.hpc_root / "del1/sub/b.txt"
    api.sync({"path": "del1", "direction": "from_online", "delete": False})
    assert b.exists()
    api.sync({"path": "del1", "direction": "from_online"})  # omitted delete = false
    assert b.exists()
    api.sync({"path": "del1", "direction": "from_online", "delete": True})
    assert not b.exists() and (sim.hpc_root / "del1/a.txt").exists()


def test_sync_delete_to_online(sim: FujitsuSim, api: Api, s3: Any) -> None:
    s3.put_object(Bucket=sim.bucket, Key="stale.txt", Body=b"old")
    (sim.hpc_root / "del2").mkdir()
    (sim.hpc_root / "del2/new.txt").write_text("new")
    api.sync({"path": "del2", "direction": "to_online"})
    assert keys(s3, sim.bucket) == ["new.txt", "stale.txt"]
    api.sync({"path": "del2", "direction": "to_online", "delete": True})
    assert keys(s3, sim.bucket) == ["new.txt"]


def test_direction_omitted_behaves_as_from_online(sim: FujitsuSim, api: Api, s3: Any) -> None:
    """The documented pitfall: without "direction", a meant-to-upload sync downloads."""
    out = sim.hpc_root / "pit/result/log.txt"
    out.parent.mkdir(parents=True)
    out.write_text("computed\n")
    s3.put_object(Bucket=sim.bucket, Key="input.txt", Body=b"in")
    rid = api.start_sync({"path": "pit", "delete": False})
    assert api.wait_sync(rid)[-1] == {"result": "0", "status": "complete"}
    assert keys(s3, sim.bucket) == ["input.txt"]  # nothing went up
    assert (sim.hpc_root / "pit/input.txt").read_bytes() == b"in"  # it went down instead
    rec = sim.syncs[rid]
    assert rec.direction == "from_online" and rec.direction_given is False


def test_sync_waits_fault(sim: FujitsuSim, api: Api, s3: Any) -> None:
    sim.faults.sync_waits = 3
    s3.put_object(Bucket=sim.bucket, Key="w.txt", Body=b"w")
    rid = api.start_sync({"path": "waits", "direction": "from_online"})
    for _ in range(3):
        assert api.sync_status(rid) == {"status": "waiting"}
        if not sim.syncs[rid].started:
            assert not (sim.hpc_root / "waits/w.txt").exists()
    answers = api.wait_sync(rid)
    assert answers[-1] == {"result": "0", "status": "complete"}
    assert (sim.hpc_root / "waits/w.txt").exists()
    # each sync gets its own count
    rid2 = api.start_sync({"path": "waits", "direction": "from_online"})
    assert len(api.wait_sync(rid2)) >= 4


def test_sync_wrong_credentials_fault(sim: FujitsuSim, api: Api, s3: Any) -> None:
    sim.faults.sync_result = "1"
    s3.put_object(Bucket=sim.bucket, Key="c.txt", Body=b"c")
    assert api.sync({"path": "creds", "direction": "from_online"}) == {
        "result": "1",
        "status": "complete",
    }
    assert not (sim.hpc_root / "creds/c.txt").exists()
    sim.faults.sync_result = "0"
    assert api.sync({"path": "creds", "direction": "from_online"})["result"] == "0"
    assert (sim.hpc_root / "creds/c.txt").exists()


@pytest.mark.parametrize("rid", ["1234567890", "0", "abc"])
def test_sync_unknown_requestid(api: Api, rid: str) -> None:
    r = api.call("GET", f"/sync/{rid}")
    assert r.status == 200 and r.json == {"status": "error: no such ID"}


def test_sync_error_status(api: Api) -> None:
    rid = api.start_sync({"path": "does/not/exist", "direction": "to_online"})
    status = api.wait_sync(rid)[-1]["status"]
    assert status.startswith("error: ") and "no such directory" in status


@pytest.mark.parametrize(
    "body",
    [
        {"path": "/etc"},
        {"path": "../up"},
        {"path": "a/../../b"},
        {"path": ""},
        {"path": 5},
        {},
        {"path": "~/x"},
        {"path": "ok", "direction": "sideways"},
        {"path": "ok", "direction": None},
        {"path": "ok", "delete": "yes"},
    ],
)
def test_sync_bad_parameters(api: Api, body: dict) -> None:
    r = api.call("POST", "/sync", body)
    assert r.status == 400 and r.json["code"] == "Client.InvalidParameter", body


# ----------------------------------------------------------------------------- jobs

JOB = """#!/bin/sh
#PJM -N myjob
#PJM -L "node=2,elapse=1:00:00"
#PJM -L rscgrp=small
#PJM -g grp1
# an ordinary comment
echo "id=$PJM_JOBID wd=$PJM_O_WORKDIR pwd=$(pwd)"
echo "to stderr" >&2
sleep 0.6
exit 0
#PJM -N ignored-after-commands
"""


def test_job_lifecycle_and_object(sim: FujitsuSim, api: Api) -> None:
    jobfile = put_script(sim, "life/scripts/job.sh", JOB)
    job_id = api.submit(jobfile)
    first = api.detail(job_id)
    assert first.status == 200
    obj = first.json
    assert set(obj) == set(JOB_KEYS) and all(isinstance(v, str) for v in obj.values())
    assert obj["job_id"] == str(job_id)
    assert obj["status"] in ("ACC", "QUE", "RNA", "RUN")
    assert obj["job_name"] == "myjob"
    assert obj["Fugaku:elapse_limit"] == "0001:00:00"
    assert obj["node_require"] == "2" and obj["queue"] == "small" and obj["group"] == "grp1"
    assert obj["user"] == "apiuser1" and obj["priority"] == "127"
    assert obj["Fugaku:md"] == "NM" and obj["Fugaku:rank"] == "bychip"
    assert obj["Fugaku:reason"] == "-" and obj["Fugaku:ec"] == "0"
    assert ISO.match(obj["accept"]) and HMS.match(obj["elapse_time"])

    listed = api.jobs()
    assert [j["job_id"] for j in listed] == [str(job_id)]
    assert set(listed[0]) == set(JOB_KEYS)

    running = api.wait_status(job_id, ("RUN",))
    assert running["Fugaku:lst"] == "RNA"  # the previous state, as in the guide's example
    assert ISO.match(running["start_date"])
    seen = api.wait_gone(job_id)
    assert api.jobs() == []
    r = api.detail(job_id)
    assert r.status == 404 and r.json == NOT_FOUND
    assert set(seen) <= {"RUN", "RNO"}

    job = sim.wait_job(job_id)
    assert job.state == "EXT" and job.exit_code == 0 and not job.cancelled
    assert job.history == ["ACC", "QUE", "RNA", "RUN", "RNO", "EXT"]
    wd = sim.hpc_root / "life/scripts"
    out = (wd / f"myjob.{job_id}.out").read_text()
    assert out == f"id={job_id} wd={wd} pwd={wd}\n"
    assert (wd / f"myjob.{job_id}.err").read_text() == "to stderr\n"


def test_job_output_options(sim: FujitsuSim, api: Api) -> None:
    joined = put_script(
        sim, "outs/joined.sh", '#!/bin/sh\n#PJM -o "run.%j.log"\n#PJM -j\necho out\necho err >&2\n'
    )
    split = put_script(
        sim, "outs/split.sh", "#PJM -o logs/o.txt\n#PJM -e logs/e.txt\necho out\necho err >&2\n"
    )
    default = put_script(sim, "outs/plain.sh", "echo plain\nexit 7\n")
    j1, j2, j3 = api.submit(joined), api.submit(split), api.submit(default)
    for j in (j1, j2, j3):
        sim.wait_job(j)
    wd = sim.hpc_root / "outs"
    assert (wd / f"run.{j1}.log").read_text() == "out\nerr\n"
    assert not list(wd.glob(f"*.{j1}.err"))
    assert (wd / "logs/o.txt").read_text() == "out\n"
    assert (wd / "logs/e.txt").read_text() == "err\n"
    assert (wd / f"plain.sh.{j3}.out").read_text() == "plain\n"  # default name: the file name
    assert (wd / f"plain.sh.{j3}.err").read_text() == ""
    assert sim.jobs[j3].exit_code == 7 and sim.jobs[j3].state == "EXT"


@pytest.mark.parametrize("qopt", [5, ["-v"], None, {"v": 1}, True])
def test_submit_non_string_qopt_is_404(sim: FujitsuSim, api: Api, qopt: Any) -> None:
    jobfile = put_script(sim, "q/job.sh", "true\n")
    r = api.call("POST", "/jobs", {"jobfile": jobfile, "qopt": qopt})
    assert r.status == 404 and r.json == NOT_FOUND
    assert sim.jobs == {} or all(j.jobfile != jobfile for j in sim.jobs.values())


def test_submit_string_qopt(sim: FujitsuSim, api: Api) -> None:
    jobfile = put_script(sim, "q2/job.sh", "true\n")
    job_id = api.submit(jobfile, qopt="-v")
    assert sim.wait_job(job_id).qopt == "-v"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"jobfile": 3},
        {"jobfile": "no/such/job.sh"},
        {"jobfile": "/etc/passwd"},
        {"jobfile": "../x.sh"},
        {"jobfile": "bad"},
        {"jobfile": "inter/job.sh"},
    ],
)
def test_submit_bad(sim: FujitsuSim, api: Api, body: dict) -> None:
    (sim.hpc_root / "bad").mkdir(exist_ok=True)  # a directory, not a file
    put_script(sim, "inter/job.sh", "#!/bin/sh\n#PJM --interact\ntrue\n")
    r = api.call("POST", "/jobs", body)
    assert r.status == 400 and r.json["code"] == "Client.InvalidParameter", body


def test_cancel_running(sim: FujitsuSim, api: Api) -> None:
    jobfile = put_script(sim, "cancel/job.sh", "echo started\nsleep 30\necho never\n")
    job_id = api.submit(jobfile)
    api.wait_status(job_id, ("RUN",))
    r = api.call("DELETE", f"/jobs/{job_id}")
    assert r.status == 204 and r.raw == b""
    api.wait_gone(job_id)
    job = sim.wait_job(job_id, 10)
    assert job.state == "CCL" and job.cancelled and job.signal == 15
    assert (sim.hpc_root / f"cancel/job.sh.{job_id}.out").read_text() == "started\n"
    r = api.call("DELETE", f"/jobs/{job_id}")  # finished now
    assert r.status == 404 and r.json == NOT_FOUND


def test_cancel_queued(sim: FujitsuSim, api: Api) -> None:
    sim.queue_seconds = 10
    jobfile = put_script(sim, "cq/job.sh", "echo ran > ran.txt\n")
    job_id = api.submit(jobfile)
    assert api.wait_status(job_id, ("QUE",))["start_date"] == "-"
    assert api.call("DELETE", f"/jobs/{job_id}").status == 204
    r = api.detail(job_id)
    assert r.status == 404
    job = sim.wait_job(job_id, 5)
    assert job.state == "CCL" and job.pid is None and job.exit_code is None
    assert not (sim.hpc_root / "cq/ran.txt").exists()


@pytest.mark.parametrize("job_id", ["999999", "abc"])
def test_unknown_job(api: Api, job_id: str) -> None:
    for method in ("GET", "DELETE"):
        r = api.call(method, f"/jobs/{job_id}")
        assert r.status == 404 and r.json == NOT_FOUND


def test_elapse_limit(sim: FujitsuSim, api: Api) -> None:
    polite = put_script(sim, "el/polite.sh", '#PJM -L "elapse=0:01"\nsleep 30\n')
    stubborn = put_script(
        sim, "el/stubborn.sh", "#PJM -L elapse=1\ntrap '' TERM\nsleep 30\nsleep 30\n"
    )
    t0 = time.monotonic()
    j1, j2 = api.submit(polite), api.submit(stubborn)
    assert api.detail(j1).json["Fugaku:elapse_limit"] == "0000:00:01"
    a = sim.wait_job(j1, 15)
    t1 = time.monotonic() - t0
    b = sim.wait_job(j2, 15)
    t2 = time.monotonic() - t0
    assert a.state == "EXT" and a.timed_out and a.signal == 15 and t1 < 2.8
    assert b.state == "EXT" and b.timed_out and b.signal == 9 and 2.9 <= t2 < 6
    for j in (j1, j2):
        assert api.detail(j).status == 404


def test_concurrent_submits(sim: FujitsuSim, api: Api) -> None:
    jobfile = put_script(sim, "conc/job.sh", "echo $PJM_JOBID > id.$PJM_JOBID\n")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda _: api.submit(jobfile), range(6)))
    assert len(set(ids)) == 6
    for j in ids:
        assert sim.wait_job(j).exit_code == 0
        assert (sim.hpc_root / f"conc/id.{j}").read_text() == f"{j}\n"


# ----------------------------------------------------------------------------- faults


def test_burst_5xx(sim: FujitsuSim, api: Api) -> None:
    sim.faults.burst_5xx = 2
    r = api.call("GET", "/jobs", auth=False)  # before authentication too
    assert r.status == 503 and r.json["code"] == "Server.ServiceUnavailable"
    r = api.call("POST", "/sync", {"path": "b"})
    assert r.status == 503 and r.json["code"] == "Server.ServiceUnavailable"
    assert sim.faults.burst_5xx == 0
    assert api.call("GET", "/jobs").status == 200
    assert [q.status for q in sim.requests] == [503, 503, 200]


def test_detail_404_after_submit(sim: FujitsuSim, api: Api) -> None:
    sim.faults.detail_404_after_submit = 3
    jobfile = put_script(sim, "ph/job.sh", "echo ran\n")
    job_id = api.submit(jobfile)
    sim.faults.detail_404_after_submit = 0  # per job, fixed at submission
    for _ in range(2):
        r = api.detail(job_id)
        assert r.status == 404 and r.json == NOT_FOUND
        assert sim.jobs[job_id].state in ("ACC", "QUE")
        assert [j["job_id"] for j in api.jobs()] == [str(job_id)]  # the list knows better
    time.sleep(0.3)
    assert sim.jobs[job_id].state == "QUE"  # held while phantom 404s are still due
    assert api.detail(job_id).status == 404
    assert api.detail(job_id).status == 200
    api.wait_gone(job_id)
    assert sim.wait_job(job_id).exit_code == 0
    assert (sim.hpc_root / f"ph/job.sh.{job_id}.out").read_text() == "ran\n"


def test_cancel_races_completion(sim: FujitsuSim, api: Api) -> None:
    sim.faults.cancel_races_completion = True
    jobfile = put_script(sim, "race/job.sh", "sleep 0.5\necho finished > done.txt\nexit 3\n")
    job_id = api.submit(jobfile)
    api.wait_status(job_id, ("RUN",))
    r = api.call("DELETE", f"/jobs/{job_id}")
    assert r.status == 404 and r.json == NOT_FOUND
    job = sim.jobs[job_id]
    assert job.state == "EXT" and job.exit_code == 3 and not job.cancelled
    assert (sim.hpc_root / "race/done.txt").read_text() == "finished\n"


# ----------------------------------------------------------------------------- full flow

FLOW_JOB = """#!/bin/sh
#PJM -N flow
#PJM -L "node=1"
#PJM -L "elapse=0:05:00"
#PJM -o flow.out
#PJM -j
set -e
mkdir -p ../result
n=$(cat ../input/n.txt)
echo "square=$((n * n))" > ../result/answer.txt
echo "job $PJM_JOBID done"
"""


def test_full_flow_hmac(hsim: FujitsuSim) -> None:
    api = Api(hsim)
    hsim.faults.sync_waits = 1
    s3 = boto3.client(
        "s3", endpoint_url=hsim.s3_endpoint, region_name=hsim.region, **hsim.s3_credentials
    )
    s3.put_object(Bucket=hsim.bucket, Key="scripts/job.sh", Body=FLOW_JOB.encode())
    s3.put_object(Bucket=hsim.bucket, Key="input/n.txt", Body=b"12\n")

    answers = api.wait_sync(
        api.start_sync({"path": "run1", "direction": "from_online", "delete": False})
    )
    assert answers[0] == {"status": "waiting"}
    assert answers[-1] == {"result": "0", "status": "complete"}

    job_id = api.submit("run1/scripts/job.sh")
    api.wait_gone(job_id)
    assert api.jobs() == []

    done = api.sync({"path": "run1", "direction": "to_online", "delete": False})
    assert done == {"result": "0", "status": "complete"}
    answer = s3.get_object(Bucket=hsim.bucket, Key="result/answer.txt")["Body"].read()
    assert answer == b"square=144\n"
    log = s3.get_object(Bucket=hsim.bucket, Key="scripts/flow.out")["Body"].read()
    assert log == f"job {job_id} done\n".encode()
    assert hsim.jobs[job_id].exit_code == 0

    methods = [(q.method, q.path) for q in hsim.requests]
    assert ("POST", "/v1/jobs") in methods and ("POST", "/v1/sync") in methods
    assert all(q.status != 401 for q in hsim.requests)


def test_stop_kills_running_jobs(tmp_path: Path) -> None:
    sim = FujitsuSim(tmp_path, token=TOKEN, kill_grace=0.5).start()
    try:
        api = Api(sim)
        job_id = api.submit(put_script(sim, "k/job.sh", "sleep 60\n"))
        api.wait_status(job_id, ("RUN",))
        pid = sim.jobs[job_id].pid
        assert pid is not None
    finally:
        t0 = time.monotonic()
        sim.stop()
    assert time.monotonic() - t0 < 5
    assert sim.jobs[job_id].state == "CCL"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_thread_safety_of_request_log(sim: FujitsuSim, api: Api) -> None:
    def hit(_: int) -> int:
        return api.call("GET", "/jobs").status

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(hit, range(40))) == {200}
    assert len(sim.requests) == 40
    assert threading.active_count() < 200
