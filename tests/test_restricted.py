"""A restricted site, for real: a loopback sshd whose ``authorized_keys`` locks MInt's key
to the remote-exec agent (put there by ``remote-exec site install --apply``).

The server allows TCP and agent forwarding globally, so every refusal below comes
from the key's own line (``command=...,restrict``) and the agent, not from sshd's
configuration; the administrator's key, unlocked, shows each door is otherwise open.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
import yaml

from remote_exec.sandbox import ENTRYPOINT_NAME, Sandbox

pytestmark = pytest.mark.timeout(300)

PASSWD_LINE = "root:x:0:0"


@dataclass
class Locked:
    box: Sandbox
    config: Path
    mint_key: Path
    root: Path
    agent_dir: Path
    scripts: Path
    state: Path

    @property
    def port(self) -> int:
        assert self.box.port is not None
        return self.box.port

    def cli(self, *args: str, cwd: Path, timeout: float = 120,
            holder: bool = False) -> subprocess.CompletedProcess:
        env = dict(os.environ, REMOTE_EXEC_CONFIG=str(self.config),
                   REMOTE_EXEC_STATE_DIR=str(self.state),
                   REMOTE_EXEC_HOLDER="1" if holder else "0", REMOTE_EXEC_HOLDER_IDLE="20")
        return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)

    def ssh_options(self, key: Path | None = None) -> list[str]:
        return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.box.known_hosts}",
                "-i", str(key or self.mint_key), "-p", str(self.port)]

    def ssh(self, *words: str, key: Path | None = None, stdin: str = "",
            options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *self.ssh_options(key), *options, "127.0.0.1", *words],
                              input=stdin, capture_output=True, text=True, timeout=60)

    def agent(self, *words: str, stdin: str = "") -> tuple[int, dict, str]:
        proc = self.ssh(*words, stdin=stdin)
        try:
            answer = json.loads(proc.stdout) if proc.stdout.strip() else {}
        except ValueError:
            answer = {"raw": proc.stdout}
        return proc.returncode, answer, proc.stderr

    def new_run(self) -> str:
        run_id = str(uuid.uuid4())
        code, answer, err = self.agent("create", run_id)
        assert code == 0, err
        return run_id

    def agent_log(self) -> str:
        path = self.agent_dir / "agent.log"
        return path.read_text() if path.exists() else ""

    def outside_root(self) -> set[str]:
        """What lies beside the runs root: nothing may appear there."""
        return {p.name for p in self.root.parent.iterdir()}


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("locked")
    box = Sandbox(base / "sshd", extra_config=["AllowTcpForwarding yes",
                                               "AllowAgentForwarding yes"])
    box.up()
    mint_key = base / "mint_key"
    key = asyncssh.generate_private_key("ssh-ed25519", comment="mint key")
    key.write_private_key(str(mint_key))
    key.write_public_key(str(mint_key) + ".pub")
    os.chmod(mint_key, 0o600)
    root = base / "area" / "runs"
    root.mkdir(parents=True)
    scripts = base / "site-scripts"
    scripts.mkdir()
    (scripts / "work.sh").write_text(
        "#!/bin/sh\n"
        "# a site program: reads the inputs, leaves results, a secret and scratch behind\n"
        "echo \"args: $*\"\n"
        "for a in \"$@\"; do printf '%s\\n' \"$a\" >> args.txt; done\n"
        "cat input.txt > out.txt 2>/dev/null || true\n"
        "if [ -L linked.txt ]; then echo link > linked.kind; else echo file > linked.kind; fi\n"
        "head -c 9 linked.txt > linked.head 2>/dev/null || true\n"
        "echo s3cret > key.secret\n"
        "mkdir -p scratch && echo tmp > scratch/tmp.dat\n"
        "ln -s /etc/passwd leak\n"
        "echo done\n")
    (scripts / "work.sh").chmod(0o755)
    (scripts / "nap.sh").write_text("#!/bin/sh\necho napping\nexec sleep \"${1:-60}\"\n")
    (scripts / "nap.sh").chmod(0o755)
    agent_dir = base / "agent"
    site = {
        "host": "127.0.0.1", "port": box.port, "user": box.site_definition()["user"],
        "identity_file": str(mint_key), "known_hosts": str(box.known_hosts),
        "root": str(root), "agent_dir": str(agent_dir), "restricted": True,
        "templates": ["generic", "python"],
        "entrypoint": str(box.site_dir / ENTRYPOINT_NAME),
        "never_return": ["*.secret", "scratch"], "cancel_grace": 2,
    }
    admin = dict(box.site_definition(), root=str(root))
    config = base / "remote-exec.yaml"
    config.write_text(yaml.safe_dump({"sites": {"locked": site, "admin": admin}}))
    locked = Locked(box=box, config=config, mint_key=mint_key, root=root,
                    agent_dir=agent_dir, scripts=scripts, state=base / "state")
    proc = locked.cli("site", "install", "locked", "--apply", "--admin-identity",
                      str(box.user_key), "--authorized-keys", str(box.authorized_keys),
                      cwd=base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield locked
    box.down()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def run_work(locked: Locked, work: Path, *extra: str, inputs: tuple[str, ...] = ()):
    return locked.cli("run", "--site", "locked", "--template", "generic",
                      "-p", f"program={locked.scripts / 'work.sh'}", *extra, *inputs, cwd=work)


# -- the installation ---------------------------------------------------------------------------

def test_install_locks_the_key_with_a_forced_command(locked: Locked):
    lines = locked.box.authorized_keys.read_text().splitlines()
    blob = (Path(str(locked.mint_key) + ".pub")).read_text().split()[1]
    mine = [line for line in lines if blob in line]
    assert len(mine) == 1
    assert mine[0].startswith('command="') and ",restrict ssh-ed25519 " in mine[0]
    assert "remote_exec_agent.py --allowlist" in mine[0]
    allowlist = json.loads((locked.agent_dir / "allowlist.json").read_text())
    assert set(allowlist["entrypoints"]) == {"generic", "python", "site"}
    generic = allowlist["entrypoints"]["generic"]
    assert hashlib.sha256(Path(generic["path"]).read_bytes()).hexdigest() == generic["sha256"]
    assert allowlist["returns"]["never"] == ["*.secret", "scratch"]


def test_install_without_apply_prints_the_line(locked: Locked, tmp_path: Path):
    before = locked.box.authorized_keys.read_text()
    proc = locked.cli("site", "install", "locked", "--admin-identity",
                      str(locked.box.user_key), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'command="' in proc.stdout and ",restrict ssh-ed25519" in proc.stdout
    assert locked.box.authorized_keys.read_text() == before


def test_site_check_reports_the_agent(locked: Locked, tmp_path: Path):
    proc = locked.cli("site", "check", "locked", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["check"]: r for r in json.loads(proc.stdout)}
    assert rows["host key"]["status"] == "ok"
    assert rows["access"]["status"] == "ok" and "restricted" in rows["access"]["detail"]
    assert rows["agent"]["status"] == "ok"
    assert rows["allowlist"]["status"] == "ok" and "generic" in rows["allowlist"]["detail"]
    assert rows["rsync (host)"]["status"] == "ok"
    assert rows["runs root"]["status"] == "ok"
    assert rows["forwarding"]["status"] == "ok"
    table = locked.cli("site", "check", "locked", cwd=tmp_path)
    assert table.returncode == 0 and "allowlist" in table.stdout


def test_site_check_says_an_open_site_is_open(locked: Locked, tmp_path: Path):
    proc = locked.cli("site", "check", "admin", "--json", cwd=tmp_path)
    rows = {r["check"]: r for r in json.loads(proc.stdout)}
    assert rows["access"]["status"] == "warn"
    assert "site install" in rows["access"]["fix"]
    assert rows["runs root"]["status"] == "ok"


# -- a normal run -------------------------------------------------------------------------------

def test_a_normal_run_works_and_never_returns_the_secret(locked: Locked, work: Path):
    (work / "input.txt").write_text("hello from mint\n")
    (work / "name with space.txt").write_text("x\n")
    proc = run_work(locked, work, "--keep", "-p", "args=one", "-p", "args=two words",
                    inputs=("input.txt", "name with space.txt"))
    assert proc.returncode == 0, proc.stderr
    assert (work / "out.txt").read_text() == "hello from mint\n"
    assert (work / "args.txt").read_text() == "one\ntwo words\n"
    assert "done" in (work / "remote_program_exec.log").read_text()
    # the entrypoint left them in place; the site never lets them go
    assert not (work / "key.secret").exists()
    assert not (work / "scratch").exists()
    assert not (work / "leak").exists() and not (work / "leak").is_symlink()
    kept = [d for d in locked.root.iterdir() if (d / "key.secret").exists()]
    assert kept, "the secret stays on the host"
    assert "approved" in proc.stderr or proc.stderr == "" or "run" in proc.stderr


def test_a_run_cleans_up_after_itself(locked: Locked, work: Path):
    before = {d.name for d in locked.root.iterdir()}
    proc = run_work(locked, work)
    assert proc.returncode == 0, proc.stderr
    assert {d.name for d in locked.root.iterdir()} == before


def test_a_run_through_the_connection_holder(locked: Locked, work: Path):
    (work / "input.txt").write_text("via the holder\n")
    try:
        proc = locked.cli("run", "--site", "locked", "--template", "generic",
                          "-p", f"program={locked.scripts / 'work.sh'}", "input.txt",
                          cwd=work, holder=True)
    finally:
        locked.cli("holder", "stop", cwd=work, holder=True)
    assert proc.returncode == 0, proc.stderr
    assert (work / "out.txt").read_text() == "via the holder\n"
    assert not (work / "key.secret").exists()


def test_the_sites_own_program_runs_without_a_template(locked: Locked, work: Path):
    (work / "yield_strength.dat").write_text("355\n")
    proc = locked.cli("run", "--site", "locked", "yield_strength.dat", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "Cyclic_SSCurve.csv").exists()
    assert "sample entrypoint: done" in (work / "remote_program_exec.log").read_text()


def test_an_input_symlink_to_etc_passwd_is_staged_as_content(locked: Locked, work: Path):
    (work / "linked.txt").symlink_to("/etc/passwd")
    proc = run_work(locked, work, inputs=("linked.txt",))
    assert proc.returncode == 0, proc.stderr
    assert (work / "linked.kind").read_text() == "file\n"  # never a link on the host
    assert (work / "linked.head").read_text() == Path("/etc/passwd").read_text()[:9]


def test_a_failing_entrypoint_keeps_its_exit_code(locked: Locked, work: Path):
    proc = locked.cli("run", "--site", "locked", "--template", "generic",
                      "-p", "program=/bin/false", cwd=work)
    assert proc.returncode == 1


# -- refused --------------------------------------------------------------------------------------

def test_a_shell_command_is_refused(locked: Locked):
    before = locked.outside_root()
    proc = locked.ssh("id")
    assert proc.returncode == 2
    assert "refused" in proc.stderr and "uid=" not in proc.stdout
    assert "refused" in locked.agent_log().splitlines()[-1]
    assert locked.outside_root() == before


def test_reading_etc_passwd_is_refused(locked: Locked):
    for words in (("cat", "/etc/passwd"), ("log", "../../../etc/passwd"),
                  ("sh", "-c", "cat /etc/passwd")):
        proc = locked.ssh(*words)
        assert proc.returncode == 2, words
        assert PASSWD_LINE not in proc.stdout
        assert "refused" in proc.stderr


def test_an_interactive_login_is_refused(locked: Locked):
    proc = locked.ssh(options=("-T",))
    assert proc.returncode == 2
    assert "runs only the remote-exec agent" in proc.stderr


def test_sftp_and_scp_are_refused(locked: Locked, tmp_path: Path):
    run_id = locked.new_run()
    target = tmp_path / "got"
    sftp = subprocess.run(["sftp", *locked.ssh_options(), "-b", "-", "127.0.0.1"],
                          input=f"get /etc/passwd {target}\nput /etc/hostname {run_id}/x\n",
                          capture_output=True, text=True, timeout=60)
    assert sftp.returncode != 0
    assert not target.exists()
    for legacy in (["-O"], []):  # the old scp protocol (an exec), and scp over SFTP
        scp = subprocess.run(["scp", *legacy, *[o if o != "-p" else "-P"
                                                for o in locked.ssh_options()],
                              "127.0.0.1:/etc/passwd", str(target)],
                             capture_output=True, text=True, timeout=60)
        assert scp.returncode != 0
        assert not target.exists()
    assert not (locked.root / run_id / "x").exists()


def rsync_e(locked: Locked) -> str:
    return " ".join(["ssh", *locked.ssh_options()])


def test_rsync_out_of_the_run_directory_is_refused(locked: Locked, tmp_path: Path):
    run_id = locked.new_run()
    source = tmp_path / "payload.txt"
    source.write_text("payload\n")
    before = locked.outside_root()
    for dest in (f"{run_id}/../", f"{run_id}/../../", "../", "/tmp/", f"{locked.root}/"):
        proc = subprocess.run(["rsync", "-e", rsync_e(locked), str(source), f"127.0.0.1:{dest}"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0, dest
        assert "refused" in proc.stderr, proc.stderr
    assert not (locked.root / "payload.txt").exists()
    assert locked.outside_root() == before
    got = tmp_path / "got"
    for src in ("/etc/passwd", f"{run_id}/../../../../etc/passwd"):
        proc = subprocess.run(["rsync", "-e", rsync_e(locked), f"127.0.0.1:{src}", str(got)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert not got.exists()


def test_a_symlink_pushed_by_rsync_cannot_escape(locked: Locked, tmp_path: Path):
    run_id = locked.new_run()
    (tmp_path / "ln").symlink_to("/etc/passwd")
    proc = subprocess.run(["rsync", "-a", "-e", rsync_e(locked), str(tmp_path / "ln"),
                           f"127.0.0.1:{run_id}/"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    landed = locked.root / run_id / "ln"
    assert landed.is_symlink()
    assert os.path.realpath(landed) != "/etc/passwd"
    assert not landed.exists()  # munged: it points nowhere


def test_a_changed_entrypoint_is_refused(locked: Locked, work: Path):
    allowlist = json.loads((locked.agent_dir / "allowlist.json").read_text())
    path = Path(allowlist["entrypoints"]["generic"]["path"])
    original = path.read_bytes()
    marker = work / "tampered-ran"
    mode = path.stat().st_mode
    path.chmod(0o700)
    path.write_bytes(original + f"\ntouch {marker}\n".encode())
    try:
        proc = run_work(locked, work)
    finally:
        path.write_bytes(original)
        path.chmod(mode)
    assert proc.returncode == 77, proc.stderr
    assert "sha256" in proc.stderr and "re-approve" in proc.stderr
    assert not marker.exists()


def test_hostile_parameters_are_refused(locked: Locked, work: Path, tmp_path: Path):
    canary = Path.home() / f".remote-exec-canary-{uuid.uuid4().hex[:8]}"
    canary.mkdir()
    try:
        # the client refuses before connecting
        proc = locked.cli("run", "--site", "locked", "--template", "generic",
                          "-p", f"program=/bin/echo; rm -rf {canary}", cwd=work)
        assert proc.returncode == 78 and "pattern" in proc.stderr
        # and so does the agent, for a client that skips those checks
        for params in ({"program": f"/bin/echo; rm -rf {canary}"},
                       {"program": "/bin/echo\nrm -rf ~"},
                       {"program": "/bin/echo", "args": ["a\nrm -rf ~"]},
                       {"program": "/bin/echo", "nosuch": "x"}):
            run_id = locked.new_run()
            code, _, err = locked.agent("launch", run_id, "generic", stdin=json.dumps(params))
            assert code == 2, (params, err)
            assert "refused" in err
            assert not (locked.root / run_id / "remote_program_exec.log").exists()
        # free text is data: it reaches the program as one argument and never a shell
        (work / "input.txt").write_text("x\n")
        proc = run_work(locked, work, "-p", f"args=; rm -rf {canary}", inputs=("input.txt",))
        assert proc.returncode == 0, proc.stderr
        assert (work / "args.txt").read_text() == f"; rm -rf {canary}\n"
        assert canary.is_dir()
    finally:
        shutil.rmtree(canary, ignore_errors=True)


def test_a_template_not_in_the_allowlist_is_refused(locked: Locked, work: Path):
    proc = locked.cli("run", "--site", "locked", "--template", "abaqus", cwd=work)
    assert proc.returncode == 78
    assert "allowed templates: generic, python" in proc.stderr
    run_id = locked.new_run()
    code, _, err = locked.agent("launch", run_id, "abaqus", stdin="{}")
    assert code == 2 and "refused" in err and "generic" in err


def test_a_command_line_is_refused_on_a_restricted_site(locked: Locked, work: Path):
    proc = locked.cli("run", "--site", "locked", "--cmd", "id", cwd=work)
    assert proc.returncode == 78 and "restricted" in proc.stderr


async def _forward(key: Path, locked: Locked) -> bool:
    """Whether a direct-tcpip channel through the host opens with ``key``."""
    user = locked.box.site_definition()["user"]
    async with asyncssh.connect("127.0.0.1", port=locked.port, username=user,
                                client_keys=[str(key)],
                                known_hosts=str(locked.box.known_hosts)) as conn:
        try:
            _, writer = await conn.open_connection("127.0.0.1", locked.port)
        except asyncssh.ChannelOpenError:
            return False
        writer.close()
        return True


def test_port_forwarding_is_refused(locked: Locked):
    assert asyncio.run(_forward(locked.box.user_key, locked))  # the server allows it...
    assert not asyncio.run(_forward(locked.mint_key, locked))  # ...the locked key does not


def test_agent_forwarding_is_refused(locked: Locked, tmp_path: Path):
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if sock.exists():
                break
            asyncio.run(asyncio.sleep(0.1))
        env_a = ("-o", "ForwardAgent=yes")
        os.environ["SSH_AUTH_SOCK"] = str(sock)
        try:
            admin = locked.ssh("printenv", "SSH_AUTH_SOCK", key=locked.box.user_key,
                               options=env_a)
            assert admin.stdout.strip()  # the server forwards an agent to the admin key...
            proc = locked.ssh("hello", options=env_a)
        finally:
            os.environ.pop("SSH_AUTH_SOCK", None)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["agent_forwarding"] is False  # ...not to the locked one
    finally:
        agent.terminate()
        agent.wait()


# -- status, logs, cancel, cleanup through the agent -------------------------------------------

def test_status_logs_cancel_and_cleanup(locked: Locked, work: Path):
    env = dict(os.environ, REMOTE_EXEC_CONFIG=str(locked.config),
               REMOTE_EXEC_STATE_DIR=str(locked.state), REMOTE_EXEC_HOLDER="0")
    driver = subprocess.Popen(
        [sys.executable, "-m", "remote_exec", "run", "--site", "locked", "--template",
         "generic", "-p", f"program={locked.scripts / 'nap.sh'}", "-p", "args=60"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = ""
        for _ in range(100):
            listed = locked.cli("list", "--json", cwd=work)
            runs = [json.loads(line) for line in listed.stdout.splitlines()]
            running = [r for r in runs if r["phase"] == "launched" and r["state"] == "running"]
            if running:
                run_id = running[0]["id"]
                break
            asyncio.run(asyncio.sleep(0.2))
        assert run_id, listed.stdout + listed.stderr
        status = locked.cli("status", run_id[:8], "--json", cwd=work)
        assert json.loads(status.stdout)["remote"]["alive"] is True, status.stdout
        logs = locked.cli("logs", run_id[:8], cwd=work)
        assert "napping" in logs.stdout
        cancel = locked.cli("cancel", run_id[:8], cwd=work)
        assert cancel.returncode == 0, cancel.stderr
        assert driver.wait(timeout=60) == 143
    finally:
        if driver.poll() is None:
            driver.kill()
    status = locked.cli("status", run_id[:8], "--json", cwd=work)
    assert json.loads(status.stdout)["state"] == "cancelled"
    assert (locked.root / run_id).is_dir()
    cleanup = locked.cli("cleanup", "locked", "--older-than", "0", cwd=work)
    assert cleanup.returncode == 0, cleanup.stderr
    assert "removed" in cleanup.stdout
    assert not (locked.root / run_id).exists()


def test_site_check_gives_the_fix_for_a_failing_row(locked: Locked, tmp_path: Path):
    conf = yaml.safe_load(locked.config.read_text())
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    conf["sites"]["locked"]["known_hosts"] = str(empty)
    config = tmp_path / "unknown-host.yaml"
    config.write_text(yaml.safe_dump(conf))
    proc = locked.cli("site", "check", "locked", "--json", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 1
    rows = {r["check"]: r for r in json.loads(proc.stdout)}
    assert rows["host key"]["status"] == "FAIL"
    assert "ssh-keyscan" in rows["host key"]["fix"]
    assert rows["authentication"]["status"] == "skipped"
