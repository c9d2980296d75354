"""The connection holder: one per-user process that keeps SSH connections warm.

A run is a fresh process (MInt starts one per module run), and importing asyncssh
costs about as much as a whole SSH handshake. So ``remote-exec run`` does the local
checks itself and hands the run to a holder process over a Unix socket in the state
directory (mode 0600 in a 0700 directory, peer uid checked). The holder executes the
same :func:`remote_exec.engine.execute_async` on a pooled connection and streams the
events back; the client prints them and exits with the run's code. Like OpenSSH's
ControlPersist, the holder exits after ``$REMOTE_EXEC_HOLDER_IDLE`` seconds without
runs (default 120). ``REMOTE_EXEC_HOLDER=0`` or ``run --no-holder`` runs in-process.

The package is in three parts, which import each other in one direction only:

  :mod:`.wire`    the messages and their framing (imports the run's data and errors only);
  :mod:`.client`  what ``remote-exec run``, ``holder status`` and ``holder stop`` do
                  (standard library and :mod:`.wire`: never asyncssh);
  :mod:`.server`  the holder process (``python -m remote_exec.holder``): the pool of
                  warm connections, admission per host, the engine driving each run.

This module re-exports the client's names only, so importing it stays cheap.
"""

from __future__ import annotations

from remote_exec.holder.client import (
    CALLER_ENV,
    CANCEL_SIGNALS,
    Interrupted,
    caller_env,
    code_fingerprint,
    enabled,
    idle_timeout,
    run_via_holder,
    socket_path,
    status,
    stop,
)

__all__ = ["CALLER_ENV", "CANCEL_SIGNALS", "Interrupted", "caller_env", "code_fingerprint",
           "enabled", "idle_timeout", "run_via_holder", "socket_path", "status", "stop"]
