"""Ordinary remote accounts with real login shells, on a stock-configured sshd.

A stock sshd starts the external ``sftp-server`` -- and every command -- through the
remote user's login shell. These tests create ordinary accounts whose start-up files
print, as many cluster accounts do ("Welcome to the cluster", quota notices), for
bash, sh and tcsh, and run the real CLI against them with both transfer methods:
the run must succeed byte-exact with the entrypoint run once, or fail before
creating anything with a message that names the fix; ``site check`` must show the
login shell's row.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers_badinput import event, sshd_without

from remote_exec.sandbox import Sandbox
from remote_exec.ssh.shell import SFTP_SERVERS

SKEL_BASHRC = Path("/etc/skel/.bashrc")


@dataclass(frozen=True)
class Account:
    name: str  # the user name (short: several tools cut long ones)
    shell: str
    rcfile: str
    rc: str  # what the start-up file says, before anything else it holds
    prints: str  # "stdout" | "stderr" | ""


ACCOUNTS = {
    "bash-stdout": Account("rxbout", "/bin/bash", ".bashrc",
                           'echo "Welcome to the cluster"\n', "stdout"),
    "bash-stderr": Account("rxberr", "/bin/bash", ".bashrc",
                           'echo "Quota: 81% of /home used" >&2\n', "stderr"),
    "sh": Account("rxsh", "/bin/sh", ".profile", 'echo "sh profile"\n', ""),
    "tcsh-stdout": Account("rxtout", "/usr/bin/tcsh", ".cshrc",
                           'echo "Welcome to tcsh"\nset path = ($path /usr/local/bin)\n',
                           "stdout"),
    "tcsh-stderr": Account("rxterr", "/usr/bin/tcsh", ".cshrc",
                           'echo "tcsh notice" > /dev/stderr\n', "stderr"),
}


def _make_account(account: Account, keys: list[str]) -> Path:
    """Create (or reset) ``account`` with its start-up file and authorized keys; its home."""
    if subprocess.run(["id", account.name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", account.shell, account.name], check=True,
                       capture_output=True)
    subprocess.run(["usermod", "-s", account.shell, "-p", "*", account.name], check=True,
                   capture_output=True)  # "*": no password, but not locked (keys work)
    entry = pwd.getpwnam(account.name)
    home = Path(entry.pw_dir)
    for old in ("runs", "ran.txt"):
        target = home / old
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    rc = account.rc
    if account.rcfile == ".bashrc" and SKEL_BASHRC.is_file():
        rc += SKEL_BASHRC.read_text()  # the echo sits above Debian's interactivity guard
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    (ssh_dir / "authorized_keys").write_text("".join(keys))
    (home / account.rcfile).write_text(rc)
    (home / "runs").mkdir()
    for path in (ssh_dir, ssh_dir / "authorized_keys", home / account.rcfile, home / "runs"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    ssh_dir.chmod(0o700)
    return home


def _public_key(box: Sandbox) -> str:
    return Path(f"{box.user_key}.pub").read_text()


@pytest.fixture(scope="module")
def accounts(sshd: Sandbox) -> dict[str, Path]:
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("creating remote accounts needs root and useradd")
    homes = {}
    for key, account in ACCOUNTS.items():
        if not os.access(account.shell, os.X_OK):
            continue  # tcsh not installed: those cases skip below
        homes[key] = _make_account(account, [_public_key(sshd)])
    return homes


def _site(box: Sandbox, account: Account, **extra: object) -> dict:
    entry = box.site_definition()
    entry.update(user=account.name, root="~/runs", **extra)
    return entry


@pytest.fixture
def config(tmp_path: Path, sshd: Sandbox, accounts: dict[str, Path]) -> Path:
    sites = {key: _site(sshd, ACCOUNTS[key]) for key in accounts}
    sites.update({f"{key}-auto": _site(sshd, ACCOUNTS[key], transfer="auto",
                                       rsync_threshold=0) for key in accounts})
    path = tmp_path / "shells.yaml"
    path.write_text(yaml.safe_dump({"sites": sites}))
    return path


def _need(accounts: dict[str, Path], key: str) -> Path:
    """The account's home, with no trace of an earlier test's run."""
    if key not in accounts:
        pytest.skip(f"{ACCOUNTS[key].shell} is not installed (apt-get install tcsh)")
    home = accounts[key]
    (home / "ran.txt").unlink(missing_ok=True)
    for leftover in (home / "runs").iterdir():
        shutil.rmtree(leftover)
    return home


def _inputs(workdir: Path) -> dict[str, bytes]:
    data = {"a.dat": os.urandom(200_000), "b c.dat": b"second input\n" * 100}
    for name, content in data.items():
        (workdir / name).write_bytes(content)
    return data


# a command every login shell here reads alike (the `command` kind runs in $SHELL)
COMMAND = 'cat a.dat "b c.dat" > out.bin; echo ran >> ~/ran.txt'


@pytest.mark.parametrize("transfer", ["sftp", "rsync"])
@pytest.mark.parametrize("key", list(ACCOUNTS))
def test_run_succeeds_byte_exact_and_once(cli, workdir: Path, tmp_path: Path, accounts,
                                          config: Path, key: str, transfer: str) -> None:
    home = _need(accounts, key)
    data = _inputs(workdir)
    into = tmp_path / "into"
    into.mkdir()
    proc = cli("run", "--site", key, "--json", "--transfer", transfer, "--into", str(into),
               "--cmd", COMMAND, "a.dat", "b c.dat", cwd=workdir,
               extra_env={"REMOTE_EXEC_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr
    assert event(proc.stderr, "staged")["method"] == transfer
    assert event(proc.stderr, "fetched")["method"] == transfer
    expected = data["a.dat"] + data["b c.dat"]
    got = (into / "out.bin").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert (home / "ran.txt").read_text() == "ran\n"  # the entrypoint ran exactly once
    assert list((home / "runs").iterdir()) == []  # the run directory was removed
    banner = {"Welcome", "Quota", "notice"}
    assert not any(word in (into / "out.bin").read_text(errors="replace") for word in banner)


@pytest.mark.parametrize("key", ["bash-stdout", "tcsh-stdout", "tcsh-stderr", "sh"])
def test_auto_detects_rsync_under_any_login_shell(cli, workdir: Path, tmp_path: Path,
                                                  accounts, config: Path, key: str) -> None:
    """`transfer: auto` asks the host whether it has rsync: under tcsh the sh-only
    redirection of that question used to fail, so SFTP was used silently."""
    _need(accounts, key)
    _inputs(workdir)
    proc = cli("run", "--site", f"{key}-auto", "--json", "--into", str(tmp_path),
               "--cmd", COMMAND, "a.dat", "b c.dat", cwd=workdir,
               extra_env={"REMOTE_EXEC_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr
    assert event(proc.stderr, "staged")["method"] == "rsync"


def _rows(cli, site: str, config: Path, cwd: Path) -> dict[str, dict]:
    proc = cli("site", "check", site, "--json", cwd=cwd,
               extra_env={"REMOTE_EXEC_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {row["check"]: row for row in json.loads(proc.stdout)}


@pytest.mark.parametrize("key", list(ACCOUNTS))
def test_site_check_shows_the_login_shell(cli, workdir: Path, accounts, config: Path,
                                          key: str) -> None:
    _need(accounts, key)
    account = ACCOUNTS[key]
    rows = _rows(cli, key, config, workdir)
    login = rows["login shell"]
    assert account.shell in login["detail"]
    if account.prints:
        assert login["status"] == "warn", login
        assert f"on {account.prints}" in login["detail"]
        assert '[ -z "$PS1" ] && return' in login["fix"]
        assert "~/.cshrc" in login["fix"]
    else:
        assert login["status"] == "ok", login
    if account.prints == "stdout":
        assert "garbled" in login["detail"]
        assert "past the login shell's output" in rows["sftp"]["detail"]
    else:
        assert rows["sftp"]["detail"] == "subsystem"
    # the rsync and Python rows show what the tools said, not the banner
    assert rows["rsync (host)"]["status"] == "ok"
    assert rows["rsync (host)"]["detail"].startswith("rsync  version")
    assert rows["python (host)"]["detail"].startswith("Python 3")


@pytest.fixture(scope="module")
def no_sftp_server(tmp_path_factory: pytest.TempPathFactory, accounts):
    """A second sshd for whose sessions no sftp-server exists (the subsystem too)."""
    path = next((p for p in SFTP_SERVERS if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.skip("no external sftp-server installed")
    box = sshd_without(path, tmp_path_factory.mktemp("no-sftp-server"))
    keys = Path(accounts["bash-stdout"]) / ".ssh" / "authorized_keys"
    keys.write_text(keys.read_text() + _public_key(box))
    yield box
    box.down()


def test_noisy_shell_without_sftp_server_fails_before_creating_anything(
        cli, workdir: Path, tmp_path: Path, accounts, no_sftp_server: Sandbox) -> None:
    home = _need(accounts, "bash-stdout")
    config = tmp_path / "nosftp.yaml"
    config.write_text(yaml.safe_dump({"sites": {
        "nosftp": _site(no_sftp_server, ACCOUNTS["bash-stdout"], transfer="sftp")}}))
    _inputs(workdir)
    before = sorted(p.name for p in workdir.iterdir())
    proc = cli("run", "--site", "nosftp", "--cmd", COMMAND, "a.dat", "b c.dat",
               cwd=workdir, extra_env={"REMOTE_EXEC_CONFIG": str(config)})
    assert proc.returncode == 73, proc.stderr
    assert "login shell prints" in proc.stderr
    assert "Welcome to the cluster" in proc.stderr
    assert '[ -z "$PS1" ] && return' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list((home / "runs").iterdir()) == []  # nothing was created remotely
    assert not (home / "ran.txt").exists()
    assert sorted(p.name for p in workdir.iterdir()) == before


@pytest.mark.parametrize("key", ["bash-stdout", "tcsh-stdout"])
def test_restricted_site_on_a_noisy_login_shell(cli, workdir: Path, tmp_path: Path, accounts,
                                                sshd: Sandbox, key: str) -> None:
    """The agent is a forced command, which sshd runs through the login shell too: its
    answers and its rsync are framed past the banner as well."""
    import asyncssh

    home = _need(accounts, key)
    account = ACCOUNTS[key]
    entry = pwd.getpwnam(account.name)
    program = home / "work.sh"
    program.write_text('#!/bin/sh\ncat a.dat "b c.dat" > out.bin\necho ran >> ~/ran.txt\n')
    program.chmod(0o755)
    os.chown(program, entry.pw_uid, entry.pw_gid)
    mint_key = tmp_path / "mint_key"
    generated = asyncssh.generate_private_key("ssh-ed25519")
    generated.write_private_key(str(mint_key))
    generated.write_public_key(f"{mint_key}.pub")
    mint_key.chmod(0o600)
    admin = _site(sshd, account)
    locked = _site(sshd, account, identity_file=str(mint_key), restricted=True,
                   agent_dir="~/.remote-exec-agent", templates=["generic"])
    config = tmp_path / "restricted.yaml"
    config.write_text(yaml.safe_dump({"sites": {"locked": locked, "admin": admin}}))
    env = {"REMOTE_EXEC_CONFIG": str(config)}
    proc = cli("site", "install", "locked", "--apply", "--admin-identity",
               str(sshd.user_key), cwd=workdir, extra_env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = _inputs(workdir)
    into = tmp_path / "into"
    into.mkdir()
    proc = cli("run", "--site", "locked", "--template", "generic", "-p",
               f"program={program}", "--into", str(into), "a.dat", "b c.dat",
               cwd=workdir, extra_env=env)
    assert proc.returncode == 0, proc.stderr
    assert (into / "out.bin").read_bytes() == data["a.dat"] + data["b c.dat"]
    assert (home / "ran.txt").read_text() == "ran\n"
    proc = cli("site", "check", "locked", "--json", cwd=workdir, extra_env=env)
    rows = {row["check"]: row for row in json.loads(proc.stdout)}
    assert rows["access"]["status"] == "ok", rows
    assert rows["login shell"]["status"] == "warn", rows
    assert "on stdout" in rows["login shell"]["detail"]


def test_every_remote_command_goes_through_the_shell_module() -> None:
    """A command sent any other way would meet the login shell unframed (and unquoted
    for csh): only remote_exec/ssh/shell.py talks to asyncssh's exec and SFTP starts."""
    import re

    package = Path(__file__).resolve().parent.parent / "remote_exec"
    call = re.compile(r"\b\w*conn\w*\.(run|create_process|start_sftp_client|open_session)\(")
    offenders = [f"{path.relative_to(package)}:{number}: {line.strip()}"
                 for path in package.rglob("*.py") if path.name != "shell.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if call.search(line)]
    assert offenders == []
