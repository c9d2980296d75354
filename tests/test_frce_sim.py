"""The FRCE HPC API simulator (tests/frce_sim), spoken to as a client would: plain urllib.

Every documented failure reason (shared/seeds/003), the size limit, the Negotiate challenge,
query_status's shape and window, the job lifecycle, cancel (also through the scancel
stand-in) and each fault.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from frce_sim import QUERY_KEYS, SCANCEL, FrceSim

pytestmark = pytest.mark.timeout(60)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_NOBODY = object()
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")
TOKEN = "Negotiate " + base64.b64encode(b"\x60\x82 a fake SPNEGO token").decode()


@dataclass
class Resp:
    status: int
    raw: bytes
    headers: Any

    @property
    def json(self) -> Any:
        assert self.headers.get("Content-Type") == "application/json", self.headers
        return json.loads(self.raw)


def call(
    sim: FrceSim,
    method: str,
    endpoint: str,
    body: Any = _NOBODY,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Resp:
    data = raw if raw is not None else None if body is _NOBODY else json.dumps(body).encode()
    hdrs = dict(headers or {})
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(sim.url + endpoint, data=data, method=method, headers=hdrs)
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return Resp(resp.status, resp.read(), resp.headers)
    except urllib.error.HTTPError as exc:
        return Resp(exc.code, exc.read(), exc.headers)


def submit(sim: FrceSim, body: Any = _NOBODY, **kw: Any) -> Resp:
    return call(sim, "POST", "/submit_job", body, **kw)


def query(sim: FrceSim, **kw: Any) -> Resp:
    return call(sim, "GET", "/query_status", **kw)


def job(script: str, **fields: Any) -> dict[str, Any]:
    return {"partition": "norm", "script-body": script, **fields}


def submitted(sim: FrceSim, body: dict[str, Any], **kw: Any) -> int:
    r = submit(sim, body, **kw)
    assert r.status == 200, r
    answer = r.json
    assert answer["status"] == "call_success", answer
    assert re.fullmatch(r"\d{8}", answer["reason"]), answer
    return int(answer["reason"])


def scancel(sim: FrceSim, *ids: object) -> subprocess.CompletedProcess:
    env = {**os.environ, **sim.scancel_env()}
    return subprocess.run(
        [str(SCANCEL), *map(str, ids)], env=env, capture_output=True, text=True, timeout=30
    )


def group_gone(pgid: int, timeout: float = 5) -> bool:
    """True once no process of the group is left (killed orphans are reaped by init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def sim(tmp_path: Path):
    with FrceSim(tmp_path, queue_delay=0.1) as s:
        yield s


# ----------------------------------------------------------------------------- jobs


def test_success_runs_the_script_without_sbatch_lines(sim: FrceSim) -> None:
    script = (
        "#!/bin/sh\n#SBATCH --job-name=mine\n  #SBATCH -o elsewhere\necho hi $SLURM_JOB_ID"
        ' "$SLURM_JOB_PARTITION" "$SLURM_SUBMIT_DIR" "$(pwd)"\necho err >&2\n'
        "# SBATCH is a comment that stays\n"
    )
    job_id = submitted(sim, job(script, ntasks=2, timelimit="00-01:00:00"))
    assert job_id == 46185772
    j = sim.wait_job(job_id)
    assert j.state == "COMPLETED" and j.exit_code == 0
    assert j.history == ["PENDING", "RUNNING", "COMPLETED"]
    assert j.script == script
    assert "#SBATCH" not in j.script_run and "# SBATCH is a comment" in j.script_run
    assert j.script_path.read_text() == j.script_run
    d = sim.workdir / "jobs" / str(job_id)
    assert j.directory == d
    out = (d / f"slurm-{job_id}.out").read_text()
    assert out == f"hi {job_id} norm {d} {d}\nerr\n"
    assert j.fields["ntasks"] == 2 and j.partition == "norm" and j.pid
    assert sim.requests[0].content_type == "application/json"
    assert submitted(sim, job("#!/bin/sh\n")) == job_id + 1


def test_shebang_interpreter_runs_it(sim: FrceSim) -> None:
    job_id = submitted(sim, job("#!/usr/bin/env python3\nprint('py', 6 * 7)\n"))
    assert sim.wait_job(job_id).state == "COMPLETED"
    assert sim.jobs[job_id].output_path.read_text() == "py 42\n"


def test_non_zero_exit_is_failed(sim: FrceSim) -> None:
    job_id = submitted(sim, job("#!/bin/sh\nexit 3\n", ntasks="4"))
    j = sim.wait_job(job_id)
    assert (j.state, j.exit_code, j.signal) == ("FAILED", 3, None)


def test_timelimit_ends_in_timeout(tmp_path: Path) -> None:
    with FrceSim(tmp_path, queue_delay=0, kill_grace=0.5) as sim:
        polite = submitted(sim, job("#!/bin/sh\nsleep 30\n", timelimit="00-00:00:01"))
        stubborn = submitted(
            sim,
            job("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.1; done\n", timelimit="0-00:00:01"),
        )
        t0 = time.monotonic()
        j = sim.wait_job(polite, timeout=10)
        assert j.state == "TIMEOUT" and j.signal is not None and j.exit_code is None
        k = sim.wait_job(stubborn, timeout=10)
        assert k.state == "TIMEOUT" and k.signal == 9
        assert time.monotonic() - t0 < 5
        assert (k.end - k.start).total_seconds() >= 1.4  # 1 s limit + 0.5 s grace


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "postdata_parse_error"),
        (b"", "postdata_parse_error"),
        (b'["a list"]', "postdata_parse_error"),
        (b"\xff\xfe", "postdata_parse_error"),
        (b'{"script-body": "#!/bin/sh\\n"}', "no_partition_given"),
        (b'{"partition": "gpu", "script-body": "#!/bin/sh\\n"}', "bad_partition"),
        (b'{"partition": 7, "script-body": "#!/bin/sh\\n"}', "bad_partition"),
        (
            b'{"partition": "norm", "ntasks": 0, "script-body": "#!/bin/sh\\n"}',
            "bad_number_of_tasks",
        ),
        (
            b'{"partition": "norm", "ntasks": -2, "script-body": "#!/bin/sh\\n"}',
            "bad_number_of_tasks",
        ),
        (
            b'{"partition": "norm", "ntasks": "two", "script-body": "#!/bin/sh\\n"}',
            "bad_number_of_tasks",
        ),
        (
            b'{"partition": "norm", "ntasks": 1.5, "script-body": "#!/bin/sh\\n"}',
            "bad_number_of_tasks",
        ),
        (
            b'{"partition": "norm", "ntasks": true, "script-body": "#!/bin/sh\\n"}',
            "bad_number_of_tasks",
        ),
        (
            b'{"partition": "norm", "mem-per-cpu": "1G", "mem-per-node": "4G",'
            b' "script-body": "#!/bin/sh\\n"}',
            "conflicting_mem_specifications",
        ),
        (b'{"partition": "norm"}', "no_script_body"),
        (b'{"partition": "norm", "script-body": ""}', "no_script_body"),
        (
            b'{"partition": "norm", "script-body": "echo no shebang\\n"}',
            "backend_query_job_submission_failed",
        ),
        (
            b'{"partition": "norm", "timelimit": "1:00:00", "script-body": "#!/bin/sh\\n"}',
            "backend_query_job_submission_failed",
        ),
        (
            b'{"partition": "norm", "timelimit": "00-24:00:00", "script-body": "#!/bin/sh\\n"}',
            "backend_query_job_submission_failed",
        ),
        (
            b'{"partition": "norm", "ntasks-per-core": 3, "script-body": "#!/bin/sh\\n"}',
            "backend_query_job_submission_failed",
        ),
        (
            b'{"partition": "norm", "cpus-per-task": 0, "script-body": "#!/bin/sh\\n"}',
            "backend_query_job_submission_failed",
        ),
        (
            b'{"partition": "norm", "mem-per-node": "lots", "script-body": "#!/bin/sh\\n"}',
            "backend_query_job_submission_failed",
        ),
    ],
)
def test_refusals(sim: FrceSim, raw: bytes, reason: str) -> None:
    r = submit(sim, raw=raw)
    assert (r.status, r.json) == (200, {"status": "call_failure", "reason": reason})
    assert sim.jobs == {}
    assert sim.requests[-1].reason == reason


