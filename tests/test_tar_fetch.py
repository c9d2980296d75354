"""Many small result files come back as one tar stream (``transfer: auto``, whether the
ends have rsync or not), unpacked locally without trusting it: byte-exact with hostile
names, modes and times kept, symlinks kept as links (those leading out never placed),
the return filter and the "unchanged inputs stay" rule of the fetch plan honoured; a
site without tar falls back; a cut mid-fetch leaves nothing half-written and ``resume``
completes it; and a hostile stream (``..``, absolute names, a file through a symlink,
devices, hard links), crafted or sent by a hostile remote tar, writes nothing outside
the partial directory; the header reader takes GNU, pax and ustar headers."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import asyncssh
import pytest
import yaml
from conftest import _start, site_entry
from tcp_proxy import TcpProxy

from remote_exec import localfs
from remote_exec.ssh.tarfetch import TMP_NAME, Extractor, Refused
from remote_exec.ssh.transfer import AUTO_RSYNC_FILES

FILES = AUTO_RSYNC_FILES + 50
HOSTILE = ["sp ace", "quo'te", 'dq"uote', "$(touch pwned)", "`touch pwned2`", "new\nline",
           "-dash", "--opt", "back\\slash", "ünï", "tab\there", "*star?"]

#: the entrypoint: FILES small files in nested directories, hostile names (as files and
#: as directories), modes and times, symlinks in and out, a secret, a changed input
MAKE = r'''
import os, sys
HOSTILE = %r
n = int(sys.argv[1])
for i in range(n):
    d = os.path.join("out", "d%%d" %% (i %% 5), "e%%d" %% (i %% 3))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%%d.txt" %% i), "w") as f:
        f.write("file %%d\n" %% i * (i %% 7))
for name in HOSTILE:
    os.makedirs(os.path.join("out", "in " + name), exist_ok=True)
    for path in (os.path.join("out", name), os.path.join("out", "in " + name, name)):
        with open(path, "w") as f:
            f.write(name + "\n")
with open("out/run.sh", "w") as f:
    f.write("#!/bin/sh\n")
os.chmod("out/run.sh", 0o750)
os.chmod("out/d1", 0o750)
os.utime("out/d0/e0/f0.txt", (1600000000, 1600000000))
os.mkdir("out/empty")
os.utime("out/empty", (1500000000, 1500000000))
os.symlink("d0/e2/f5.txt", "out/inside")
os.symlink("in sp ace", "out/dirlink")
os.symlink("../../../../../../etc/passwd", "out/escape")
os.symlink("/etc/hostname", "out/absolute")
with open("out/secret.key", "w") as f:
    f.write("never\n")
if os.path.isdir("tree"):
    with open("tree/f1", "a") as f:
        f.write("changed\n")
'''


def write_make(work: Path) -> None:
    (work / "make.py").write_text(MAKE % (HOSTILE,))


def make_tree(work: Path) -> None:
    tree = work / "tree"
    tree.mkdir()
    for i in range(FILES):
        (tree / f"f{i}").write_text(f"in {i}\n")


def events(stderr: str) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            found.setdefault(record["event"], record)
    return found


def snapshot(top: Path) -> dict[str, tuple]:
    """What is under ``top``: per relative path, its kind and content, mode or target."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(top))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                found[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    return found


def expected_out(tmp: Path) -> dict[str, tuple]:
    """The entrypoint run locally: what ``out/`` must hold once fetched."""
    here = tmp / "expected"
    here.mkdir()
    write_make(here)
    subprocess.run([sys.executable, "make.py", str(FILES)], cwd=here, check=True)
    wanted = snapshot(here / "out")
    for dropped in ("secret.key", "escape", "absolute"):
        del wanted[dropped]
    return wanted


