"""The queue server's state: one SQLite database (WAL) and a spool directory.

::

    <state_dir>/queue.sqlite       runs, uploaded files, events, tokens, pollers
    <state_dir>/spool/<run id>/in/<key>    the run's inputs   (key: sha256 of the path,
    <state_dir>/spool/<run id>/out/<key>   its outputs         so any path is one file name)
    <state_dir>/spool/<run id>/log         the log the poller streamed
    <state_dir>/tmp/                       uploads in progress (renamed into place)

SQLite and the spool are the whole truth: the server keeps nothing else that a restart
could lose. Every change is made in one ``BEGIN IMMEDIATE`` transaction, so two pollers
can never take the same run, and every change of a run increments its ``version``.
After each commit the store calls ``listener(run_id, site)`` for each run it changed
(the server wakes the long-polls waiting on it). The state machine is
docs/pull-protocol.md's "Run states"; its timed moves (lease expiry, queue_timeout,
stalled) are applied lazily on every call touching a run (:meth:`Store.settle`) and by
the server's sweep (:meth:`Store.sweep`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from remote_exec.queue.errors import ApiError, bad_request, not_found, state_error
from remote_exec.queue.paths import path_problem
from remote_exec.queue.tokens import looks_like_token, new_token, token_hash

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, role TEXT NOT NULL, sites TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL, revoked_at REAL, last_used_at REAL, note TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, site TEXT NOT NULL, entrypoint TEXT NOT NULL, request TEXT NOT NULL,
    state TEXT NOT NULL, version INTEGER NOT NULL, attempt INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, submitted_at REAL, queued_at REAL,
    ended_at REAL, queue_timeout REAL NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, stalled INTEGER NOT NULL DEFAULT 0,
    launched INTEGER NOT NULL DEFAULT 0,
    poller_id TEXT, poller_host TEXT, lease_id TEXT, lease_expires_at REAL, last_heartbeat REAL,
    pid INTEGER, outcome TEXT, exit_code INTEGER, signal INTEGER, reason TEXT, message TEXT,
    outputs TEXT NOT NULL DEFAULT '[]', held_back TEXT NOT NULL DEFAULT '[]', finish TEXT,
    log_size INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS runs_by_site ON runs (site, state, queued_at);
CREATE TABLE IF NOT EXISTS files (
    run_id TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, PRIMARY KEY (run_id, kind, path));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, at REAL NOT NULL,
    state TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, seq);
CREATE TABLE IF NOT EXISTS pollers (
    site TEXT NOT NULL, id TEXT NOT NULL, host TEXT, version TEXT, entrypoints TEXT,
    last_seen REAL NOT NULL, PRIMARY KEY (site, id));
"""

TERMINAL = ("finished", "expired", "cancelled")
#: the states a claimed run moves through, in order (a poller's events only move forward)
ORDER = ["claimed", "staging", "staged", "launching", "running", "uploading"]
PRE_LAUNCH = ("claimed", "staging", "staged")
LAUNCHED = ("launching", "running", "uploading")
MAX_ATTEMPTS = 3
CANCEL_GRACE = 10
EVENTS_SHOWN = 50
LOG_CHUNK_MAX = 1024 * 1024
LOG_READ_MAX = 4 * 1024 * 1024
#: the largest JSON body read (a run with thousands of inputs stays well below)
JSON_MAX = 16 * 1024 * 1024
#: the poller id prefix of the runs handed out to MInt's original poller (compat_v0)
COMPAT_POLLER = "mi-system-remote"
#: the ``finish`` column of a run that MInt's original poller ended (end-send)
COMPAT_FINISH = '{"compat_v0":"end send"}'


