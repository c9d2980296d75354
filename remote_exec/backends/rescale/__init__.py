"""The ``rescale`` backend: a run as a job of Rescale's REST API (seed 004 and the
published API reference; see docs/research/rescale.md for the calls and what is assumed).

One run:

  created   the job's name ``remote-exec-<run id>`` is chosen (nothing remote yet);
  staged    the inputs and the control files (the wrapper ``run.sh`` that records the
            exit code) are packed into one ``remote-exec-inputs.tar.gz``, streamed as a
            Rescale file (``POST /api/v2/files/contents/``), and a job is created with it
            as its input, the site's analysis and hardware, and a command that unpacks it
            and runs the wrapper (``POST /api/v2/jobs/``); its id is recorded at once;
  launched  submitted on demand (``…/jobs/{id}/submit/``) or to the site's persistent
            cluster (seed 004: ``POST /api/clusters/{cluster}/jobs/`` ``{"id", "submit":
            true}``, after starting the cluster and waiting for ``Started`` if it is down
            and the site allows it);
  finished  ``…/jobs/{id}/statuses/`` is polled with backoff until the job ended; its
            history goes to the journal (``status`` shows it); the exit code is read from
            the job's own ``.remote-exec/exit_code`` output (Rescale's statuses carry none);
  fetched   the job's outputs (``…/jobs/{id}/files/``, every page) that pass the return
            filter are streamed (``/api/v2/files/{id}/contents/``), md5-checked and placed;
  cleaned   the job is deleted (``DELETE …/jobs/{id}/``) per the site's cleanup policy.

Ctrl-C, ``--timeout`` and ``remote-exec cancel`` stop the job (``…/stop/``) and wait
until it no longer runs. The API key comes from the environment or a 0600 file and
never reaches a log, an error or the journal (:mod:`.client`, :mod:`remote_exec.redact`).
"""