def test_every_documented_field_is_accepted(sim: FrceSim) -> None:
    fields = {
        "ntasks": 2,
        "ntasks-per-core": 1,
        "ntasks-per-node": 2,
        "cpus-per-task": "1",
        "mem-per-cpu": "512M",
        "dependency": "afterok:1",
        "timelimit": "01-02:03:04",
    }
    job_id = submitted(sim, job("#!/bin/sh\n", **fields))
    j = sim.wait_job(job_id)
    assert j.timelimit == 93784 and j.fields == job("#!/bin/sh\n", **fields)
    job_id = submitted(sim, job("#!/bin/sh\n", **{"mem-per-node": 4096, "ntasks-per-core": 2}))
    assert sim.wait_job(job_id).state == "COMPLETED"


def test_failure_status_is_a_setting(tmp_path: Path) -> None:
    with FrceSim(tmp_path, failure_status=400) as sim:
        r = submit(sim, {"script-body": "#!/bin/sh\n"})
        assert (r.status, r.json["reason"]) == (400, "no_partition_given")


def test_body_limit_exact_and_one_byte_more(tmp_path: Path) -> None:
    with FrceSim(tmp_path, queue_delay=0, body_limit=4096, partitions=["quick"]) as sim:
        base = {"partition": "quick", "script-body": "#!/bin/sh\n#"}
        pad = 4096 - len(json.dumps(base).encode())
        exact = {"partition": "quick", "script-body": "#!/bin/sh\n#" + "x" * pad}
        raw = json.dumps(exact).encode()
        assert len(raw) == 4096
        r = submit(sim, raw=raw)
        assert r.json["status"] == "call_success"
        big = json.dumps({**exact, "script-body": exact["script-body"] + "y"}).encode()
        assert len(big) == 4097
        r = submit(sim, raw=big)
        assert r.json == {"status": "call_failure", "reason": "postdata_too_big"}
        # too big wins over everything else
        r = submit(sim, raw=b"[" + b" " * 5000 + b"]")
        assert r.json["reason"] == "postdata_too_big"
        assert len(sim.jobs) == 1


