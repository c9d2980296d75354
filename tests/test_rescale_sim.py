"""The Rescale API simulator (tests/rescale_sim) spoken to as seed 004's curl calls do:
plain urllib, the seed's own JSON bodies, and the reference's calls of the research note."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rescale_sim import BAD_TOKEN, CLUSTER_FLOW, JOB_FLOW, NO_CREDENTIALS, RescaleSim

pytestmark = pytest.mark.timeout(60)

KEY = "seed-004-api-token"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# seed 004, testCluster.json and testJob.json, as written there
CLUSTER_JSON = {"name": "Untitled Cluster 3",
                "hardware": {"coresPerSlot": 1, "slots": 1, "coreType": {"code": "hpc-3"},
                             "walltime": 10},
                "installedAnalyses": [{"analysis": {"code": "user_included", "version": "0"}}],
                "runLowPriority": True}
JOB_JSON = {"name": "Test Job",
            "jobanalyses": [{"analysis": {"code": "user_included", "version": "0"},
                             "command": "echo hello", "flags": {},
                             "hardware": {"coresPerSlot": 1, "slots": 1,
                                          "coreType": {"code": "hpc-3"}, "walltime": 10},
                             "inputFiles": []}],
            "isLowPriority": "true"}
STATUS_KEYS = {"status", "statusDate", "id", "statusReason"}


@dataclass
class Resp:
    status: int
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


def call(sim: RescaleSim, method: str, path: str, body: Any = None, *, key: str | None = KEY,
         raw: bytes | None = None, ctype: str = "application/json") -> Resp:
    headers = {"Authorization": f"Token {key}"} if key else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["Content-Type"] = ctype
    request = urllib.request.Request(sim.url + path, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=30) as r:
            return Resp(r.status, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.read())


@pytest.fixture
def sim(tmp_path: Path):
    with RescaleSim(tmp_path, token=KEY, step_seconds=0.02, cluster_step_seconds=0.05) as sim:
        yield sim


def wait_statuses(sim: RescaleSim, path: str, last: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = call(sim, "GET", path).json
        if page["results"] and page["results"][0]["status"] == last:
            return page
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {last}")


def upload(sim: RescaleSim, name: str, data: bytes) -> Resp:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return call(sim, "POST", "/api/v2/files/contents/", raw=body,
                ctype=f"multipart/form-data; boundary={boundary}")


def test_seed_004_persistent_cluster_flow(sim: RescaleSim) -> None:
    created = call(sim, "POST", "/api/v3/clusters/", CLUSTER_JSON)
    assert created.status == 201 and created.json["id"]
    cluster = created.json["id"]
    started = call(sim, "POST", f"/api/v3/clusters/{cluster}/start/")
    assert started.status == 204 and started.raw == b""  # "This returns a 204 on success."
    page = wait_statuses(sim, f"/api/v3/clusters/{cluster}/statuses/", "Started")
    assert set(page) == {"count", "previous", "next", "results"} and page["count"] == 5
    assert [r["status"] for r in reversed(page["results"])] == list(CLUSTER_FLOW)
    assert all(set(r) == STATUS_KEYS | {"clusterId"} and r["clusterId"] == cluster
               for r in page["results"])
    job = call(sim, "POST", "/api/v3/jobs/", JOB_JSON)
    assert job.status == 201 and job.json["id"]
    submit = call(sim, "POST", f"/api/clusters/{cluster}/jobs/",
                  {"id": job.json["id"], "submit": True})
    assert submit.status == 200 and set(submit.json) == {"id"}
    assert submit.json["id"] != job.json["id"]  # seed: QvQAo submitted, {"id":"ReUKdb"}
    done = wait_statuses(sim, f"/api/v2/jobs/{job.json['id']}/statuses/", "Completed")
    assert [r["status"] for r in reversed(done["results"])] == list(JOB_FLOW)
    assert done["results"][0]["statusReason"] == "Completed successfully"
    files = call(sim, "GET", f"/api/v2/jobs/{job.json['id']}/files/").json["results"]
    log = next(f for f in files if f["relativePath"] == "process_output.log")
    assert log["typeId"] == 5 and log["isUploaded"] is True
    content = call(sim, "GET", f"/api/v2/files/{log['id']}/contents/")
    assert content.status == 200 and content.raw == b"hello\n"


def test_on_demand_job_with_an_input_file(sim: RescaleSim) -> None:
    up = upload(sim, "in.txt", b"abc\n")
    assert up.status == 201
    meta = up.json
    assert meta["name"] == "in.txt" and meta["decryptedSize"] == 4 and meta["typeId"] == 1
    assert meta["md5"] == "0bee89b07a248e27c83fc3d5951213c1" and meta["isUploaded"] is True
    body = json.loads(json.dumps(JOB_JSON))
    body["jobanalyses"][0]["inputFiles"] = [{"id": meta["id"]}]
    body["jobanalyses"][0]["command"] = "cat in.txt > out.txt; exit 4"
    job = call(sim, "POST", "/api/v2/jobs/", body).json["id"]
    assert call(sim, "GET", f"/api/v2/jobs/{job}/statuses/").json["results"] == []
    assert call(sim, "POST", f"/api/v2/jobs/{job}/submit/").status == 200
    assert call(sim, "POST", f"/api/v2/jobs/{job}/submit/").status == 400  # once
    wait_statuses(sim, f"/api/v2/jobs/{job}/statuses/", "Completed")
    assert sim.jobs[job].returncode == 4  # shown by no call
    out = call(sim, "GET", f"/api/v2/jobs/{job}/files/?search=out.txt").json["results"]
    assert [f["relativePath"] for f in out] == ["out.txt"]
    assert call(sim, "GET", f"/api/v2/files/{out[0]['id']}/contents/").raw == b"abc\n"
    runs = call(sim, "GET", f"/api/v2/jobs/{job}/runs/").json["results"]
    assert len(runs) == 1 and runs[0]["outputFileCount"] == len(sim.jobs[job].outputs)
    assert call(sim, "DELETE", f"/api/v2/jobs/{job}/").status == 204
    assert call(sim, "GET", f"/api/v2/jobs/{job}/").status == 404


def test_stop_and_delete_rules(sim: RescaleSim) -> None:
    body = json.loads(json.dumps(JOB_JSON))
    body["jobanalyses"][0]["command"] = "sleep 30"
    job = call(sim, "POST", "/api/v2/jobs/", body).json["id"]
    call(sim, "POST", f"/api/v2/jobs/{job}/submit/")
    wait_statuses(sim, f"/api/v2/jobs/{job}/statuses/", "Executing")
    assert call(sim, "DELETE", f"/api/v2/jobs/{job}/").status == 400  # stop first
    stop = call(sim, "POST", f"/api/v2/jobs/{job}/stop/")
    assert stop.status == 202 and stop.raw == b""
    page = wait_statuses(sim, f"/api/v2/jobs/{job}/statuses/", "Stopped")
    assert [r["status"] for r in page["results"][:2]] == ["Stopped", "Stopping"]
    assert call(sim, "POST", f"/api/v2/jobs/{job}/stop/").status == 400
    assert call(sim, "DELETE", f"/api/v2/jobs/{job}/").status == 204


def test_refusals_paths_and_pages(sim: RescaleSim) -> None:
    missing = call(sim, "GET", "/api/v2/jobs/", key=None)
    assert missing.status == 401 and missing.json == NO_CREDENTIALS
    wrong = call(sim, "GET", "/api/v2/jobs/", key="nope")
    assert wrong.status == 401 and wrong.json == BAD_TOKEN
    assert call(sim, "GET", "/api/v2/jobs").status == 404  # the trailing slash is required
    assert call(sim, "PUT", "/api/v2/jobs/").status == 405
    bad = json.loads(json.dumps(JOB_JSON))
    bad["jobanalyses"][0]["inputFiles"] = [{"id": "nosuch"}]
    assert call(sim, "POST", "/api/v2/jobs/", bad).status == 400
    assert call(sim, "POST", "/api/v2/jobs/", JOB_JSON, ctype="text/plain").status == 415
    for _ in range(3):
        call(sim, "POST", "/api/v2/jobs/", JOB_JSON)
    first = call(sim, "GET", "/api/v2/jobs/?page_size=2").json
    assert first["count"] == 3 and len(first["results"]) == 2 and first["previous"] is None
    second = call(sim, "GET", first["next"].removeprefix(sim.url)).json
    assert len(second["results"]) == 1 and second["next"] is None
    assert call(sim, "GET", "/api/v2/jobs/?page=9").status == 404
    codes = {c["code"] for c in call(sim, "GET", "/api/v2/coretypes/").json["results"]}
    assert "hpc-3" in codes


def test_faults(sim: RescaleSim) -> None:
    sim.faults.burst_5xx = 2
    assert [call(sim, "GET", "/api/v2/jobs/").status for _ in range(3)] == [503, 503, 200]
    sim.faults.rate_limited = 1
    assert call(sim, "GET", "/api/v2/jobs/").status == 429
    sim.faults.lose_create_answer = 1
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        call(sim, "POST", "/api/v2/jobs/", JOB_JSON)
    assert len(sim.jobs) == 1  # it was created all the same
    (job,) = sim.jobs
    sim.faults.lose_submit_answer = 1
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        call(sim, "POST", f"/api/v2/jobs/{job}/submit/")
    wait_statuses(sim, f"/api/v2/jobs/{job}/statuses/", "Completed")
    early = call(sim, "GET", f"/api/v2/jobs/{job}/cluster_statuses/")
    assert early.status in (200, 404)
    sim.faults.revoke_token_after = 1
    assert call(sim, "GET", "/api/v2/jobs/").status == 200
    assert call(sim, "GET", "/api/v2/jobs/").status == 401
