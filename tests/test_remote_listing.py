"""Large run directories are listed by one remote ``find`` and removed by one ``rm -rf``
(see transfer.MANY_ENTRIES); the listing must say exactly what the SFTP walk says, for
every kind of entry and every hostile name, so that the fetch plan cannot tell them apart."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import asyncssh
import pytest

from remote_exec.sandbox import Sandbox
from remote_exec.ssh import shell, transfer

HOSTILE = ["sp ace", "quo'te", 'dq"uote', "$(touch pwned)", "new\nline", "back\\slash",
           "-dash", "tab\tname", "ünï", "*", "semi;colon"]


def make_tree(root: Path) -> None:
    (root / ".remote-exec").mkdir()
    (root / ".remote-exec" / "exit_code").write_text("0\n")  # left out of both
    (root / "d" / "e").mkdir(parents=True)
    for i, name in enumerate(HOSTILE):
        (root / name).write_bytes(b"x" * i)
        (root / "d" / "e" / name).write_text(name)
    (root / "empty-dir").mkdir()
    os.symlink("d/e", root / "link-to-dir")
    os.symlink("/etc/passwd", root / "link-out")
    os.symlink("missing", root / "dangling")
    os.mkfifo(root / "fifo")
    suid = root / "suid"
    suid.write_text("#!/bin/sh\n")
    suid.chmod(0o4755)
    os.utime(root / "d" / "e" / "sp ace", (1_600_000_000.75, 1_600_000_000.75))


async def both(box: Sandbox, root: Path) -> tuple[dict, dict]:
    site = box.site_definition()
    async with asyncssh.connect("127.0.0.1", port=site["port"], username=site["user"],
                                client_keys=[site["identity_file"]],
                                known_hosts=site["known_hosts"]) as conn:
        listed = await transfer.list_remote(conn, str(root))
        async with await shell.open_sftp(conn) as sftp:
            walked = await transfer.walk_remote(sftp, str(root))
            assert await transfer.walk_remote(sftp, str(root), limit=3) is None
    assert listed is not None and walked is not None

    def table(entries: transfer.Entries) -> dict:
        return {rel: (a.type, a.size if a.type == asyncssh.FILEXFER_TYPE_REGULAR else None,
                      a.mtime, a.permissions) for rel, a in entries}

    return table(listed), table(walked)


def test_find_listing_equals_the_sftp_walk(sshd: Sandbox, tmp_path: Path) -> None:
    root = tmp_path / "run dir $(x)"
    root.mkdir()
    make_tree(root)
    listed, walked = asyncio.run(both(sshd, root))
    assert listed == walked
    assert "new\nline" in listed and "d/e/$(touch pwned)" in listed
    assert not [k for k in listed if k.startswith(".remote-exec")]
    assert listed["suid"][3] & 0o4000 and listed["fifo"][0] == asyncssh.FILEXFER_TYPE_FIFO
    assert listed["d/e/sp ace"][2] == 1_600_000_000
    assert not (tmp_path / "pwned").exists()


def test_a_large_run_directory_is_listed_and_removed_by_command(cli, workdir: Path,
                                                                remote_root: Path) -> None:
    count = transfer.MANY_ENTRIES + 500
    proc = cli("run", "--site", "loop", "--json", "--keep", "--cmd",
               f"python3 -c \"import os; os.mkdir('many'); "
               f"[open('many/f%d' % i, 'w').write('x') for i in range({count})]\"",
               "--into", "back", cwd=workdir, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((workdir / "back" / "many").iterdir())) == count
    run_id = next(json.loads(line)["run_id"] for line in proc.stderr.splitlines()
                  if line.startswith("{") and "run_id" in line)
    assert (remote_root / run_id / "many").is_dir()  # --keep
    cleanup = cli("cleanup", "loop", "--older-than", "0", cwd=workdir)
    assert cleanup.returncode == 0, cleanup.stderr
    assert not (remote_root / run_id).exists(), cleanup.stdout + cleanup.stderr


def test_large_run_removed_after_success(cli, workdir: Path, remote_root: Path) -> None:
    count = transfer.MANY_ENTRIES + 10
    proc = cli("run", "--site", "loop", "--cmd",
               f"python3 -c \"import os; os.mkdir('m'); "
               f"[open('m/f%d' % i, 'w').close() for i in range({count})]\"",
               "--into", "back", cwd=workdir, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((workdir / "back" / "m").iterdir())) == count
    assert not list(remote_root.iterdir())


@pytest.mark.parametrize("name", ["plain", "with space", "$(x)"])
def test_remove_by_command_is_idempotent(sshd: Sandbox, tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    (target / "a" / "b").mkdir(parents=True)
    (target / "a" / "b" / "f").write_text("x")
    os.symlink(str(tmp_path / "keep"), target / "out")  # rm -rf never follows it
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious").write_text("p")
    site = sshd.site_definition()

    async def go() -> tuple[bool, bool]:
        async with asyncssh.connect("127.0.0.1", port=site["port"], username=site["user"],
                                    client_keys=[site["identity_file"]],
                                    known_hosts=site["known_hosts"]) as conn:
            return (await transfer.remove_by_command(conn, str(target)),
                    await transfer.remove_by_command(conn, str(target)))

    assert asyncio.run(go()) == (True, True)
    assert not target.exists()
    assert (tmp_path / "keep" / "precious").read_text() == "p"