# ----------------------------------------------------------------------------- auth


def test_negotiate_challenge_then_acceptance(tmp_path: Path) -> None:
    with FrceSim(tmp_path, auth="negotiate", queue_delay=0) as sim:
        r = submit(sim, job("#!/bin/sh\n"))
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == "Negotiate"
        assert r.raw and len(r.raw) < 1000
        assert sim.jobs == {} and sim.challenges == 1
        r = submit(sim, job("#!/bin/sh\n"), headers={"Authorization": "Negotiate !!!"})
        assert r.status == 401
        r = query(sim)
        assert r.status == 401 and sim.challenges == 3

        r = submit(sim, job("#!/bin/sh\n"), headers={"Authorization": TOKEN})
        assert r.status == 200 and r.json["status"] == "call_success"
        scheme, _, token = r.headers["WWW-Authenticate"].partition(" ")
        assert scheme == "Negotiate" and base64.b64decode(token, validate=True)
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        r = query(sim, headers={"Authorization": TOKEN})
        assert r.status == 200 and r.json["reason"] == "query_success"
        log = sim.requests
        assert [q.challenged for q in log] == [True, True, True, False, False]
        assert [q.authorized for q in log] == [False, False, False, True, True]
        assert "fake SPNEGO" not in repr(log) and TOKEN not in repr(log)


# ----------------------------------------------------------------------------- query_status


