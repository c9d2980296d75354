"""Many small input files travel as one tar stream (``transfer: auto``): the remote run
directory then holds exactly what rsync -a -L would have put there (modes, times,
symlinks followed, hostile names), and a site without tar falls back to another way."""

from __future__ import annotations

import json
import os
from pathlib import Path

from remote_exec.ssh.transfer import AUTO_RSYNC_FILES

HOSTILE = ["sp ace", "quo'te", "$(touch pwned)", "new\nline", "-dash", "back\\slash", "ünï"]


def make_inputs(work: Path) -> None:
    tree = work / "tree"
    for i in range(AUTO_RSYNC_FILES + 20):
        d = tree / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n")
    for name in HOSTILE:
        (tree / name).write_text(name)
    (tree / "run.sh").write_text("#!/bin/sh\n")
    (tree / "run.sh").chmod(0o750)
    os.utime(tree / "d0" / "f0.txt", (1_600_000_000, 1_600_000_000))
    (work / "outside.txt").write_text("followed\n")
    os.symlink(work / "outside.txt", tree / "link.txt")  # followed, as rsync -L does
    (work / "single file.dat").write_text("one\n")


def staged(proc_stderr: str) -> dict:
    for line in proc_stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "staged":
                return event
    raise AssertionError(proc_stderr)


def test_many_small_files_travel_as_one_tar_stream(cli, workdir: Path,
                                                   remote_root: Path) -> None:
    check_tar_staging(cli, workdir, remote_root, "loop")


def test_tar_staging_needs_no_rsync(cli, workdir: Path, remote_root: Path,
                                    nosync_sshd) -> None:
    check_tar_staging(cli, workdir, remote_root, "norsync")


def check_tar_staging(cli, workdir: Path, remote_root: Path, site: str) -> None:
    make_inputs(workdir)
    proc = cli("run", "--site", site, "--json", "--keep", "--cmd",
               "ls tree/d0 > listing.txt", "tree", "single file.dat", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    event = staged(proc.stderr)
    assert event["method"] == "tar", event
    run_dir = next(p for p in remote_root.iterdir() if not p.name.startswith("."))
    tree = run_dir / "tree"
    local = workdir / "tree"
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*"))
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*")) == names
    for rel in names:
        a, b = local / rel, tree / rel
        if a.is_file():
            assert b.read_bytes() == a.read_bytes(), rel
            assert not b.is_symlink()  # symlinks followed
            assert (b.stat().st_mode & 0o7777) == (a.stat().st_mode & 0o7777), rel
            assert int(b.stat().st_mtime) == int(a.stat().st_mtime), rel
    assert (run_dir / "single file.dat").read_text() == "one\n"
    assert not (workdir / "pwned").exists() and not (run_dir / "pwned").exists()


def test_few_files_do_not_use_tar(cli, workdir: Path) -> None:
    (workdir / "a.txt").write_text("a\n")
    proc = cli("run", "--site", "loop", "--json", "--cmd", "cat a.txt", "a.txt", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert staged(proc.stderr)["method"] == "sftp"


def test_an_explicit_method_is_honoured(cli, workdir: Path) -> None:
    make_inputs(workdir)
    proc = cli("run", "--site", "loop", "--json", "--transfer", "rsync", "--cmd", "true",
               "tree", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert staged(proc.stderr)["method"] == "rsync"


def test_a_site_without_tar_gets_rsync(cli, workdir: Path, remote_root: Path,
                                       notar_sshd) -> None:
    make_inputs(workdir)
    proc = cli("run", "--site", "notar", "--json", "--cmd", "cat tree/d0/f0.txt > n.txt",
               "tree", "--into", "back", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert staged(proc.stderr)["method"] == "rsync"
    assert (workdir / "back" / "n.txt").read_text() == "file 0\n"
