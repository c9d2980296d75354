"""A run: what is asked (:class:`RunRequest`), what happened (:class:`RunResult`), and
how it is carried out.

    planned -> staged -> launched -> finished(exit code) -> fetched -> cleaned
                                ↘ failed(reason)

The steps live in :mod:`remote_exec.engine`. :func:`execute` hands the request to the
per-user connection holder (:mod:`remote_exec.holder`, warm connections, no asyncssh
import in this process) or, when that is disabled or unavailable, runs the engine in
this process. This module imports nothing heavy.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from remote_exec.config import Site
from remote_exec.entrypoint import Entrypoint
from remote_exec.inputs import LOG_NAME, Input
from remote_exec.ui import Reporter


@dataclass
class RunRequest:
    """Everything decided before the first packet."""

    site: Site
    inputs: list[Input]
    entrypoint: Entrypoint
    into: Path
    keep: bool = False
    follow: bool = False
    backend: str = "direct"
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class RunResult:
    """What happened. ``exit_code`` is the entrypoint's own."""

    run_id: str
    rundir: str
    exit_code: int
    fetched: list[str]
    remote_kept: bool
    stage_method: str = ""
    fetch_method: str = ""
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def execute(request: RunRequest, ui: Reporter, *, use_holder: bool = True) -> RunResult:
    """Run ``request`` to the end (blocking), through the holder when possible."""
    from remote_exec import holder

    if use_holder and holder.enabled():
        result = holder.run_via_holder(request, ui)
        if result is not None:
            return result
        ui.warn("the connection holder did not start; running in this process")
    import asyncio

    from remote_exec.engine import execute_async

    return asyncio.run(execute_async(request, ui))


def read_log_tail(into: Path, lines: int = 40) -> str:
    """The end of the fetched ``remote_program_exec.log`` (empty if absent)."""
    path = into / LOG_NAME
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
