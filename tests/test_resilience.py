"""Runs that survive a broken link, a dead orchestrator, a restarted sshd; cancel, timeout,
cleanup, logs.

Every scenario runs the real CLI against a real loopback sshd, through
:class:`tcp_proxy.TcpProxy` where the link has to misbehave. The remote root is on
the local file system (the sshd is loopback), so the tests look into run directories
directly: ``.remote-exec/launched``, ``pgid``, ``exit_code``. Each entrypoint appends a
line to a counter file outside the run directory, so "the entrypoint ran exactly
once" is one line in that file whatever happened to the link.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from tcp_proxy import TcpProxy

from remote_exec.journal import Journal, RunRecord
from remote_exec.sandbox import Sandbox

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="the tests find remote processes in /proc")

MODES = {"holder": [], "no-holder": ["--no-holder"]}
FAST_RETRY = ["--retry", "5,1"]
BIG = 20_000_000


# -- helpers --------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], object], timeout: float = 30, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def write_site_config(path: Path, box: Sandbox, root: Path, *, port: int | None = None,
                      **extra: object) -> Path:
    """A configuration with site ``loop`` on ``box`` (or on a proxy in front of it at
    ``port``, with a known_hosts file pinning the same host key there)."""
    site = box.site_definition()
    site["root"] = str(root)
    if port is not None and port != box.port:
        kind, blob = Path(f"{box.host_key}.pub").read_text().split()[:2]
        known = path.with_suffix(".known_hosts")
        known.write_text(f"[127.0.0.1]:{port} {kind} {blob}\n")
        site["port"], site["known_hosts"] = port, str(known)
    site.update(extra)
    path.write_text(yaml.safe_dump({"sites": {"loop": site}}))
    return path


def proc_table() -> list[tuple[int, int, int, str, str]]:
    """(pid, ppid, pgid, state, cmdline) of every process."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        rows.append((int(entry), int(fields[1]), int(fields[2]), fields[0],
                     cmdline.replace(b"\0", b" ").decode(errors="replace").strip()))
    return rows


def live(pred: Callable[[tuple[int, int, int, str, str]], bool]) -> list[int]:
    return [row[0] for row in proc_table() if row[3] != "Z" and pred(row)]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    return live(lambda row: row[2] == pgid)


def sleepers(marker: str) -> list[int]:
    """Live ``sleep MARKER`` processes (the marker is unique to one test)."""
    return live(lambda row: row[4] == f"sleep {marker}")


def working_in(directory: Path) -> list[int]:
    """Live processes whose working directory is ``directory`` or below it."""
    found = []
    for pid in live(lambda row: True):
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(directory):
                found.append(pid)
    return found


@dataclass
class Bg:
    """A ``remote-exec`` process running in the background, output in files."""

    proc: subprocess.Popen
    out: Path
    err: Path

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait(self, timeout: float = 90) -> int:
        return self.proc.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


