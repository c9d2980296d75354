"""rsync's remote shell, spoken through the run's existing SSH connection.

rsync starts its ``--rsh`` program as ``RSH [-l USER] HOST rsync --server ...``.
This script is that program: instead of opening a new SSH connection it hands the
remote command to the remote-exec process over a private Unix socket, which runs
it on an asyncssh channel of the connection the run already holds, and relays
bytes both ways. So a run costs one SSH handshake even when rsync moves its data.

Wire format on the socket (kept tiny on purpose):
  bridge -> orchestrator: one JSON line (the remote argv), then raw stdin bytes, then EOF;
  orchestrator -> bridge: frames of 1 type byte (b"o" stdout, b"e" stderr,
  b"x" exit status) + 4-byte big-endian length + payload.

Standard library only, and started with ``python -S -E`` so it costs ~20 ms.
"""

import json
import os
import socket
import struct
import sys
import threading


def _pump_stdin(sock: socket.socket) -> None:
    try:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        data = sock.recv(size)
        if not data:
            raise EOFError
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def main(argv: list) -> int:
    if len(argv) < 3:
        sys.stderr.write("usage: rsh_bridge.py SOCKET [-l USER] HOST COMMAND...\n")
        return 255
    sock_path, args = argv[0], argv[1:]
    # rsync may hand us non-blocking pipes; this loop wants plain blocking writes
    os.set_blocking(0, True)
    os.set_blocking(1, True)
    if args[:1] == ["-l"]:
        args = args[2:]
    command = args[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    sock.sendall(json.dumps(command).encode("utf-8") + b"\n")
    threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
    try:
        while True:
            kind, size = struct.unpack(">cI", _read_exact(sock, 5))
            payload = _read_exact(sock, size)
            if kind == b"o":
                _write_all(1, payload)
            elif kind == b"e":
                _write_all(2, payload)
            elif kind == b"x":
                return struct.unpack(">i", payload)[0]
    except EOFError:
        sys.stderr.write("remote-exec: the SSH connection closed under rsync\n")
        return 255


if __name__ == "__main__":
    sys.stdout.flush()
    os._exit(main(sys.argv[1:]))
