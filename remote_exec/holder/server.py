"""The holder process: warm connections, admission per host, the engine driving each run.

Started by a client (:mod:`remote_exec.holder.client`) as ``python -m remote_exec.holder``
with the client's environment. Admission is counted here, per host, across all the
runs of one user: at most ``HOLDER_HANDSHAKES`` connections being opened at once
(sshd drops unauthenticated connections beyond MaxStartups) and at most
``RUNS_PER_CONNECTION`` runs sharing one connection (each run uses two or three
channels; sshd allows ten, MaxSessions).

The event loop here carries every run's SSH traffic, so nothing in this module
blocks it on the local disk: the socket file and the lock are handled in a thread
(or before the loop starts), writing to a client waits for it (back-pressure, see
:meth:`_WireReporter.drain`), and the engine writes its journal through its writer
thread (:meth:`remote_exec.journal.Journal.aupdate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remote_exec import errors
from remote_exec.engine import RunControl, execute_async
from remote_exec.holder import wire
from remote_exec.holder.client import claim_lock, code_fingerprint, idle_timeout, socket_path
from remote_exec.ssh.link import HOLDER_HANDSHAKES, open_throttled
from remote_exec.ui import Reporter

RUNS_PER_CONNECTION = 3


class _WireReporter(Reporter):
    """A Reporter that forwards everything to the client socket."""

    def __init__(self, writer: asyncio.StreamWriter, progress: bool) -> None:  # noqa: D107
        # no super().__init__(): this process has no terminal of its own
        self.writer = writer
        self.show_progress = progress

    def send(self, msg: dict[str, Any]) -> None:
        """Queue one message for the client (see :meth:`drain` for waiting on it)."""
        if not self.writer.is_closing():
            self.writer.write(wire.encode(msg))

    def event(self, kind: str, message: str, **fields: Any) -> None:
        self.send(wire.event_message(kind, message, **fields))

    def warn(self, message: str) -> None:
        self.send(wire.warn_message(message))

    def log_text(self, data: str) -> None:
        self.send(wire.log_message(data))

    async def drain(self) -> None:
        """Back-pressure: a client that stops reading (``--follow`` on a slow terminal)
        holds the log's reader here instead of the holder buffering the whole log."""
        if not self.writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    def progress_start(self, label: str, total: int) -> None:
        if self.show_progress:
            self.send(wire.progress_start_message(label, total))

    def progress_update(self, name: str, done: int, total: int) -> None:
        self.send(wire.progress_message(name, done, total))

    def progress_stop(self) -> None:
        if self.show_progress:
            self.send(wire.progress_stop_message())

    @property
    def progress_fn(self) -> Any:
        return self.progress_update if self.show_progress else None


class _Pool:
    """Warm connections per destination and caller's agent, with admission counted per host.

    ``acquire`` (with the run's ``caller_env`` bound) and ``release`` have the shape
    :class:`remote_exec.ssh.link.Link` takes, so a run's reconnects go through the pool
    too. A connection is shared only by runs whose callers have the same ssh-agent:
    a run never authenticates with another caller's agent.
    """

    def __init__(self) -> None:
        self.conns: dict[tuple, list[list[Any]]] = {}  # key -> [[conn, active_runs], ...]
        self.handshakes: dict[str, asyncio.Semaphore] = {}
        self.lock = asyncio.Lock()

    @staticmethod
    def key(site: Any, caller_env: Mapping[str, str]) -> tuple:
        return (site.host, site.port, site.user, site.identity_file, site.known_hosts,
                site.connect_timeout, site.stall_timeout, tuple(sorted(caller_env.items())))

    def _take(self, key: tuple) -> Any:
        slots = self.conns.setdefault(key, [])
        slots[:] = [s for s in slots if not s[0].is_closed()]
        for slot in slots:
            if slot[1] < RUNS_PER_CONNECTION:
                slot[1] += 1
                return slot[0]
        return None

    async def acquire(self, site: Any, tries: int, *, caller_env: Mapping[str, str]) -> Any:
        key = self.key(site, caller_env)
        async with self.lock:
            conn = self._take(key)
            if conn is not None:
                return conn
            gate = self.handshakes.setdefault(site.host, asyncio.Semaphore(HOLDER_HANDSHAKES))
        async with gate:
            async with self.lock:  # someone may have opened one meanwhile
                conn = self._take(key)
                if conn is not None:
                    return conn
            conn = await open_throttled(site, tries, caller_env=caller_env)
            async with self.lock:
                self.conns.setdefault(key, []).append([conn, 1])
                return conn

    def release(self, conn: Any, broken: bool) -> None:
        if broken:
            conn.close()
        for slots in self.conns.values():
            for slot in slots:
                if slot[0] is conn:
                    slot[1] -= 1
                    if broken:
                        slots.remove(slot)
                    return

    def destinations(self) -> dict[str, int]:
        """``user@host:port`` as each open connection resolved it (~/.ssh/config
        included) -> how many connections."""
        counts: dict[str, int] = {}
        for slots in self.conns.values():
            for conn, _runs in slots:
                if not conn.is_closed():
                    dest = (f"{conn.get_extra_info('username')}@{conn.get_extra_info('host')}"
                            f":{conn.get_extra_info('port')}")
                    counts[dest] = counts.get(dest, 0) + 1
        return counts

    def close_all(self) -> None:
        for slots in self.conns.values():
            for conn, _ in slots:
                conn.close()
        self.conns.clear()


