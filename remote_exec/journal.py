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

Which process drives a run is decided by an exclusive lock on
``<state dir>/runs/<id>.lock``, not by the journal, so a driver that died
(SIGKILL, reboot) never blocks a ``resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class Journal:
    """The journal of this user's state directory (one connection per instance)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or journal_path()
        try:
            self._open()
        except (OSError, sqlite3.OperationalError) as exc:
            raise state_dir_error(self.path.parent, exc) from None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns a journal written by an older version lacks."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        for column, kind in _ADDED_COLUMNS:
            if column not in have:
                with contextlib.suppress(sqlite3.OperationalError):  # a racing process did
                    self.db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    # -- writing --------------------------------------------------------------------------
    def create(self, *, run_id: str, site: str, host: str, label: str, backend: str,
               into_dir: str, request: dict[str, Any], driver_pid: int) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO runs (id, site, host, label, backend, into_dir, phase, state, "
            "driver_pid, request, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'planned', 'running', ?, ?, ?, ?)",
            (run_id, site, host, label, backend, into_dir, driver_pid,
             json.dumps(request), now, now),
        )

    def update(self, run_id: str, **fields: Any) -> None:
        """Set ``fields`` (columns of ``runs``) and ``updated_at``."""
        unknown = set(fields) - set(RunRecord.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown journal columns: {sorted(unknown)}")
        if fields.get("phase") == "launched":
            fields.setdefault("launched_at", time.time())
        if fields.get("state") in END_STATES:
            fields.setdefault("ended_at", time.time())
        fields["updated_at"] = time.time()
        columns = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE runs SET {columns} WHERE id = ?",  # noqa: S608 - names checked
                        (*fields.values(), run_id))

    def event(self, run_id: str, kind: str, message: str) -> None:
        self.db.execute("INSERT INTO events (run_id, at, kind, message) VALUES (?, ?, ?, ?)",
                        (run_id, time.time(), kind, message))

    def mark_destroyed(self, run_id: str, message: str) -> None:
        """Record that the run's remote directory, results unfetched, was removed on
        purpose (``cleanup --force``): nothing is left for ``resume`` to fetch."""
        self.update(run_id, state="failed", error=message)
        self.event(run_id, DESTROYED, message)

    def destroyed(self, run_id: str) -> str | None:
        """Why the run's unfetched results are gone (see :meth:`mark_destroyed`), or None."""
        row = self.db.execute("SELECT message FROM events WHERE run_id = ? AND kind = ? "
                              "ORDER BY at DESC LIMIT 1", (run_id, DESTROYED)).fetchone()
        return str(row["message"]) if row else None

    # -- reading --------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord | None:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return RunRecord(**dict(row)) if row else None

    def find(self, prefix: str) -> RunRecord:
        """The run whose id is ``prefix`` or starts with it (unique), else a ConfigError."""
        prefix = prefix.strip()
        if len(prefix) < 4:
            raise ConfigError(f"run id {prefix!r} is too short",
                              hint="give at least 4 characters of the id (see `remote-exec list`)")
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
        return [RunRecord(**dict(r)) for r in self.db.execute(sql, args).fetchall()]

    def events(self, run_id: str) -> list[tuple[float, str, str]]:
        return [(r["at"], r["kind"], r["message"]) for r in self.db.execute(
            "SELECT at, kind, message FROM events WHERE run_id = ? ORDER BY at, rowid",
            (run_id,))]


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
