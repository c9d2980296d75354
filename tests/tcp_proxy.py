"""A small TCP proxy for tests that need a link to misbehave on cue.

``TcpProxy(target_port)`` listens on 127.0.0.1 (a free port, ``proxy.port``) and
relays every connection to ``127.0.0.1:target_port``. One thread runs a selector
loop over all sockets; the test thread only flips flags, and the loop applies
them (it is woken through a socket pair), so no socket is ever closed under a
``select`` running in another thread.

    cut(reset=True)         close every current connection at once (both sides get a
                            reset: nothing is flushed, as when a link dies; with
                            ``reset=False`` an orderly close, FIN, as when a peer exits)
    cut_after(up=, down=)   arm a cut of every connection once that many more bytes
                            have flowed client→server (up) or server→client (down)
    stall_after(up=, down=) the same, but a stall (exactly at that byte count, where a
                            test polling the counters could be late)
    stall(first=0)          stop relaying on the connections open now (those numbered
    / unstall()             ``first`` and up, in the order they were accepted), without
                            closing them: no byte is read or written, the peers'
                            kernels buffer, then everything stands still; connections
                            made later are relayed normally
    refuse(True/False)      new connections are accepted and closed at once (a reset);
                            ``refuse(True, listen=False)`` stops listening instead, so
                            connecting fails with "connection refused"
    close()                 stop listening and close everything

Counters: ``bytes_up``, ``bytes_down`` (relayed), ``accepted`` (connections
relayed), ``refused``, ``cuts`` (connections closed by a cut). Use it as a
context manager.

Each direction buffers about ``BUFFER`` bytes at most: the loop reads from a side
only while less than that waits to be written to the other.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

BUFFER = 256 * 1024
CHUNK = 64 * 1024


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0): no FIN, no flush."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One relayed connection: the client's socket and ours to the target."""

    def __init__(self, client: socket.socket, server: socket.socket, index: int) -> None:
        self.index = index  # 0 for the first connection accepted
        self.client = client
        self.server = server
        self.to_server = bytearray()  # read from client, not yet written to server
        self.to_client = bytearray()
        self.client_eof = False  # the client sent FIN (relayed once to_server is empty)
        self.server_eof = False
        self.stalled = False
        self.closed = False

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.server):
            if reset:
                _reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()


