"""Issue 13, findings 9 and 10: special inputs are refused, and every local failure ends
with its documented exit code and the next command to run.

Everything goes through the real ``remote-exec`` CLI against the loopback sshd.
"""
# ruff: noqa: F811  (fixtures imported from helpers_badinput are parameters by name)

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from helpers_badinput import site_entry, tmpfs_root, write_config  # noqa: F401
from test_ssh_config import write_ssh_config

# -- 9. special inputs: refused with exit 66 before anything connects -----------------------


def _assert_refused(proc: subprocess.CompletedProcess, remote_root: Path, *needles: str) -> None:
    assert proc.returncode == 66, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in {proc.stderr!r}"
    assert "only regular files and directories" in proc.stderr
    assert list(remote_root.iterdir()) == [], "something was created on the remote side"


def test_a_fifo_input_is_refused_at_once(cli, workdir, remote_root):
    os.mkfifo(workdir / "pipe")
    (workdir / "ok.dat").write_text("ok\n")
    proc = cli("run", "--site", "loop", "--cmd", "touch ran", "ok.dat", "pipe",
               cwd=workdir, timeout=30)  # it used to block here for ever
    _assert_refused(proc, remote_root, "'pipe'", "FIFO")


def test_a_symlink_to_a_character_device_is_refused(cli, workdir, remote_root):
    os.symlink("/dev/zero", workdir / "zeros")
    proc = cli("run", "--site", "loop", "--cmd", "touch ran", "zeros", cwd=workdir, timeout=30)
    _assert_refused(proc, remote_root, "'zeros'", "/dev/zero", "character device")
    assert not (workdir / "ran").exists()


def test_special_files_inside_an_input_directory_are_refused(cli, workdir, remote_root):
    for name in ("with-fifo", "with-device", "with-socket"):
        (workdir / name).mkdir()
        (workdir / name / "ok.txt").write_text("ok\n")
    os.mkfifo(workdir / "with-fifo" / "inner-pipe")
    os.symlink("/dev/null", workdir / "with-device" / "inner-null")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(workdir / "with-socket" / "inner-sock"))
        proc = cli("run", "--site", "loop", "--cmd", "touch ran", "with-fifo", "with-device",
                   "with-socket", cwd=workdir, timeout=30)
    _assert_refused(proc, remote_root, "inner-pipe", "inner-null", "inner-sock",
                    "FIFO", "character device", "socket")


# -- 10a. a full local disk at fetch: resume continues into the kept partial directory ------

@pytest.mark.parametrize("transfer", ["sftp", "rsync"])
def test_full_local_disk_at_fetch_names_the_partial_directory_and_resume(
        cli, workdir, tmpfs_root, transfer):
    if transfer == "rsync" and not shutil.which("rsync"):
        pytest.skip("no rsync")
    into = tmpfs_root / "results"
    proc = cli("run", "--site", "loop", "--transfer", transfer, "--into", str(into), "--cmd",
               "head -c 2000000 /dev/urandom > big; echo small > small", cwd=workdir)
    assert proc.returncode == 74, proc.stderr
    assert "Traceback" not in proc.stderr
    partials = list(into.glob(".remote-exec-*.partial"))
    assert len(partials) == 1, proc.stderr
    partial = partials[0]
    run_id = partial.name[len(".remote-exec-"):-len(".partial")]
    assert str(partial) in proc.stderr
    assert f"remote-exec resume {run_id[:8]}" in proc.stderr
    assert re.search(r"\d+ more bytes needed", proc.stderr), proc.stderr
    assert "copy it by hand" not in proc.stderr

    grown = subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs_root)],
                           capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    again = cli("resume", run_id[:8], cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert (into / "big").stat().st_size == 2000000
    assert (into / "small").read_text() == "small\n"
    assert not partial.exists()
