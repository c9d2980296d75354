"""Many clients at once: one of them starts the holder, the others wait for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from remote_exec.holder import client


def test_clients_started_together_start_one_holder(tmp_path, monkeypatch):
    """Clients that find no holder take turns on the start lock: the first starts one,
    the others connect to it instead of starting holders of their own."""
    monkeypatch.setenv("REMOTE_EXEC_STATE_DIR", str(tmp_path / "state"))
    path = client.socket_path()
    started: list[float] = []
    servers: list[socket.socket] = []

    class FakePopen:  # a holder that needs a while to come up
        def __init__(self, *_args, **_kwargs) -> None:
            started.append(time.monotonic())
            threading.Timer(0.3, self.listen).start()

        @staticmethod
        def listen() -> None:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
            server.listen(64)
            servers.append(server)

    monkeypatch.setattr(client.subprocess, "Popen", FakePopen)
    got: list[socket.socket | None] = []
    threads = [threading.Thread(target=lambda: got.append(client._connect(start=True)))
               for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    try:
        assert len(got) == 12 and all(sock is not None for sock in got)
        assert len(started) == 1
    finally:
        for sock in [*got, *servers]:
            if sock is not None:
                sock.close()


def test_a_needless_holder_exits_before_importing_the_engine(tmp_path):
    """``python -m remote_exec.holder`` while another holds the lock: it exits at once,
    without importing asyncssh or the engine (hundreds of clients may start one)."""
    env = {**os.environ, "REMOTE_EXEC_STATE_DIR": str(tmp_path / "state"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    held = subprocess.run(
        [sys.executable, "-c", "from remote_exec.holder.client import claim_lock, socket_path;"
         "import sys; lock = claim_lock(socket_path()); print(lock is not None, flush=True);"
         "sys.stdin.read()"],
        env=env, input="", capture_output=True, text=True, timeout=30)
    assert held.stdout.strip() == "True"  # (released when that process ended)
    holder = tmp_path / "state" / "holder"
    with (holder / "holder.lock").open("w") as lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "remote_exec.holder"],
                              env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "remote_exec.holder.client" in proc.stderr
    assert "asyncssh" not in proc.stderr and "remote_exec.engine" not in proc.stderr
    assert not (holder / "holder.sock").exists()
