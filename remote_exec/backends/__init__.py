"""Where and how the entrypoint runs. One module per backend.

A backend is a small protocol over a staged run directory (see
:class:`remote_exec.backends.direct.DirectBackend`, the reference):

  ``launch(conn, sftp, rundir)``  start the entrypoint at most once, detached from
                            the SSH session; returns a :class:`Launched` (job id, and
                            an optional way to wait while the channel lasts);
  ``poll(sftp, rundir, job_id)``  the exit code if the entrypoint ended, else None;
                            raises RemoteLostError if it vanished without one;
  ``cancel(conn, rundir, grace, job_id)``  stop it (TERM, then KILL after ``grace`` s,
                            or the scheduler's cancel command).

Staging, fetching and cleaning are the same for every backend that shares the
file system with the SSH host, and live in :mod:`remote_exec.engine`.

  ``direct``   a detached process group on the SSH host (:mod:`.direct`);
  ``slurm``, ``pbs``, ``torque``, ``pjm``  a batch job of the site's scheduler
               (:mod:`.batch`, the job's life in :mod:`.scheduler`, one module per
               scheduler for its commands and output formats);
  ``fujitsu``  the Fujitsu Cloud Service HPC WebAPI: files through its object storage,
               the job through its REST calls (:mod:`.fujitsu`);
  ``agent``    a restricted site: every step, files included, is a request to the
               agent the site installed (:mod:`.agent`).
"""

from __future__ import annotations

from typing import Any

#: the batch schedulers (each a module here with its commands and formats)
SCHEDULER_NAMES = ("slurm", "pbs", "torque", "pjm")


def make_backend(name: str, *, run_id: str = "",
                 resources: dict[str, Any] | None = None, site: Any = None) -> Any:
    """The backend ``name`` for one run (``resources``: a batch job's, validated).

    Imports happen here, so that loading the configuration (which validates backend
    names and resources) does not import the SSH engine.
    """
    if name == "fujitsu":
        from remote_exec.backends.fujitsu.client import FujitsuBackend

        return FujitsuBackend(site, run_id)
    if name == "direct":
        from remote_exec.backends.direct import DirectBackend

        return DirectBackend()
    if name == "agent":
        from remote_exec.backends.agent import AgentBackend

        return AgentBackend()
    if name in SCHEDULER_NAMES:
        from remote_exec.backends.scheduler import Resources
        from remote_exec.backends.batch import BatchBackend, scheduler_named

        return BatchBackend(scheduler_named(name), Resources(**(resources or {})), run_id)
    raise ValueError(f"unknown backend {name!r}")


__all__ = ["SCHEDULER_NAMES", "make_backend"]