class Env:
    """What a test drives: the CLI (through a configuration of its choice), background
    runs, the journal, the remote root, the counter file. ``close()`` stops whatever
    is left: background clients, remote process groups, marked sleeps, the holder."""

    def __init__(self, cli: Any, tmp_path: Path, workdir: Path, remote_root: Path) -> None:
        self.cli = cli
        self.tmp = tmp_path
        self.work = workdir
        self.root = remote_root
        self.counter = tmp_path / "counter"
        self.dest = tmp_path / "dest"
        self.bg: list[Bg] = []
        self.markers: list[str] = []

    # -- configuration and processes ------------------------------------------------------
    def use_config(self, path: Path) -> None:
        self.cli = replace(self.cli, config=path,
                           env={**self.cli.env, "REMOTE_EXEC_CONFIG": str(path)})

    def use_state(self, state: Path) -> None:
        self.cli = replace(self.cli, state=state,
                           env={**self.cli.env, "REMOTE_EXEC_STATE_DIR": str(state)})

    def __call__(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return self.cli(*args, cwd=self.work, timeout=timeout)

    def start(self, *args: str) -> Bg:
        n = len(self.bg)
        out, err = self.tmp / f"bg{n}.out", self.tmp / f"bg{n}.err"
        with open(out, "wb") as fout, open(err, "wb") as ferr:
            proc = subprocess.Popen([sys.executable, "-m", "remote_exec", *args],
                                    cwd=self.work, env=self.cli.env, stdin=subprocess.DEVNULL,
                                    stdout=fout, stderr=ferr)
        bg = Bg(proc, out, err)
        self.bg.append(bg)
        return bg

    # -- what the entrypoint leaves ---------------------------------------------------------
    def count(self) -> str:
        """Shell snippet: one line in the counter file per start of the entrypoint."""
        return f"echo ran >> {shlex.quote(str(self.counter))}"

    def runs_of_entrypoint(self) -> int:
        return len(self.counter.read_text().splitlines()) if self.counter.exists() else 0

    def marker(self) -> str:
        """A unique ``sleep`` argument (about a minute) to find that process by."""
        marker = f"6{len(self.markers)}.{uuid.uuid4().int % 10**6:06d}"
        self.markers.append(marker)
        return marker

    def rundirs(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if (p / ".remote-exec").is_dir())

    def rundir(self, run_id: str | None = None) -> Path:
        if run_id is None:
            return wait_until(lambda: self.rundirs() and self.rundirs()[-1],
                              what="a run directory")
        return self.root / run_id

    # -- the journal ------------------------------------------------------------------------
    @property
    def journal_path(self) -> Path:
        return self.cli.state / "journal.sqlite"

    def records(self) -> list[RunRecord]:
        if not self.journal_path.exists():
            return []
        journal = Journal(self.journal_path)
        try:
            return journal.runs(limit=None)
        finally:
            journal.close()

    def record(self, run_id: str | None = None) -> RunRecord:
        records = self.records()
        if run_id is None:
            assert len(records) == 1, records
            return records[0]
        return next(r for r in records if r.id == run_id)

    def wait_phase(self, phase: str, timeout: float = 30, exclude: set[str] = frozenset()
                   ) -> RunRecord:
        """The newest run (not in ``exclude``) once it has reached ``phase``."""
        def reached() -> RunRecord | None:
            for r in self.records():
                if r.id not in exclude:
                    return r if r.reached(phase) else None
            return None

        return wait_until(reached, timeout, f"a run to reach {phase}")

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        for bg in self.bg:
            if bg.proc.poll() is None:
                bg.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                bg.proc.wait(10)
        # what still runs in this test's run directories, or sleeps with its markers
        mine = set(working_in(self.root))
        for marker in self.markers:
            mine.update(sleepers(marker))
        for pid in mine:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        stop_holder(self.cli)


def holder_pid(cli: Any) -> int | None:
    proc = cli("holder", "status", cwd=cli.state.parent, timeout=20)
    match = re.match(r"pid (\d+):", proc.stdout)
    return int(match.group(1)) if match else None


def stop_holder(cli: Any) -> None:
    """Stop this state directory's holder (KILL it if it does not go within 10 s)."""
    if not (cli.state / "holder" / "holder.sock").exists():
        return
    pid = holder_pid(cli)
    if pid is None:
        return
    cli("holder", "stop", cwd=cli.state.parent, timeout=20)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not live(lambda row: row[0] == pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def env(cli: Any, tmp_path: Path, workdir: Path, remote_root: Path) -> Iterator[Env]:
    harness = Env(cli, tmp_path, workdir, remote_root)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def proxy(sshd: Sandbox, env: Env, tmp_path: Path) -> Iterator[TcpProxy]:
    """A proxy in front of the session sshd; ``env`` runs go through it."""
    with TcpProxy(sshd.port) as tcp:
        env.use_config(write_site_config(tmp_path / "proxied.yaml", sshd, env.root,
                                         port=tcp.port))
        yield tcp
        assert not tcp.errors


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_succeeded(env: Env, run_id: str | None = None, kept: bool = False) -> RunRecord:
    record = env.record(run_id)
    assert (record.state, record.phase, record.exit_code) == ("succeeded", "cleaned", 0), record
    assert (env.root / record.id).exists() == kept  # removed after success unless --keep
    return record


def assert_group_gone(pgid: int, marker: str, timeout: float = 10) -> None:
    wait_until(lambda: not group_members(pgid) and not sleepers(marker), timeout,
               f"process group {pgid} / sleep {marker} to end")


# -- a. the link is cut ----------------------------------------------------------------------

TRANSFERS = [("holder", "sftp"), ("no-holder", "sftp"), ("no-holder", "rsync")]


@pytest.mark.parametrize(("mode", "transfer"), TRANSFERS, ids=lambda v: v)
def test_cut_during_staging_restages_and_completes(env, proxy, mode, transfer):
    payload = os.urandom(BIG)
    (env.work / "big.bin").write_bytes(payload)
    proxy.cut_after(up=5_000_000)
    proc = env("run", "--site", "loop", *MODES[mode], *FAST_RETRY, "--transfer", transfer,
               "--into", str(env.dest),
               "--cmd", f"{env.count()}; sha256sum big.bin > sum", "big.bin")
    assert proc.returncode == 0, proc.stderr
    assert proxy.cuts >= 1 and not proxy.armed
    assert "lost during staging" in proc.stderr
    assert "reconnected to" in proc.stderr
    assert f"sent by {transfer}" in proc.stderr
    assert (env.dest / "sum").read_text().split()[0] == sha256(payload)
    assert not (env.dest / "big.bin").exists()  # an unchanged input does not come back
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


@pytest.mark.parametrize("mode", MODES)
def test_cut_while_waiting_reconnects_and_completes(env, proxy, mode):
    (env.work / "in.txt").write_text("hello\n")
    run = env.start("run", "--site", "loop", *MODES[mode], *FAST_RETRY, "--into", str(env.dest),
                    "--cmd", f"{env.count()}; sleep 3; tr a-z A-Z < in.txt > out.txt", "in.txt")
    env.wait_phase("launched")
    proxy.cut()
    assert run.wait() == 0, run.stderr
    assert "lost during waiting for the entrypoint" in run.stderr
    assert "reconnected to" in run.stderr
    assert (env.dest / "out.txt").read_text() == "HELLO\n"
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


def test_cut_of_a_connection_shared_by_two_holder_runs(env, proxy):
    """Two runs share the holder's pooled connection; it is cut; both finish, each
    entrypoint having run once."""
    runs, records = [], set()
    for name in ("A", "B"):
        runs.append(env.start(
            "run", "--site", "loop", *FAST_RETRY, "--into", str(env.tmp / name),
            "--cmd", f"echo {name} >> {shlex.quote(str(env.counter))}; sleep 2; "
            f"echo {name} > out.txt"))
        records.add(env.wait_phase("launched", exclude=records).id)
    assert proxy.accepted == 1  # one connection for both
    proxy.cut()
    for name, run in zip("AB", runs):
        assert run.wait() == 0, run.stderr
        assert "reconnected to" in run.stderr
        assert (env.tmp / name / "out.txt").read_text() == f"{name}\n"
    assert sorted(env.counter.read_text().split()) == ["A", "B"]
    for run_id in records:
        assert_succeeded(env, run_id)


def test_cut_at_launch_starts_the_entrypoint_once(env, proxy):
    """The link dies the moment launch.sh takes its guard (the launch step, or the wait
    just after it, is retried): the entrypoint still starts once."""
    run = env.start("run", "--site", "loop", "--no-holder", *FAST_RETRY, "--into", str(env.dest),
                    "--cmd", f"{env.count()}; sleep 1; echo once > out.txt")
    wait_until(lambda: list(env.root.glob("*/.remote-exec/launched")), 30, "the launch guard")
    proxy.cut()
    assert run.wait() == 0, run.stderr
    assert "reconnected to" in run.stderr
    assert (env.dest / "out.txt").read_text() == "once\n"
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


@pytest.mark.parametrize(("mode", "transfer"), TRANSFERS, ids=lambda v: v)
def test_cut_during_fetching_refetches_and_completes(env, proxy, mode, transfer):
    run = env.start("run", "--site", "loop", *MODES[mode], *FAST_RETRY, "--transfer", transfer,
                    "--into", str(env.dest), "--cmd",
                    f"{env.count()}; head -c {BIG} /dev/urandom > out.bin; "
                    "sha256sum out.bin > out.sha")
    rundir = env.rundir()
    wait_until(lambda: (rundir / ".remote-exec" / "exit_code").exists(), 30, "the exit code")
    proxy.cut_after(down=3_000_000)
    assert run.wait() == 0, run.stderr
    assert proxy.cuts >= 1 and not proxy.armed
    assert "lost during fetching" in run.stderr
    assert "reconnected to" in run.stderr
    assert f"bytes, by {transfer} into" in run.stderr
    out = (env.dest / "out.bin").read_bytes()
    assert len(out) == BIG
    assert (env.dest / "out.sha").read_text().split()[0] == sha256(out)
    assert not [p for p in env.dest.iterdir() if p.name.startswith(".remote-exec")]
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


def test_cut_during_cleanup_still_removes_the_run_directory(env, proxy):
    files = 1000  # enough for the removal to take a moment
    run = env.start("run", "--site", "loop", "--no-holder", *FAST_RETRY, "--into", str(env.dest),
                    "--cmd", f"{env.count()}; mkdir many; "
                    f"i=0; while [ $i -lt {files} ]; do : > many/f$i; i=$((i+1)); done")
    record = env.wait_phase("fetched", timeout=60)
    proxy.cut(reset=False)
    assert run.wait() == 0, run.stderr
    assert "lost during cleaning up" in run.stderr
    assert len(list((env.dest / "many").iterdir())) == files
    assert env.runs_of_entrypoint() == 1
    assert not (env.root / record.id).exists(), run.stderr
    assert_succeeded(env)


# -- b. the link stalls ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_stalled_link_is_detected_and_replaced(env, proxy, mode):
    run = env.start("run", "--site", "loop", *MODES[mode], *FAST_RETRY, "--stall-timeout", "2",
                    "--json", "--into", str(env.dest),
                    "--cmd", f"{env.count()}; sleep 4; echo awake > out.txt")
    env.wait_phase("launched")
    proxy.stall()  # and left stalled: only new connections get through
    try:
        assert run.wait() == 0, run.stderr
    finally:
        proxy.unstall()
    events = [json.loads(line) for line in run.stderr.splitlines()]
    launched = next(e["elapsed"] for e in events if e["event"] == "launched")
    lost = next(e for e in events if e["event"] == "warning" and "lost during" in e["message"])
    assert "lost during waiting for the entrypoint" in lost["message"]
    assert 1.5 < lost["elapsed"] - launched < 8  # about --stall-timeout after the stall
    assert any(e["event"] == "reconnected" for e in events)
    assert proxy.accepted >= 2
    assert (env.dest / "out.txt").read_text() == "awake\n"
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


# -- c. sshd restarts ------------------------------------------------------------------------

@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path / "own-sshd")
    box.up()
    try:
        yield box
    finally:
        box.down()


def sshd_sessions(listener: int) -> list[int]:
    """The per-connection sshd processes forked by listener ``listener`` (and theirs)."""
    table = proc_table()
    found: set[int] = set()
    frontier = {listener}
    while frontier:
        frontier = {pid for pid, ppid, _g, _s, cmd in table
                    if ppid in frontier and cmd.startswith("sshd") and pid not in found}
        found |= frontier
    return sorted(found)


@pytest.mark.parametrize("mode", MODES)
def test_sshd_restart_while_waiting(env, own_sshd, tmp_path, mode):
    """sshd goes away with every connection (as on a host reboot or crash, not a mere
    `systemctl restart ssh`, which keeps sessions) and comes back on the same port."""
    env.use_config(write_site_config(tmp_path / "own.yaml", own_sshd, env.root))
    port = own_sshd.port
    run = env.start("run", "--site", "loop", *MODES[mode], *FAST_RETRY, "--into", str(env.dest),
                    "--cmd", f"{env.count()}; sleep 4; echo survived > out.txt")
    env.wait_phase("launched")
    listener = own_sshd.pid()
    assert listener is not None
    sessions = sshd_sessions(listener)
    assert sessions
    own_sshd.down()
    for pid in sessions:  # Sandbox.down() stops the listener only
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not live(lambda row: row[0] in sessions), 10, "sshd sessions to end")
    time.sleep(2)
    own_sshd.up(port=port)
    assert run.wait() == 0, run.stderr
    assert "lost during waiting for the entrypoint" in run.stderr
    assert "reconnected to" in run.stderr
    assert (env.dest / "out.txt").read_text() == "survived\n"
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


