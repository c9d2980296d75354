"""The pull method end to end: the real CLI (``backend: pull``), the real queue server
(``remote-exec queue serve`` over TLS with a throwaway CA) and the real poller
(``remote_exec_poller.py``), installed from the files ``site install --poller`` writes.

What the MInt side must show (issue 15): results and exit codes as for SSH runs, the
site's refusals (77, nothing created on the site), no poller (69), ``--timeout`` and
cancels, the MInt side killed then ``resume``, the server killed and restarted
mid-run, ``status`` / ``logs`` / ``cleanup`` / ``site check``, and secrets kept out of
every output.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import Cli
from pull_site import QueueServer, make_ca

#: a command for the `generic` template: sh -c SCRIPT
SH = ["-p", "program=/bin/sh", "-p", "args=-c"]


def script(text: str) -> list[str]:
    return [*SH, "-p", f"args={text}"]


def wait_until(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Pull:
    """A queue server, a site (poller files, run root) and the MInt side's CLI."""

    def __init__(self, tmp: Path, shared: QueueServer | None = None, **site: object) -> None:
        """A site of its own (``self.site``); the server ``shared`` by the module's tests
        unless the test stops or reconfigures it (then one of its own)."""
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.site = f"corp-{uuid.uuid4().hex[:8]}"
        self.own_server = shared is None
        self.server = shared or QueueServer(tmp / "queue", make_ca(tmp / "ca")).start()
        self.ca = self.server.ca
        self.root = tmp / "site-runs"
        self.root.mkdir()
        self.work = tmp / "work"
        self.work.mkdir()
        self.marker = tmp / "starts"
        self.submit_token = self.server.token("submit", self.site)
        token_file = tmp / "submit.token"
        token_file.write_text(self.submit_token + "\n")
        token_file.chmod(0o600)
        entry = {"backend": "pull", "templates": ["generic", "python"], "root": str(self.root),
                 "never_return": ["*.key"], "retry_tries": 6, "retry_max_interval": 2,
                 "cancel_grace": 3,
                 "pull": {"server": self.server.url, "token_file": str(token_file),
                          "ca_file": str(self.ca.ca_file), "queue_timeout": 60,
                          "poll_wait": 5}}
        entry.update(site)
        self.config = tmp / "remote-exec.yaml"
        self.config.write_text(yaml.safe_dump({"sites": {self.site: entry}}))
        env = dict(os.environ)
        env.update({"REMOTE_EXEC_CONFIG": str(self.config),
                    "REMOTE_EXEC_STATE_DIR": str(tmp / "state"),
                    "XDG_CONFIG_HOME": str(tmp / "xdg-config")})
        env.pop("MISYSTEM_SITEID", None)
        self.cli = Cli(config=self.config, state=tmp / "state", env=env)
        self.site_dir = tmp / "site"
        made = self("site", "install", self.site, "--poller", "--output", str(self.site_dir),
                    "--site-dir", str(self.site_dir), "--user", "nobody")
        assert made.returncode == 0, made.stderr
        self.site_token = self.server.token("site", self.site)
        (self.site_dir / "token").write_text(self.site_token + "\n")
        (self.site_dir / "token").chmod(0o600)
        self.pollers: list[subprocess.Popen] = []
        self.bg: list[subprocess.Popen] = []

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cli(*args, cwd=self.work, timeout=timeout)

    def start_poller(self) -> subprocess.Popen:
        """One more poller of the site (its own state directory and log)."""
        n = len(self.pollers)
        config = self.site_dir / "poller.json"
        if n:
            data = json.loads(config.read_text())
            data.update(state=f"poller-state-{n}", log=f"poller-{n}.log")
            config = self.site_dir / f"poller-{n}.json"
            config.write_text(json.dumps(data))
        with open(self.tmp / f"poller{n}.out", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(self.site_dir / "remote_exec_poller.py"), "--config",
                 str(config)], stdout=out, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        self.pollers.append(proc)
        return proc

    def start(self, *args: str) -> subprocess.Popen:
        """``remote-exec ARGS`` in the background (stdout and stderr to files)."""
        n = len(self.bg)
        with open(self.tmp / f"bg{n}.out", "wb") as out, open(self.tmp / f"bg{n}.err",
                                                              "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "remote_exec", *args],
                                    cwd=self.work, env=self.cli.env, stdout=out, stderr=err)
        self.bg.append(proc)
        return proc

    def err(self, n: int) -> str:
        return (self.tmp / f"bg{n}.err").read_text()

    def counting(self, tail: str = "") -> list[str]:
        """A `generic` run that appends a line to the marker file per start."""
        return script(f"echo started >> {self.marker}; {tail}")

    def starts(self) -> int:
        return len(self.marker.read_text().splitlines()) if self.marker.exists() else 0

    def run_dirs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir())

    def journal(self) -> list[dict]:
        listed = self("list", "--json")
        assert listed.returncode == 0, listed.stderr
        return [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]

    def close(self) -> None:
        for proc in self.bg + self.pollers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.own_server:
            self.server.stop()
        subprocess.run(["pkill", "-KILL", "-f", str(self.marker)], check=False)

    def edit_site(self, **changes: object) -> None:
        """Change the site's entry (``pull`` merged into its section)."""
        config = yaml.safe_load(self.config.read_text())
        entry = config["sites"][self.site]
        entry["pull"].update(changes.pop("pull", {}))  # type: ignore[arg-type]
        entry.update(changes)
        self.config.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueServer]:
    """One queue server for the tests that neither stop nor reconfigure it."""
    base = tmp_path_factory.mktemp("shared-queue")
    # leases long enough that a loaded machine does not re-queue a run before its launch
    # (lease expiry itself is tested against servers of their own)
    server = QueueServer(base / "queue", make_ca(base / "ca"), lease_ttl=30,
                         lost_after=60).start()
    yield server
    server.stop()


