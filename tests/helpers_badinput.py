"""Helpers and fixtures for the bad-input / bad-configuration tests.

Import the fixtures into a test module by name (``from helpers_badinput import pwned``)
so pytest registers them there; conftest.py stays untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import site_entry

from remote_exec.sandbox import Sandbox, free_port

__all__ = [
    "event",
    "events",
    "free_port",
    "mounted_tmpfs",
    "remount",
    "absent_rsync_sshd",
    "new_ed25519_key",
    "pwned",
    "site_entry",
    "snapshot",
    "sshd_without",
    "tmpfs_root",
    "tree_bytes",
    "write_config",
]


def write_config(path: Path, sites: dict) -> Path:
    """Write a configuration file with ``sites`` and return its path."""
    path.write_text(yaml.safe_dump({"sites": sites}, allow_unicode=True))
    return path


def events(stderr: str) -> list[dict]:
    """The JSON event records a ``--json`` run wrote to stderr (other lines ignored)."""
    found = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def event(stderr: str, kind: str) -> dict:
    matches = [e for e in events(stderr) if e.get("event") == kind]
    assert matches, f"no {kind!r} event in:\n{stderr}"
    return matches[-1]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following symlinks): kind, bytes/target, mode, mtime."""
    result: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if os.path.islink(full):
                result[rel] = ("link", os.readlink(full), st.st_mtime_ns)
            elif os.path.isdir(full):
                result[rel] = ("dir", None, st.st_mode)
            else:
                try:
                    data = Path(full).read_bytes()
                except PermissionError:
                    data = None
                result[rel] = ("file", data, st.st_mode, st.st_mtime_ns)
    return result


def tree_bytes(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, bytes | None]:
    """Relative path -> content (None for directories) for a byte-for-byte comparison."""
    result: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = os.path.relpath(full, root)
            if rel.split(os.sep)[0] in exclude:
                continue
            result[rel] = None if full.is_dir() else full.read_bytes()
    return result


def new_ed25519_key(path: Path) -> Path:
    """A fresh ed25519 key pair at ``path`` / ``path.pub`` (no passphrase)."""
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519", comment="remote-exec test stranger")
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def pwned():
    """Factory of random /tmp/pwned-* marker paths; removes any that appeared afterwards."""
    made: list[Path] = []

    def make() -> Path:
        path = Path(f"/tmp/pwned-{secrets.token_hex(6)}")
        assert not path.exists()
        made.append(path)
        return path

    yield make
    for path in made:
        if path.exists():
            path.unlink()


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs at ``path`` with mount ``options`` (root only; the test is skipped else)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    """Change a :func:`mounted_tmpfs` (e.g. ``size=16m``: the full disk was freed)."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


@pytest.fixture
def tmpfs_root(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs to serve as a site's root (root only; skipped if mount fails)."""
    with mounted_tmpfs(tmp_path / "tiny-root", "size=512k,mode=0755") as root:
        yield root


@pytest.fixture(scope="session")
def absent_rsync_sshd(tmp_path_factory: pytest.TempPathFactory):
    """A loopback sshd whose sessions have no rsync at all in /usr/bin.

    Unlike ``nosync_sshd`` (which bind-mounts a non-executable empty file over the
    binary, so bash's ``command -v rsync`` still answers yes), this lays an overlay on
    /usr/bin with a whiteout for ``rsync`` inside a private mount namespace: the file
    simply does not exist for the remote side, as on a host where rsync is not installed.
    """
    rsync = shutil.which("rsync")
    if not rsync:
        pytest.skip("rsync is not installed here")
    box = sshd_without(os.path.realpath(rsync), tmp_path_factory.mktemp("absent-rsync"))
    yield box
    box.down()


def sshd_without(path: str, directory: Path) -> Sandbox:
    """A started loopback sshd for whose sessions the file ``path`` does not exist.

    An overlay on its directory with a whiteout for it, inside a private mount
    namespace (the test skips where that needs what it cannot have: root, unshare,
    overlayfs)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or not unshare:
        pytest.skip(f"hiding {path} needs root and unshare(1)")
    bindir, name = os.path.split(path)
    upper, work = directory / "upper", directory / "ovl-work"
    upper.mkdir()
    work.mkdir()
    try:
        os.mknod(upper / name, 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # a whiteout
    except OSError as exc:
        pytest.skip(f"cannot make an overlay whiteout: {exc}")
    mount = (f"mount -t overlay overlay -o lowerdir={bindir},upperdir={upper},"
             f"workdir={work} {bindir}")
    probe = subprocess.run([unshare, "-m", "sh", "-c", f"{mount} && ! test -e {path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"overlayfs is not usable here: {probe.stderr.strip()}")
    box = Sandbox(directory / "sshd", wrapper=[unshare, "-m", "sh", "-c",
                                               f'{mount} && exec "$@"', "sh"])
    box.up()
    return box