# -- d. the orchestrator is killed, then `resume` ----------------------------------------------

def assert_undriven(env: Env, record: RunRecord) -> None:
    """`list`, `list --json` and `status` show the run as running with no driver."""
    listing = env("list")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(record.id[:8]))
    assert "running*" in row
    assert "no remote-exec process drives it" in listing.stdout
    data = [json.loads(line) for line in env("list", "--json").stdout.splitlines()]
    mine = next(d for d in data if d["id"] == record.id)
    assert (mine["state"], mine["driven"]) == ("running", False)
    status = env("status", record.id[:8], "--local")
    assert status.returncode == 0, status.stderr
    assert "no process drives it" in status.stdout
    assert f"remote-exec resume {record.id[:8]}" in status.stdout


def test_sigkill_while_waiting_then_resume(env):
    # (8 s: long enough for `status` to see it running on a loaded machine)
    run = env.start("run", "--site", "loop", "--no-holder", "--into", str(env.dest),
                    "--cmd", f"{env.count()}; sleep 8; echo resumed > out.txt")
    record = env.wait_phase("launched")
    run.signal(signal.SIGKILL)
    run.wait()
    assert_undriven(env, record)
    status = env("status", record.id[:8])  # asks the remote side too
    assert status.returncode == 0, status.stderr
    assert "remotely  entrypoint running" in status.stdout
    resumed = env("resume", record.id[:8], "--no-holder")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stderr
    assert (env.dest / "out.txt").read_text() == "resumed\n"
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