@pytest.fixture
def pull(tmp_path: Path, shared: QueueServer) -> Iterator[Pull]:
    env = Pull(tmp_path, shared)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def polled(pull: Pull) -> Pull:
    pull.start_poller()
    return pull


@pytest.fixture
def alone(tmp_path: Path) -> Iterator[Pull]:
    """A site and a poller with a queue server of their own (the test stops it)."""
    env = Pull(tmp_path)
    env.start_poller()
    try:
        yield env
    finally:
        env.close()


# -- results and exit codes ----------------------------------------------------------------

HOSTILE = ["in put.txt", "quo'te\".txt", "new\nline.txt", "$(touch pwned).txt"]


def test_success_with_hostile_names_and_return_filter(polled: Pull) -> None:
    for i, name in enumerate(HOSTILE):
        (polled.work / name).write_text(f"input {i}\n")
    (polled.work / "data").mkdir()
    (polled.work / "data" / "nested.bin").write_bytes(os.urandom(300_000))
    result = polled("run", "--site", polled.site, "-t", "generic", *script(
        'mkdir -p out; for f in *.txt; do cp "$f" "out/$f"; done; cp data/nested.bin out/; '
        'echo secret > my.key; echo done'), *HOSTILE, "data")
    assert result.returncode == 0, result.stderr
    for i, name in enumerate(HOSTILE):
        assert (polled.work / "out" / name).read_text() == f"input {i}\n"
    assert (polled.work / "out" / "nested.bin").read_bytes() == \
        (polled.work / "data" / "nested.bin").read_bytes()
    assert not (polled.work / "my.key").exists()  # never_return: kept on the site
    assert "my.key" in result.stderr
    assert not list(polled.work.glob("pwned*")) and not (polled.root / "pwned").exists()
    assert (polled.work / "remote_program_exec.log").read_text() == "done\n"
    record = polled.journal()[0]
    assert (record["state"], record["phase"], record["exit_code"]) == \
        ("succeeded", "cleaned", 0)
    # cleanup on success: the server forgot the run, the site removed its directory
    wait_until(lambda: polled.run_dirs() == [], 10, "the site to remove the run directory")
    runs = polled.server.admin("runs")
    assert record["id"] not in runs.stdout


