"""What a run tells the person (or MInt) watching it: messages, progress, log lines.

Human-readable lines on stderr by default; ``--json`` turns them into one JSON
object per line for machines; progress bars only when stderr is a terminal.
rich is imported only when a progress bar is actually shown.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


class Reporter:
    """Sink for run events. ``quiet`` keeps only errors; ``as_json`` emits JSON lines."""

    def __init__(self, *, quiet: bool = False, as_json: bool = False,
                 progress: bool | None = None) -> None:
        self.quiet = quiet
        self.as_json = as_json
        self.show_progress = (sys.stderr.isatty() and not as_json and not quiet
                              if progress is None else progress)
        self._bar: Any = None
        self._task: Any = None
        self._started = time.monotonic()

    def event(self, kind: str, message: str, **fields: Any) -> None:
        """One step of the run (``kind`` is a short machine name, e.g. ``staged``)."""
        if self.as_json:
            record = {"event": kind, "message": message,
                      "elapsed": round(time.monotonic() - self._started, 3), **fields}
            sys.stderr.write(json.dumps(record, default=str) + "\n")
            sys.stderr.flush()
        elif not self.quiet:
            sys.stderr.write(f"remote-exec: {message}\n")
            sys.stderr.flush()

    def warn(self, message: str) -> None:
        if self.as_json:
            self.event("warning", message)
        else:
            sys.stderr.write(f"remote-exec: warning: {message}\n")
            sys.stderr.flush()

    def log_text(self, data: str) -> None:
        """Live output of the remote entrypoint (``--follow``)."""
        sys.stdout.write(data)
        sys.stdout.flush()

    async def drain(self) -> None:
        """Wait until what was reported has left (a reader that lags slows the writer)."""

    # -- transfer progress -------------------------------------------------------------
    def progress_start(self, label: str, total: int) -> None:
        if not self.show_progress:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(label, total=max(total, 1))
        self._done: dict[str, int] = {}

    def progress_update(self, name: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        self._done[name] = done
        self._bar.update(self._task, completed=sum(self._done.values()))

    def progress_stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    @property
    def progress_fn(self) -> Any:
        return self.progress_update if self.show_progress else None