def test_query_status_shape(tmp_path: Path) -> None:
    with FrceSim(tmp_path, queue_delay=1.0, user="onealdw") as sim:
        assert query(sim).json == {"status": "call_success", "reason": "query_success"}
        done = submitted(sim, job("#!/bin/sh\n"))
        sim.wait_job(done)
        running = submitted(sim, job("#!/bin/sh\nsleep 30\n", timelimit="05-00:00:00"))
        sim.wait_job(running, ["RUNNING"])
        pending = submitted(sim, job("#!/bin/sh\n", partition="quick"))
        r = query(sim)
        assert r.status == 200
        answer = r.json
        keys = list(answer)
        assert keys[0] == "status" and keys[-1] == "reason"
        assert answer["status"] == "call_success" and answer["reason"] == "query_success"
        assert set(keys[1:-1]) == {str(done), str(running), str(pending)}
        for rec in (answer[str(done)], answer[str(running)], answer[str(pending)]):
            assert tuple(rec) == QUERY_KEYS
            assert rec["user"] == "onealdw" and rec["name"] == "onealdw-"
        assert answer[str(done)]["state"] == "COMPLETED"
        assert TIME.match(answer[str(done)]["start"]) and TIME.match(answer[str(done)]["end"])
        rec = answer[str(running)]
        assert rec["state"] == "RUNNING" and rec["partition"] == "norm"
        start = time.mktime(time.strptime(rec["start"], "%Y-%m-%dT%H:%M:%S"))
        end = time.mktime(time.strptime(rec["end"], "%Y-%m-%dT%H:%M:%S"))
        assert end - start == 5 * 86400  # the expected end, as in the seed's example
        rec = answer[str(pending)]
        assert rec == {
            "user": "onealdw",
            "name": "onealdw-",
            "partition": "quick",
            "start": "Unknown",
            "end": "Unknown",
            "state": "PENDING",
        }
        assert sim.cancel(running) and sim.cancel(pending)


def test_query_status_window(tmp_path: Path) -> None:
    with FrceSim(tmp_path, queue_delay=0, window=1.5) as sim:
        old = submitted(sim, job("#!/bin/sh\n"))
        sim.wait_job(old)
        assert str(old) in query(sim).json
        time.sleep(1.6)
        new = submitted(sim, job("#!/bin/sh\n"))
        answer = query(sim).json
        assert str(old) not in answer and str(new) in answer
        assert old in sim.jobs  # still there for the tests' eyes


def test_query_unavailable_then_fine(sim: FrceSim) -> None:
    sim.faults.query_unavailable = 2
    assert query(sim).status == 503
    r = query(sim)
    assert r.status == 503 and r.headers["Content-Type"].startswith("text/plain")
    assert query(sim).status == 200
    assert submitted(sim, job("#!/bin/sh\n"))  # submit was never concerned


# ----------------------------------------------------------------------------- cancel


def test_cancel_pending_never_starts(tmp_path: Path) -> None:
    with FrceSim(tmp_path, queue_delay=1.0) as sim:
        job_id = submitted(sim, job("#!/bin/sh\ntouch started\n"))
        assert sim.cancel(job_id) is True
        j = sim.wait_job(job_id, timeout=1)
        assert j.state == "CANCELLED" and j.start is None and j.pid is None
        time.sleep(1.2)
        assert j.history == ["PENDING", "CANCELLED"] and not (j.directory / "started").exists()
        rec = query(sim).json[str(job_id)]
        assert rec["state"] == "CANCELLED" and rec["start"] == "Unknown"
        assert TIME.match(rec["end"])
        assert sim.cancel(job_id) is False