def test_exit_code_and_signal(polled: Pull) -> None:
    three = polled("run", "--site", polled.site, "-t", "generic",
                   *script("echo out > r.txt; exit 3"))
    assert three.returncode == 3, three.stderr
    assert (polled.work / "r.txt").read_text() == "out\n"  # results come back on failure
    killed = polled("run", "--site", polled.site, "-t", "generic", *script("kill -KILL $$"))
    assert killed.returncode == 137, killed.stderr


# -- the site decides ------------------------------------------------------------------------

def test_site_refuses_unknown_entrypoint(polled: Pull) -> None:
    # `python` is allowed by the MInt side's site entry, but not installed on the site
    allowlist = json.loads((polled.site_dir / "allowlist.json").read_text())
    del allowlist["entrypoints"]["python"]
    (polled.site_dir / "allowlist.json").write_text(json.dumps(allowlist))
    result = polled("run", "--site", polled.site, "-t", "python", "-p", "script=x.py")
    assert result.returncode == 77, result.stderr
    assert "refused" in result.stderr and "python" in result.stderr
    assert "entrypoint_not_allowed" in result.stderr
    assert polled.run_dirs() == []


def test_site_refuses_changed_entrypoint(polled: Pull) -> None:
    entry = polled.site_dir / "entrypoints" / "generic.sh"
    entry.chmod(0o700)
    entry.write_text(entry.read_text() + "\necho tampered\n")
    result = polled("run", "--site", polled.site, "-t", "generic", *polled.counting())
    assert result.returncode == 77, result.stderr
    assert "sha256" in result.stderr and "digest_mismatch" in result.stderr
    assert polled.run_dirs() == [] and polled.starts() == 0


def test_site_refuses_bad_parameter(polled: Pull) -> None:
    allowlist = json.loads((polled.site_dir / "allowlist.json").read_text())
    allowlist["entrypoints"]["generic"]["parameters"]["program"]["pattern"] = "/usr/bin/[a-z]+"
    (polled.site_dir / "allowlist.json").write_text(json.dumps(allowlist))
    result = polled("run", "--site", polled.site, "-t", "generic", *polled.counting())
    assert result.returncode == 77, result.stderr
    assert "bad_parameter" in result.stderr and "program" in result.stderr
    assert polled.run_dirs() == [] and polled.starts() == 0


# -- nobody there, time limits, cancels -----------------------------------------------------

def test_no_poller_expires_with_last_seen(pull: Pull) -> None:
    config = yaml.safe_load(pull.config.read_text())
    config["sites"][pull.site]["pull"]["queue_timeout"] = 2
    pull.config.write_text(yaml.safe_dump(config))
    result = pull("run", "--site", pull.site, "-t", "generic", *script("true"))
    assert result.returncode == 69, result.stderr
    assert f"no poller of site {pull.site} claimed" in result.stderr
    assert "last seen never" in result.stderr
    assert "remote_exec_poller.py running" in result.stderr


def test_timeout_while_queued(pull: Pull) -> None:
    result = pull("run", "--site", pull.site, "--timeout", "4s", "-t", "generic", *script("true"))
    assert result.returncode == 124, result.stderr
    record = pull.journal()[0]
    assert record["state"] == "timed_out"
    runs = pull.server.admin("runs", "--site", pull.site).stdout
    # withdrawn from the queue (or, on a machine so loaded that the time ran out before
    # the submission, never submitted): no poller takes it later
    assert "cancelled" in runs or ("created" in runs and "queued" not in runs), runs


