"""The local run journal: one SQLite row per run, so any process can pick a run up again.

The journal lives at ``<state dir>/journal.sqlite`` (WAL mode, so ``list`` and
``status`` read while runs write). Each step of a run is recorded *before* the
next one starts:

    phase:  planned -> created -> staged -> launched -> finished -> fetched -> cleaned
    state:  running | interrupted | succeeded | failed | cancelled | timed_out

``phase`` is the last step known to be done; ``state`` says whether the run is
still going (``running``: some process drives it, or did until it died),
``interrupted`` (the link was lost longer than the retry budget; ``resume``
continues it) or ended. The full request is stored too, so ``resume`` needs
nothing but the run id. Nothing secret goes in: keys are recorded as file paths.

Writing: one thread per :class:`Journal` writes, in the order the writes were
asked for. The synchronous methods (the CLI's) hand their write to it and wait;
an event loop that drives runs (the engine, the holder) uses the async ones
instead, so that SQLite's waits (a busy database, an fsync on a slow disk) never
stall the SSH traffic of the other runs on the loop:

    await journal.aupdate(run_id, phase="staged")   # waits for the write, not the loop
    await journal.aevent(run_id, "staged", "3 files")
    journal.event_soon(run_id, "progress", "...")   # queued; the loop goes on at once
    journal.close()                                  # waits for what is queued
                                                     # (await journal.aclose() on a loop)

Reads run in the calling thread, under the same lock as the writer's statements
(one SQLite connection, never used by two threads at once); a read after
:meth:`Journal.event_soon` sees the event only once it is written
(:meth:`Journal.flush` / :meth:`Journal.aflush` wait for that).

Which process drives a run is decided by an exclusive lock on
``<state dir>/runs/<id>.lock``, not by the journal, so a driver that died
(SIGKILL, reboot) never blocks a ``resume``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote_exec.backoff import JOURNAL_BUSY, JOURNAL_BUSY_TRIES
from remote_exec.errors import ConfigError
from remote_exec.paths import state_dir, state_dir_error

PHASES = ("planned", "created", "staged", "launched", "finished", "fetched", "cleaned")
ACTIVE_STATES = ("running", "interrupted")
#: the event kind of :meth:`Journal.mark_destroyed`
DESTROYED = "destroyed"
END_STATES = ("succeeded", "failed", "cancelled", "timed_out")

#: columns added after the first release (name, type), for older journals
_ADDED_COLUMNS = (("job_info", "TEXT"),)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          TEXT PRIMARY KEY,
    site        TEXT NOT NULL,
    host        TEXT NOT NULL,
    label       TEXT NOT NULL,
    backend     TEXT NOT NULL,
    rundir      TEXT,
    job_id      TEXT,
    into_dir    TEXT NOT NULL,
    phase       TEXT NOT NULL,
    state       TEXT NOT NULL,
    exit_code   INTEGER,
    error       TEXT,
    driver_pid  INTEGER,
    request     TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    launched_at REAL,
    ended_at    REAL,
    job_info    TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at);
CREATE TABLE IF NOT EXISTS events (
    run_id  TEXT NOT NULL,
    at      REAL NOT NULL,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, at);
"""


@dataclass
class RunRecord:
    """One row of the journal."""

    id: str
    site: str
    host: str
    label: str
    backend: str
    rundir: str | None
    job_id: str | None
    into_dir: str
    phase: str
    state: str
    exit_code: int | None
    error: str | None
    driver_pid: int | None
    request: str
    created_at: float
    updated_at: float
    launched_at: float | None
    ended_at: float | None
    job_info: str | None = None  # a batch job: the scheduler's last word (JSON)

    def reached(self, phase: str) -> bool:
        """Whether ``phase`` is done."""
        return PHASES.index(self.phase) >= PHASES.index(phase)

    @property
    def ended(self) -> bool:
        return self.state in END_STATES

    @property
    def awaits_fetch(self) -> bool:
        """Whether the entrypoint finished but its results were never placed locally:
        the remote run directory is their only copy, and ``resume`` fetches them."""
        return self.reached("finished") and not self.reached("fetched")

    def request_data(self) -> dict[str, Any]:
        return dict(json.loads(self.request))

    def job_data(self) -> dict[str, Any] | None:
        """A batch job's last known state (see ``backends.scheduler.JobInfo``), if any."""
        return dict(json.loads(self.job_info)) if self.job_info else None


def journal_path() -> Path:
    return state_dir() / "journal.sqlite"


def lock_path(run_id: str) -> Path:
    return state_dir() / "runs" / f"{run_id}.lock"


