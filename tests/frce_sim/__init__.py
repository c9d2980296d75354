"""A simulator of the FRCE HPC API (NCI Frederick's REST front end to Slurm), for tests.

Written field by field from its documentation, "HPC API Documentation" version 0.0.1
(shared/seeds/003) and shared/docs/research/slurm-rest.md B.1/B.4. [seed] marks what the
document says; [assumed] marks the simulator's own choice where it says nothing.

Endpoints (``sim.url`` = ``http://127.0.0.1:PORT/hpcapi``):

    POST /hpcapi/submit_job     [seed] JSON object -> {"status": "call_success", "reason": "<id>"}
                                       or {"status": "call_failure", "reason": "<reason>"}
    GET  /hpcapi/query_status   [seed] {"status": "call_success",
                                       "<id>": {user, name, partition, start, end, state}, ...,
                                       "reason": "query_success"}
    POST /_sim/cancel/<id>      [assumed] control endpoint, not part of the API (the API has no
                                       cancel); used by ``tests/frce_sim/scancel``

submit_job, in the order the simulator checks:

* [seed] request fields: ``script-body`` and ``partition`` (mandatory), ``ntasks``,
  ``ntasks-per-core`` (1 or 2), ``ntasks-per-node``, ``cpus-per-task``, ``mem-per-cpu``,
  ``mem-per-node``, ``dependency``, ``timelimit`` (``DD-HH:MM:SS``). [assumed] unknown fields are
  ignored (kept in ``job.fields``); ``dependency`` is recorded, not enforced; memory and the
  other counts only have their format checked; nothing checks ``Content-Type`` (it is recorded
  in the request log for the tests to check).
* [seed] the POST bigger than "4 KB" -> ``postdata_too_big``; [assumed] "bigger" means the raw
  body has more than ``body_limit`` bytes (default 4096; exactly ``body_limit`` passes).
* [seed] JSON that cannot be processed -> ``postdata_parse_error``; [assumed] also valid JSON
  that is not an object, and an empty body.
* [seed] ``no_partition_given`` (absent; [assumed] also null or ""), ``bad_partition`` (not in
  ``partitions``; [assumed] also a non-string), ``bad_number_of_tasks`` ([assumed] ``ntasks``
  given but not a positive integer; an int or a string of digits is accepted),
  ``conflicting_mem_specifications`` (both mem fields).
* [assumed] a missing, non-string or empty ``script-body`` -> ``no_script_body`` (undocumented:
  the seed says "other errors remain to be documented").
* [assumed] what sbatch would refuse -> ``backend_query_job_submission_failed`` (the seed: "an
  error submitting the job to SLURM"): a script whose first line is not ``#!``; a
  ``timelimit`` not ``DD-HH:MM:SS`` (HH < 24, MM, SS < 60); ``ntasks-per-core`` not 1 or 2;
  ``ntasks-per-node`` / ``cpus-per-task`` not positive integers; a mem field not
  ``<digits>[KMGT]``; a non-string ``dependency``.
* [seed] ``backend_query_malloc_failed`` / ``backend_query_job_submission_failed`` also come
  from the faults ``malloc_failed`` / ``submission_failed`` (checked after validation).
* [seed] success: ``{"status": "call_success", "reason": "<job id>"}``; [assumed] ids are
  consecutive from 46185772 (the seed's example). The seed's prose says "Status"/"call success"
  but its example shows lowercase keys and underscores: the simulator speaks as the example.
* [assumed] a failure answers HTTP ``failure_status`` (default 200: the seed does not say).
* [seed] a severe error answers ``text/plain``; [assumed] with status 500 (fault
  ``severe_error``, for either endpoint). Faults are described on ``Faults``.

Authentication ([seed] Kerberos/SPNEGO via Apache): with ``auth="negotiate"`` a request to the
API without ``Authorization: Negotiate <base64>`` gets ``401 Unauthorized``,
``WWW-Authenticate: Negotiate`` and Apache's short ``text/html`` page (as in the seed's example);
with one, [assumed] any base64 token is accepted and the answer carries
``WWW-Authenticate: Negotiate <random base64>`` and ``Access-Control-Allow-Origin: *`` [seed].
Authentication comes before everything else (also before ``postdata_too_big``). Challenges are
counted in the request log (``Request.challenged``, ``sim.challenges``); no header value is
ever logged. With ``auth="none"`` nothing is asked. [assumed] ``Server: Apache`` and the
reason phrase ``200 Success`` as in the seed's example.

The job:

* [seed] ``#SBATCH`` lines are stripped out of the script ([assumed] lines starting with
  optional blanks then ``#SBATCH``); ``job.script`` is what was received, ``job.script_run``
  what runs, written to ``workdir/jobs/<id>/script.sh``.
* [assumed] after ``queue_delay`` seconds in ``PENDING`` it runs as Slurm runs a batch script:
  executed directly, so its shebang's interpreter runs it (hence a script without ``#!`` is
  refused at submission), in its own process group (session), cwd ``workdir/jobs/<id>`` (the
  real service runs it wherever Slurm puts it), stdout+stderr to
  ``workdir/jobs/<id>/slurm-<id>.out``, environment = the simulator's plus ``SLURM_JOB_ID``,
  ``SLURM_JOB_PARTITION``, ``SLURM_SUBMIT_DIR`` (= the job's directory).
* states ``PENDING`` -> ``RUNNING`` -> ``COMPLETED`` (exit 0) / ``FAILED`` (non-zero or killed
  by a signal) / ``CANCELLED`` / ``TIMEOUT`` (the ``timelimit`` elapsed: TERM to the group,
  KILL ``kill_grace`` = 2 s later). Without ``timelimit`` no limit is enforced [assumed].
  Exit codes (``job.exit_code``, ``job.signal``) are for the tests' eyes only: the API never
  shows them [seed].

query_status:

* [seed] no parameters; all the user's jobs "over the previous 24 hours": [assumed] the jobs
  whose submission or end is within ``window`` seconds.
* [seed] times ``YYYY-MM-DDTHH:MM:SS`` (local time); [assumed] a time not known yet is Slurm's
  ``Unknown`` (start and end of a pending job; the start of a job cancelled while pending).
  [assumed, from the seed's example where end = start + 5 days for a RUNNING job] while a job
  runs, ``end`` is its expected end, start + ``timelimit`` (``Unknown`` without a limit).
* [seed example] ``name`` is ``"<user>-"`` (``onealdw-``), whatever the script: clients cannot
  find their jobs by name. ``user`` is the constructor's ``user``.
* [assumed] fault ``query_unavailable``: 503 ``text/plain``.

Cancel ([seed] the API has none): ``sim.cancel(id)`` or ``POST /_sim/cancel/<id>`` (no
authentication): pending -> never starts; running -> TERM to its group, KILL after
``kill_grace``; state ``CANCELLED``. An ended job is left as it is (200, ``cancelled: false``);
an unknown id answers 404. ``stop()`` kills every job's process group, then the server.

Use::

    with FrceSim(tmp_path, queue_delay=0.1) as sim:   # or sim.start() ... sim.stop()
        ... POST sim.url + "/submit_job" {"partition": "norm", "script-body": "#!/bin/sh\\n..."}
        sim.wait_job(job_id)                           # until a final state
        sim.jobs[job_id].exit_code                     # what the API never shows
        sim.faults.lose_submit_answer = 1              # misbehave on cue (see Faults)
        env = {**os.environ, **sim.scancel_env()}; run [SCANCEL, str(job_id)]
"""