def test_scancel_stand_in(sim: FrceSim) -> None:
    job_id = submitted(
        sim, job("#!/bin/sh\ntrap 'echo got TERM; exit 143' TERM\nsleep 30 &\nwait\n")
    )
    j = sim.wait_job(job_id, ["RUNNING"])
    time.sleep(0.2)  # let the trap be set
    p = scancel(sim, job_id)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    j = sim.wait_job(job_id, timeout=5)
    assert j.state == "CANCELLED" and j.exit_code == 143
    assert "got TERM" in j.output_path.read_text()
    assert group_gone(j.pid)  # the whole group is gone (the background sleep too)

    p = scancel(sim, job_id)  # already ended: quietly nothing
    assert (p.returncode, p.stderr) == (0, "")
    p = scancel(sim, 12345678)
    assert p.returncode == 1
    assert p.stderr == (
        "scancel: error: Kill job error on job id 12345678: Invalid job id specified\n"
    )
    # the control endpoint is outside the API (no auth, not under /hpcapi)
    assert all(not q.path.startswith("/hpcapi") for q in sim.requests[-3:])


def test_stop_kills_every_job(tmp_path: Path) -> None:
    sim = FrceSim(tmp_path, queue_delay=0).start()
    job_id = submitted(sim, job("#!/bin/sh\ntrap '' TERM\nsleep 60\n"))
    j = sim.wait_job(job_id, ["RUNNING"])
    sim.stop()
    assert j.finished
    assert group_gone(j.pid)


# ----------------------------------------------------------------------------- faults


def test_backend_failures_once_or_n_times(sim: FrceSim) -> None:
    sim.faults.malloc_failed = 1
    sim.faults.submission_failed = 2
    reasons = [submit(sim, job("#!/bin/sh\n")).json["reason"] for _ in range(4)]
    assert reasons[:3] == [
        "backend_query_malloc_failed",
        "backend_query_job_submission_failed",
        "backend_query_job_submission_failed",
    ]
    assert list(sim.jobs) == [int(reasons[3])]
    # an invalid request does not use up a backend fault
    sim.faults.malloc_failed = 1
    assert submit(sim, {"script-body": "#!/bin/sh\n"}).json["reason"] == "no_partition_given"
    assert submit(sim, job("#!/bin/sh\n")).json["reason"] == "backend_query_malloc_failed"


def test_severe_error_is_text_plain_500(sim: FrceSim) -> None:
    sim.faults.severe_error = 2
    r = submit(sim, job("#!/bin/sh\n"))
    assert r.status == 500 and r.headers["Content-Type"].startswith("text/plain")
    assert r.raw and not r.raw.startswith(b"{")
    r = query(sim)
    assert r.status == 500 and r.headers["Content-Type"].startswith("text/plain")
    assert sim.jobs == {}
    assert submitted(sim, job("#!/bin/sh\n"))


def test_lose_submit_answer(sim: FrceSim) -> None:
    sim.faults.lose_submit_answer = 1
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
        submit(sim, job("#!/bin/sh\necho lost\n"))
    (job_id,) = sim.jobs
    assert sim.requests[-1].dropped and sim.requests[-1].status is None
    assert sim.wait_job(job_id).state == "COMPLETED"
    assert str(job_id) in query(sim).json  # findable afterwards, but only by id
    assert submitted(sim, job("#!/bin/sh\n")) == job_id + 1


def test_unknown_path_and_wrong_method(sim: FrceSim) -> None:
    assert call(sim, "GET", "/nothing").status == 404
    assert call(sim, "GET", "/submit_job").status == 405
    assert call(sim, "POST", "/query_status", {}).status == 405


def test_scancel_several_ids_api_url_and_no_auth(tmp_path: Path) -> None:
    with FrceSim(tmp_path, auth="negotiate", queue_delay=30) as sim:
        a = submitted(sim, job("#!/bin/sh\n"), headers={"Authorization": TOKEN})
        b = submitted(sim, job("#!/bin/sh\n"), headers={"Authorization": TOKEN})
        env = {**os.environ, "FRCE_SIM_URL": sim.url + "/"}  # the API url is tolerated
        p = subprocess.run(
            [str(SCANCEL), str(a), "99999999", str(b)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 1
        assert p.stderr == (
            "scancel: error: Kill job error on job id 99999999: Invalid job id specified\n"
        )
        assert sim.wait_job(a, timeout=2).state == sim.wait_job(b, timeout=2).state
        assert sim.jobs[a].state == "CANCELLED"
        assert sim.challenges == 0  # the control endpoint asks for nothing
