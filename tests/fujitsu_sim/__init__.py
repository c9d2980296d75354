"""A simulator of the Fujitsu Cloud Service HPC WebAPI, for tests.

It follows the "HPC WebAPI 利用ガイド" (shared/seeds/000, §4 and §6). The guide leaves URL
paths and authentication to an API reference we do not have; the simulator's choices are:

    base URL                      http://127.0.0.1:PORT/v1            (``sim.url``)
    POST   /v1/sync               Start to sync files       200 {"requestid": <int>}
    GET    /v1/sync/{requestid}   Get Synchronization Status
                                  200 {"status": "waiting"}
                                  200 {"result": "0"|"1", "status": "complete"}
                                  200 {"status": "error: no such ID"} / "error: <reason>"
    POST   /v1/jobs               Submit a Job              201 {"job_id": <int>}
    GET    /v1/jobs               Get Job List              200 [<job>, ...] (queued/running)
    GET    /v1/jobs/{job_id}      Get Job Detail            200 <job> | 404 Client.URLNotFound
    DELETE /v1/jobs/{job_id}      Cancel a Job              204 | 404 Client.URLNotFound

Request bodies are JSON objects sent with ``Content-Type: application/json`` (else 415).
Authentication: see ``auth`` (``AUTH_RECIPE``); failures answer 401 Client.Unauthorized.
Choices where the guide says nothing:

* order of checks: ``faults.burst_5xx`` (503) → authentication (401) → route (404 for an
  unknown path, 405 for a wrong method) → parameters;
* bad parameters answer ``400 {"code": "Client.InvalidParameter", "message": ...}``: a sync
  ``path`` / ``jobfile`` that is not a non-empty string, is absolute, starts with ``~`` or has a
  ``..`` part; a ``direction`` other than "from_online"/"to_online"; a non-boolean ``delete``;
  a jobfile that does not exist; a ``#PJM --interact`` script. Only a non-string ``qopt``
  answers 404 (documented), with the Client.URLNotFound body;
* ``path`` / ``jobfile`` are relative to ``sim.hpc_root`` (the HPC-side file system);
* sync failures after the start (e.g. ``to_online`` of a directory that does not exist)
  appear as ``{"status": "error: <reason>"}``; requestids stay valid after completion;
* from_online overwrites every object's file (no size/time comparison); with ``delete`` it
  removes files under ``path`` that have no object (directories are left); to_online uploads
  every regular file under ``path`` and with ``delete`` removes every object of the bucket that
  has no file under ``path`` (like ``aws s3 sync --delete``);
* a job runs ``/bin/sh <jobfile>`` in the job file's directory (that is also
  ``PJM_O_WORKDIR``), in its own process group; also set: ``PJM_JOBID``, ``PJM_JOBNAME``,
  ``PJM_O_LOGNAME`` and ``#PJM -x`` variables. Default job name: the script's file name
  (as pjsub does), default output ``<name>.<id>.out`` / ``<name>.<id>.err`` in the job's
  directory; states ACC → QUE → RNA → RUN → RNO → EXT (cancel: CCL; elapse limit exceeded:
  TERM, KILL after ``kill_grace`` s, then EXT with ``timed_out``). "Fugaku:lst" is the
  previous state; "start_date" is "-" until the job starts; the default elapse limit is
  ``default_elapse`` (3600 s).

Use::

    with FujitsuSim(tmp_path) as sim:              # or sim.start() ... sim.stop()
        s3 = boto3.client("s3", endpoint_url=sim.s3_endpoint, region_name=sim.region,
                          **sim.s3_credentials)
        s3.put_object(Bucket=sim.bucket, Key="scripts/job.sh", Body=b"...")
        ... POST sim.url + "/sync" with sim.auth_headers("POST", "/v1/sync", body) ...
        sim.faults.sync_waits = 2                    # misbehave on cue (see Faults)
        sim.jobs[job_id].exit_code                   # what the API never shows
"""

from .auth import (
    AUTH_RECIPE,
    HEADER_ACCESS_KEY,
    HEADER_AUTHORIZATION,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    MAX_CLOCK_SKEW,
    bearer_headers,
    hmac_headers,
    signature,
    string_to_sign,
)
from .pjm import JobOptions, format_hms, parse_elapse, parse_script
from .sim import (
    ACTIVE_STATES,
    API_PREFIX,
    FINAL_STATES,
    JOB_KEYS,
    NOT_FOUND,
    UNAVAILABLE,
    Faults,
    FujitsuSim,
    Job,
    Request,
    Sync,
    job_keys_ok,
)

__all__ = [
    "ACTIVE_STATES",
    "API_PREFIX",
    "AUTH_RECIPE",
    "FINAL_STATES",
    "HEADER_ACCESS_KEY",
    "HEADER_AUTHORIZATION",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "JOB_KEYS",
    "MAX_CLOCK_SKEW",
    "NOT_FOUND",
    "UNAVAILABLE",
    "Faults",
    "FujitsuSim",
    "Job",
    "JobOptions",
    "Request",
    "Sync",
    "bearer_headers",
    "format_hms",
    "hmac_headers",
    "job_keys_ok",
    "parse_elapse",
    "parse_script",
    "signature",
    "string_to_sign",
]
