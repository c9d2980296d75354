"""A simulator of Rescale's REST API, for tests, written from seed 004 (a Japanese
hands-on: persistent cluster, job, submit) and docs/research/rescale.md (the published
API reference's calls). Base URL ``sim.url`` (``http://127.0.0.1:PORT``); every call:

    Authorization: Token <key>     missing: 401 {"detail": "Authentication credentials were
                                   not provided."}; wrong: 401 {"detail": "Invalid token."}
                                   (the body's shape is a guess: clients must not parse it)
    a path without its trailing slash: 404 (the reference demands the slash)
    lists: {"count", "next", "previous", "results"}, ``page`` / ``page_size`` (default 10),
           ``next``/``previous`` absolute URLs; a page past the end: 404

    POST   /api/v2/files/contents/            multipart/form-data, field ``file`` (streamed
                                              to disk) → 201 {"id", "name", "relativePath",
                                              "decryptedSize", "md5", "isUploaded": true,
                                              "path", "typeId": 1, "dateUploaded", ...}
    GET    /api/v2/files/{id}/                the file's object
    GET    /api/v2/files/{id}/contents/       the bytes, with Content-Length (404 while an
                                              output is not uploaded yet)
    POST   /api/v{2,3}/jobs/                  create (not start) → 201 the job with ``id``;
                                              400 unless ``name``, ``jobanalyses[0]``'s
                                              ``analysis`` {code, version}, ``command``,
                                              ``hardware`` (``coreType`` a known code, as
                                              {"code": …} or a string; ``coresPerSlot`` int)
                                              and every ``inputFiles[].id`` exists
    GET    /api/v{2,3}/jobs/                  every job, newest first
    GET    /api/v{2,3}/jobs/{id}/             the job
    POST   /api/v{2,3}/jobs/{id}/submit/      200, no data; 400 if submitted before
    GET    /api/v{2,3}/jobs/{id}/statuses/    newest first: Pending → Queued → Started →
                                              Validated → Executing → Completed ("Completed
                                              successfully"); a stop: … → Stopping → Stopped.
                                              A created, unsubmitted job has none.
    POST   /api/v{2,3}/jobs/{id}/stop/        202, no data (TERM to the command's process
                                              group, KILL after ``kill_grace``); 400 if the
                                              job is not running
    DELETE /api/v{2,3}/jobs/{id}/             204; 400 while it runs (stop first)
    GET    /api/v{2,3}/jobs/{id}/files/       the outputs (typeId 5; ``relativePath``
                                              relative to the job's directory; ``search``
                                              filters names)
    GET    /api/v{2,3}/jobs/{id}/runs/        one run once it executed
    GET    /api/v{2,3}/jobs/{id}/cluster_statuses/  404 for the first
                                              ``cluster_statuses_404_seconds``
    GET    /api/v2/coretypes/                 {"code", "name"} of hpc-3, emerald, standard-plus
    POST   /api/v3/clusters/                  create → 201 {"id", ...}; status Not Started
    POST   /api/v3/clusters/{id}/start/       204 (empty body); 400 unless Not Started/Stopped
    GET    /api/v3/clusters/{id}/statuses/    newest first: Not Started → Pending → Queued →
                                              Starting → Started (``cluster_step_seconds``)
    POST   /api/clusters/{id}/jobs/           (no version segment, as in seed 004)
                                              {"id": <job id>, "submit": true} → 200
                                              {"id": <another id>}; the job waits in Queued
                                              until the cluster is Started

A job runs: its input files are copied into ``<workdir>/jobs/<id>/work/`` by name (with
``unpack_archives``, a ``.tar.gz`` is also unpacked, as Rescale may do), then ``/bin/sh -c
<command>`` there in its own process group, stdout and stderr to ``process_output.log``;
when it ends every file of the directory becomes an output. The command's exit status is
kept in ``sim.jobs[id].returncode`` and shown by no call (as on Rescale). Faults: see
:class:`Faults`.
"""

from .sim import (
    BAD_TOKEN,
    CLUSTER_FLOW,
    CORE_TYPES,
    JOB_FLOW,
    NO_CREDENTIALS,
    Faults,
    Job,
    RescaleSim,
)

__all__ = ["BAD_TOKEN", "CLUSTER_FLOW", "CORE_TYPES", "JOB_FLOW", "NO_CREDENTIALS", "Faults",
           "Job", "RescaleSim"]