def test_cancel_while_running_stops_the_entrypoint(polled: Pull) -> None:
    run = polled.start("run", "--site", polled.site, "-t", "generic",
                       *polled.counting(f"sleep 60 # {polled.marker}"))
    wait_until(lambda: polled.starts() == 1, 30, "the entrypoint to start")
    time.sleep(0.5)
    run.send_signal(signal.SIGTERM)
    assert run.wait(30) == 143, polled.err(0)
    assert "the site's poller stopped it" in polled.err(0)
    wait_until(lambda: subprocess.run(["pgrep", "-f", f"sleep 60 # {polled.marker}"],
                                      capture_output=True).returncode != 0,
               15, "the entrypoint to be stopped")
    assert polled.journal()[0]["state"] == "cancelled"


def test_cancel_command_while_queued(pull: Pull) -> None:
    run = pull.start("run", "--site", pull.site, "-t", "generic", *script("true"))
    record = wait_until(lambda: [r for r in pull.journal() if r["phase"] == "staged"], 30,
                        "the run to be queued")[0]
    cancelled = pull("cancel", record["id"][:8])
    assert cancelled.returncode == 0, cancelled.stderr
    assert run.wait(30) == 143, pull.err(0)
    assert "withdrawn from the queue" in pull.err(0)
    pull.start_poller()  # a poller that comes later takes nothing
    time.sleep(2)
    assert pull.run_dirs() == []


# -- crashes on either side ------------------------------------------------------------------

def test_mint_side_killed_then_resume(polled: Pull) -> None:
    (polled.work / "in.dat").write_text("x\n")
    run = polled.start("run", "--site", polled.site, "-t", "generic",
                       *polled.counting("sleep 3; cat in.dat > out.dat"), "in.dat")
    wait_until(lambda: polled.starts() == 1, 30, "the entrypoint to start")
    run.kill()
    run.wait()
    record = polled.journal()[0]
    assert record["phase"] in ("launched", "staged")
    resumed = polled("resume", record["id"][:8])
    assert resumed.returncode == 0, resumed.stderr
    assert (polled.work / "out.dat").read_text() == "x\n"
    assert polled.starts() == 1


def test_server_killed_and_restarted_mid_run(alone: Pull) -> None:
    run = alone.start("run", "--site", alone.site, "-t", "generic",
                       *alone.counting("sleep 4; echo ok > ok.txt"))
    wait_until(lambda: alone.starts() == 1, 30, "the entrypoint to start")
    alone.server.kill()
    time.sleep(1.5)
    alone.server.restart()
    assert run.wait(90) == 0, alone.err(0)
    assert (alone.work / "ok.txt").read_text() == "ok\n"
    assert alone.starts() == 1


def test_server_gone_interrupts_then_resume(alone: Pull) -> None:
    config = yaml.safe_load(alone.config.read_text())
    config["sites"][alone.site].update(retry_tries=1, retry_max_interval=0.5)
    alone.config.write_text(yaml.safe_dump(config))
    run = alone.start("run", "--site", alone.site, "-t", "generic",
                       *alone.counting("sleep 5; echo ok > ok.txt"))
    wait_until(lambda: alone.starts() == 1, 30, "the entrypoint to start")
    alone.server.kill()
    assert run.wait(60) == 75, alone.err(0)
    assert "resume" in alone.err(0)
    alone.server.restart()
    record = alone.journal()[0]
    assert record["state"] == "interrupted"
    resumed = alone("resume", record["id"][:8])
    assert resumed.returncode == 0, resumed.stderr
    assert (alone.work / "ok.txt").read_text() == "ok\n" and alone.starts() == 1


# -- credentials and TLS ---------------------------------------------------------------------

def test_token_file_readable_by_others_is_refused(pull: Pull) -> None:
    token = Path(yaml.safe_load(pull.config.read_text())["sites"][pull.site]["pull"]["token_file"])
    token.chmod(0o644)
    result = pull("run", "--site", pull.site, "-t", "generic", *script("true"))
    assert result.returncode == 78, result.stderr
    assert "chmod 600" in result.stderr and pull.journal() == []


