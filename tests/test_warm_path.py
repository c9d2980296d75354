"""The warm path of a small run: launches go through one launch server per connection
(remote_exec/backends/direct.py) instead of an exec request (a login shell) each; the
guarantees stay: launch at most once, exit codes, a fallback when the server cannot
answer."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import asyncssh

from remote_exec.backends import direct
from remote_exec.entrypoint import ALREADY_LAUNCHED, Entrypoint


async def _connect(box) -> asyncssh.SSHClientConnection:
    site = box.site_definition()
    return await asyncssh.connect(
        site["host"], port=int(site["port"]), username=site["user"],
        client_keys=[site["identity_file"]], known_hosts=site["known_hosts"])


def _rundir(root: Path, name: str, command: str) -> Path:
    rundir = root / name
    control = rundir / ".remote-exec"
    control.mkdir(parents=True)
    for file, data in Entrypoint("command", command, command).control_files().items():
        (control / file).write_bytes(data)
    return rundir


def test_launch_server_starts_once_and_reports_exit_codes(sshd, tmp_path: Path) -> None:
    one = _rundir(tmp_path, "one", "echo ran >> count; exit 3")
    two = _rundir(tmp_path, "two", "sleep 0.3; exit 0")

    async def main() -> None:
        conn = await _connect(sshd)
        async with conn:
            server = await direct.launch_server(conn)
            assert server is not None and server.alive
            assert await direct.launch_server(conn) is server  # one per connection
            first, second = server.launch(str(one)), server.launch(str(two))
            pids = await asyncio.gather(first.pid, second.pid)
            assert all(p is not None and p.isdigit() for p in pids), pids
            await asyncio.gather(first.wait_closed(), second.wait_closed())
            assert (first.exit_status, second.exit_status) == (3, 0)
            # again: launch.sh's guard refuses, no "started" (the caller falls back to an
            # exec request, which reports ALREADY_LAUNCHED and reads the pgid)
            again = server.launch(str(one))
            assert await again.pid is None
            await again.wait_closed()
            assert again.exit_status == ALREADY_LAUNCHED
            assert not server.waiting

    asyncio.run(main())
    assert (one / "count").read_text() == "ran\n"
    assert (one / ".remote-exec" / "exit_code").read_text() == "3\n"
    assert (two / ".remote-exec" / "exit_code").read_text() == "0\n"


def test_a_closed_launch_server_is_replaced_and_its_waiters_released(sshd,
                                                                     tmp_path: Path) -> None:
    slow = _rundir(tmp_path, "slow", "sleep 2; echo done > out")

    async def main() -> None:
        conn = await _connect(sshd)
        async with conn:
            server = await direct.launch_server(conn)
            assert server is not None
            attached = server.launch(str(slow))
            assert await attached.pid is not None
            server.process.close()  # the channel ends; the entrypoint goes on (detached)
            await asyncio.wait_for(attached.wait_closed(), 10)
            assert attached.exit_status is None
            await asyncio.wait_for(server.reader, 10)
            assert not server.alive
            fresh = await direct.launch_server(conn)
            assert fresh is not None and fresh is not server and fresh.alive

    asyncio.run(main())
    for _ in range(100):
        if (slow / ".remote-exec" / "exit_code").exists():
            break
        time.sleep(0.1)
    assert (slow / "out").read_text() == "done\n"
    assert (slow / ".remote-exec" / "exit_code").read_text() == "0\n"


def test_warm_runs_through_the_holder_keep_exit_codes_and_outputs(cli, workdir: Path,
                                                                  remote_root: Path) -> None:
    for code in (0, 5, 0):
        work = workdir / f"w{code}-{len(os.listdir(workdir))}"
        work.mkdir()
        for name in "abc":
            (work / name).write_text(name * 1000)
        proc = cli("run", "--site", "loop", "--cmd", f"cat a b c > out; exit {code}",
                   "a", "b", "c", cwd=work)
        assert proc.returncode == code, proc.stderr
        assert (work / "out").read_text() == "a" * 1000 + "b" * 1000 + "c" * 1000
    assert len(list(remote_root.iterdir())) == 1  # the failed run's directory is kept