class TcpProxy:
    """Relay 127.0.0.1:<port> to 127.0.0.1:<target_port>, breaking the link on demand."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener: socket.socket | None = self._listen(0)
        self.port: int = self._listener.getsockname()[1]

        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._pairs: list[_Pair] = []
        self._pending: list[Callable[[], None]] = []  # run in the loop thread
        self._refuse = False
        self._trigger_up: int | None = None  # byte counts at which the armed action fires
        self._trigger_down: int | None = None
        self._trigger_action: Callable[[], None] | None = None
        self._closing = False

        self.bytes_up = 0
        self.bytes_down = 0
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        self.errors: list[BaseException] = []

        self._thread = threading.Thread(target=self._loop, name=f"tcp-proxy-{self.port}",
                                        daemon=True)
        self._thread.start()

    # -- the test's side ---------------------------------------------------------------------
    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connections(self) -> int:
        """How many relayed connections are open now."""
        with self._lock:
            return sum(1 for p in self._pairs if not p.closed)

    def cut(self, reset: bool = True) -> None:
        """Close every current connection at once (waits until it is done)."""
        self._call(lambda: self._cut_all(reset), wait=True)

    def cut_after(self, up: int | None = None, down: int | None = None) -> None:
        """Arm one cut of every connection after ``up`` more bytes client→server or
        ``down`` more bytes server→client (whichever comes first)."""
        self._arm(self._cut_all, up, down)

    def stall_after(self, up: int | None = None, down: int | None = None) -> None:
        """Arm one ``stall()`` after ``up`` / ``down`` more bytes, as ``cut_after``."""
        self._arm(self._stall_all, up, down)

    @property
    def armed(self) -> bool:
        """Whether a ``cut_after`` / ``stall_after`` is still waiting for its bytes."""
        with self._lock:
            return self._trigger_action is not None

    def _arm(self, action: Callable[[], None], up: int | None, down: int | None) -> None:
        with self._lock:
            self._trigger_up = None if up is None else self.bytes_up + up
            self._trigger_down = None if down is None else self.bytes_down + down
            self._trigger_action = action if up is not None or down is not None else None

    def stall(self, first: int = 0) -> None:
        """Stop relaying on the connections open now (they stay open), or only on those
        accepted as number ``first`` (0-based) or later."""
        self._stall_all(first)
        self._wake()

    def _stall_all(self, first: int = 0) -> None:
        with self._lock:
            for pair in self._pairs:
                if pair.index >= first:
                    pair.stalled = True

    def unstall(self) -> None:
        with self._lock:
            for pair in self._pairs:
                pair.stalled = False
        self._wake()

    def refuse(self, on: bool = True, listen: bool = True) -> None:
        """Close new connections as soon as they are accepted (``on``), or relay them.

        With ``listen=False`` the port stops listening instead (connecting is refused by
        the kernel) until ``refuse(False)``."""
        with self._lock:
            self._refuse = on

        def relisten() -> None:
            if on and not listen and self._listener is not None:
                self._listener.close()
                self._listener = None
            elif not on and self._listener is None:
                self._listener = self._listen(self.port)

        self._call(relisten, wait=True)

    def wait_for(self, predicate: Callable[[TcpProxy], bool], timeout: float = 30) -> bool:
        """Poll ``predicate(self)`` until true or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.01)
        return predicate(self)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake()
        self._thread.join(5)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

    # -- the loop thread ---------------------------------------------------------------------
    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def _call(self, action: Callable[[], None], wait: bool = False) -> None:
        """Run ``action`` in the loop thread (and wait for it, with ``wait``)."""
        done = threading.Event()

        def run() -> None:
            try:
                action()
            finally:
                done.set()

        with self._lock:
            self._pending.append(run)
        self._wake()
        if wait and not done.wait(5):
            raise RuntimeError("the proxy's loop did not answer within 5 s")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            while not self._closing:
                self._register(selector)
                for key, events in selector.select(timeout=0.5):
                    try:
                        self._handle(key, events)
                    except Exception as exc:  # noqa: BLE001 - kept for the test to look at
                        self.errors.append(exc)
                with self._lock:
                    pending, self._pending = self._pending, []
                for action in pending:
                    try:
                        action()
                    except Exception as exc:  # noqa: BLE001 - kept for the test to look at
                        self.errors.append(exc)
        finally:
            selector.close()

    def _register(self, selector: selectors.BaseSelector) -> None:
        """(Re)compute what the selector waits for: cheap at this scale and never stale."""
        for key in list(selector.get_map().values()):
            selector.unregister(key.fileobj)
        selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        if self._listener is not None:
            selector.register(self._listener, selectors.EVENT_READ, ("accept", None))
        with self._lock:
            self._pairs = [p for p in self._pairs if not p.closed]
            pairs = list(self._pairs)
        for pair in pairs:
            if pair.stalled:
                continue
            for sock, inbox, outbox, eof in (
                (pair.client, pair.to_server, pair.to_client, pair.client_eof),
                (pair.server, pair.to_client, pair.to_server, pair.server_eof),
            ):
                mask = 0
                if not eof and len(inbox) < BUFFER:
                    mask |= selectors.EVENT_READ
                if outbox:
                    mask |= selectors.EVENT_WRITE
                if mask:
                    selector.register(sock, mask, ("relay", pair))

    def _handle(self, key: selectors.SelectorKey, events: int) -> None:
        kind, pair = key.data
        if kind == "wake":
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
        elif kind == "accept":
            self._accept()
        elif not pair.closed and not pair.stalled:
            self._relay(pair, key.fileobj, events)

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        with self._lock:
            refuse = self._refuse
        if refuse:
            self.refused += 1
            _reset(client)
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs.append(_Pair(client, server, self.accepted))
            self.accepted += 1

    def _relay(self, pair: _Pair, sock: socket.socket, events: int) -> None:
        from_client = sock is pair.client
        inbox = pair.to_server if from_client else pair.to_client
        outbox = pair.to_client if from_client else pair.to_server
        peer = pair.server if from_client else pair.client
        if events & selectors.EVENT_WRITE and outbox:
            try:
                sent = sock.send(outbox)
            except BlockingIOError:
                sent = 0
            except OSError:
                pair.close(reset=True)
                return
            del outbox[:sent]
            if not outbox and (pair.server_eof if from_client else pair.client_eof):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                if self._finished(pair):
                    return
        if events & selectors.EVENT_READ:
            try:
                data = sock.recv(CHUNK)
            except BlockingIOError:
                return
            except OSError:
                pair.close(reset=True)
                return
            if not data:
                if from_client:
                    pair.client_eof = True
                else:
                    pair.server_eof = True
                if not inbox:
                    with contextlib.suppress(OSError):
                        peer.shutdown(socket.SHUT_WR)
                self._finished(pair)
                return
            inbox += data
            self._count(len(data), up=from_client)

    @staticmethod
    def _finished(pair: _Pair) -> bool:
        """Close ``pair`` once both sides sent FIN and everything was delivered."""
        if (pair.client_eof and pair.server_eof and not pair.to_client
                and not pair.to_server):
            pair.close()
            return True
        return False

    def _count(self, n: int, up: bool) -> None:
        with self._lock:
            if up:
                self.bytes_up += n
            else:
                self.bytes_down += n
            action = self._trigger_action
            fire = action is not None and (
                (self._trigger_up is not None and self.bytes_up >= self._trigger_up)
                or (self._trigger_down is not None and self.bytes_down >= self._trigger_down))
            if fire:
                self._trigger_action = self._trigger_up = self._trigger_down = None
        if fire and action is not None:
            action()

    def _cut_all(self, reset: bool = True) -> None:
        with self._lock:
            pairs = [p for p in self._pairs if not p.closed]
        for pair in pairs:
            pair.close(reset=reset)
        self.cuts += len(pairs)
