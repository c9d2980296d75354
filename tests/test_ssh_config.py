"""~/.ssh/config is honoured, and a bare Host alias works without a site entry, like ssh."""

from __future__ import annotations

import sys
from pathlib import Path

RELAY = r'''
import socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while True:
        data = sys.stdin.buffer.read1(65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
'''


def write_ssh_config(home: Path, sshd, extra: str = "") -> None:
    ssh = home / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "config").write_text(
        f"Host labhost\n"
        f"    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.site_definition()['user']}\n"
        f"    IdentityFile {sshd.user_key}\n"
        f"    UserKnownHostsFile {sshd.known_hosts}\n"
        f"{extra}"
    )


def run_alias(cli, workdir: Path, home: Path, remote_root: Path):
    (workdir / "in.txt").write_text("via ssh config\n")
    # the alias is not a site of the configuration file: it is used like `ssh labhost`
    cfg = home / "empty.yaml"
    cfg.write_text(f"defaults:\n  root: {remote_root}\nsites: {{}}\n")
    return cli("run", "--config", str(cfg), "--site", "labhost", "--cmd", "cp in.txt out.txt",
               "in.txt", cwd=workdir, extra_env={"HOME": str(home)})


def test_host_alias_from_ssh_config(cli, sshd, workdir, tmp_path, remote_root):
    home = tmp_path / "home"
    write_ssh_config(home, sshd)
    proc = run_alias(cli, workdir, home, remote_root)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "out.txt").read_text() == "via ssh config\n"


def test_proxy_command_from_ssh_config(cli, sshd, workdir, tmp_path, remote_root):
    home = tmp_path / "home"
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    marker = tmp_path / "proxy-used"
    proxy = f"    ProxyCommand sh -c 'touch {marker}; exec {sys.executable} {relay} %h %p'\n"
    write_ssh_config(home, sshd, proxy)
    proc = run_alias(cli, workdir, home, remote_root)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()
    assert (workdir / "out.txt").read_text() == "via ssh config\n"


def test_aes_gcm_is_preferred_unless_ssh_config_names_ciphers(sshd, tmp_path, monkeypatch):
    """The connection negotiates AES-GCM (1.5x chacha20-poly1305's throughput in
    asyncssh; README *Measured*); a ``Ciphers`` line in ~/.ssh/config decides instead."""
    import asyncio

    from remote_exec.config import Site
    from remote_exec.ssh.connect import open_connection

    entry = sshd.site_definition()
    site = Site(name="loop", host="127.0.0.1", port=entry["port"], user=entry["user"],
                identity_file=entry["identity_file"], known_hosts=entry["known_hosts"])

    async def cipher() -> str:
        conn = await open_connection(site)
        try:
            return conn.get_extra_info("send_cipher")
        finally:
            conn.close()

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert asyncio.run(cipher()) == "aes128-gcm@openssh.com"
    write_ssh_config(home, sshd, "Host *\n    Ciphers chacha20-poly1305@openssh.com\n")
    assert asyncio.run(cipher()) == "chacha20-poly1305@openssh.com"