def test_revoked_submit_token(pull: Pull) -> None:
    ident = hashlib.sha256(pull.submit_token.encode()).hexdigest()[:12]
    assert ident in pull.server.admin("token", "list").stdout
    assert pull.server.admin("token", "revoke", ident).returncode == 0
    result = pull("run", "--site", pull.site, "-t", "generic", *script("true"))
    assert result.returncode == 77, result.stderr
    assert "revoked" in result.stderr and "queue token add --role submit" in result.stderr


def test_wrong_ca_is_refused(pull: Pull, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other-ca")
    config = yaml.safe_load(pull.config.read_text())
    config["sites"][pull.site]["pull"]["ca_file"] = str(other.ca_file)
    pull.config.write_text(yaml.safe_dump(config))
    result = pull("run", "--site", pull.site, "-t", "generic", *script("true"))
    assert result.returncode == 69, result.stderr
    assert "certificate" in result.stderr and "ca_file" in result.stderr


def test_no_secret_in_outputs_or_state(polled: Pull) -> None:
    result = polled("run", "--site", polled.site, "-t", "generic", *script("echo hi"))
    assert result.returncode == 0, result.stderr
    status = polled("status", polled.journal()[0]["id"][:8])
    seen = result.stdout + result.stderr + status.stdout + status.stderr
    for token in (polled.submit_token, polled.site_token):
        assert token not in seen
        for path in [*polled.cli.state.rglob("*"), *polled.site_dir.rglob("*.log"),
                     *polled.server.state_dir.rglob("*")]:
            if path.is_file() and path.name != "token":
                assert token.encode() not in path.read_bytes(), path


# -- the commands around runs ----------------------------------------------------------------

def test_status_logs_check_and_cleanup(polled: Pull) -> None:
    result = polled("run", "--site", polled.site, "-t", "generic", *script("echo first; exit 2"))
    assert result.returncode == 2
    run_id = polled.journal()[0]["id"]
    status = polled("status", run_id[:8])
    assert status.returncode == 0, status.stderr
    assert "finished: exit code 2" in status.stdout
    logs = polled("logs", run_id[:8])
    assert logs.stdout == "first\n"
    check = polled("site", "check", polled.site, "--json")
    rows = {row["check"]: row for row in json.loads(check.stdout)}
    assert rows["queue server"]["status"] == "ok" and rows["pollers"]["status"] == "ok"
    assert check.returncode == 0
    assert run_id in polled.server.admin("runs").stdout  # kept: the entrypoint failed
    cleaned = polled("cleanup", polled.site, "--older-than", "0")
    assert cleaned.returncode == 0, cleaned.stderr
    assert run_id not in polled.server.admin("runs").stdout


def test_poller_bundle(pull: Pull) -> None:
    unit = (pull.site_dir / "remote-exec-poller.service").read_text()
    assert "KillMode=process" in unit and "User=nobody" in unit
    assert f"--config {pull.site_dir}/poller.json" in unit
    allowlist = json.loads((pull.site_dir / "allowlist.json").read_text())
    assert set(allowlist["entrypoints"]) == {"generic", "python"}
    assert allowlist["returns"]["never"] == ["*.key"]
    assert allowlist["root"] == str(pull.root)
    config = json.loads((pull.site_dir / "poller.json").read_text())
    assert config["server"] == pull.server.url and config["ca_file"] == "mint-ca.pem"
    again = pull("site", "install", pull.site, "--poller", "--output", str(pull.site_dir))
    assert again.returncode == 78 and "not empty" in again.stderr


# -- MInt's WebAPI argument form -------------------------------------------------------------

def test_mi_system_wf_arguments(polled: Pull) -> None:
    config = yaml.safe_load(polled.config.read_text())
    config["sites"][polled.site]["pull"]["legacy_commands"] = {
        "execute_remote-side_program_api.sh": {
            "entrypoint": "generic",
            "params": ["program=/bin/sh", "args=-c",
                       "args=cat a.dat > 'X X.dat'; echo other > YY.dat; echo ran"]}}
    polled.config.write_text(yaml.safe_dump(config))
    (polled.work / "a.dat").write_text("alpha\n")
    wrapper = Path(__file__).resolve().parent.parent / "scripts" / "mi-system-wf.py"
    mint_token = "0123456789abcdef" * 4

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(wrapper), "https://nims.mintsys.jp", polled.site,
                               mint_token, *args], cwd=polled.work, env=polled.cli.env,
                              capture_output=True, text=True, timeout=120)

    done = call("execute_remote-side_program_api.sh", "a.dat", "X X.dat")
    assert done.returncode == 0, done.stderr
    assert (polled.work / "X X.dat").read_text() == "alpha\n"
    assert not (polled.work / "YY.dat").exists()  # only the named results come back
    assert (polled.work / "remote_program_exec.log").read_text() == "ran\n"
    unknown = call("/opt/other.sh", "a.dat", "X X.dat")
    assert unknown.returncode == 1
    assert f"not one of site '{polled.site}''s legacy_commands" in unknown.stderr
    usage = call("execute_remote-side_program_api.sh")
    assert usage.returncode == 1 and "Usage" in usage.stdout
    for result in (done, unknown, usage):
        assert mint_token not in result.stdout + result.stderr