_log = logging.getLogger(__name__)


class Journal:
    """The journal of this user's state directory (one connection per instance, and
    one writer thread, started on the first write)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or journal_path()
        #: held by whoever uses ``db``: the writer thread or a reading caller
        self._lock = threading.RLock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer",
                                          initializer=self._writer_started)
        self._writer_ident: int | None = None
        try:
            self._open()
        except (OSError, sqlite3.OperationalError) as exc:
            raise state_dir_error(self.path.parent, exc) from None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                  check_same_thread=False)  # (the writer thread writes)
        self.db.row_factory = sqlite3.Row
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self._use_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._migrate()

    def _use_wal(self) -> None:
        """Switch a new journal to WAL. Only when it is not WAL yet: asking for it needs an
        exclusive lock, which SQLite refuses at once (no busy wait) while another process
        reads, so a journal that already is WAL is never asked again."""
        for attempt, delay in enumerate(JOURNAL_BUSY.delays()):
            if str(self.db.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt >= JOURNAL_BUSY_TRIES:
                    raise
            time.sleep(delay)

    def _migrate(self) -> None:
        """Add the columns a journal written by an older version lacks."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        for column, kind in _ADDED_COLUMNS:
            if column not in have:
                with contextlib.suppress(sqlite3.OperationalError):  # a racing process did
                    self.db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

    @classmethod
    async def aopen(cls, path: Path | None = None) -> Journal:
        """A journal opened in a thread (opening may wait on a busy database, and a new
        one creates its schema): for an event loop."""
        return await asyncio.to_thread(cls, path)

    def close(self) -> None:
        """Wait for the queued writes, then close the database."""
        self._writer.shutdown(wait=True)
        with self._lock:
            self.db.close()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    # -- the writer thread ----------------------------------------------------------------
    def _writer_started(self) -> None:
        self._writer_ident = threading.get_ident()

    def _locked(self, write: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            return write(*args)

    def _submit(self, write: Callable[..., Any], *args: Any) -> Future[Any]:
        """Queue ``write(*args)`` for the writer thread (in order, after what is queued)."""
        return self._writer.submit(self._locked, write, *args)

    def _write(self, write: Callable[..., Any], *args: Any) -> Any:
        """Do ``write(*args)`` on the writer thread and wait for it (in this thread if it
        is the writer: a write that writes more)."""
        if threading.get_ident() == self._writer_ident:
            return self._locked(write, *args)
        return self._submit(write, *args).result()

    async def _awrite(self, write: Callable[..., Any], *args: Any) -> Any:
        # shielded: once asked for, a write happens even if the awaiting task is cancelled
        return await asyncio.shield(asyncio.wrap_future(self._submit(write, *args)))

    def flush(self) -> None:
        """Wait until every write asked for so far is done."""
        self._write(lambda: None)

    async def aflush(self) -> None:
        """:meth:`flush` without blocking the event loop."""
        await self._awrite(lambda: None)

    # -- writing --------------------------------------------------------------------------
    def create(self, *, run_id: str, site: str, host: str, label: str, backend: str,
               into_dir: str, request: dict[str, Any], driver_pid: int) -> None:
        self._write(self._create, run_id, site, host, label, backend, into_dir, request,
                    driver_pid, time.time())

    def _create(self, run_id: str, site: str, host: str, label: str, backend: str,
                into_dir: str, request: dict[str, Any], driver_pid: int, now: float) -> None:
        self.db.execute(
            "INSERT INTO runs (id, site, host, label, backend, into_dir, phase, state, "
            "driver_pid, request, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'planned', 'running', ?, ?, ?, ?)",
            (run_id, site, host, label, backend, into_dir, driver_pid,
             json.dumps(request), now, now),
        )

    def update(self, run_id: str, **fields: Any) -> None:
        """Set ``fields`` (columns of ``runs``) and ``updated_at``."""
        self._write(self._update, run_id, _stamped(fields))

    async def aupdate(self, run_id: str, **fields: Any) -> None:
        """:meth:`update` on the writer thread, awaited: the event loop goes on meanwhile.
        The times it records (``updated_at``, ...) are those of the call."""
        await self._awrite(self._update, run_id, _stamped(fields))

    def _update(self, run_id: str, fields: dict[str, Any]) -> None:
        columns = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE runs SET {columns} WHERE id = ?",  # noqa: S608 - names checked
                        (*fields.values(), run_id))

    def event(self, run_id: str, kind: str, message: str) -> None:
        self._write(self._event, run_id, time.time(), kind, message)

    async def aevent(self, run_id: str, kind: str, message: str) -> None:
        """:meth:`event` on the writer thread, awaited (recorded at the time of the call)."""
        await self._awrite(self._event, run_id, time.time(), kind, message)

    def event_soon(self, run_id: str, kind: str, message: str) -> None:
        """Queue :meth:`event` and return at once (from a loop or any thread). It is
        written after every write asked for before, at the time of this call; a
        failure to write it is logged, not raised. :meth:`close` waits for it."""
        future = self._submit(self._event, run_id, time.time(), kind, message)
        future.add_done_callback(_log_failure)

    def _event(self, run_id: str, at: float, kind: str, message: str) -> None:
        self.db.execute("INSERT INTO events (run_id, at, kind, message) VALUES (?, ?, ?, ?)",
                        (run_id, at, kind, message))

    def mark_destroyed(self, run_id: str, message: str) -> None:
        """Record that the run's remote directory, results unfetched, was removed on
        purpose (``cleanup --force``): nothing is left for ``resume`` to fetch."""
        self.update(run_id, state="failed", error=message)
        self.event(run_id, DESTROYED, message)

    def destroyed(self, run_id: str) -> str | None:
        """Why the run's unfetched results are gone (see :meth:`mark_destroyed`), or None."""
        with self._lock:
            row = self.db.execute("SELECT message FROM events WHERE run_id = ? AND kind = ? "
                                  "ORDER BY at DESC LIMIT 1", (run_id, DESTROYED)).fetchone()
        return str(row["message"]) if row else None

    # -- reading --------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return RunRecord(**dict(row)) if row else None

    def find(self, prefix: str) -> RunRecord:
        """The run whose id is ``prefix`` or starts with it (unique), else a ConfigError."""
        prefix = prefix.strip()
        if len(prefix) < 4:
            raise ConfigError(f"run id {prefix!r} is too short",
                              hint="give at least 4 characters of the id (see `remote-exec list`)")
        with self._lock:
            rows = self.db.execute(
                "SELECT * FROM runs WHERE id >= ? AND id < ? ORDER BY created_at DESC LIMIT 3",
                (prefix, prefix + "\uffff"),
            ).fetchall()
        if not rows:
            raise ConfigError(f"no run {prefix!r} in the journal {self.path}",
                              hint="`remote-exec list` shows the recorded runs")
        if len(rows) > 1 and rows[0]["id"] != prefix:
            raise ConfigError(f"run id {prefix!r} is ambiguous",
                              hint="give more characters of the id")
        return RunRecord(**dict(rows[0]))

    def runs(self, *, site: str | None = None, limit: int | None = 20,
             states: tuple[str, ...] | None = None) -> list[RunRecord]:
        sql = "SELECT * FROM runs"
        where: list[str] = []
        args: list[Any] = []
        if site:
            where.append("site = ?")
            args.append(site)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(states)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self.db.execute(sql, args).fetchall()
        return [RunRecord(**dict(r)) for r in rows]

    def events(self, run_id: str) -> list[tuple[float, str, str]]:
        with self._lock:
            rows = self.db.execute("SELECT at, kind, message FROM events WHERE run_id = ? "
                                   "ORDER BY at, rowid", (run_id,)).fetchall()
        return [(r["at"], r["kind"], r["message"]) for r in rows]


