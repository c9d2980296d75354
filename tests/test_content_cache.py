"""The site's content cache (issue 14) against a real loopback sshd: an input the site
already holds is copied there, verified, instead of sent; a run can never change an
entry or another run's input; a changed entry is never used; the switches; the limits;
``cleanup``; hostile names."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import site_entry

SIZE = 64 * 1024 + 7


@pytest.fixture
def cache_options() -> dict:
    return {"cache_min_size": "1K"}


@pytest.fixture
def site_config(tmp_path: Path, sshd, remote_root: Path, cache_options: dict) -> Path:
    path = tmp_path / "remote-exec.yaml"
    path.write_text(yaml.safe_dump({"sites": {"loop": site_entry(sshd, remote_root,
                                                                 **cache_options)}}))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staged(stderr: str) -> dict:
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "staged":
                return record
    raise AssertionError(f"no staged event in:\n{stderr}")


def entry(remote_root: Path, digest: str) -> Path:
    return remote_root / ".remote-exec-cache" / digest[:2] / digest


def run(cli, workdir: Path, *args: str, cmd: str = "true", ok: bool = True):
    proc = cli("run", "--site", "loop", "--json", "--cmd", cmd, *args, cwd=workdir)
    if ok:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    return proc


def rundirs(remote_root: Path) -> list[Path]:
    return [p for p in remote_root.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("transfer", ["sftp", "rsync"])
def test_a_second_run_sends_nothing(cli, workdir, remote_root, transfer):
    payload = os.urandom(SIZE)
    (workdir / "big.bin").write_bytes(payload)
    (workdir / "small.txt").write_text("under cache_min_size\n")
    first = staged(run(cli, workdir, "--transfer", transfer, "big.bin", "small.txt").stderr)
    assert (first["cached_bytes"], first["sent_bytes"]) == (0, SIZE + 21)
    cached = entry(remote_root, sha(payload))
    assert cached.read_bytes() == payload
    assert cached.stat().st_mode & 0o777 == 0o444
    assert (remote_root / ".remote-exec-cache").stat().st_mode & 0o777 == 0o700
    os.utime(cached, (1, 1))  # so the use shows
    proc = run(cli, workdir, "--transfer", transfer, "big.bin", "small.txt",
               cmd="sha256sum big.bin > sum; test -w big.bin && stat -c %a big.bin > mode")
    second = staged(proc.stderr)
    assert (second["cached_bytes"], second["sent_bytes"]) == (SIZE, 21)
    assert second["method"] == transfer
    assert "from the site's cache, 21 B sent" in second["message"]
    assert (workdir / "sum").read_text().split()[0] == sha(payload)
    assert (workdir / "mode").read_text().strip() == oct(
        (workdir / "big.bin").stat().st_mode & 0o777)[2:]
    assert not (workdir / "big.bin.returned").exists()  # same size and time: unchanged
    assert cached.stat().st_mtime > time.time() - 300  # touched: recently used
    assert rundirs(remote_root) == []


def test_a_run_writing_its_input_changes_neither_the_cache_nor_another_run(
        cli, workdir, remote_root):
    payload = os.urandom(SIZE)
    (workdir / "big.bin").write_bytes(payload)
    # the insertion goes on beside the entrypoint, which changes its copy meanwhile: the
    # entry, if it went in, holds the bytes sent (a copy that no longer matches is dropped)
    run(cli, workdir, "big.bin", cmd="printf x >> big.bin")
    cached = entry(remote_root, sha(payload))
    assert not cached.exists() or sha(cached.read_bytes()) == sha(payload)
    run(cli, workdir, "big.bin")  # (in any case, a run that leaves its input inserts it)
    assert sha(cached.read_bytes()) == sha(payload)
    keeper = run(cli, workdir, "--keep", "big.bin")  # another run's input, kept
    assert staged(keeper.stderr)["sent_bytes"] == 0
    (kept,) = rundirs(remote_root)
    proc = run(cli, workdir, "big.bin",
               cmd="dd if=/dev/zero of=big.bin bs=1k count=4 conv=notrunc 2>/dev/null; "
               "printf y >> big.bin")
    assert staged(proc.stderr)["sent_bytes"] == 0
    assert sha(cached.read_bytes()) == sha(payload)
    assert sha((kept / "big.bin").read_bytes()) == sha(payload)
    assert (workdir / "big.bin").read_bytes() == payload
    returned = (workdir / "big.bin.returned").read_bytes()
    assert returned[:4096] == bytes(4096) and returned.endswith(b"y")


def test_a_changed_entry_is_never_used(cli, workdir, remote_root):
    payload = os.urandom(SIZE)
    (workdir / "big.bin").write_bytes(payload)
    run(cli, workdir, "big.bin")
    cached = entry(remote_root, sha(payload))
    cached.chmod(0o644)
    cached.write_bytes(os.urandom(SIZE))  # same size, other bytes
    proc = run(cli, workdir, "big.bin", cmd="sha256sum big.bin > sum")
    assert staged(proc.stderr)["sent_bytes"] == SIZE
    assert "no longer holds what its name says" in proc.stderr
    assert (workdir / "sum").read_text().split()[0] == sha(payload)
    assert cached.read_bytes() == payload  # evicted, then the sent file went in again
    assert cached.stat().st_mode & 0o777 == 0o444
    third = run(cli, workdir, "big.bin", cmd="sha256sum big.bin > sum")
    assert staged(third.stderr)["sent_bytes"] == 0


def test_no_cache_sends_everything_and_adds_nothing(cli, workdir, remote_root):
    payload = os.urandom(SIZE)
    (workdir / "big.bin").write_bytes(payload)
    proc = run(cli, workdir, "--no-cache", "big.bin")
    assert staged(proc.stderr)["cached_bytes"] == 0
    assert not (remote_root / ".remote-exec-cache").exists()
    run(cli, workdir, "big.bin")
    proc = run(cli, workdir, "--no-cache", "big.bin")
    assert (staged(proc.stderr)["sent_bytes"], staged(proc.stderr)["cached_bytes"]) == (SIZE, 0)


@pytest.mark.parametrize("cache_options", [{"cache_min_size": "1K", "cache": False}])
def test_cache_false_sends_everything(cli, workdir, remote_root):
    payload = os.urandom(SIZE)
    (workdir / "big.bin").write_bytes(payload)
    for _ in range(2):
        proc = run(cli, workdir, "big.bin")
        assert staged(proc.stderr)["sent_bytes"] == SIZE
    assert not (remote_root / ".remote-exec-cache").exists()


@pytest.mark.parametrize("cache_options", [{"cache_min_size": "1K", "cache_size": "100K"}])
def test_the_least_recently_used_entries_go_beyond_the_size_cap(cli, workdir, remote_root):
    blobs = {name: os.urandom(40 * 1024) for name in ("a", "b", "c")}
    for age, name in ((300, "a"), (200, "b")):
        (workdir / name).write_bytes(blobs[name])
        run(cli, workdir, name)
        os.utime(entry(remote_root, sha(blobs[name])), (time.time() - age,) * 2)
    (workdir / "again").mkdir()
    (workdir / "again" / "a").write_bytes(blobs["a"])
    proc = run(cli, workdir, "again/a")  # a is used: now the most recent
    assert staged(proc.stderr)["sent_bytes"] == 0
    (workdir / "c").write_bytes(blobs["c"])
    run(cli, workdir, "c")  # 120K over a 100K cap: b, the least recently used, goes
    assert entry(remote_root, sha(blobs["a"])).exists()
    assert not entry(remote_root, sha(blobs["b"])).exists()
    assert entry(remote_root, sha(blobs["c"])).exists()
    total = sum(p.stat().st_size for p in (remote_root / ".remote-exec-cache").rglob("*")
                if p.is_file())
    assert total <= 100 * 1024


def test_cleanup_trims_the_cache(cli, workdir, remote_root):
    old, fresh = os.urandom(SIZE), os.urandom(SIZE)
    for name, data in (("old.bin", old), ("fresh.bin", fresh)):
        (workdir / name).write_bytes(data)
        run(cli, workdir, name)
    forty_days = time.time() - 40 * 86400
    os.utime(entry(remote_root, sha(old)), (forty_days, forty_days))
    debris = entry(remote_root, sha(fresh)).parent / ".tmp-dead-run"
    debris.write_bytes(b"x")
    os.utime(debris, (forty_days, forty_days))
    dry = cli("cleanup", "loop", "--dry-run", cwd=workdir)
    assert dry.returncode == 0, dry.stderr
    assert "would remove" in dry.stdout and sha(old) in dry.stdout
    assert "0 of 2 cache entries removed" in dry.stdout
    assert entry(remote_root, sha(old)).exists()
    done = cli("cleanup", "loop", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "unused for 40.0 days" in done.stdout and "unfinished insertion" in done.stdout
    assert "2 of 2 cache entries removed" in done.stdout
    assert not entry(remote_root, sha(old)).exists() and not debris.exists()
    assert entry(remote_root, sha(fresh)).exists()
    # an explicit --older-than applies to the cache too
    now = cli("cleanup", "loop", "--older-than", "0", cwd=workdir)
    assert now.returncode == 0, now.stderr
    assert not entry(remote_root, sha(fresh)).exists()


HOSTILE = ["with space.bin", "it's \"quoted\".bin", "$(touch pwned).bin", "new\nline.bin",
           "-dash.bin", "back\\slash `tick`.bin"]


@pytest.mark.parametrize("transfer", ["sftp", "rsync"])
def test_hostile_names_work_with_the_cache(cli, workdir, remote_root, transfer):
    tree = workdir / "tree $(id)"
    (tree / "sub 'q'").mkdir(parents=True)
    files: dict[str, bytes] = {}
    for name in HOSTILE:
        files[name] = os.urandom(4096)
        (workdir / name).write_bytes(files[name])
        files[f"tree $(id)/sub 'q'/{name}"] = os.urandom(3000)
        (tree / "sub 'q'" / name).write_bytes(files[f"tree $(id)/sub 'q'/{name}"])
    (tree / "small").write_text("small\n")
    args = ["--transfer", transfer, "--keep", *[f"./{n}" for n in HOSTILE], "tree $(id)"]
    total = sum(map(len, files.values())) + 6
    first = staged(run(cli, workdir, *args).stderr)
    assert first["sent_bytes"] == total
    second = staged(run(cli, workdir, *args).stderr)
    assert (second["cached_bytes"], second["sent_bytes"]) == (total - 6, 6)
    newest = max(rundirs(remote_root), key=lambda p: p.stat().st_mtime)
    for rel, data in files.items():
        assert (newest / rel).read_bytes() == data, rel
    assert (newest / "tree $(id)" / "small").read_text() == "small\n"
    assert not list(newest.rglob("pwned")) and not (workdir / "pwned").exists()
    assert not [p for p in (newest / ".remote-exec").iterdir() if p.name.startswith("cache-")]


def test_a_batch_backend_stages_through_the_cache(tmp_path):
    """A scheduler's backend (PBS, played by tests/fakesched) stages through
    ``SshBackend.stage``, so it has the cache too."""
    from batch_site import BatchSite
    from fakesched import install

    base = tmp_path / "pbs"
    install(base / "bin")
    (base / "sched").mkdir()
    env = {"PATH": f"{base / 'bin'}:/usr/local/bin:/usr/bin:/bin",
           "FAKESCHED_DIR": str(base / "sched"), "FAKESCHED_START_DELAY": "0.3"}
    site = BatchSite.start(base, "cluster", "pbs", env, resources={"walltime": "10m"},
                           cache_min_size="1K")
    try:
        work = tmp_path / "work"
        work.mkdir()
        payload = os.urandom(SIZE)
        (work / "big.bin").write_bytes(payload)
        for sent in (SIZE, 0):
            proc = site.cli("run", "--site", "cluster", "--json", "--cmd",
                            "sha256sum big.bin > sum", "big.bin", cwd=work)
            assert proc.returncode == 0, proc.stderr
            assert staged(proc.stderr)["sent_bytes"] == sent
            assert (work / "sum").read_text().split()[0] == sha(payload)
        assert entry(site.root, sha(payload)).read_bytes() == payload
    finally:
        site.stop()


def test_runs_inserting_one_file_at_once_agree(cli, workdir, remote_root):
    import subprocess
    import sys

    payload = os.urandom(SIZE)
    for i in range(3):
        (workdir / f"w{i}").mkdir()
        (workdir / f"w{i}" / "big.bin").write_bytes(payload)
    procs = [subprocess.Popen([sys.executable, "-m", "remote_exec", "run", "--site", "loop",
                               "--json", "--cmd", "sha256sum big.bin > sum", "big.bin"],
                              cwd=workdir / f"w{i}", env=cli.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for i, proc in enumerate(procs):
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert (workdir / f"w{i}" / "sum").read_text().split()[0] == sha(payload)
    assert entry(remote_root, sha(payload)).read_bytes() == payload
    assert not [p for p in entry(remote_root, sha(payload)).parent.iterdir()
                if p.name.startswith(".tmp-")]


def test_the_digest_memo_reads_an_unchanged_file_once(tmp_path, monkeypatch):
    from remote_exec import digests

    monkeypatch.setenv("REMOTE_EXEC_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "big.bin"
    path.write_bytes(b"a" * 5000)
    reads = []
    real = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda p: reads.append(p) or real(p))
    first = digests.digests([str(path)])
    assert digests.digests([str(path)]) == first == {str(path): sha(b"a" * 5000)}
    assert len(reads) == 1
    path.write_bytes(b"b" * 5000)  # same size, new mtime (or inode)
    os.utime(path, ns=(1, 1))
    assert digests.digests([str(path)]) == {str(path): sha(b"b" * 5000)}
    assert len(reads) == 2


def test_cache_keys_are_checked(tmp_path):
    from remote_exec.config import DEFAULT_CACHE_SIZE, parse_config
    from remote_exec.errors import ConfigError

    path = tmp_path / "c.yaml"
    config = parse_config("sites:\n  s:\n    cache_min_size: 2K\n    cache_max_age: 7d\n", path)
    site = config.site("s")
    assert (site.cache, site.cache_min_size, site.cache_size, site.cache_max_age) == \
        (True, 2048, DEFAULT_CACHE_SIZE, 7 * 86400.0)
    with pytest.raises(ConfigError, match=r"c.yaml:3: sites.s.cache_size: invalid size"):
        parse_config("sites:\n  s:\n    cache_size: lots\n", path)
    with pytest.raises(ConfigError, match="cache_max_age"):
        parse_config("sites:\n  s:\n    cache_max_age: soon\n", path)
    with pytest.raises(ConfigError, match="cache"):
        parse_config("sites:\n  s:\n    cache: maybe\n", path)


def test_more_files_than_one_remote_command_takes(cli, workdir, remote_root):
    from remote_exec.ssh.cache import BATCH

    tree = workdir / "many"
    blobs = {}
    for i in range(BATCH + 30):
        blobs[f"d{i % 3}/f{i}"] = os.urandom(1100)
        (tree / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 3}" / f"f{i}").write_bytes(blobs[f"d{i % 3}/f{i}"])
    total = sum(map(len, blobs.values()))
    assert staged(run(cli, workdir, "many").stderr)["sent_bytes"] == total
    proc = run(cli, workdir, "--keep", "many")
    assert (staged(proc.stderr)["cached_bytes"], staged(proc.stderr)["sent_bytes"]) == (total, 0)
    (kept,) = rundirs(remote_root)
    for rel, data in blobs.items():
        assert (kept / "many" / rel).read_bytes() == data


def test_a_symlinked_port_is_cached_and_hashed_once(cli, workdir, remote_root, tmp_path):
    target = tmp_path / "port-target.dat"
    payload = os.urandom(SIZE)
    target.write_bytes(payload)
    for i in range(2):  # a new module directory with a new symlink each time, as MInt does
        work = workdir / f"module{i}"
        work.mkdir()
        os.symlink(target, work / "port.dat")
        proc = run(cli, work, "port.dat", cmd="sha256sum port.dat > sum")
        assert staged(proc.stderr)["sent_bytes"] == (SIZE if i == 0 else 0)
        assert (work / "sum").read_text().split()[0] == sha(payload)
        assert (work / "port.dat").is_symlink()
    memo = json.loads((cli.state / "digests.json").read_text())
    assert list(memo) == [str(target.resolve())]