def rfc3339(t: float | None) -> str | None:
    """``t`` (epoch seconds) as an RFC 3339 UTC string, seconds precision."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


@dataclass
class Principal:
    """Who calls: the token's hash, role and sites (one for a site token; for a submit
    token the sites it may use, empty for all)."""

    hash: str
    role: str
    sites: list[str]

    @property
    def site(self) -> str:
        return self.sites[0]

    def may_use(self, site: str) -> bool:
        return not self.sites or site in self.sites


@dataclass
class Upload:
    """Where an accepted upload goes, or that the same content is already there."""

    run_id: str
    kind: str  # "in" or "out"
    path: str
    size: int
    sha256: str
    final: Path
    already: bool


class Store:
    """The database and spool of ``state_dir``; used by the server and the admin commands."""

    def __init__(self, state_dir: Path, *, lease_ttl: float = 90, lost_after: float = 600,
                 max_file_size: int = 8 * 1024 ** 3, max_run_bytes: int = 32 * 1024 ** 3) -> None:
        self.dir = Path(state_dir)
        self.spool = self.dir / "spool"
        self.tmp = self.dir / "tmp"
        for directory in (self.dir, self.spool, self.tmp):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lease_ttl = lease_ttl
        self.lost_after = lost_after
        self.max_file_size = max_file_size
        self.max_run_bytes = max_run_bytes
        self.listener: Callable[[str, str], None] | None = None
        self._changed: dict[str, str] = {}
        self._now = 0.0
        self.db = sqlite3.connect(str(self.dir / "queue.sqlite"), isolation_level=None,
                                  check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA_SQL)

    def close(self) -> None:
        self.db.close()

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def tx(self) -> Iterator[float]:
        """One ``BEGIN IMMEDIATE`` transaction; yields its time (epoch seconds). Listeners
        hear of the changed runs after the commit."""
        self._changed = {}
        self._now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self._now
        except BaseException:
            self.db.execute("ROLLBACK")
            self._changed = {}
            raise
        self.db.execute("COMMIT")
        changed, self._changed = self._changed, {}
        if self.listener:
            for run_id, site in changed.items():
                self.listener(run_id, site)

    def _update(self, run: sqlite3.Row, bump: bool = True, **changes: Any) -> sqlite3.Row:
        """Change columns of ``run`` (and its version unless ``bump`` is False)."""
        if bump:
            changes["version"] = run["version"] + 1
            changes["updated_at"] = self._now
            self._changed[run["id"]] = run["site"]
        if changes:
            columns = ", ".join(f"{name} = ?" for name in changes)
            self.db.execute(f"UPDATE runs SET {columns} WHERE id = ?",  # noqa: S608
                            [*changes.values(), run["id"]])
        return self._row(run["id"])

    def _event(self, run_id: str, state: str, message: str) -> None:
        self.db.execute("INSERT INTO events (run_id, at, state, message) VALUES (?, ?, ?, ?)",
                        (run_id, self._now, state, message))

    def _row(self, run_id: str) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()

    # -- paths --------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.spool / run_id

    def file_path(self, run_id: str, kind: str, path: str) -> Path:
        key = hashlib.sha256(path.encode("utf-8")).hexdigest()
        return self.spool / run_id / kind / key

    def log_path(self, run_id: str) -> Path:
        return self.spool / run_id / "log"

    def temp_file(self) -> Path:
        return self.tmp / f"{uuid.uuid4().hex}.part"

    # -- tokens -------------------------------------------------------------------------

    def add_token(self, role: str, sites: list[str], expires_at: float | None,
                  note: str | None) -> str:
        token = new_token()
        with self.tx() as now:
            self.db.execute("INSERT INTO tokens (hash, role, sites, created_at, expires_at, note)"
                            " VALUES (?, ?, ?, ?, ?, ?)",
                            (token_hash(token), role, json.dumps(sites), now, expires_at, note))
        return token

    def tokens(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM tokens ORDER BY created_at").fetchall()
        return [{**dict(row), "sites": json.loads(row["sites"])} for row in rows]

    def revoke_token(self, token_id: str) -> list[str]:
        """Revoke the token whose hash starts with ``token_id``; the hashes matched."""
        with self.tx() as now:
            rows = self.db.execute("SELECT hash FROM tokens WHERE hash LIKE ? || '%'",
                                   (token_id.lower(),)).fetchall()
            if len(rows) == 1:
                self.db.execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) "
                                "WHERE hash = ?", (now, rows[0]["hash"]))
        return [row["hash"] for row in rows]

    def authenticate(self, token: str | None) -> Principal:
        """The caller of a request bearing ``token``; a 401 ApiError otherwise."""
        if not token or not looks_like_token(token):
            raise ApiError(401, "unauthenticated", "no valid bearer token: send "
                           "`Authorization: Bearer re1_...` with a token from the queue "
                           "server's administrator (remote-exec queue token add)")
        digest = token_hash(token)
        row = self.db.execute("SELECT * FROM tokens WHERE hash = ?", (digest,)).fetchone()
        now = time.time()
        if row is None:
            raise ApiError(401, "unauthenticated", "this token is unknown to the queue server:"
                           " ask its administrator for one (remote-exec queue token add)")
        if row["revoked_at"] is not None:
            raise ApiError(401, "token_revoked", f"this token (id {digest[:12]}) was revoked "
                           f"at {rfc3339(row['revoked_at'])}: ask the queue server's "
                           "administrator for a new one")
        if row["expires_at"] is not None and row["expires_at"] <= now:
            raise ApiError(401, "token_expired", f"this token (id {digest[:12]}) expired at "
                           f"{rfc3339(row['expires_at'])}: ask the queue server's administrator"
                           " for a new one (remote-exec queue token add)")
        if row["last_used_at"] is None or now - row["last_used_at"] > 10:
            with self.tx():
                self.db.execute("UPDATE tokens SET last_used_at = ? WHERE hash = ?",
                                (now, digest))
        return Principal(digest, row["role"], json.loads(row["sites"]))

    # -- timed moves --------------------------------------------------------------------

    def settle(self, run: sqlite3.Row) -> sqlite3.Row:
        """Apply the moves that time alone makes (inside a transaction)."""
        now, state = self._now, run["state"]
        if state in PRE_LAUNCH and run["lease_expires_at"] is not None \
                and run["lease_expires_at"] <= now:
            lost = f"the lease of poller {run['poller_host'] or run['poller_id']} expired"
            if run["cancel_requested"]:
                self._event(run["id"], "cancelled", f"{lost} before launching; cancelled")
                return self._update(run, state="cancelled", ended_at=now, lease_id=None,
                                    lease_expires_at=None)
            if run["attempt"] >= MAX_ATTEMPTS:
                self._event(run["id"], "finished", f"{lost} before launching, "
                            f"{MAX_ATTEMPTS} attempts made: lost")
                return self._update(run, state="finished", ended_at=now, lease_id=None,
                                    lease_expires_at=None, outcome="lost",
                                    reason="lease_expired",
                                    message=f"{lost} before launching, {MAX_ATTEMPTS} times")
            self._event(run["id"], "queued", f"{lost} before launching; queued again "
                        f"(attempt {run['attempt'] + 1})")
            return self._update(run, state="queued", attempt=run["attempt"] + 1, queued_at=now,
                                lease_id=None, lease_expires_at=None, poller_id=None,
                                poller_host=None, pid=None, last_heartbeat=None)
        if state == "queued" and run["queued_at"] + run["queue_timeout"] <= now:
            seen = self.site_last_seen(run["site"])
            when = f"a poller of site {run['site']} was last seen {rfc3339(seen)}" if seen \
                else f"no poller of site {run['site']} was ever seen"
            message = (f"no poller claimed the run within queue_timeout "
                       f"({_number(run['queue_timeout'])} s); {when}")
            self._event(run["id"], "expired", message)
            return self._update(run, state="expired", ended_at=now, message=message)
        if state in LAUNCHED and not run["stalled"] and run["last_heartbeat"] is not None \
                and run["last_heartbeat"] + self.lost_after <= now:
            who = run["poller_host"] or run["poller_id"]
            self._event(run["id"], state, f"stalled: no heartbeat from poller {who} for "
                        f"{_number(self.lost_after)} s")
            return self._update(run, stalled=1)
        return run

    def sweep(self) -> int:
        """Settle every run that time may have moved; how many moved."""
        now = time.time()
        marks = ",".join("?" * len(PRE_LAUNCH))
        lmarks = ",".join("?" * len(LAUNCHED))
        ids = [row[0] for row in self.db.execute(
            f"SELECT id FROM runs WHERE (state IN ({marks}) AND lease_expires_at <= ?) "  # noqa: S608
            f"OR (state = 'queued' AND queued_at + queue_timeout <= ?) "
            f"OR (state IN ({lmarks}) AND stalled = 0 AND last_heartbeat + ? <= ?)",
            [*PRE_LAUNCH, now, now, *LAUNCHED, self.lost_after, now]).fetchall()]
        moved = 0
        for run_id in ids:
            with self.tx():
                run = self._row(run_id)
                if run is not None and self.settle(run)["version"] != run["version"]:
                    moved += 1
        return moved

    # -- reading ------------------------------------------------------------------------

    def site_last_seen(self, site: str) -> float | None:
        return self.db.execute("SELECT MAX(last_seen) FROM pollers WHERE site = ?",
                               (site,)).fetchone()[0]

    def view(self, run: sqlite3.Row) -> dict[str, Any]:
        """The protocol's **run** object."""
        events = self.db.execute("SELECT at, state, message FROM events WHERE run_id = ? "
                                 "ORDER BY seq DESC LIMIT ?", (run["id"], EVENTS_SHOWN)).fetchall()
        poller = None
        if run["poller_id"]:
            seen = self.db.execute("SELECT last_seen FROM pollers WHERE site = ? AND id = ?",
                                   (run["site"], run["poller_id"])).fetchone()
            poller = {"id": run["poller_id"], "host": run["poller_host"],
                      "last_seen": rfc3339(seen[0]) if seen else None}
        return {
            "id": run["id"], "site": run["site"], "entrypoint": run["entrypoint"],
            "state": run["state"], "version": run["version"], "attempt": run["attempt"],
            "created_at": rfc3339(run["created_at"]), "updated_at": rfc3339(run["updated_at"]),
            "submitted_at": rfc3339(run["submitted_at"]),
            "queue_timeout": _number(run["queue_timeout"]),
            "cancel_requested": bool(run["cancel_requested"]), "stalled": bool(run["stalled"]),
            "poller": poller, "site_last_seen": rfc3339(self.site_last_seen(run["site"])),
            "lease_expires_at": None if run["state"] in TERMINAL
            else rfc3339(run["lease_expires_at"]), "pid": run["pid"],
            "outcome": run["outcome"], "exit_code": run["exit_code"], "signal": run["signal"],
            "reason": run["reason"], "message": run["message"],
            "outputs": json.loads(run["outputs"]), "held_back": json.loads(run["held_back"]),
            "log_size": run["log_size"],
            "events": [{"at": rfc3339(e["at"]), "state": e["state"], "message": e["message"]}
                       for e in reversed(events)],
        }

    def _submit_run(self, who: Principal, run_id: str) -> sqlite3.Row:
        run = self._row(run_id)
        if run is None or not who.may_use(run["site"]):
            raise not_found(f"run {run_id}")
        return self.settle(run)

    def _site_run(self, who: Principal, run_id: str) -> sqlite3.Row:
        run = self._row(run_id)
        if run is None or run["site"] != who.site:
            raise not_found(f"job {run_id}")
        return self.settle(run)

    def _missing(self, run: sqlite3.Row) -> list[str]:
        declared = json.loads(run["request"]).get("inputs", [])
        have = {(r["path"], r["size"], r["sha256"]) for r in self.db.execute(
            "SELECT path, size, sha256 FROM files WHERE run_id = ? AND kind = 'in'",
            (run["id"],))}
        return [f["path"] for f in declared if (f["path"], f["size"], f["sha256"]) not in have]

    # -- submit role --------------------------------------------------------------------

    def create_run(self, who: Principal, body: dict[str, Any], queue_timeout_default: float,
                   site_entrypoints: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        if not who.may_use(body["site"]):
            raise ApiError(403, "forbidden", f"this token may not submit to site {body['site']}"
                           f" (it may use: {', '.join(who.sites)})")
        allowed = site_entrypoints.get(body["site"])
        if allowed is not None and body["entrypoint"] not in allowed:
            raise bad_request(f"site {body['site']} does not offer entrypoint "
                              f"{body['entrypoint']!r} (the queue server lists: "
                              f"{', '.join(allowed) or 'none'})")
        seen: set[str] = set()
        total = 0
        for item in body.get("inputs", []):
            problem = path_problem(item["path"])
            if problem:
                raise bad_request(f"input {item['path']!r}: {problem}")
            if item["path"] in seen:
                raise bad_request(f"input {item['path']!r} is listed twice")
            seen.add(item["path"])
            if item["size"] > self.max_file_size:
                raise ApiError(413, "too_large", f"input {item['path']!r} is larger than the "
                               f"server's max_file_size ({self.max_file_size} bytes)")
            total += item["size"]
        if total > self.max_run_bytes:
            raise ApiError(413, "too_large", f"the inputs ({total} bytes) exceed the server's "
                           f"max_run_bytes ({self.max_run_bytes} bytes)")
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        with self.tx() as now:
            run = self._row(body["id"])
            if run is not None:
                if run["request"] != canonical or not who.may_use(run["site"]):
                    raise ApiError(409, "conflict", f"run {body['id']} exists with another "
                                   "body: use a new run id")
                return 200, {"state": run["state"], "missing": self._missing(run)}
            self.db.execute(
                "INSERT INTO runs (id, site, entrypoint, request, state, version, attempt, "
                "created_at, updated_at, queue_timeout) "
                "VALUES (?, ?, ?, ?, 'created', 1, 1, ?, ?, ?)",
                (body["id"], body["site"], body["entrypoint"], canonical, now, now,
                 float(body.get("queue_timeout", queue_timeout_default))))
            self._event(body["id"], "created", f"created for site {body['site']}, entrypoint "
                        f"{body['entrypoint']}")
            self._changed[body["id"]] = body["site"]
            return 201, {"state": "created", "missing": self._missing(self._row(body["id"]))}

    def input_upload(self, who: Principal, run_id: str, path: str, size: int,
                     sha256: str) -> Upload:
        with self.tx():
            run = self._submit_run(who, run_id)
            declared = {f["path"]: f for f in json.loads(run["request"]).get("inputs", [])}
            if path not in declared:
                raise bad_request(f"{path!r} is not one of the inputs of run {run_id}")
            if run["state"] != "created":
                raise state_error(f"run {run_id} is {run['state']}: inputs can only be "
                                  "uploaded before submit")
            want = declared[path]
            if (want["size"], want["sha256"]) != (size, sha256):
                raise bad_request(f"input {path!r} was declared with size {want['size']} and "
                                  f"sha256 {want['sha256']}, the upload says {size} and {sha256}")
            return self._upload(run, "in", path, size, sha256)

    def _upload(self, run: sqlite3.Row, kind: str, path: str, size: int, sha256: str) -> Upload:
        if size > self.max_file_size:
            raise ApiError(413, "too_large", f"{path!r} ({size} bytes) is larger than the "
                           f"server's max_file_size ({self.max_file_size} bytes)")
        row = self.db.execute("SELECT size, sha256 FROM files WHERE run_id = ? AND kind = ? "
                              "AND path = ?", (run["id"], kind, path)).fetchone()
        final = self.file_path(run["id"], kind, path)
        already = row is not None and (row["size"], row["sha256"]) == (size, sha256) \
            and final.exists()
        if kind == "out" and not already:
            used = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE run_id = ? "
                                   "AND NOT (kind = ? AND path = ?)",
                                   (run["id"], kind, path)).fetchone()[0]
            if used + size > self.max_run_bytes:
                raise ApiError(413, "too_large", f"{path!r} would bring run {run['id']} to "
                               f"{used + size} bytes, over the server's max_run_bytes "
                               f"({self.max_run_bytes} bytes)")
        return Upload(run["id"], kind, path, size, sha256, final, already)

    def commit_upload(self, who: Principal, upload: Upload, temp: Path,
                      lease: str | None = None) -> None:
        """Move a checked temporary file into place and record it, if the run still takes
        it (its state may have moved during the upload)."""
        with self.tx():
            if upload.kind == "in":
                run = self._submit_run(who, upload.run_id)
                if run["state"] != "created":
                    raise state_error(f"run {upload.run_id} is {run['state']}: inputs can only"
                                      " be uploaded before submit")
            else:
                run = self._leased(who, upload.run_id, lease)
            upload.final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, upload.final)
            self.db.execute("INSERT OR REPLACE INTO files (run_id, kind, path, size, sha256) "
                            "VALUES (?, ?, ?, ?, ?)", (upload.run_id, upload.kind, upload.path,
                                                       upload.size, upload.sha256))

    def submit(self, who: Principal, run_id: str) -> dict[str, Any]:
        with self.tx() as now:
            run = self._submit_run(who, run_id)
            if run["state"] == "created":
                missing = self._missing(run)
                if missing:
                    raise ApiError(409, "inputs_missing", f"{len(missing)} input(s) not "
                                   "uploaded yet: upload them, then submit", missing=missing)
                self._event(run_id, "queued", "submitted")
                run = self._update(run, state="queued", submitted_at=now, queued_at=now)
            return {"state": run["state"], "version": run["version"]}

    def get_run(self, who: Principal, run_id: str) -> dict[str, Any]:
        with self.tx():
            return self.view(self._submit_run(who, run_id))

    def read_log(self, who: Principal, run_id: str, offset: int) -> tuple[bytes, int, bool]:
        """The log bytes from ``offset``, the log size, and whether the log is final."""
        with self.tx():
            run = self._submit_run(who, run_id)
        size = run["log_size"]
        data = b""
        if offset < size:
            with open(self.log_path(run_id), "rb") as f:
                f.seek(offset)
                data = f.read(min(size - offset, LOG_READ_MAX))
        final = run["state"] in TERMINAL and offset + len(data) >= size
        return data, size, final

    def output_file(self, who: Principal, run_id: str, path: str) -> tuple[Path, dict[str, Any]]:
        with self.tx():
            run = self._submit_run(who, run_id)
        listed = {f["path"]: f for f in json.loads(run["outputs"])}
        if path not in listed:
            raise not_found(f"output {path!r} of run {run_id}")
        return self.file_path(run_id, "out", path), listed[path]

    def cancel(self, who: Principal, run_id: str) -> tuple[int, dict[str, Any]]:
        with self.tx() as now:
            run = self._submit_run(who, run_id)
            if run["state"] in TERMINAL:
                return 200, {"state": run["state"]}
            if run["state"] in ("created", "queued"):
                self._event(run_id, "cancelled", "cancelled before any poller claimed it")
                self._update(run, state="cancelled", ended_at=now, cancel_requested=1)
                return 200, {"state": "cancelled"}
            if (run["poller_id"] or "").startswith(COMPAT_POLLER):
                # MInt's original poller cannot be told to stop: the run ends here, and its
                # further calls about it are answered with an error
                self._event(run_id, "cancelled", "cancelled; MInt's original poller "
                            "(compat_v0) cannot be told to stop: what it still runs is not "
                            "taken back")
                self._update(run, state="cancelled", ended_at=now, cancel_requested=1,
                             lease_id=None, lease_expires_at=None)
                return 200, {"state": "cancelled"}
            if not run["cancel_requested"]:
                self._event(run_id, run["state"], "cancel requested: the poller stops the run")
                run = self._update(run, cancel_requested=1)
            return 202, {"state": run["state"], "cancel_requested": True}

    def delete(self, who: Principal, run_id: str) -> None:
        with self.tx():
            run = self._submit_run(who, run_id)
            if run["state"] not in TERMINAL:
                raise state_error(f"run {run_id} is {run['state']}: cancel it and wait for its"
                                  " end before deleting it")
            self._purge(run_id)
            self._changed[run_id] = run["site"]
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    def _purge(self, run_id: str) -> None:
        for table, column in (("runs", "id"), ("files", "run_id"), ("events", "run_id")):
            self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (run_id,))  # noqa: S608

    def list_runs(self, who: Principal | None, site: str | None = None,
                  state: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT id FROM runs WHERE 1 = 1", []
        if site:
            query, args = query + " AND site = ?", [*args, site]
        if state:
            query, args = query + " AND state = ?", [*args, state]
        ids = [r[0] for r in self.db.execute(query + " ORDER BY created_at", args).fetchall()]
        runs = []
        for run_id in ids:
            with self.tx():
                run = self._row(run_id)
                if run is None or (who is not None and not who.may_use(run["site"])):
                    continue
                run = self.settle(run)
                if state and run["state"] != state:
                    continue
                runs.append(self.view(run))
        return runs

    def site_info(self, who: Principal, site: str) -> dict[str, Any]:
        if not who.may_use(site):
            raise ApiError(403, "forbidden", f"this token may not use site {site}")
        pollers = self.db.execute("SELECT id, host, version, entrypoints, last_seen FROM "
                                  "pollers WHERE site = ? ORDER BY last_seen DESC",
                                  (site,)).fetchall()
        counts = dict(self.db.execute("SELECT state, COUNT(*) FROM runs WHERE site = ? "
                                      "GROUP BY state", (site,)).fetchall())
        return {"site": site,
                "pollers": [{"id": p["id"], "host": p["host"], "version": p["version"],
                             "last_seen": rfc3339(p["last_seen"]),
                             "entrypoints": json.loads(p["entrypoints"] or "null")}
                            for p in pollers],
                "last_seen": rfc3339(self.site_last_seen(site)),
                "queued": counts.get("queued", 0),
                "running": sum(counts.get(s, 0) for s in ORDER)}

    # -- site role ----------------------------------------------------------------------

    def claim(self, who: Principal, poller: dict[str, Any],
              entrypoints: list[str] | None) -> dict[str, Any] | None:
        """Hand the oldest queued run of the caller's site to ``poller``, or None."""
        with self.tx() as now:
            self.db.execute(
                "INSERT INTO pollers (site, id, host, version, entrypoints, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (site, id) DO UPDATE SET host = "
                "excluded.host, version = excluded.version, entrypoints = excluded.entrypoints,"
                " last_seen = excluded.last_seen",
                (who.site, poller["id"], poller.get("host"), poller.get("version"),
                 json.dumps(entrypoints) if entrypoints is not None else None, now))
            expired = self.db.execute(
                "SELECT id FROM runs WHERE site = ? AND state IN ('claimed', 'staging', 'staged')"
                " AND lease_expires_at <= ?", (who.site, now)).fetchall()
            for (run_id,) in expired:
                self.settle(self._row(run_id))
            while True:
                row = self.db.execute("SELECT id FROM runs WHERE site = ? AND state = 'queued' "
                                      "ORDER BY queued_at, created_at LIMIT 1",
                                      (who.site,)).fetchone()
                if row is None:
                    return None
                run = self.settle(self._row(row[0]))
                if run["state"] == "queued":
                    break
            lease = str(uuid.uuid4())
            host = poller.get("host") or poller["id"]
            self._event(run["id"], "claimed", f"claimed by poller {host} (attempt "
                        f"{run['attempt']})")
            run = self._update(run, state="claimed", poller_id=poller["id"],
                               poller_host=poller.get("host"), lease_id=lease,
                               lease_expires_at=now + self.lease_ttl, last_heartbeat=now)
            request = json.loads(run["request"])
            return {
                "id": run["id"],
                "lease": {"id": lease, "expires_at": rfc3339(run["lease_expires_at"]),
                          "ttl": _number(self.lease_ttl),
                          "heartbeat": _number(round(self.lease_ttl / 3, 3))},
                "entrypoint": run["entrypoint"], "params": request.get("params", {}),
                "inputs": [{"path": f["path"], "size": f["size"], "sha256": f["sha256"],
                            "mode": f.get("mode", 0o644)} for f in request.get("inputs", [])],
                "returns": request.get("returns", []), "attempt": run["attempt"],
                "cancel_grace": CANCEL_GRACE,
            }

    def _leased(self, who: Principal, run_id: str, lease: str | None,
                finishing: bool = False) -> sqlite3.Row:
        """The run, if ``lease`` is its current lease (renewed); 409 otherwise."""
        run = self._site_run(who, run_id)
        if not lease or run["lease_id"] != lease:
            raise ApiError(409, "lease_lost", f"lease {lease} is not the current lease of job "
                           f"{run_id} (it expired or the job was handed out again): drop the job")
        if run["state"] in TERMINAL and not finishing:
            raise state_error(f"job {run_id} is {run['state']} already")
        now = self._now
        if run["state"] not in TERMINAL:
            changes: dict[str, Any] = {"lease_expires_at": now + self.lease_ttl,
                                       "last_heartbeat": now}
            bump = False
            if run["stalled"]:
                self._event(run_id, run["state"], "heartbeat again: no longer stalled")
                changes["stalled"], bump = 0, True
            run = self._update(run, bump=bump, **changes)
        self.db.execute("UPDATE pollers SET last_seen = ? WHERE site = ? AND id = ?",
                        (now, run["site"], run["poller_id"]))
        return run

    def lease_input(self, who: Principal, run_id: str, lease: str | None,
                    path: str) -> tuple[Path, dict[str, Any]]:
        with self.tx():
            run = self._leased(who, run_id, lease)
        declared = {f["path"]: f for f in json.loads(run["request"]).get("inputs", [])}
        if path not in declared:
            raise not_found(f"input {path!r} of job {run_id}")
        return self.file_path(run_id, "in", path), declared[path]

    def event(self, who: Principal, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.tx():
            run = self._leased(who, run_id, body["lease"])
            changes: dict[str, Any] = {}
            new = body.get("state")
            if new and new != run["state"]:
                if ORDER.index(new) < ORDER.index(run["state"]):
                    raise state_error(f"job {run_id} is {run['state']} already: states only "
                                      f"move forward (not to {new})")
                changes["state"] = new
                if new in LAUNCHED:
                    changes["launched"] = 1
            if "pid" in body and body["pid"] != run["pid"]:
                changes["pid"] = body["pid"]
            if new and new != run["state"] or body.get("message"):
                self._event(run_id, new or run["state"], body.get("message") or new or "")
                if not changes:
                    changes["updated_at"] = self._now
            if changes:
                run = self._update(run, **changes)
            return {"lease_expires_at": rfc3339(run["lease_expires_at"]),
                    "cancel": bool(run["cancel_requested"])}

    def append_log(self, who: Principal, run_id: str, lease: str | None, offset: int,
                   data: bytes) -> int:
        with self.tx():
            run = self._leased(who, run_id, lease)
            size = run["log_size"]
            if offset > size:
                raise state_error(f"the log of job {run_id} has {size} bytes: send from there",
                                  log_size=size)
            fresh = data[size - offset:]
            if not fresh:
                return size
            path = self.log_path(run_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.truncate(size)  # bytes of a write whose commit was lost
                f.write(fresh)
            self._update(run, log_size=size + len(fresh))
            return size + len(fresh)

    def output_upload(self, who: Principal, run_id: str, lease: str | None, path: str,
                      size: int, sha256: str) -> Upload:
        with self.tx():
            run = self._leased(who, run_id, lease)
            return self._upload(run, "out", path, size, sha256)

    def finish(self, who: Principal, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        with self.tx() as now:
            run = self._leased(who, run_id, body["lease"], finishing=True)
            if run["state"] in TERMINAL:
                if run["finish"] == canonical:
                    return self.view(run)
                raise state_error(f"job {run_id} is {run['state']} already, with another "
                                  "finish")
            have = {r["path"]: (r["size"], r["sha256"]) for r in self.db.execute(
                "SELECT path, size, sha256 FROM files WHERE run_id = ? AND kind = 'out'",
                (run_id,))}
            outputs = body.get("outputs", [])
            missing = [f["path"] for f in outputs
                       if have.get(f["path"]) != (f["size"], f["sha256"])]
            if missing:
                raise ApiError(409, "outputs_missing", f"{len(missing)} listed output(s) not "
                               "uploaded, or uploaded with another digest: upload them, then "
                               "finish again", missing=missing)
            what = body["outcome"]
            if what == "exited":
                what += f" with {body.get('exit_code')}"
            elif what == "signaled":
                what += f" by signal {body.get('signal')}"
            elif body.get("reason"):
                what += f" ({body['reason']})"
            self._event(run_id, "finished", what + (f": {body['message']}"
                                                    if body.get("message") else ""))
            self._update(run, state="finished", ended_at=now, outcome=body["outcome"],
                         exit_code=body.get("exit_code"), signal=body.get("signal"),
                         reason=body.get("reason"), message=body.get("message"),
                         outputs=json.dumps(outputs), held_back=json.dumps(
                             body.get("held_back", [])), finish=canonical)
            return self.view(self._row(run_id))

    # -- compat_v0: MInt's original poller (remote_exec/queue/compat.py) -----------------------
    # Its calls name a run by id and site only (no lease): a run it holds has a poller id
    # starting with COMPAT_POLLER, and every call renews the lease (``ttl``, long: the
    # original sleeps 10 s between calls). Errors are ApiError(200, CODE, ...) as the
    # original answered them (HTTP 200, the code inside the envelope).

    def compat_claim(self, site: str, entrypoint: str, peer: str, ttl: float,
                     reoffer_after: float) -> str | None:
        """Hand the oldest queued run of ``site`` with ``entrypoint`` to an original poller
        (non-blocking), or a run such a poller took but never asked the parameters of
        within ``reoffer_after`` s (the original ignores the first answer after its start);
        the run id, or None."""
        poller_id = f"{COMPAT_POLLER}@{peer}"
        with self.tx() as now:
            self.db.execute(
                "INSERT INTO pollers (site, id, host, version, entrypoints, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (site, id) DO UPDATE SET "
                "last_seen = excluded.last_seen, entrypoints = excluded.entrypoints",
                (site, poller_id, peer, "mi-system-remote.py (compat_v0)",
                 json.dumps([entrypoint]), now))
            expired = self.db.execute(
                "SELECT id FROM runs WHERE site = ? AND state IN ('claimed', 'staging', 'staged')"
                " AND lease_expires_at <= ?", (site, now)).fetchall()
            for (run_id,) in expired:
                self.settle(self._row(run_id))
            row = self.db.execute(
                "SELECT id FROM runs WHERE site = ? AND entrypoint = ? AND state = 'claimed' "
                "AND poller_id LIKE ? AND updated_at <= ? ORDER BY queued_at, created_at "
                "LIMIT 1", (site, entrypoint, COMPAT_POLLER + "@%", now - reoffer_after)
            ).fetchone()
            if row is not None:
                run = self._row(row[0])
                self._event(run["id"], "claimed", f"offered again to MInt's original poller at"
                            f" {peer}: it was not asked for its parameters within "
                            f"{_number(reoffer_after)} s")
            else:
                while True:
                    row = self.db.execute(
                        "SELECT id FROM runs WHERE site = ? AND entrypoint = ? AND state = "
                        "'queued' ORDER BY queued_at, created_at LIMIT 1",
                        (site, entrypoint)).fetchone()
                    if row is None:
                        return None
                    run = self.settle(self._row(row[0]))
                    if run["state"] == "queued":
                        break
                self._event(run["id"], "claimed", f"claimed by MInt's original poller "
                            f"(mi-system-remote.py) at {peer} (attempt {run['attempt']})")
            self._update(run, state="claimed", poller_id=poller_id, poller_host=peer,
                         lease_id=str(uuid.uuid4()), lease_expires_at=now + ttl,
                         last_heartbeat=now)
            return run["id"]

    def returns_of(self, run_id: str) -> list[str]:
        """The ``returns`` of a run (empty for an unknown run)."""
        row = self._row(run_id) if run_id else None
        return list(json.loads(row["request"]).get("returns", [])) if row else []

    def _compat_run(self, site: str, run_id: str, ttl: float, states: tuple[str, ...],
                    call: str) -> sqlite3.Row:
        """The run an original poller names, if it holds it and it is in ``states``
        (lease renewed); ApiError(200, ...) otherwise."""
        run = self._row(run_id) if run_id else None
        if run is None or run["site"] != site:
            raise ApiError(200, "0300", f"id({run_id})の情報はありません。 (site {site} has no "
                           f"run {run_id} on the queue server)")
        run = self.settle(run)
        if not (run["poller_id"] or "").startswith(COMPAT_POLLER + "@"):
            raise ApiError(200, "400", f"{call}: run {run_id} was not handed out to MInt's "
                           "original poller (ask calc-request first)")
        if run["state"] in TERMINAL and run["state"] not in states:
            why = " (cancelled on the MInt side: nothing more is taken for it)" \
                if run["state"] == "cancelled" else ""
            raise ApiError(200, "400", f"{call}: run {run_id} is {run['state']}{why}")
        if run["state"] not in states:
            raise ApiError(200, "400", f"{call}: run {run_id} is {run['state']}; this call "
                           f"expects it {' or '.join(states)}")
        now = self._now
        if run["state"] not in TERMINAL:
            changes: dict[str, Any] = {"lease_expires_at": now + ttl}
            if run["state"] in (*PRE_LAUNCH, "uploading"):
                changes["last_heartbeat"] = now
            run = self._update(run, bump=False, **changes)
        self.db.execute("UPDATE pollers SET last_seen = ? WHERE site = ? AND id = ?",
                        (now, site, run["poller_id"]))
        return run

    def compat_params(self, site: str, run_id: str,
                      ttl: float) -> tuple[list[tuple[str, Path]], list[str]]:
        """``calc-params``: claimed -> staging; the inputs (path, spool file) and returns."""
        with self.tx():
            run = self._compat_run(site, run_id, ttl, ("claimed",), "calc-params")
            self._event(run_id, "staging", "MInt's original poller fetches the inputs "
                        "(calc-params)")
            run = self._update(run, state="staging")
        request = json.loads(run["request"])
        inputs = [(f["path"], self.file_path(run_id, "in", f["path"]))
                  for f in request.get("inputs", [])]
        return inputs, list(request.get("returns", []))

    def compat_step(self, site: str, run_id: str, ttl: float, call: str) -> None:
        """``calc-params-complete`` (staging -> staged), ``calc-start`` (staged ->
        launching -> running)."""
        with self.tx():
            if call == "calc-params-complete":
                run = self._compat_run(site, run_id, ttl, ("staging",), call)
                self._event(run_id, "staged", "inputs written on the site "
                            "(calc-params-complete)")
                self._update(run, state="staged")
                return
            run = self._compat_run(site, run_id, ttl, ("staged",), call)
            self._event(run_id, "launching", "MInt's original poller starts the command "
                        "(calc-start)")
            self._event(run_id, "running", "running (the original poller sends nothing "
                        "until the command ends)")
            # no heartbeat until calc-end: never marked stalled
            self._update(run, state="running", launched=1, last_heartbeat=None)

    def compat_end(self, site: str, run_id: str, ttl: float, exit_code: int) -> None:
        """``calc-end``: running -> uploading, with exit code 0 or 1. Also from staged:
        the original sends calc-end after a calc-start that failed on its way here, and
        its command may have run."""
        with self.tx() as now:
            run = self._compat_run(site, run_id, ttl, ("staged", "launching", "running"),
                                   "calc-end")
            word = "calc end" if exit_code == 0 else "abnormal"
            self._event(run_id, "uploading", f"the command ended: {word!r} (exit code "
                        f"{exit_code}); results follow")
            # heartbeats again: the original sends its results within seconds
            self._update(run, state="uploading", exit_code=exit_code, launched=1,
                         last_heartbeat=now)

    def compat_results(self, site: str, run_id: str, ttl: float,
                       files: list[tuple[str, int, str, Path]], log: tuple[int, Path] | None,
                       notes: list[str]) -> None:
        """``send-results``: record the decoded files (path, size, sha256, temporary file),
        the log and ``notes`` (the run's message)."""
        with self.tx():
            run = self._compat_run(site, run_id, ttl, ("uploading",), "send-results")
            total = sum(size for _path, size, _sha, _temp in files)
            total += self.db.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE "
                                     "run_id = ? AND kind = 'in'", (run_id,)).fetchone()[0]
            if total > self.max_run_bytes:
                raise ApiError(200, "400", f"send-results: run {run_id} would hold {total} "
                               f"bytes, over the server's max_run_bytes ({self.max_run_bytes})")
            self.db.execute("DELETE FROM files WHERE run_id = ? AND kind = 'out'", (run_id,))
            for path, size, sha256, temp in files:
                final = self.file_path(run_id, "out", path)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp, final)
                self.db.execute("INSERT INTO files (run_id, kind, path, size, sha256) "
                                "VALUES (?, ?, ?, ?, ?)", (run_id, "out", path, size, sha256))
            changes: dict[str, Any] = {"message": "; ".join(notes) or None}
            if log is not None:
                size, temp = log
                final = self.log_path(run_id)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp, final)
                changes["log_size"] = size
            self._event(run_id, "uploading", f"{len(files)} result file(s) received "
                        "(send-results)" + (f": {'; '.join(notes)}" if notes else ""))
            self._update(run, **changes)

    def compat_finish(self, site: str, run_id: str, ttl: float) -> None:
        """``end-send``: uploading -> finished (exited, with calc-end's exit code)."""
        with self.tx() as now:
            run = self._compat_run(site, run_id, ttl, ("uploading", "finished"), "end-send")
            if run["state"] == "finished":
                if run["finish"] == COMPAT_FINISH:
                    return  # said again
                raise ApiError(200, "400", f"end-send: run {run_id} is finished already")
            outputs = [{"path": r["path"], "size": r["size"], "sha256": r["sha256"]}
                       for r in self.db.execute(
                           "SELECT path, size, sha256 FROM files WHERE run_id = ? AND "
                           "kind = 'out' ORDER BY path", (run_id,))]
            if not outputs and not run["log_size"] and not run["message"]:
                run = self._update(run, bump=False, message="no result came from the site "
                                   "(send-results missing, or refused: larger than "
                                   "compat_v0.max_job_bytes?)")
            self._event(run_id, "finished", f"exited with {run['exit_code']} (end-send)"
                        + (f": {run['message']}" if run["message"] else ""))
            self._update(run, state="finished", ended_at=now, outcome="exited",
                         outputs=json.dumps(outputs), finish=COMPAT_FINISH,
                         lease_id=None, lease_expires_at=None)

    # -- garbage collection -------------------------------------------------------------

    def gc(self, retention: float, dry_run: bool = False,
           temp_age: float = 3600) -> dict[str, list[str]]:
        """Purge terminal runs ended more than ``retention`` seconds ago (with their
        spool), spool directories of no run, temporary files older than ``temp_age``, and
        pollers not seen for ``retention``."""
        now = time.time()
        old = [r[0] for r in self.db.execute(
            "SELECT id FROM runs WHERE state IN ('finished', 'expired', 'cancelled') AND "
            "COALESCE(ended_at, updated_at) <= ?", (now - retention,)).fetchall()]
        known = {r[0] for r in self.db.execute("SELECT id FROM runs").fetchall()}
        orphans = sorted(p.name for p in self.spool.iterdir() if p.name not in known)
        temps = []
        for p in self.tmp.iterdir():
            try:
                if p.stat().st_mtime <= now - temp_age:
                    temps.append(p.name)
            except FileNotFoundError:
                continue
        pollers = [f"{r[0]}/{r[1]}" for r in self.db.execute(
            "SELECT site, id FROM pollers WHERE last_seen <= ?", (now - retention,)).fetchall()]
        if not dry_run:
            with self.tx():
                self.db.execute("DELETE FROM pollers WHERE last_seen <= ?", (now - retention,))
            for run_id in old:
                with self.tx():
                    self._purge(run_id)
                shutil.rmtree(self.run_dir(run_id), ignore_errors=True)
            for name in orphans:
                # a run created meanwhile is no orphan
                if self._row(name) is None:
                    shutil.rmtree(self.spool / name, ignore_errors=True)
            for name in temps:
                (self.tmp / name).unlink(missing_ok=True)
        return {"runs": old, "orphans": orphans, "temp_files": temps, "pollers": pollers}
