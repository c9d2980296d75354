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
"""

from __future__ import annotations

from remote_exec.backends.direct import DirectBackend, Launched

BACKENDS = {"direct": DirectBackend}

__all__ = ["BACKENDS", "DirectBackend", "Launched"]
