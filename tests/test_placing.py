"""Placing returned results (issue 13, "nothing lost, nothing planted"), through the real
CLI against the loopback sshd, by SFTP and by rsync alike:

  1. a returned item never replaces a local item of another type: it is kept aside in
     the partial directory, the run exits 74 naming both, and `resume` places it later;
  3. a returned symlink that leads out of the destination, through chains of links
     included, is dropped with a warning;
  4. device nodes, FIFOs, sockets, setuid/setgid bits and foreign owners never come back;
  7. local inputs are never modified: unchanged ones do not travel back, changed ones
     come back as NAME.returned, a symlinked input stays a symlink.
"""
# ruff: noqa: F811  (the restricted site's fixture is imported and used by name)

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers_badinput import event
from test_restricted import Locked, locked  # noqa: F401  (the restricted site, by name)

from remote_exec.errors import EXIT_FETCH

TRANSFERS = ["sftp", "rsync"]


def run(cli, workdir: Path, transfer: str, command: str, *inputs: str, json: bool = False):
    flags = ["--json"] if json else []
    return cli("run", "--site", "loop", "--transfer", transfer, *flags, "--cmd", command,
               *inputs, cwd=workdir)


def partials(workdir: Path) -> list[Path]:
    return [p for p in workdir.iterdir() if p.name.startswith(".remote-exec-")]


# -- 1. nothing local is replaced by an item of another type --------------------------------

@pytest.mark.parametrize("transfer", TRANSFERS)
def test_a_returned_file_never_replaces_a_local_directory(cli, workdir, remote_root, transfer):
    results = workdir / "results"
    results.mkdir()
    (results / "kept.dat").write_text("precious\n")
    os.symlink("results", workdir / "alias")
    (workdir / "out.txt").write_text("old\n")
    proc = run(cli, workdir, transfer,
               "echo x > results; mkdir alias; echo new > out.txt; echo fine > other.txt",
               json=True)
    assert proc.returncode == EXIT_FETCH, proc.stderr
    # the local data is untouched
    assert (results / "kept.dat").read_text() == "precious\n"
    assert os.readlink(workdir / "alias") == "results"
    # what did not clash is placed (same type: updated in place)
    assert (workdir / "out.txt").read_text() == "new\n"
    assert (workdir / "other.txt").read_text() == "fine\n"
    # the clashing items are kept aside, and the error names both paths of each
    [partial] = partials(workdir)
    assert (partial / "results").read_text() == "x\n"
    assert (partial / "alias").is_dir()
    assert f"{partial / 'results'} (a file) would replace the local directory {results}" \
        in proc.stderr
    assert f"{partial / 'alias'} (a directory) would replace the local symlink " \
        f"{workdir / 'alias'}" in proc.stderr
    assert "remote-exec resume" in proc.stderr
    assert len(list(remote_root.iterdir())) == 1  # the remote directory is kept

    # the user moves the local items away; `resume` places the results
    run_id = event(proc.stderr, "created")["run_id"]
    results.rename(workdir / "results.mine")
    (workdir / "alias").unlink()
    resumed = cli("resume", run_id[:8], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert (workdir / "results").read_text() == "x\n"
    assert (workdir / "alias").is_dir() and not (workdir / "alias").is_symlink()
    assert (workdir / "results.mine" / "kept.dat").read_text() == "precious\n"
    assert partials(workdir) == []
    assert list(remote_root.iterdir()) == []


# -- 3. no link leaves the destination ----------------------------------------------------

#: ``sub/up -> ..`` climbs nothing for real, yet each ``sub/up`` counts two levels textually
CHAIN = "sub/up/" * 12 + "../" * 24 + "etc/passwd"


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_a_chain_of_links_cannot_lead_out(cli, workdir, transfer):
    proc = run(cli, workdir, transfer,
               f"mkdir sub; ln -s .. sub/up; ln -s {CHAIN} x; ln -s /etc/passwd abs; "
               "ln -s sub/up/sub inside; ln -s sub/up/../.. out; echo t > t.txt; "
               "ln -s t.txt t.link")
    assert proc.returncode == 0, proc.stderr
    for name in ("x", "abs", "out"):
        assert not os.path.lexists(workdir / name), name
        assert f"not fetched: {name} -> " in proc.stderr, name
    # the links that stay inside come back as links
    assert os.readlink(workdir / "sub" / "up") == ".."
    assert os.readlink(workdir / "inside") == "sub/up/sub"
    assert (workdir / "t.link").read_text() == "t\n"
    assert os.path.realpath(workdir / "inside") == str(workdir.resolve() / "sub")
    assert partials(workdir) == []


# -- 4. no special files, no privileges -----------------------------------------------------

SPECIALS = ("mknod blk b 7 0; mknod chr c 1 3; mkfifo fifo; "
            "python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'; "
            "echo s > suid; chmod 4755 suid; echo g > sgid; chmod 2750 sgid; "
            "mkdir gdir; chmod 2775 gdir; echo o > owned; chown 12345:23456 owned; "
            "echo plain > plain")


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and chown need root")
@pytest.mark.parametrize("transfer", TRANSFERS)
def test_no_device_fifo_socket_setuid_or_foreign_owner_comes_back(cli, workdir, transfer):
    proc = run(cli, workdir, transfer, SPECIALS)
    assert proc.returncode == 0, proc.stderr
    for name in ("blk", "chr", "fifo", "sock"):
        assert not os.path.lexists(workdir / name), name
        assert f"not fetched: {name} (a " in proc.stderr, name
    for name, mode in (("suid", 0o755), ("sgid", 0o750), ("gdir", 0o775)):
        st = os.lstat(workdir / name)
        assert stat.S_IMODE(st.st_mode) == mode, name
        assert f"setuid/setgid bit of {name}" in proc.stderr, name
    st = os.lstat(workdir / "owned")
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert (workdir / "plain").read_text() == "plain\n"


# -- 7. inputs are never modified -----------------------------------------------------------

@pytest.mark.parametrize("transfer", TRANSFERS)
def test_a_changed_input_comes_back_beside_it_never_over_it(cli, workdir, tmp_path, transfer):
    (workdir / "input.dat").write_text("the input\n")
    target = tmp_path / "elsewhere.dat"
    target.write_text("handed over by MInt\n")
    os.symlink(target, workdir / "port.dat")
    other = tmp_path / "other-port.dat"
    other.write_text("another port\n")
    os.symlink(other, workdir / "port2.dat")
    tree = workdir / "tree"
    (tree / "deep").mkdir(parents=True)
    (tree / "a").write_text("a\n")
    (tree / "deep" / "b").write_text("b\n")
    before = {p: os.lstat(p).st_mtime_ns
              for p in (workdir / "input.dat", target, other, tree / "a")}
    proc = run(cli, workdir, transfer,
               ": > input.dat; echo changed > tree/a; echo new > tree/deep/new; "
               "cat port.dat > seen.txt; echo more >> port2.dat",
               "input.dat", "port.dat", "port2.dat", "tree")
    assert proc.returncode == 0, proc.stderr
    # the local inputs are untouched; the symlinked one is still a symlink
    assert (workdir / "input.dat").read_text() == "the input\n"
    assert os.readlink(workdir / "port.dat") == str(target)
    assert target.read_text() == "handed over by MInt\n"
    assert os.readlink(workdir / "port2.dat") == str(other)
    assert other.read_text() == "another port\n"
    assert (tree / "a").read_text() == "a\n" and not (tree / "deep" / "new").exists()
    assert before == {p: os.lstat(p).st_mtime_ns for p in before}
    # what the entrypoint changed comes back as NAME.returned, and only that
    assert (workdir / "input.dat.returned").read_bytes() == b""
    assert sorted(str(p.relative_to(workdir / "tree.returned"))
                  for p in (workdir / "tree.returned").rglob("*")) == ["a", "deep", "deep/new"]
    assert (workdir / "tree.returned" / "a").read_text() == "changed\n"
    assert not os.path.lexists(workdir / "port.dat.returned")
    assert (workdir / "port2.dat.returned").read_text() == "another port\nmore\n"
    assert (workdir / "seen.txt").read_text() == "handed over by MInt\n"
    assert "input input.dat was changed by the entrypoint" in proc.stderr
    assert partials(workdir) == []


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_an_unchanged_input_does_not_travel_back(cli, workdir, transfer):
    size = 3 * 1024 * 1024
    (workdir / "big.bin").write_bytes(os.urandom(size))
    proc = run(cli, workdir, transfer, "wc -c < big.bin > n", "big.bin", json=True)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "n").read_text().strip() == str(size)
    fetched = event(proc.stderr, "fetched")
    assert fetched["bytes"] < 4096 and "big.bin" not in fetched["fetched"]
    assert event(proc.stderr, "unchanged")["unchanged"] == 1
    assert fetched["method"] == transfer
    assert not (workdir / "big.bin.returned").exists()