from pathlib import Path

from .sim import (
    ACTIVE_STATES,
    API_PREFIX,
    BAD_NUMBER_OF_TASKS,
    BAD_PARTITION,
    CANCELLED,
    COMPLETED,
    CONFLICTING_MEM,
    CONTROL_PREFIX,
    DOCUMENTED_REASONS,
    FAILED,
    FIELDS,
    FINAL_STATES,
    FIRST_JOB_ID,
    MALLOC_FAILED,
    NO_PARTITION_GIVEN,
    NO_SCRIPT_BODY,
    PENDING,
    POSTDATA_PARSE_ERROR,
    POSTDATA_TOO_BIG,
    QUERY_KEYS,
    RUNNING,
    SUBMISSION_FAILED,
    TIMEOUT,
    UNKNOWN_TIME,
    Faults,
    FrceSim,
    Job,
    Request,
    parse_timelimit,
    strip_sbatch,
)

SCANCEL = Path(__file__).resolve().parent / "scancel"
"""The executable scancel stand-in (needs ``FRCE_SIM_URL`` in its environment)."""

__all__ = [
    "ACTIVE_STATES",
    "API_PREFIX",
    "BAD_NUMBER_OF_TASKS",
    "BAD_PARTITION",
    "CANCELLED",
    "COMPLETED",
    "CONFLICTING_MEM",
    "CONTROL_PREFIX",
    "DOCUMENTED_REASONS",
    "FAILED",
    "FIELDS",
    "FINAL_STATES",
    "FIRST_JOB_ID",
    "MALLOC_FAILED",
    "NO_PARTITION_GIVEN",
    "NO_SCRIPT_BODY",
    "PENDING",
    "POSTDATA_PARSE_ERROR",
    "POSTDATA_TOO_BIG",
    "QUERY_KEYS",
    "RUNNING",
    "SCANCEL",
    "SUBMISSION_FAILED",
    "TIMEOUT",
    "UNKNOWN_TIME",
    "Faults",
    "FrceSim",
    "Job",
    "Request",
    "parse_timelimit",
    "strip_sbatch",
]
