"""The per-user connection holder: same results as an in-process run, and observable."""

from __future__ import annotations


def test_holder_and_in_process_runs_agree(cli, workdir, tmp_path):
    (workdir / "x").write_bytes(bytes(range(256)) * 40)
    outs = {}
    for mode, extra in (("holder", []), ("direct", ["--no-holder"])):
        dest = tmp_path / mode
        proc = cli("run", "--site", "loop", *extra, "--into", str(dest), "--cmd",
                   "sha256sum x > sum; cp x y", "x", cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        outs[mode] = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert outs["holder"] == outs["direct"]
    assert outs["holder"]["y"] == (workdir / "x").read_bytes()


def test_holder_status_and_stop(cli, workdir):
    assert cli("holder", "status", cwd=workdir).returncode == 3
    proc = cli("run", "--site", "loop", "--cmd", "true", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    status = cli("holder", "status", cwd=workdir)
    assert status.returncode == 0
    assert "1 done" in status.stdout and "127.0.0.1" in status.stdout
    assert "stopping" in cli("holder", "stop", cwd=workdir).stdout


def test_env_disables_holder(cli, workdir):
    proc = cli("run", "--site", "loop", "--cmd", "true", cwd=workdir,
               extra_env={"REMOTE_EXEC_HOLDER": "0"})
    assert proc.returncode == 0, proc.stderr
    assert cli("holder", "status", cwd=workdir).returncode == 3


def test_holder_running_other_code_makes_way(cli, workdir):
    """A holder started by another version (an upgrade) answers `stale` to a client with
    other code and goes; the client's next holder runs its own code."""
    import json
    import socket
    import time
    from pathlib import Path

    proc = cli("run", "--site", "loop", "--cmd", "true", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    path = Path(cli.state) / "holder" / "holder.sock"
    assert path.exists()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(json.dumps({"run": {}, "code": "another-version"}).encode() + b"\n")
        assert json.loads(sock.makefile("rb").readline()) == {"t": "stale"}
    deadline = time.monotonic() + 5
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not path.exists()  # the old holder went away
    again = cli("run", "--site", "loop", "--cmd", "echo fresh > f", "--into", "b", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "did not start" not in again.stderr  # a new holder took the run
    assert (workdir / "b" / "f").read_text() == "fresh\n"


def test_runs_on_a_warm_connection_share_one_sftp_session(cli, workdir, sshd):
    """A stock sshd starts every SFTP session through the login shell (as costly as a
    bare ssh): runs on one warm connection of the holder open it once."""
    from test_resilience import proc_table

    for _ in range(3):
        proc = cli("run", "--site", "loop", "--cmd", "true", cwd=workdir)
        assert proc.returncode == 0, proc.stderr
    table = proc_table()
    parent = {pid: ppid for pid, ppid, *_ in table}

    def under_sshd(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 1)
            if pid == sshd.pid():
                return True
        return False

    servers = [row for row in table if "sftp-server" in row[4] and under_sshd(row[0])]
    assert len(servers) == 1, servers  # the holder's connection keeps its one session


def test_a_client_that_stops_reading_holds_the_log_back_in_the_holder(cli, workdir,
                                                                       remote_root):
    """``--follow`` on a terminal that does not keep up: the holder waits for its client
    instead of buffering the whole log (here 300 MB) in memory."""
    import subprocess
    import sys
    import time

    from test_resilience import holder_pid

    size = 300_000_000
    client = subprocess.Popen(
        [sys.executable, "-m", "remote_exec", "run", "--site", "loop", "--follow", "--cmd",
         f"head -c {size} /dev/zero | tr '\\0' x; sleep 60"],
        cwd=workdir, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:  # (its stdout is never read: the client blocks once the pipe is full)
        deadline = time.monotonic() + 90
        logs: list = []
        while time.monotonic() < deadline:
            logs = list(remote_root.glob("*/remote_program_exec.log"))
            if logs and logs[0].stat().st_size >= size:
                break
            time.sleep(0.5)
        assert logs and logs[0].stat().st_size >= size, "the entrypoint did not write its log"
        time.sleep(3)  # time for an unbounded holder to read and buffer it all
        pid = holder_pid(cli)
        assert pid is not None
        status = open(f"/proc/{pid}/status").read()
        rss_kib = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("VmRSS:")))
        assert rss_kib < 200 * 1024, f"the holder holds {rss_kib} KiB"
    finally:
        client.kill()
        client.wait()


# -- the parts, without an sshd ----------------------------------------------------------

def test_wire_messages_round_trip():
    from remote_exec import errors
    from remote_exec.holder import wire
    from remote_exec.request import RunResult

    result = RunResult(run_id="r", rundir="/d", exit_code=3, fetched=["a"], remote_kept=True,
                       skipped=["b"], failure="why")
    assert wire.result_from(wire.decode(wire.encode(wire.result_message(result)))) == result

    err = errors.ConfigError("bad site", hint="fix it")
    back = wire.error_from(wire.decode(wire.encode(wire.error_message(err))))
    assert type(back) is errors.ConfigError
    assert (back.message, back.hint, back.exit_code) == ("bad site", "fix it", err.exit_code)
    for name in ("NoSuchError", "EXIT_INTERNAL", "Path"):  # never anything but an error class
        msg = {"t": "error", "class": name, "message": "m", "exit_code": 70}
        assert type(wire.error_from(msg)) is errors.RemoteExecError

    internal = wire.internal_error_message(RuntimeError("boom"))
    assert internal["exit_code"] == errors.EXIT_INTERNAL and "boom" in internal["message"]
    assert wire.decode(wire.cancel_message("SIGTERM", 143)) == {"cancel": "SIGTERM",
                                                                "exit_code": 143}
    for line in (b"[1, 2]\n", b"not json\n"):
        try:
            wire.decode(line)
        except ValueError:
            continue
        raise AssertionError(f"{line!r} was taken for a message")


def test_the_reporter_waits_for_a_client_that_stops_reading(tmp_path):
    """Back-pressure in the holder's writer itself: while its client does not read, a
    followed log stops after a few chunks instead of piling up in the holder."""
    import asyncio

    from remote_exec.holder import wire
    from remote_exec.holder.server import _WireReporter

    chunk = "x" * 256 * 1024  # what the log follower sends at once
    chunks = 100
    path = str(tmp_path / "s.sock")

    async def main() -> tuple[int, int, int]:
        sent = 0
        writers: list = []

        async def serve(_reader, writer) -> None:
            nonlocal sent
            writers.append(writer)
            ui = _WireReporter(writer, progress=False)
            for _ in range(chunks):
                ui.log_text(chunk)
                await ui.drain()
                sent += 1
            ui.warn("done")
            await ui.drain()
            writer.close()

        server = await asyncio.start_unix_server(serve, path=path)
        async with server:
            reader, client = await asyncio.open_unix_connection(path, limit=1 << 20)
            await asyncio.sleep(1.0)  # the client reads nothing meanwhile
            stalled_at = sent
            buffered = writers[0].transport.get_write_buffer_size()
            logs = 0
            while line := await reader.readline():
                msg = wire.decode(line)
                if msg["t"] == "log":
                    assert msg["text"] == chunk
                    logs += 1
                else:
                    assert msg == {"t": "warn", "message": "done"} and logs == chunks
            client.close()
        return stalled_at, buffered, logs

    stalled_at, buffered, logs = asyncio.run(main())
    assert stalled_at * len(chunk) < 8 * 1024 * 1024, f"{stalled_at} chunks went out unread"
    assert buffered < 1024 * 1024, f"the holder buffered {buffered} bytes"
    assert logs == chunks  # and once the client reads, everything arrives, in order
