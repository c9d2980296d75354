"""The ``slurmrest`` backend: Slurm jobs through a REST API, files over SSH.

  :mod:`.settings`  the site's ``slurmrest:`` section;
  :mod:`.auth`      slurmrestd's JWT headers (renewed before expiry), Kerberos SPNEGO;
  :mod:`.client`    JSON over HTTP(S) in a worker thread, one retry policy;
  :mod:`.dialects`  the two APIs (slurmrestd, FRCE) as pure builders and parsers;
  :mod:`.backend`   the run's steps: the ``slurm`` backend's, but submit, ask and cancel
                    over HTTP.
"""