@pytest.mark.parametrize("kill_holder", [True, False], ids=["client+holder", "client"])
def test_sigkill_in_holder_mode_then_resume(env, kill_holder):
    run = env.start("run", "--site", "loop", "--into", str(env.dest),
                    "--cmd", f"{env.count()}; sleep 3; echo resumed > out.txt")
    record = env.wait_phase("launched")
    holder = holder_pid(env.cli)
    assert holder is not None
    run.signal(signal.SIGKILL)
    if kill_holder:
        os.kill(holder, signal.SIGKILL)
    run.wait()
    # without its client the holder stops driving the run (the remote side goes on)
    wait_until(lambda: env.record().driver_pid is None or kill_holder, 10, "the holder to let go")
    assert_undriven(env, record)
    assert env.record().phase in ("launched", "finished")
    resumed = env("resume", record.id[:8])
    assert resumed.returncode == 0, resumed.stderr
    assert (env.dest / "out.txt").read_text() == "resumed\n"
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


def test_sigkill_during_staging_then_resume(env, proxy):
    payload = os.urandom(BIG)
    (env.work / "big.bin").write_bytes(payload)
    proxy.stall_after(up=5_000_000)  # hold the transfer there, then kill the orchestrator
    run = env.start("run", "--site", "loop", "--no-holder", "--into", str(env.dest),
                    "--cmd", f"{env.count()}; sha256sum big.bin > sum", "big.bin")
    assert proxy.wait_for(lambda p: not p.armed, 30)
    run.signal(signal.SIGKILL)
    run.wait()
    proxy.unstall()
    record = env.record()
    assert record.phase == "created", record
    partial = env.root / record.id / "big.bin"
    assert partial.exists() and partial.stat().st_size < BIG
    assert env.runs_of_entrypoint() == 0
    assert_undriven(env, record)
    resumed = env("resume", record.id, "--no-holder")
    assert resumed.returncode == 0, resumed.stderr
    assert not (env.dest / "big.bin").exists()  # an unchanged input does not come back
    assert (env.dest / "sum").read_text().split()[0] == sha256(payload)
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


