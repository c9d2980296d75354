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
from helpers_badinput import remount, site_entry, tmpfs_root, write_config  # noqa: F401
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

    remount(tmpfs_root, "size=8m")
    again = cli("resume", run_id[:8], cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert (into / "big").stat().st_size == 2000000
    assert (into / "small").read_text() == "small\n"
    assert not partial.exists()


def test_an_unwritable_destination_is_a_fetch_error_naming_resume(cli, workdir):
    """A local failure is not an internal error (70): exit 74, and the next command."""
    (workdir / "afile").write_text("in the way\n")
    proc = cli("run", "--site", "loop", "--into", "afile/results", "--cmd", "echo hi > out",
               cwd=workdir)
    assert proc.returncode == 74, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    resume = re.search(r"`remote-exec resume ([0-9a-f]{8})`", proc.stderr)
    assert resume, proc.stderr
    assert "afile/results" in proc.stderr and "still on the remote host" in proc.stderr

    (workdir / "afile").unlink()
    again = cli("resume", resume.group(1), cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert (workdir / "afile" / "results" / "out").read_text() == "hi\n"


# -- 10b, 10c: keys and agents --------------------------------------------------------------

@pytest.fixture
def agents(tmp_path: Path):
    """Factory of fresh ssh-agents (``agents(*keys)`` -> socket path); stopped afterwards."""
    if not shutil.which("ssh-agent") or not shutil.which("ssh-add"):
        pytest.skip("ssh-agent / ssh-add are not installed")
    started: list[subprocess.Popen] = []

    def start(*keys: Path) -> str:
        sock = tmp_path / f"agent-{len(started)}.sock"
        agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(agent)
        for _ in range(200):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.02"])
        for key in keys:
            subprocess.run(["ssh-add", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                           check=True, capture_output=True)
        return str(sock)

    yield start
    for agent in started:
        agent.terminate()
        agent.wait(timeout=10)


@pytest.fixture
def keyless_home(tmp_path: Path) -> Path:
    """A HOME with no keys of its own (so only what a test names or its agent holds counts)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    return home


def _env(home: Path, agent: str | None) -> dict[str, str]:
    env = {"HOME": str(home)}
    if agent:
        env["SSH_AUTH_SOCK"] = agent
    return env


def _encrypted_copy(sshd, directory: Path) -> Path:
    """The sandbox's user key, protected by a passphrase (its .pub beside it)."""
    key = directory / "locked_ed25519"
    shutil.copy(sshd.user_key, key)
    shutil.copy(f"{sshd.user_key}.pub", f"{key}.pub")
    os.chmod(key, 0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "a passphrase", "-f", str(key)],
                   check=True, capture_output=True)
    return key


def _no_agent(cli) -> None:
    cli.env.pop("SSH_AUTH_SOCK", None)
    cli.env.pop("SSH_AGENT_PID", None)


@pytest.mark.parametrize("named_in", ["site", "ssh_config"])
def test_encrypted_key_without_agent_names_the_passphrase_and_the_agent(
        cli, sshd, workdir, tmp_path, remote_root, keyless_home, named_in):
    _no_agent(cli)
    key = _encrypted_copy(sshd, keyless_home / ".ssh")
    entry = site_entry(sshd, remote_root)
    if named_in == "site":
        entry["identity_file"] = str(key)
    else:
        del entry["identity_file"]
        (keyless_home / ".ssh" / "config").write_text(
            f"Host 127.0.0.1\n    IdentityFile {key}\n")
    config = write_config(tmp_path / "locked.yaml", {"locked": entry})
    proc = cli("run", "--config", str(config), "--site", "locked", "--cmd", "touch ran",
               cwd=workdir, extra_env=_env(keyless_home, None))
    assert proc.returncode == 77, proc.stderr
    assert str(key) in proc.stderr
    assert "passphrase" in proc.stderr and "ssh-agent" in proc.stderr
    assert f"ssh-add {key}" in proc.stderr
    assert "authorized_keys" not in proc.stderr
    assert list(remote_root.iterdir()) == []


def test_encrypted_identity_file_held_by_the_agent_is_used(
        cli, sshd, workdir, tmp_path, remote_root, keyless_home, agents):
    key = _encrypted_copy(sshd, keyless_home / ".ssh")
    config = write_config(tmp_path / "locked.yaml",
                          {"locked": site_entry(sshd, remote_root, identity_file=str(key))})
    agent = agents(sshd.user_key)  # the same key, unlocked in the agent
    proc = cli("run", "--config", str(config), "--site", "locked", "--cmd", "echo in > out",
               cwd=workdir, extra_env=_env(keyless_home, agent))
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "out").read_text() == "in\n"


def test_holder_uses_each_callers_own_agent(cli, sshd, workdir, tmp_path, remote_root,
                                            keyless_home, agents):
    """The holder was started from a shell whose agent holds no key; a caller with a new
    agent holding the key succeeds at once, and a caller with the old agent still cannot
    ride on that caller's pooled connection."""
    entry = site_entry(sshd, remote_root)
    del entry["identity_file"]
    config = write_config(tmp_path / "agent-only.yaml", {"agent": entry})
    old_agent, new_agent = agents(), agents(sshd.user_key)

    def run(agent: str, name: str) -> subprocess.CompletedProcess:
        return cli("run", "--config", str(config), "--site", "agent", "--into", name,
                   "--cmd", "echo ok > ok", cwd=workdir, extra_env=_env(keyless_home, agent))

    first = run(old_agent, "first")
    assert first.returncode == 77, first.stderr
    holder = cli("holder", "status", cwd=workdir)
    assert holder.returncode == 0, "the first run should have started the holder"
    pid = holder.stdout.split()[1]

    second = run(new_agent, "second")
    assert second.returncode == 0, second.stderr
    assert (workdir / "second" / "ok").read_text() == "ok\n"

    third = run(old_agent, "third")
    assert third.returncode == 77, third.stderr
    assert cli("holder", "status", cwd=workdir).stdout.split()[1] == pid  # one holder all along


# -- 10g. holder status shows where the connection really goes ------------------------------

def test_holder_status_shows_the_port_from_ssh_config(cli, sshd, workdir, tmp_path,
                                                      remote_root, keyless_home):
    write_ssh_config(keyless_home / "alias", sshd)
    home = keyless_home / "alias"
    cfg = tmp_path / "empty.yaml"
    cfg.write_text(f"defaults:\n  root: {remote_root}\nsites: {{}}\n")
    proc = cli("run", "--config", str(cfg), "--site", "labhost", "--cmd", "true",
               cwd=workdir, extra_env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    status = cli("holder", "status", cwd=workdir)
    assert status.returncode == 0, status.stderr
    user = sshd.site_definition()["user"]
    assert f"{user}@127.0.0.1:{sshd.port}" in status.stdout, status.stdout
    assert ":22:" not in status.stdout


def test_unknown_host_hint_uses_the_port_and_file_from_ssh_config(cli, sshd, workdir, tmp_path,
                                                                  remote_root, keyless_home):
    """The same resolution names the real port and known_hosts file in the fix it offers."""
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    (keyless_home / ".ssh" / "config").write_text(
        f"Host labhost\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
        f"    IdentityFile {sshd.user_key}\n    UserKnownHostsFile {empty}\n")
    cfg = tmp_path / "empty.yaml"
    cfg.write_text(f"defaults:\n  root: {remote_root}\nsites: {{}}\n")
    proc = cli("run", "--config", str(cfg), "--site", "labhost", "--cmd", "true",
               cwd=workdir, extra_env={"HOME": str(keyless_home)})
    assert proc.returncode == 77, proc.stderr
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in proc.stderr, proc.stderr