# -- the same rules on a restricted site (results through the agent's outbox) --------------

def test_a_restricted_site_places_by_the_same_rules(locked: Locked, tmp_path: Path):
    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    (work / "results" / "kept.dat").write_text("precious\n")
    (work / "input.txt").write_text("the input\n")
    target = tmp_path / "port-target.dat"
    target.write_text("a port\n")
    os.symlink(target, work / "port.dat")
    script = ": > input.txt; echo x > results; echo s > suid; chmod 4755 suid; echo ok > out"
    proc = locked.cli("run", "--site", "locked", "--template", "generic",
                      "-p", "program=/bin/sh", "-p", "args=-c", "-p", f"args={script}",
                      "input.txt", "port.dat", cwd=work)
    assert proc.returncode == EXIT_FETCH, proc.stderr
    assert (work / "results" / "kept.dat").read_text() == "precious\n"
    assert (work / "input.txt").read_text() == "the input\n"
    assert (work / "input.txt.returned").read_bytes() == b""
    assert os.readlink(work / "port.dat") == str(target)
    assert target.read_text() == "a port\n"
    assert not os.path.lexists(work / "port.dat.returned")
    assert (work / "out").read_text() == "ok\n"
    assert stat.S_IMODE(os.lstat(work / "suid").st_mode) == 0o755
    [partial] = partials(work)
    assert (partial / "results").read_text() == "x\n"
    assert "would replace the local directory" in proc.stderr
