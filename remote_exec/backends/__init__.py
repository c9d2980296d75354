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
               (:mod:`.scheduled`, the job's life in :mod:`.batch`, one module per
               scheduler for its commands and output formats);
  ``agent``    a restricted site: every step, files included, is a request to the
               agent the site installed (:mod:`.agent`).
"""

from __future__ import annotations

from typing import Any

from remote_exec.backends.agent import AgentBackend
from remote_exec.backends.direct import DirectBackend, Launched
from remote_exec.backends.scheduled import SCHEDULERS, BatchBackend, scheduler_named

#: what a user may choose per site (``backend:``) or per run (``--backend``)
CHOOSABLE = ("direct", *SCHEDULERS)


def make_backend(name: str, *, run_id: str = "",
                 resources: dict[str, Any] | None = None) -> Any:
    """The backend ``name`` for one run (``resources``: a batch job's, validated)."""
    if name == "direct":
        return DirectBackend()
    if name == "agent":
        return AgentBackend()
    if name in SCHEDULERS:
        from remote_exec.backends.batch import Resources

        return BatchBackend(scheduler_named(name), Resources(**(resources or {})), run_id)
    raise ValueError(f"unknown backend {name!r}")


__all__ = ["CHOOSABLE", "AgentBackend", "BatchBackend", "DirectBackend", "Launched",
           "make_backend"]
