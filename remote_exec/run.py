"""How a run is carried out (what is asked and what happened: :mod:`remote_exec.request`).

    planned -> created -> staged -> launched -> finished(exit code) -> fetched -> cleaned
                                  ↘ cancelled / timed_out / failed(reason) / interrupted

The steps live in :mod:`remote_exec.engine`, the record of each run in
:mod:`remote_exec.journal`. :func:`execute` hands the request to the per-user
connection holder (:mod:`remote_exec.holder`: warm connections, no asyncssh import
in this process) or, when that is disabled or unavailable, runs the engine in this
process. Either way SIGINT, SIGTERM and SIGHUP cancel the run remotely (TERM, then
KILL after the site's grace period) and the process exits 128 + the signal number;
a second signal exits at once. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from remote_exec.errors import EXIT_SIGNAL_BASE
from remote_exec.holder.client import CANCEL_SIGNALS, Interrupted  # noqa: F401 - re-exported
from remote_exec.inputs import LOG_NAME
from remote_exec.request import RunRequest, RunResult, request_from_wire
from remote_exec.ui import Reporter

# -- carrying it out ----------------------------------------------------------------------------

def execute(request: RunRequest, ui: Reporter, *, use_holder: bool = True,
            resume: bool = False) -> RunResult:
    """Run (or resume) ``request`` to the end, through the holder when possible."""
    from remote_exec import backends
    from remote_exec.holder import client as holder

    if use_holder and holder.enabled() and backends.get(request.backend).over_ssh:
        # (a run that does not travel over SSH has no connection to keep warm, and may
        # need this process's environment, e.g. a WebAPI's credentials)
        result = holder.run_via_holder(request, ui, resume=resume)
        if result is not None:
            return result
        ui.warn("the connection holder did not start; running in this process")
    return _execute_here(request, ui, resume)


def _execute_here(request: RunRequest, ui: Reporter, resume: bool) -> RunResult:
    import asyncio

    from remote_exec.engine import RunControl, execute_async

    control = RunControl()

    def on_signal(signum: int) -> None:
        if control.reason is not None:  # the second one: leave at once
            os._exit(EXIT_SIGNAL_BASE + signum)
        ui.warn(f"{signal.Signals(signum).name} received: cancelling the run "
                "(send it again to exit at once)")
        control.cancel(signal.Signals(signum).name, EXIT_SIGNAL_BASE + signum)

    async def main() -> RunResult:
        loop = asyncio.get_running_loop()
        for signum in CANCEL_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await execute_async(request, ui, resume=resume, control=control)
        finally:
            for signum in CANCEL_SIGNALS:
                loop.remove_signal_handler(signum)

    return asyncio.run(main())


def resume_request(run_id: str) -> RunRequest:
    """The stored request of journal run ``run_id`` (a unique prefix will do)."""
    from remote_exec.journal import opened

    with opened() as journal:
        record = journal.find(run_id)
    return request_from_wire(record.request_data())


def read_log_tail(into: Path, lines: int = 40) -> str:
    """The end of the fetched ``remote_program_exec.log`` (empty if absent)."""
    path = into / LOG_NAME
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