# -- e. the retry budget runs out ------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_retries_exhausted_then_resume(env, proxy, mode):
    """The host stops answering (connections refused) longer than --retry allows: exit
    75, the run is interrupted, and `resume` finishes it once the host is back."""
    run = env.start("run", "--site", "loop", *MODES[mode], "--retry", "2,0.5",
                    "--into", str(env.dest),
                    "--cmd", f"{env.count()}; sleep 2; echo late > out.txt")
    record = env.wait_phase("launched")
    proxy.refuse(True, listen=False)
    proxy.cut()
    cut_at = time.monotonic()
    assert run.wait() == 75, run.stderr
    assert time.monotonic() - cut_at < 10
    assert f"remote-exec resume {record.id[:8]}" in run.stderr
    assert run.stderr.count("reconnecting in") == 2
    record = env.record()
    assert record.state == "interrupted", record
    assert "could not reconnect in 2 tries" in (record.error or "")
    listing = env("list", "--active")
    assert record.id[:8] in listing.stdout and "interrupted" in listing.stdout
    proxy.refuse(False)
    resumed = env("resume", record.id[:8], *MODES[mode])
    assert resumed.returncode == 0, resumed.stderr
    assert (env.dest / "out.txt").read_text() == "late\n"
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)


def test_retry_budget_bounds_connections_reset_during_the_handshake(env, proxy):
    """A middlebox (or a restarting sshd) that accepts TCP and resets at once: --retry 2,0.5
    gives up after 2 attempts and about a second of waiting. (Regression: each reconnect
    try used to retry a dropped handshake 8 more times, ~25 s in all.)"""
    run = env.start("run", "--site", "loop", "--no-holder", "--retry", "2,0.5",
                    "--into", str(env.dest), "--cmd", f"{env.count()}; sleep 2")
    env.wait_phase("launched")
    proxy.refuse(True)
    proxy.cut()
    try:
        code = run.wait(6)
    except subprocess.TimeoutExpired:
        code = None
    assert (code, proxy.refused) == (75, 2), f"{proxy.refused} connection attempts"


# -- f. cancel ----------------------------------------------------------------------------------

