"""Where and how the entrypoint runs. One module per backend.

A backend is a small protocol over a staged run directory (see
:class:`remote_exec.backends.direct.DirectBackend`, the reference):

  ``launch(conn, rundir)``  start the entrypoint at most once, detached from the
                            SSH session; returns a :class:`Launched` (job id, and
                            an optional way to wait while the channel lasts);
  ``poll(sftp, rundir)``    the exit code if the entrypoint ended, else None;
                            raises RemoteLostError if it vanished without one;
  ``cancel(conn, rundir, grace)``  stop it: TERM, then KILL after ``grace`` s.

Staging, fetching and cleaning are the same for every backend that shares the
file system with the SSH host, and live in :mod:`remote_exec.engine`. Batch
schedulers and the Fujitsu WebAPI follow the same shape.

The ``agent`` backend (:mod:`remote_exec.backends.agent`) is a restricted site:
there every step, files included, is a request to the agent the site installed.
"""

from __future__ import annotations

from remote_exec.backends.agent import AgentBackend
from remote_exec.backends.direct import DirectBackend, Launched

BACKENDS = {"direct": DirectBackend, "agent": AgentBackend}

__all__ = ["BACKENDS", "AgentBackend", "DirectBackend", "Launched"]