def with_never_return(cli, patterns: list[str]) -> None:
    config = yaml.safe_load(cli.config.read_text())
    for site in config["sites"].values():
        site["never_return"] = patterns
    cli.config.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def bare_sshd(tmp_path_factory: pytest.TempPathFactory):
    """A loopback sshd whose sessions can run neither tar nor rsync (empty files
    bind-mounted over both, in a mount namespace of the sshd's own)."""
    unshare, paths = shutil.which("unshare"), [shutil.which(p) for p in ("tar", "rsync")]
    if os.geteuid() != 0 or not unshare or not all(paths):
        pytest.skip("hiding tar and rsync needs root and unshare(1)")
    directory = tmp_path_factory.mktemp("no-tar-no-rsync")
    empty = directory / "empty"
    empty.write_text("")
    script = " && ".join(f"mount --bind {empty} {os.path.realpath(p)}" for p in paths)
    box = _start(directory, wrapper=[unshare, "-m", "sh", "-c", script + ' && exec "$@"', "sh"])
    yield box
    box.down()


def add_site(cli, name: str, box, root: Path) -> None:
    config = yaml.safe_load(cli.config.read_text())
    config["sites"][name] = site_entry(box, root)
    cli.config.write_text(yaml.safe_dump(config))


# -- through the CLI -------------------------------------------------------------------------