def start_sleeper(env: Env, *extra: str, script: str = "sleep {marker}") -> tuple[Bg, RunRecord,
                                                                                  str, int]:
    """A run whose entrypoint sleeps about a minute; returns once it is asleep."""
    marker = env.marker()
    run = env.start("run", "--site", "loop", *extra, "--into", str(env.dest),
                    "--cmd", f"{env.count()}; " + script.format(marker=marker))
    record = env.wait_phase("launched")
    wait_until(lambda: sleepers(marker), 30, f"sleep {marker}")
    pgid = int((env.rundir(record.id) / ".remote-exec" / "pgid").read_text())
    return run, record, marker, pgid


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["INT", "TERM", "HUP"])
def test_signal_cancels_the_remote_process_group(env, mode, signum):
    run, record, marker, pgid = start_sleeper(env, *MODES[mode])
    sent = time.monotonic()
    run.signal(signum)
    assert run.wait(30) == 128 + signum, run.stderr
    assert time.monotonic() - sent < 8
    assert_group_gone(pgid, marker)
    record = env.record()
    assert record.state == "cancelled", record
    assert signal.Signals(signum).name in (record.error or "")
    assert "cancel" in run.stderr
    assert env.runs_of_entrypoint() == 1


def test_entrypoint_ignoring_term_is_killed_after_the_grace(env, sshd, tmp_path):
    env.use_config(write_site_config(tmp_path / "grace.yaml", sshd, env.root, cancel_grace=2))
    run, record, marker, pgid = start_sleeper(env, "--no-holder",
                                              script='trap "" TERM; sleep {marker}')
    sent = time.monotonic()
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 143, run.stderr
    took = time.monotonic() - sent
    assert 2 <= took < 12, took
    assert_group_gone(pgid, marker)
    record = env.record()
    assert record.state == "cancelled", record
    assert "killed" in (record.error or ""), record.error
    assert (env.rundir(record.id) / ".remote-exec" / "exit_code").read_text().strip() == "137"


@pytest.mark.parametrize("mode", MODES)
def test_second_signal_exits_at_once_and_the_cancel_still_happens(env, sshd, tmp_path, mode):
    """The second signal exits at once, yet the remote cancel runs to its end: the group is
    KILLed after the grace and exit code 137 recorded; the holder records the cancel.
    (Regression: cancel.sh used to die of SIGPIPE once the client had gone, recording no
    exit code, and the holder took the client's EOF for 'abandon' in the middle of the
    cancel, leaving the journal at 'running'.)"""
    env.use_config(write_site_config(tmp_path / "grace.yaml", sshd, env.root, cancel_grace=2))
    run, record, marker, pgid = start_sleeper(env, *MODES[mode],
                                              script='trap "" TERM; sleep {marker}')
    run.signal(signal.SIGINT)
    wait_until((env.rundir(record.id) / ".remote-exec" / "cancelled").exists, 10,
               "cancel.sh to start")  # it TERMs the group, waits 2 s, then KILLs it
    sent = time.monotonic()
    run.signal(signal.SIGINT)
    assert run.wait(10) == 130, run.stderr
    assert time.monotonic() - sent < 3
    assert_group_gone(pgid, marker, timeout=15)  # TERM ignored: KILLed after the grace
    exit_code = env.rundir(record.id) / ".remote-exec" / "exit_code"
    with contextlib.suppress(AssertionError):
        wait_until(exit_code.exists, 3, "the exit code")
    assert exit_code.exists() and exit_code.read_text().strip() == "137"
    if mode == "holder":  # the holder finishes the cancel, so the journal knows
        with contextlib.suppress(AssertionError):
            wait_until(lambda: env.record().state != "running", 3, "the journal")
        assert env.record().state == "cancelled"


@pytest.mark.parametrize("mode", MODES)
def test_cancel_command_stops_a_driven_run(env, mode):
    run, record, marker, pgid = start_sleeper(env, *MODES[mode])
    cancel = env("cancel", record.id[:8], timeout=60)
    assert cancel.returncode == 0, cancel.stderr
    assert "cancel" in cancel.stdout
    assert run.wait(30) == 143, run.stderr
    assert_group_gone(pgid, marker)
    assert env.record().state == "cancelled"


def test_cancel_command_stops_an_undriven_run(env):
    run, record, marker, pgid = start_sleeper(env, "--no-holder")
    run.signal(signal.SIGKILL)
    run.wait()
    assert sleepers(marker)  # the remote side goes on without its orchestrator
    cancel = env("cancel", record.id[:8], timeout=60)
    assert cancel.returncode == 0, cancel.stderr
    assert "stopped by TERM" in cancel.stdout
    assert_group_gone(pgid, marker)
    record = env.record()
    assert record.state == "cancelled", record
    again = env("resume", record.id[:8], "--no-holder")
    assert again.returncode == 78 and "cancelled" in again.stderr


