#!/usr/bin/env python3
"""Capture real slurmrestd answers into tests/data/slurmrest/v0.0.38/*.json (stdlib only).

Usage (as root, one Slurm cluster on the machine at a time; takes about 2.5 minutes):

    python3 tests/data/slurmrest/capture.py [DIRECTORY] [--attach URL] [--out DIR]

Without ``--attach`` a cluster ``SlurmCluster(DIRECTORY, rest=True)`` (tests/slurm_cluster.py) is
started in DIRECTORY (default: a new temporary directory) and stopped at the end. With
``--attach http://127.0.0.1:PORT`` the cluster already running in DIRECTORY (started by
tests/slurm_cluster.py with rest=True) is used and left running; note that the ctld-down
situation stops and restarts its slurmctld.

Each file: ``{"request": {"method", "path", "body"?}, "status", "content_type", "body"}``;
tokens are never stored (the script checks). What each file shows: README.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # tests/, for slurm_cluster

from slurm_cluster import SlurmCluster  # noqa: E402

VERSION = "v0.0.38"
V = f"/slurm/{VERSION}"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"}


class Capturer:
    def __init__(self, cluster: SlurmCluster, out: Path, work: Path) -> None:
        self.cluster = cluster
        self.out = out
        self.work = work
        self.token = cluster.token("root", lifespan=3600)
        self.tokens = [self.token]
        self.written: list[str] = []
        self.job_ids: list[int] = []

    # -- requests -------------------------------------------------------------------------
    def call(self, method: str, path: str, body: object = None, **kwargs) -> tuple[int, str,
                                                                                  object]:
        kwargs.setdefault("token", self.token)
        return self.cluster.request(method, path, body, **kwargs)

    def save(self, name: str, method: str, path: str, body: object, status: int, ctype: str,
             answer: object, **extra: object) -> None:
        request: dict[str, object] = {"method": method, "path": path}
        if body is not None:
            request["body"] = body
        record = {"request": request, "status": status, "content_type": ctype, "body": answer,
                  **extra}
        text = json.dumps(record, indent=2, sort_keys=False) + "\n"
        for token in self.tokens:
            assert token not in text, f"{name}: a token would be stored"
        assert "eyJhbGci" not in text, f"{name}: something like a JWT would be stored"
        (self.out / f"{name}.json").write_text(text)
        self.written.append(name)
        print(f"{name}: {method} {path} -> {status}", flush=True)

    def capture(self, name: str, method: str, path: str, body: object = None,
                **kwargs) -> tuple[int, str, object]:
        status, ctype, answer = self.call(method, path, body, **kwargs)
        self.save(name, method, path, body, status, ctype, answer)
        return status, ctype, answer

    # -- jobs -----------------------------------------------------------------------------
    def submit_body(self, tag: str, script: str, **job: object) -> dict:
        directory = self.work / tag
        directory.mkdir(parents=True, exist_ok=True)
        return {"script": "#!/bin/sh\n" + script,
                "job": {"name": f"re-{tag}", "partition": self.cluster.partition, "tasks": 1,
                        "current_working_directory": str(directory),
                        "standard_output": str(directory / "scheduler.out"),
                        "environment": {"PATH": "/usr/bin:/bin"},
                        "no_requeue": True, "time_limit": 10, **job}}

    def submit(self, tag: str, script: str, name: str | None = None, **job: object) -> int:
        body = self.submit_body(tag, script, **job)
        if name:
            status, _, answer = self.capture(name, "POST", f"{V}/job/submit", body)
        else:
            status, _, answer = self.call("POST", f"{V}/job/submit", body)
        assert isinstance(answer, dict) and isinstance(answer.get("job_id"), int), answer
        self.job_ids.append(answer["job_id"])
        return answer["job_id"]

    def job(self, job_id: int) -> dict:
        status, _, answer = self.call("GET", f"{V}/job/{job_id}")
        assert status == 200, answer
        return answer["jobs"][0]

    def wait(self, job_id: int, states: set[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.job(job_id)["job_state"]
            if state in states:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} is {state}, not {states}")
            time.sleep(0.3)

    # -- the situations -------------------------------------------------------------------
    def run(self) -> None:
        c = self
        short = self.cluster.token("root", lifespan=5)
        self.tokens.append(short)
        short_made = time.monotonic()

        # the time-limit job first: it needs ~80 s, the rest happens meanwhile (2 CPUs)
        timeout_id = c.submit("timeout", "sleep 300\n", time_limit=1)

        c.capture("ping", "GET", f"{V}/ping")
        status, ctype, spec = c.call("GET", "/openapi/v3")
        c.save("openapi_v3_paths", "GET", "/openapi/v3", None, status, ctype,
               {"paths": sorted(spec["paths"])} if isinstance(spec, dict) else spec,
               note="body trimmed: only the sorted list of the document's paths is kept")
        c.capture("missing_user_name", "GET", f"{V}/ping",
                  headers={"X-SLURM-USER-NAME": None})

        ok_id = c.submit("ok", 'echo "hello from $(pwd)"\n', name="submit_ok")
        fail_id = c.submit("fail", "exit 3\n")
        held_id = c.submit("held", "exit 0\n", name="submit_hold", hold=True)
        c.capture("submit_invalid_partition", "POST", f"{V}/job/submit",
                  c.submit_body("badpart", "exit 0\n", partition="nosuchpartition"))
        body = c.submit_body("noenv", "exit 0\n")
        del body["job"]["environment"]
        c.capture("submit_without_environment", "POST", f"{V}/job/submit", body)
        c.capture("submit_unknown_key", "POST", f"{V}/job/submit",
                  c.submit_body("badkey", "exit 0\n", bogus_key=1))

        c.capture("job_pending_held", "GET", f"{V}/job/{held_id}")
        c.capture("delete_pending_signal_term", "DELETE", f"{V}/job/{held_id}?signal=TERM")
        c.call("DELETE", f"{V}/job/{held_id}")

        c.wait(ok_id, FINAL)
        c.capture("job_completed_exit0", "GET", f"{V}/job/{ok_id}")
        c.wait(fail_id, FINAL)
        c.capture("job_failed_exit3", "GET", f"{V}/job/{fail_id}")

        run_id = c.submit("running", "sleep 120\n")
        c.wait(run_id, {"RUNNING"})
        time.sleep(1)
        c.capture("job_running", "GET", f"{V}/job/{run_id}")
        c.capture("delete_running", "DELETE", f"{V}/job/{run_id}")
        c.wait(run_id, FINAL)
        c.capture("job_cancelled_running", "GET", f"{V}/job/{run_id}")

        c.capture("job_unknown", "GET", f"{V}/job/999999")
        c.capture("delete_unknown", "DELETE", f"{V}/job/999999")

        time.sleep(max(0.0, short_made + 7 - time.monotonic()))
        c.capture("expired_token", "GET", f"{V}/job/{ok_id}", token=short)
        c.capture("expired_token_ping", "GET", f"{V}/ping", token=short)

        status, ctype, listing = c.call("GET", f"{V}/jobs")
        if isinstance(listing, dict) and "jobs" in listing:
            listing = dict(listing, jobs=[j for j in listing["jobs"]
                                          if j.get("job_id") in self.job_ids])
        c.save("jobs_listing", "GET", f"{V}/jobs", None, status, ctype, listing,
               note="jobs trimmed to the ones this capture submitted")
        future = int(time.time()) + 3600
        c.capture("jobs_update_time_future", "GET", f"{V}/jobs?update_time={future}")

        c.wait(timeout_id, FINAL, timeout=150)
        c.capture("job_timeout", "GET", f"{V}/job/{timeout_id}")

        self.cluster.stop_ctld()
        try:
            started = time.monotonic()
            status, ctype, answer = c.call("GET", f"{V}/job/{ok_id}", timeout=120)
            elapsed = round(time.monotonic() - started, 1)
            c.save("ctld_down", "GET", f"{V}/job/{ok_id}", None, status, ctype, answer,
                   elapsed_seconds=elapsed)
        finally:
            self.cluster.start_ctld()
        c.wait(ok_id, FINAL)  # still known after the restart


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", type=Path,
                        help="cluster directory (default: a new temporary directory)")
    parser.add_argument("--attach", metavar="URL",
                        help="use the cluster already running in DIRECTORY at this slurmrestd URL")
    parser.add_argument("--out", type=Path, default=HERE / VERSION)
    args = parser.parse_args()
    if args.attach and not args.directory:
        parser.error("--attach needs the DIRECTORY of the running cluster")
    directory = args.directory or Path(tempfile.mkdtemp(prefix="slurmrest-capture-"))
    cluster = SlurmCluster(directory, rest=True)
    if args.attach:
        cluster.rest_port = int(args.attach.rstrip("/").rsplit(":", 1)[1])
    else:
        reason = SlurmCluster.rest_available()
        if reason:
            print(reason, file=sys.stderr)
            return 2
        cluster.up()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slurmrest-jobs-"))
    work.chmod(0o755)
    try:
        Capturer(cluster, args.out, work).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.attach:
            cluster.down()
    if not args.directory:  # a temporary cluster directory (logs) is only kept on failure
        shutil.rmtree(directory, ignore_errors=True)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
