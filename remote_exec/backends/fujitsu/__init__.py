"""The ``fujitsu`` backend: a run forwarded to the Fujitsu Cloud Service HPC WebAPI.

The flow (seeds/000, "HPC WebAPI 利用ガイド" §4 and §6), one run:

  created   the run's prefix ``<hpc_dir>/<run id>/`` is chosen (nothing remote yet);
  staged    the inputs, ``run.sh`` (the wrapper that records the exit code) and the
            job script (resources as ``#PJM`` lines: the API takes no options, §6.1)
            are uploaded to the bucket under ``<run id>/`` with boto3 (multipart for
            large files); "Start to sync files" ``from_online`` copies the bucket into
            ``<hpc_dir>`` on the HPC side; its status is polled until ``complete``;
  launched  "Submit a Job" with ``{"jobfile": "<hpc_dir>/<run id>/.remote-exec/job.sh"}``
            answers 201 and the job id (recorded before anything else happens);
  finished  "Get Job Detail" is polled while it answers 200 (queued, running: state,
            elapse time and the ``Fugaku:*`` fields go to the journal); a 404 means the
            job is gone, confirmed by "Get Job List"; then "Start to sync files"
            ``to_online`` (always with ``direction``: omitted, it would sync the other way,
            §6.6.1) and the job's own ``.remote-exec/exit_code`` is read from the bucket;
  fetched   the run's prefix is downloaded (§6.7) and placed like any other fetch;
  cleaned   the run's objects are deleted per the site's cleanup policy.

Ctrl-C, ``--timeout`` and ``remote-exec cancel`` call "Cancel a Job" (204; 404: it had
ended). Credentials come from the environment or a 0600 file and never reach a log,
an error or the journal (:mod:`.auth`, :mod:`remote_exec.redact`).
"""