# -- g. --timeout -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_timeout_stops_the_run(env, mode):
    marker = env.marker()
    started = time.monotonic()
    proc = env("run", "--site", "loop", *MODES[mode], "--timeout", "2s", "--into", str(env.dest),
               "--cmd", f"{env.count()}; sleep {marker}")
    assert proc.returncode == 124, proc.stderr
    assert time.monotonic() - started < 15
    assert "time limit" in proc.stderr and "--timeout 2 s" in proc.stderr
    record = env.record()
    assert record.state == "timed_out", record
    pgid = int((env.rundir(record.id) / ".remote-exec" / "pgid").read_text())
    assert_group_gone(pgid, marker)
    assert env.runs_of_entrypoint() == 1


# -- h. cleanup --------------------------------------------------------------------------------

def test_cleanup_removes_only_old_finished_run_directories(env, tmp_path):
    def age(path: Path, days: float) -> None:
        then = time.time() - days * 86400
        os.utime(path, (then, then))

    def verdicts(out: str) -> dict[str, str]:
        found = {}
        for line in out.splitlines():
            match = re.match(r"(.+?)\s{2,}(/\S+)\s", line)
            if match:
                found[Path(match.group(2)).name] = match.group(1).strip()
        return found

    # finished runs, kept: one old, one recent; a failed one (kept by policy), old
    old = env("run", "--site", "loop", "--no-holder", "--keep", "--into", str(tmp_path / "o"),
              "--cmd", "echo old > old.txt")
    assert old.returncode == 0, old.stderr
    recent = env("run", "--site", "loop", "--no-holder", "--keep", "--into", str(tmp_path / "r"),
                 "--cmd", "true")
    assert recent.returncode == 0, recent.stderr
    failed = env("run", "--site", "loop", "--no-holder", "--into", str(tmp_path / "f"),
                 "--cmd", "exit 3")
    assert failed.returncode == 3, failed.stderr
    old_id, recent_id, failed_id = (r.id for r in reversed(env.records()))
    # an active run whose entrypoint has finished but whose results were never fetched
    orphan = env.start("run", "--site", "loop", "--no-holder", "--into", str(env.dest),
                       "--cmd", f"{env.count()}; sleep 1; echo precious > precious.txt")
    active = env.wait_phase("launched", exclude={old_id, recent_id, failed_id})
    orphan.signal(signal.SIGKILL)
    orphan.wait()
    wait_until(lambda: (env.root / active.id / ".remote-exec" / "exit_code").exists(), 30,
               "the orphaned entrypoint to finish")
    # a run of another journal (another machine) whose entrypoint is still running
    other_state = tmp_path / "other-state"
    other = Env(env.cli, tmp_path / "other", env.work, env.root)
    other.tmp.mkdir()
    other.use_state(other_state)
    other.dest = tmp_path / "other-dest"
    other.counter = tmp_path / "other-counter"
    try:
        foreign_run, foreign, marker, pgid = start_sleeper(other, "--no-holder")
        # directories that are not run directories
        stranger = env.root / str(uuid.uuid4())
        stranger.mkdir()
        (env.root / "not-a-run").mkdir()
        for name in (old_id, failed_id, active.id, foreign.id, stranger.name, "not-a-run"):
            age(env.root / name, 3)

        dry = env("cleanup", "loop", "--older-than", "1d", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert verdicts(dry.stdout) == {
            old_id: "would remove", failed_id: "would remove", recent_id: "too recent",
            active.id: "kept (active)", foreign.id: "kept (active)",
        }, dry.stdout
        assert all((env.root / n).is_dir() for n in (old_id, failed_id, recent_id, active.id))

        real = env("cleanup", "loop", "--older-than", "1d")
        assert real.returncode == 0, real.stderr
        assert verdicts(real.stdout) == {
            old_id: "removed", failed_id: "removed", recent_id: "too recent",
            active.id: "kept (active)", foreign.id: "kept (active)",
        }, real.stdout
        assert "2 of 5 run directories removed on loop" in real.stdout
        left = sorted(p.name for p in env.root.iterdir())
        assert left == sorted([recent_id, active.id, foreign.id, stranger.name, "not-a-run"])
        assert sleepers(marker)

        # the active run is still whole: resume brings its results back
        resumed = env("resume", active.id[:8], "--no-holder")
        assert resumed.returncode == 0, resumed.stderr
        assert (env.dest / "precious.txt").read_text() == "precious\n"
        assert env.runs_of_entrypoint() == 1
    finally:
        other.close()


# -- i. logs, status, list ---------------------------------------------------------------------

def test_logs_status_and_list(env):
    lines = "".join(f"line{i}\n" for i in range(1, 6))
    run = env.start("run", "--site", "loop", "--keep", "--into", str(env.dest),
                    "--cmd", "for i in 1 2 3 4 5; do echo line$i; sleep 0.4; done")
    record = env.wait_phase("launched")
    busy = env("resume", record.id[:8], "--no-holder")
    assert busy.returncode == 75 and "being driven by another" in busy.stderr, busy.stderr
    follow = env("logs", record.id[:8], "-f", timeout=60)
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout == lines
    assert run.wait() == 0, run.stderr
    record = assert_succeeded(env, kept=True)

    logs = env("logs", record.id[:8])
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == lines == (env.dest / "remote_program_exec.log").read_text()

    status = env("status", record.id)
    assert status.returncode == 0, status.stderr
    fields = dict(re.findall(r"^(run|site|state|phase|exit code|remote|into)\s+(.*)$",
                             status.stdout, re.M))
    assert fields["run"] == record.id
    assert fields["site"].startswith("loop (127.0.0.1)")
    assert (fields["state"], fields["phase"], fields["exit code"]) == ("succeeded", "cleaned",
                                                                       "0")
    assert fields["remote"] == str(env.root / record.id)  # kept (--keep)
    assert fields["into"] == str(env.dest)
    for kind in ("created", "staged", "launched", "finished", "fetched", "kept"):
        assert re.search(rf"^  \S+ \S+  {kind}\s", status.stdout, re.M), (kind, status.stdout)
    data = json.loads(env("status", record.id[:8], "--json").stdout)
    assert (data["id"], data["state"], data["exit_code"], data["driven"]) == (
        record.id, "succeeded", 0, False)

    listing = env("list")
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]
    assert header.split()[:5] == ["RUN", "SITE", "STATE", "PHASE", "EXIT"]
    assert row.split()[:5] == [record.id[:8], "loop", "succeeded", "cleaned", "0"]
    assert "command 'for i in" in row
    rows = [json.loads(line) for line in env("list", "--json").stdout.splitlines()]
    assert [(r["id"], r["state"], r["phase"]) for r in rows] == [
        (record.id, "succeeded", "cleaned")]
    assert env("list", "--active").stdout.strip() == "no runs recorded"
    short = env("status", record.id[:3])
    assert short.returncode == 78 and "too short" in short.stderr