class Holder:
    def __init__(self, path: Path, idle: float) -> None:
        self.path = path
        self.lock_file: Any = None
        self.idle = idle
        self.pool = _Pool()
        self.active = 0
        self.last_activity = time.monotonic()
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.runs_done = 0
        self.code = code_fingerprint()

    def claim(self) -> bool:
        """Take the holder lock; False if another holder of this state directory runs."""
        self.lock_file = claim_lock(self.path)
        return self.lock_file is not None

    async def serve(self) -> None:
        await asyncio.to_thread(self._unlink_socket)
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old_umask)
        async with server:
            while not self.stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)
                if self.active == 0 and time.monotonic() - self.last_activity > self.idle:
                    break
            server.close()
            await asyncio.to_thread(self._unlink_socket)  # new clients start a new holder
            while self.active:
                await asyncio.sleep(0.1)
        self.pool.close_all()

    def _unlink_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _peer_ok(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            return uid == os.getuid()
        except (OSError, AttributeError):
            return True  # not Linux: the 0600 socket in a 0700 directory is the guard

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._peer_ok(writer):
            writer.close()
            return
        self.active += 1
        self.last_activity = time.monotonic()
        try:
            line = await reader.readline()
            if not line:
                return
            msg = wire.decode(line)
            if "status" in msg:
                writer.write(wire.encode({"pid": os.getpid(), "active_runs": self.active - 1,
                                          "runs_done": self.runs_done,
                                          "connections": self.pool.destinations(),
                                          "idle_timeout": self.idle,
                                          "started": self.started}))
            elif "stop" in msg:
                self.stopping.set()
                writer.write(wire.STOPPING)
            elif "run" in msg and msg.get("code", self.code) != self.code:
                self.stopping.set()  # other code than the client's: make way for a new one
                writer.write(wire.STALE)
            elif "run" in msg:
                await self._run(msg, reader, writer)
            await writer.drain()
        except (ConnectionError, ValueError):  # (a line that is not a message)
            pass
        finally:
            self.active -= 1
            self.last_activity = time.monotonic()
            with contextlib.suppress(Exception):
                writer.close()

    async def _run(self, msg: dict[str, Any], reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        """Drive one run for a client; a ``cancel`` line cancels it, EOF abandons it."""
        request = wire.run_request(msg)
        ui = _WireReporter(writer, bool(msg.get("progress")))
        control = RunControl()
        # the connections of this run use its caller's agent, never this process's
        acquire = functools.partial(self.pool.acquire, caller_env=dict(msg.get("env") or {}))
        task = asyncio.ensure_future(execute_async(
            request, ui, resume=bool(msg.get("resume")), control=control,
            acquire=acquire, release=self.pool.release, driver_pid=msg.get("pid"),
        ))
        watcher = asyncio.ensure_future(self._watch_client(reader, control))
        try:
            result = await task
            self.runs_done += 1
            ui.send(wire.result_message(result))
        except asyncio.CancelledError:
            pass  # abandoned: the client went away, the run stays resumable
        except errors.RemoteExecError as err:
            ui.send(wire.error_message(err))
        except Exception as exc:  # noqa: BLE001 - reported to the client as an internal error
            ui.send(wire.internal_error_message(exc))
        finally:
            watcher.cancel()

    @staticmethod
    async def _watch_client(reader: asyncio.StreamReader, control: Any) -> None:
        while True:
            line = await reader.readline()
            if not line:
                control.abandon()
                return
            with contextlib.suppress(ValueError):
                msg = wire.decode(line)
                if "cancel" in msg:
                    control.cancel(str(msg["cancel"]), int(msg.get("exit_code", 130)))


def main(lock_file: Any = None) -> None:
    """Serve until idle; ``lock_file``: the holder lock, if the caller took it already
    (``python -m remote_exec.holder`` does, before importing this module)."""
    os.chdir("/")
    holder = Holder(socket_path(), idle_timeout())
    if lock_file is not None:
        holder.lock_file = lock_file
    elif not holder.claim():
        return  # another holder serves this state directory
    asyncio.run(holder.serve())


if __name__ == "__main__":
    main()