def _stamped(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` for :meth:`Journal.update`, checked, with the times they imply (now)."""
    unknown = set(fields) - set(RunRecord.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown journal columns: {sorted(unknown)}")
    now = time.time()
    if fields.get("phase") == "launched":
        fields.setdefault("launched_at", now)
    if fields.get("state") in END_STATES:
        fields.setdefault("ended_at", now)
    fields["updated_at"] = now
    return fields


def _log_failure(future: Future[Any]) -> None:
    """Log the failure of a write nobody waits for (:meth:`Journal.event_soon`)."""
    if not future.cancelled() and future.exception() is not None:
        _log.warning("a journal event was not recorded: %s", future.exception())


class RunLock:
    """The exclusive right to drive one run (an ``flock`` on ``runs/<id>.lock``)."""

    def __init__(self, run_id: str) -> None:
        self.path = lock_path(run_id)
        self._file: Any = None

    def acquire(self) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file = handle
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def held_elsewhere(self) -> bool:
        """Whether another process drives the run right now."""
        if self._file is not None:
            return False
        if self.acquire():
            self.release()
            return False
        return True


@contextlib.contextmanager
def opened(path: Path | None = None) -> Iterator[Journal]:
    journal = Journal(path)
    try:
        yield journal
    finally:
        journal.close()