def test_logs_follow_of_a_run_that_already_came_back(env):
    """`logs -f` of a run that came back prints the fetched copy. (Regression: it failed
    with 'the run directory ... is gone'.)"""
    proc = env("run", "--site", "loop", "--no-holder", "--into", str(env.dest),
               "--cmd", "echo finished-line")
    assert proc.returncode == 0, proc.stderr
    record = env.record()
    follow = env("logs", record.id[:8], "-f", timeout=60)
    assert (follow.returncode, follow.stdout) == (0, "finished-line\n"), follow.stderr


def test_logs_follow_ends_when_the_run_is_cleaned_up(env, proxy):
    """`logs -f` follows a run without --keep; its own link lags (stalled) while the run
    ends and its directory is removed. It must then end, with every line printed.
    (Regression: it polled the vanished exit code forever; a plain short run without
    the stall showed that almost every time.)"""
    run = env.start("run", "--site", "loop", "--no-holder", "--into", str(env.dest),
                    "--cmd", "echo first; sleep 2; echo last")
    record = env.wait_phase("launched")
    follow = env.start("logs", record.id[:8], "-f")
    wait_until(lambda: follow.stdout or follow.proc.poll() is not None, 30, "the first line")
    assert proxy.accepted == 2  # the run's connection, then the follower's
    proxy.stall(first=1)  # the follower only
    assert run.wait() == 0, run.stderr
    assert not (env.root / record.id).exists()
    proxy.unstall()
    try:
        code = follow.wait(5)
    except subprocess.TimeoutExpired:
        code = None
    assert (code, follow.stdout) == (0, "first\nlast\n"), follow.stderr


def test_cut_during_tar_staging_restages_and_completes(env, proxy):
    tree = env.work / "tree"
    tree.mkdir()
    for i in range(400):  # many small files: one tar stream (transfer: auto)
        (tree / f"f{i:03d}").write_bytes(os.urandom(20_000))
    proxy.cut_after(up=3_000_000)
    proc = env("run", "--site", "loop", "--no-holder", *FAST_RETRY, "--into", str(env.dest),
               "--cmd", f"{env.count()}; cat tree/* | sha256sum > sum", "tree")
    assert proc.returncode == 0, proc.stderr
    assert proxy.cuts >= 1 and "lost during staging" in proc.stderr
    assert "by tar" in proc.stderr
    whole = b"".join((tree / f"f{i:03d}").read_bytes() for i in range(400))
    assert (env.dest / "sum").read_text().split()[0] == sha256(whole)
    assert env.runs_of_entrypoint() == 1
    assert_succeeded(env)