def test_many_small_results_come_back_as_one_tar_stream(cli, workdir: Path, tmp_path: Path,
                                                        remote_root: Path, nosync_sshd) -> None:
    with_never_return(cli, ["**/*.key"])
    write_make(workdir)
    make_tree(workdir)
    back = workdir / "back"
    proc = cli("run", "--site", "norsync", "--json", "--into", str(back), "--cmd",
               f"python3 make.py {FILES}", "make.py", "tree", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = events(proc.stderr)
    assert seen["staged"]["method"] == "tar"
    assert seen["fetched"]["method"] == "tar", seen["fetched"]
    assert "no-tar" not in seen
    # unchanged inputs stay where they are: only the changed one comes back (renamed)
    assert seen["unchanged"]["unchanged"] == FILES  # (FILES - 1 of tree, and make.py)
    assert sorted(p.name for p in (back / "tree.returned").iterdir()) == ["f1"]
    assert (back / "tree.returned" / "f1").read_text() == "in 1\nchanged\n"
    assert not (back / "make.py").exists() and not (back / "tree").exists()
    # byte-exact, modes and link targets kept; the secret and the escaping links stay out
    got = snapshot(back / "out")
    assert got == expected_out(tmp_path)
    assert int((back / "out" / "d0" / "e0" / "f0.txt").stat().st_mtime) == 1600000000
    assert int((back / "out" / "empty").stat().st_mtime) == 1500000000
    assert (back / "out" / "inside").read_text() == "file 5\n" * 5
    assert "escape" in proc.stderr and "absolute" in proc.stderr  # dropped, with a warning
    assert not any(p.name.startswith("pwned") for d in (workdir, back, back / "out")
                   for p in d.iterdir())
    assert not [p for p in back.iterdir() if p.name.startswith(".remote-exec")]


@pytest.mark.parametrize(("site", "transfer", "method"), [
    ("loop", "auto", "tar"),  # both ends have rsync: one tar stream all the same
    ("loop", "rsync", "rsync"),
    ("norsync", "sftp", "sftp"),  # (where auto would take tar)
])
def test_auto_and_explicit_methods_take_their_way(cli, workdir: Path, tmp_path: Path,
                                                   nosync_sshd, site: str, transfer: str,
                                                   method: str) -> None:
    write_make(workdir)
    back = workdir / "back"
    proc = cli("run", "--site", site, "--json", "--transfer", transfer, "--into", str(back),
               "--cmd", f"python3 make.py {FILES}", "make.py", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert events(proc.stderr)["fetched"]["method"] == method
    got = snapshot(back / "out")
    del got["secret.key"]
    assert got == expected_out(tmp_path)


def test_a_site_without_tar_falls_back(cli, workdir: Path, tmp_path: Path, remote_root: Path,
                                      bare_sshd) -> None:
    add_site(cli, "bare", bare_sshd, remote_root)
    write_make(workdir)
    back = workdir / "back"
    proc = cli("run", "--site", "bare", "--json", "--into", str(back),
               "--cmd", f"python3 make.py {FILES}", "make.py", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = events(proc.stderr)
    assert seen["no-tar"]["method"] == "sftp", seen.get("no-tar")
    assert seen["fetched"]["method"] == "sftp"
    got = snapshot(back / "out")
    del got["secret.key"]
    assert got == expected_out(tmp_path)


def test_a_cut_mid_fetch_then_resume(cli, workdir: Path, tmp_path: Path, nosync_sshd,
                                     remote_root: Path) -> None:
    """The link is cut while the tar stream flows and the host refuses reconnects: the
    run is interrupted, its partial directory holds only whole files, and ``resume``
    brings all of it."""
    count, size = 400, 20_000
    sshd = nosync_sshd  # (no rsync there: auto takes tar)
    with TcpProxy(sshd.port) as proxy:
        site = sshd.site_definition()
        kind, blob = Path(f"{sshd.host_key}.pub").read_text().split()[:2]
        known = tmp_path / "proxied.known_hosts"
        known.write_text(f"[127.0.0.1]:{proxy.port} {kind} {blob}\n")
        site.update(root=str(remote_root), port=proxy.port, known_hosts=str(known))
        config = tmp_path / "proxied.yaml"
        config.write_text(yaml.safe_dump({"sites": {"loop": site}}))
        env = {**cli.env, "REMOTE_EXEC_CONFIG": str(config)}
        back = workdir / "back"
        command = (f"mkdir out; i=0; while [ $i -lt {count} ]; do head -c {size} /dev/urandom"
                   " > out/f$i; i=$((i+1)); done; cd out && sha256sum f* > ../sums")
        with open(tmp_path / "run.err", "wb") as err:
            run = subprocess.Popen(
                [sys.executable, "-m", "remote_exec", "run", "--site", "loop", "--no-holder",
                 "--retry", "1,0.5", "--into", str(back), "--cmd", command],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err)
            deadline = time.monotonic() + 60
            while not list(remote_root.glob("*/.remote-exec/exit_code")):
                assert time.monotonic() < deadline and run.poll() is None, "no exit code"
                time.sleep(0.02)
            proxy.refuse(True, listen=False)
            proxy.cut_after(down=count * size // 3)
            assert run.wait(90) == 75
        stderr = (tmp_path / "run.err").read_text()
        assert proxy.cuts >= 1, stderr
        assert "lost during fetching" in stderr
        [rundir] = [p for p in remote_root.iterdir() if (p / ".remote-exec").is_dir()]
        partial = localfs.partial_path(back, rundir.name)
        assert partial.is_dir(), stderr
        assert not (partial / TMP_NAME).exists()
        whole = [p for p in (partial / "out").iterdir()] if (partial / "out").exists() else []
        assert len(whole) < count  # the cut came mid-stream
        assert all(p.stat().st_size == size for p in whole)  # nothing half-written
        proxy.refuse(False)
        resumed = subprocess.run(
            [sys.executable, "-m", "remote_exec", "resume", rundir.name, "--no-holder",
             "--json"], cwd=workdir, env=env, capture_output=True, text=True, timeout=90)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert events(resumed.stderr)["fetched"]["method"] == "tar"
    sums = {}
    for line in (back / "sums").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    assert len(sums) == count
    for name, digest in sums.items():
        assert hashlib.sha256((back / "out" / name).read_bytes()).hexdigest() == digest
    assert not partial.exists()


# -- the extractor, fed crafted streams ------------------------------------------------------

REG, DIR, LNK = (asyncssh.FILEXFER_TYPE_REGULAR, asyncssh.FILEXFER_TYPE_DIRECTORY,
                 asyncssh.FILEXFER_TYPE_SYMLINK)


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
           link: str = "", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, mode, 1_600_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def stream(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """(a partial directory, a directory outside it that must stay empty)"""
    dest, outside = tmp_path / "partial", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    return dest, outside


def test_a_good_stream_is_unpacked(places: tuple[Path, Path]) -> None:
    dest, _ = places
    data = stream(member("d", tarfile.DIRTYPE, mode=0o750),
                  member("d/f", data=b"x" * 100_000, mode=0o4755),
                  member("d/l", tarfile.SYMTYPE, link="f"),
                  member("top", data=b"top\n"))
    kinds = {"d": DIR, "d/f": REG, "d/l": LNK, "top": REG}
    Extractor(dest, kinds).extract(io.BytesIO(data))
    assert (dest / "d" / "f").read_bytes() == b"x" * 100_000
    assert stat.S_IMODE((dest / "d" / "f").stat().st_mode) == 0o755  # no setuid
    assert os.readlink(dest / "d" / "l") == "f"
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o750
    assert int((dest / "d").stat().st_mtime) == 1_600_000_000
    assert sorted(os.listdir(dest)) == ["d", "top"]  # (no temporary directory left)


def hostile_cases(outside: Path) -> dict[str, tuple[list, dict, str]]:
    """name -> (members, the plan's kinds, what the refusal says)"""
    evil = member("evil", data=b"evil\n")
    return {
        "dotdot": ([member("../evil", data=b"evil\n")], {"../evil": REG}, "'..'"),
        "dotdot-inside": ([member("d/../../evil", data=b"x")], {"d/../../evil": REG}, "'..'"),
        "absolute": ([member(str(outside / "evil"), data=b"x")],
                     {str(outside / "evil"): REG}, "absolute"),
        "link-then-file": ([member("l", tarfile.SYMTYPE, link=str(outside)),
                            member("l/evil", data=b"x")], {"l": LNK, "l/evil": REG},
                           "not a directory"),
        "link-as-dir": ([member("l", tarfile.SYMTYPE, link=str(outside)),
                         member("l/evil", data=b"x")], {"l": DIR, "l/evil": REG},
                        "a symlink in the stream"),
        "link-over-link": ([member("l", tarfile.SYMTYPE, link=str(outside)),
                            member("l", data=b"x")], {"l": LNK}, "twice"),
        "device": ([member("dev", tarfile.CHRTYPE)], {"dev": REG}, "character device"),
        "block": ([member("blk", tarfile.BLKTYPE)], {"blk": REG}, "block device"),
        "fifo": ([member("fifo", tarfile.FIFOTYPE)], {"fifo": REG}, "FIFO"),
        "hardlink": ([evil, member("hl", tarfile.LNKTYPE, link=str(outside / "x"))],
                     {"evil": REG, "hl": REG}, "hard link"),
        "not-asked": ([member("other", data=b"x")], {"evil": REG}, "not asked for"),
        "kind-mismatch": ([member("f", tarfile.SYMTYPE, link=str(outside))], {"f": REG},
                          "a symlink in the stream but a regular file"),
    }


@pytest.mark.parametrize("case", list(hostile_cases(Path("/x"))))
def test_a_hostile_stream_writes_nothing_outside(places: tuple[Path, Path], case: str) -> None:
    dest, outside = places
    members, kinds, says = hostile_cases(outside)[case]
    with pytest.raises(Refused, match=says if says != "'..'" else r"'\.\.'"):
        Extractor(dest, kinds).extract(io.BytesIO(stream(*members)))
    assert list(outside.iterdir()) == []
    assert not (dest / TMP_NAME).exists()
    for dirpath, _dirs, files in os.walk(dest):  # nothing reached through a link
        assert not files or dirpath == str(dest), files


def test_a_link_left_by_an_earlier_attempt_is_never_written_through(
        places: tuple[Path, Path]) -> None:
    """The plan says ``d`` is a directory, but the partial directory holds a symlink of
    that name (an earlier attempt's, or planted): a file under ``d`` is refused by the
    O_NOFOLLOW walk, not written through the link."""
    dest, outside = places
    os.symlink(outside, dest / "d")
    with pytest.raises(Refused, match="not a directory"):
        Extractor(dest, {"d": DIR, "d/evil": REG}).extract(
            io.BytesIO(stream(member("d/evil", data=b"x"))))
    assert list(outside.iterdir()) == []
    # with the directory's own member first, the link is replaced, not followed
    Extractor(dest, {"d": DIR, "d/evil": REG}).extract(io.BytesIO(stream(
        member("d", tarfile.DIRTYPE), member("d/evil", data=b"x"))))
    assert not (dest / "d").is_symlink() and (dest / "d" / "evil").read_bytes() == b"x"
    assert list(outside.iterdir()) == []


def test_a_truncated_stream_leaves_no_half_written_file(places: tuple[Path, Path]) -> None:
    dest, _ = places
    data = stream(member("a", data=b"a" * 5000), member("b", data=b"b" * 200_000))
    with pytest.raises(tarfile.ReadError):
        Extractor(dest, {"a": REG, "b": REG}).extract(io.BytesIO(data[:100_000]))
    assert (dest / "a").read_bytes() == b"a" * 5000  # whole: kept
    assert not (dest / "b").exists()  # cut short: never took its name
    assert not (dest / TMP_NAME).exists()


def stream_in(fmt: int, *members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_names_long_and_hostile_come_through_each_header_format(
        places: tuple[Path, Path], fmt: int) -> None:
    """The extractor's own header reader: GNU long names, pax paths and ustar prefixes
    give back the names byte for byte (spaces, newlines, ``$(...)``, non-ASCII), with
    sizes across block boundaries and times kept."""
    dest, outside = places
    deep = "/".join(["dir with space"] * 6)  # (> 100 bytes: a long name, or a prefix)
    names = [*HOSTILE, f"{deep}/x"] if fmt != tarfile.USTAR_FORMAT else [f"{deep}/x"]
    members = [member(p, tarfile.DIRTYPE) for p in
               ("/".join(["dir with space"] * k) for k in range(1, 7))]
    members += [member(n, data=n.encode() * (i * 97 + 1)) for i, n in enumerate(names)]
    members.append(member(f"{deep}/l", tarfile.SYMTYPE, link="../" * 3 + "x" * 120
                          if fmt != tarfile.USTAR_FORMAT else "x"))
    kinds = {info.name: {tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: LNK}.get(info.type, REG)
             for info, _ in members}
    Extractor(dest, kinds).extract(io.BytesIO(stream_in(fmt, *members)))
    for i, name in enumerate(names):
        assert (dest / name).read_bytes() == name.encode() * (i * 97 + 1)
        assert int((dest / name).stat().st_mtime) == 1_600_000_000
    assert os.readlink(dest / deep / "l") == members[-1][0].linkname
    assert list(outside.iterdir()) == []
    assert not any(p.name.startswith("pwned") for p in dest.iterdir())


def test_a_broken_or_foreign_stream_is_refused(places: tuple[Path, Path]) -> None:
    dest, _ = places
    good = stream(member("a", data=b"a" * 700))
    bad_sum = bytearray(good)
    bad_sum[0:1] = b"b"  # (the name changed, the checksum not)
    with pytest.raises(tarfile.ReadError, match="checksum"):
        Extractor(dest, {"a": REG, "b": REG}).extract(io.BytesIO(bytes(bad_sum)))
    with pytest.raises(tarfile.ReadError, match="empty"):
        Extractor(dest, {"a": REG}).extract(io.BytesIO(b""))
    with pytest.raises(tarfile.ReadError, match="within a header"):
        Extractor(dest, {"a": REG}).extract(io.BytesIO(good[:300]))
    for pax in ({"size": "-5"}, {"mtime": "1000000000000000.5"}):
        info = tarfile.TarInfo("a")
        info.pax_headers = pax
        with pytest.raises(tarfile.ReadError, match="out of range"):
            Extractor(dest, {"a": REG}).extract(io.BytesIO(stream_in(tarfile.PAX_FORMAT,
                                                                      (info, b""))))
    sparse = tarfile.TarInfo("s")
    sparse.pax_headers = {"GNU.sparse.map": "0,10"}
    with pytest.raises(Refused, match="sparse"):
        Extractor(dest, {"s": REG}).extract(io.BytesIO(stream_in(tarfile.PAX_FORMAT,
                                                                  (sparse, b""))))
    glob = io.BytesIO()
    with tarfile.open(fileobj=glob, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "x"}) as archive:
        archive.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
    with pytest.raises(Refused):  # (a global pax header: its name is refused first)
        Extractor(dest, {"a": REG}).extract(io.BytesIO(glob.getvalue()))
    assert os.listdir(dest) == []


@pytest.mark.parametrize("case", ["dotdot", "absolute", "link-then-file", "hardlink",
                                  "device", "not-asked"])
def test_a_hostile_remote_tar_fails_the_fetch(sshd, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              case: str) -> None:
    """Through the real sshd: the remote 'tar' (a script sending a crafted stream, with
    the plan's hostile names on its stdin) is refused with a FetchError that names the
    member; nothing lands outside the partial directory, no temporary directory stays."""
    from remote_exec.errors import FetchError
    from remote_exec.ssh import tarfetch

    rundir, dest, outside = tmp_path / "run", tmp_path / "partial", tmp_path / "outside"
    for place in (rundir, dest, outside):
        place.mkdir()
    members, kinds, says = hostile_cases(outside)[case]
    (rundir / "crafted.tar").write_bytes(stream(*members))
    # the names really sent: the plan's, hostile ones among them (read and kept)
    kinds = {**kinds, **{name: REG for name in HOSTILE}}
    monkeypatch.setattr(tarfetch, "_TAR_CREATE",
                        'cd -- "$1" && cat > names.got && cat crafted.tar')
    entries = [(rel, asyncssh.SFTPAttrs(type=kind, size=1, mtime=0))
               for rel, kind in kinds.items()]
    site = sshd.site_definition()

    async def go() -> None:
        async with asyncssh.connect("127.0.0.1", port=site["port"], username=site["user"],
                                    client_keys=[site["identity_file"]],
                                    known_hosts=site["known_hosts"]) as conn:
            await tarfetch.fetch_tar(conn, str(rundir), dest, None, entries)

    with pytest.raises(FetchError, match="refused") as refused:
        asyncio.run(go())
    assert says in str(refused.value)
    assert (rundir / "names.got").read_bytes().split(b"\0")[:-1] == [
        os.fsencode(rel) for rel in kinds]
    assert list(outside.iterdir()) == []
    assert not (dest / TMP_NAME).exists()
    for dirpath, _dirs, files in os.walk(dest):
        assert not files or dirpath == str(dest), files


def test_a_slow_unpacking_holds_the_stream_bounded(sshd, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """30 MB of files through the real sshd while the unpacking lags behind: what waits
    in memory stays around the channel's window (Python's allocations traced), and
    every file arrives whole."""
    import threading
    import tracemalloc

    from remote_exec.ssh import tarfetch

    rundir, dest = tmp_path / "run", tmp_path / "partial"
    rundir.mkdir()
    dest.mkdir()
    for i in range(300):
        (rundir / f"f{i}").write_bytes(bytes([i % 256]) * 100_000)
    entries = [(f"f{i}", asyncssh.SFTPAttrs(type=REG, size=100_000, mtime=0))
               for i in range(300)]
    write = tarfetch.Extractor._write_file

    def slow_write(self, *args: object) -> None:  # (the disk of a loaded machine)
        time.sleep(0.01)
        write(self, *args)

    monkeypatch.setattr(tarfetch.Extractor, "_write_file", slow_write)
    site = sshd.site_definition()
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], tracemalloc.get_traced_memory()[0])

    async def go() -> bool:
        async with asyncssh.connect("127.0.0.1", port=site["port"], username=site["user"],
                                    client_keys=[site["identity_file"]],
                                    known_hosts=site["known_hosts"]) as conn:
            tracemalloc.start()
            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                return await tarfetch.fetch_tar(conn, str(rundir), dest, None, entries)
            finally:
                stop.set()
                watcher.join()
                tracemalloc.stop()

    assert asyncio.run(go())
    assert peak[0] < 12 * 2**20, f"{peak[0] / 2**20:.1f} MiB held"
    assert all((dest / f"f{i}").read_bytes() == bytes([i % 256]) * 100_000
               for i in range(300))
