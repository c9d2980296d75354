"""The main path of `remote-exec run` against a real loopback sshd."""

from __future__ import annotations

import os
from pathlib import Path


def make_inputs(work: Path) -> list[str]:
    for name, text in (("a", "alpha\n"), ("b", "beta\n"), ("c", "gamma\n")):
        (work / name).write_text(text)
    return ["a", "b", "c"]


def test_success_returns_outputs_and_removes_remote_dir(cli, workdir, remote_root):
    names = make_inputs(workdir)
    proc = cli("run", "--site", "loop", "--cmd", "cat a b c > out; echo done", *names, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "out").read_bytes() == b"alpha\nbeta\ngamma\n"
    assert (workdir / "remote_program_exec.log").read_text() == "done\n"
    assert not (workdir / ".remote-exec").exists()
    assert list(remote_root.iterdir()) == []  # remote directory removed
    assert not [p for p in workdir.iterdir() if p.name.startswith(".remote-exec-")]


def test_failing_entrypoint_keeps_remote_dir_and_passes_exit_code(cli, workdir, remote_root):
    make_inputs(workdir)
    proc = cli("run", "--site", "loop", "--cmd", "echo broken >&2; exit 7", "a", cwd=workdir)
    assert proc.returncode == 7
    assert "broken" in proc.stderr
    kept = list(remote_root.iterdir())
    assert len(kept) == 1 and str(kept[0]) in proc.stderr
    assert (kept[0] / "remote_program_exec.log").read_text() == "broken\n"
    assert (kept[0] / ".remote-exec" / "exit_code").read_text().strip() == "7"
    assert oct(kept[0].stat().st_mode & 0o777) == "0o700"


def test_keep_keeps_remote_dir(cli, workdir, remote_root):
    make_inputs(workdir)
    proc = cli("run", "--site", "loop", "--keep", "--cmd", "true", "a", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert len(list(remote_root.iterdir())) == 1


def test_into_directory(cli, workdir, tmp_path):
    make_inputs(workdir)
    dest = tmp_path / "results"
    proc = cli("run", "--site", "loop", "--into", str(dest), "--cmd", "wc -c a > n", "a",
               cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "n").read_text().split()[0] == "6"
    assert not (workdir / "n").exists()


def test_symlinked_and_directory_inputs_are_followed(cli, workdir, tmp_path):
    target = tmp_path / "elsewhere.dat"
    target.write_text("linked content\n")
    os.symlink(target, workdir / "port.dat")
    (workdir / "tree" / "sub").mkdir(parents=True)
    (workdir / "tree" / "sub" / "leaf.txt").write_text("leaf\n")
    os.symlink(target, workdir / "tree" / "link-in-tree")
    proc = cli("run", "--site", "loop", "--keep", "--cmd",
               "test -f port.dat && test ! -L port.dat && test ! -L tree/link-in-tree && "
               "cat port.dat tree/sub/leaf.txt tree/link-in-tree > joined",
               "port.dat", "tree", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "joined").read_text() == "linked content\nleaf\nlinked content\n"


def test_follow_streams_the_log(cli, workdir):
    proc = cli("run", "--site", "loop", "--follow", "--cmd",
               "echo first; sleep 1; echo second", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "first\nsecond\n"


def test_large_payload_both_ways_through_tunnelled_rsync_and_sftp(cli, workdir, tmp_path):
    payload = os.urandom(5 * 1024 * 1024 + 17)
    (workdir / "big.bin").write_bytes(payload)
    for transfer in ("rsync", "sftp"):
        dest = tmp_path / transfer
        proc = cli("run", "--site", "loop", "--json", "--transfer", transfer, "--into", str(dest),
                   "--cmd", "cp big.bin copy.bin", "big.bin", cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        assert f'"method": "{transfer}"' in proc.stderr
        assert (dest / "copy.bin").read_bytes() == payload
        assert not (dest / "big.bin").exists()  # an unchanged input does not travel back
        assert "Traceback" not in proc.stderr