# -- trying it without a site ----------------------------------------------------------------

def test_demo_through_the_pull_sandbox(tmp_path: Path) -> None:
    env = {**os.environ, "REMOTE_EXEC_STATE_DIR": str(tmp_path / "state"),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    env.pop("REMOTE_EXEC_CONFIG", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "remote_exec", *args], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    try:
        demo = cli("demo", "--backend", "pull", "--into", str(tmp_path / "demo"))
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "K' =" in (tmp_path / "demo" / "results" / "summary.txt").read_text()
        up = cli("sandbox", "up", "--pull")  # already up: kept, the site recorded
        assert up.returncode == 0, up.stderr
        run = cli("run", "--site", "sandbox-pull", "-t", "generic", "-p", "program=/bin/echo",
                  "-p", "args=hello")
        assert run.returncode == 0, run.stderr
        assert (tmp_path / "remote_program_exec.log").read_text() == "hello\n"
    finally:
        down = cli("sandbox", "down")
    assert "pull sandbox (queue server and poller) stopped" in down.stdout


# -- a full spool, a link that drops -------------------------------------------------------

def test_full_spool_is_a_staging_error(tmp_path: Path) -> None:
    env = Pull(tmp_path)
    try:
        env.server.settings["min_free_space"] = "1000TiB"
        env.server.restart()
        (env.work / "in.dat").write_text("data\n")
        result = env("run", "--site", env.site, "-t", "generic", *script("true"), "in.dat")
        assert result.returncode == 73, result.stderr
        assert "min_free_space" in result.stderr and "queue gc" in result.stderr
        assert (env.work / "in.dat").read_text() == "data\n"
    finally:
        env.close()


def test_link_cuts_during_upload_and_long_poll(polled: Pull) -> None:
    from tcp_proxy import TcpProxy

    with TcpProxy(polled.server.port) as proxy:
        config = yaml.safe_load(polled.config.read_text())
        config["sites"][polled.site]["pull"]["server"] = \
            polled.server.url.replace(f":{polled.server.port}/", f":{proxy.port}/")
        polled.config.write_text(yaml.safe_dump(config))
        (polled.work / "big.bin").write_bytes(os.urandom(24 << 20))
        proxy.cut_after(up=8 << 20)  # in the middle of the upload
        run = polled.start("run", "--site", polled.site, "-t", "generic",
                           *polled.counting("sleep 3; cp big.bin copy.bin"), "big.bin")
        wait_until(lambda: polled.starts() == 1, 60, "the entrypoint to start")
        proxy.cut()  # during the long-poll of `wait`
        assert run.wait(120) == 0, polled.err(0)
        assert proxy.cuts >= 2
    assert (polled.work / "copy.bin").read_bytes() == (polled.work / "big.bin").read_bytes()
    assert polled.starts() == 1


def test_four_pollers_fifty_runs(pull: Pull) -> None:
    for _ in range(4):
        pull.start_poller()
    runs = [pull.start("run", "--site", pull.site, "--into", str(pull.work / f"r{i}"), "-t",
                       "generic", *script(f"echo {i} >> {pull.marker}; echo {i} > mine.txt"))
            for i in range(50)]
    codes = [run.wait(240) for run in runs]
    assert codes == [0] * 50, [pull.err(i) for i, c in enumerate(codes) if c][:2]
    assert sorted(int(x) for x in pull.marker.read_text().split()) == list(range(50))
    for i in range(50):
        assert (pull.work / f"r{i}" / "mine.txt").read_text() == f"{i}\n"
    logs = "".join(p.read_text() for p in pull.site_dir.glob("poller*.log"))
    assert logs.count(": claimed") == 50
    assert len({line.split()[2] for line in logs.splitlines() if ": claimed" in line}) == 50


def test_unchanged_inputs_stay_and_changed_ones_come_back_aside(polled: Pull) -> None:
    (polled.work / "same.dat").write_bytes(os.urandom(2 << 20))
    (polled.work / "changed.dat").write_text("before\n")
    result = polled("run", "--site", polled.site, "--json", "-t", "generic",
                    *script("echo after > changed.dat; echo out > out.txt"),
                    "same.dat", "changed.dat")
    assert result.returncode == 0, result.stderr
    assert (polled.work / "changed.dat").read_text() == "before\n"  # never overwritten
    assert (polled.work / "changed.dat.returned").read_text() == "after\n"
    fetched = [json.loads(line) for line in result.stderr.splitlines()
               if line.startswith("{") and '"fetched"' in line][0]
    assert fetched["bytes"] < 1 << 20  # the 2 MiB input did not travel back
    assert "1 unchanged inputs not sent" in (polled.site_dir / "poller.log").read_text()



def test_a_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    wrong = ca.authority.issue_cert("queue.example.org")
    cert, key = tmp_path / "wrong.pem", tmp_path / "wrong.key"
    wrong.private_key_and_cert_chain_pem.write_to_path(str(cert))
    wrong.private_key_pem.write_to_path(str(key))
    server = QueueServer(tmp_path / "queue", ca,
                         tls={"cert": str(cert), "key": str(key), "client_ca": None}).start()
    try:
        env = Pull(tmp_path / "mint", server)
        result = env("run", "--site", env.site, "-t", "generic", *script("true"))
        assert result.returncode == 69, result.stderr
        assert "certificate" in result.stderr and "host name" in result.stderr
        assert env.journal() == [] or env.journal()[0]["state"] == "failed"
    finally:
        server.stop()


def test_full_site_disk_is_a_staging_error(pull: Pull) -> None:
    from helpers_badinput import mounted_tmpfs

    with mounted_tmpfs(pull.root, "size=512k,mode=0755"):
        pull.start_poller()
        (pull.work / "big.dat").write_bytes(os.urandom(2 << 20))
        result = pull("run", "--site", pull.site, "-t", "generic", *pull.counting(),
                      "big.dat")
        assert result.returncode == 73, result.stderr
        assert "could not start" in result.stderr and "space" in result.stderr
        assert pull.starts() == 0
        assert (pull.work / "big.dat").stat().st_size == 2 << 20
        wait_until(lambda: not [p for p in pull.root.iterdir()], 15,
                   "the site to remove the run directory it could not fill")
