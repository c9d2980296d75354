"""One error model (issue 12): every error is transient, resumable or final, and the exit
code, the journal state and what ``resume`` does follow from that, never disagree.

Each of the four wrong outcomes users reproduced runs here through the real CLI against
a real loopback sshd (a restricted site with the real agent, sshd's MaxSessions, a
remote file system out of inodes, a read-only state directory) or the WebAPI simulator;
the last test walks every error class against the README's exit-code table.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
import yaml
from conftest import Cli, site_entry
from fujitsu_sim import FujitsuSim
from helpers_badinput import mounted_tmpfs
from test_fujitsu import Env, env, sim  # noqa: F401 - fixtures, by name
from test_restricted import Locked, locked  # noqa: F401 - fixture, by name

from remote_exec import backends, errors, localfs
from remote_exec.backends.agent import AgentRefused
from remote_exec.backends.batch import SchedulerUnavailable, SubmitError
from remote_exec.backends.fujitsu.api import ApiError, ResultSyncError, SyncError
from remote_exec.backends.pull.backend import NotClaimed, SiteRefused
from remote_exec.backends.rescale.api import ApiError as RescaleApiError
from remote_exec.engine import _check_resumable, record_error
from remote_exec.journal import Journal
from remote_exec.sandbox import Sandbox
from remote_exec.ssh import rsync as rsync_mod

pytestmark = pytest.mark.timeout(300)

README = Path(__file__).resolve().parent.parent / "README.md"


def runs(cli: Cli, cwd: Path) -> list[dict]:
    out = cli("list", "--json", cwd=cwd).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# -- 1. legacy on a restricted site ---------------------------------------------------------

def test_legacy_on_a_restricted_site_is_refused_before_connecting(locked: Locked,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    """The agent refuses SFTP; legacy used to take that for a dropped link and reconnect
    until the run ended "interrupted". Now it is refused before anything is contacted."""
    work = tmp_path / "legacy"
    work.mkdir()
    (work / "input.txt").write_text("data\n")
    before_log = locked.agent_log()
    before_root = set(os.listdir(locked.root))
    proc = locked.cli("legacy", "client_name:locked", f"client_cmd:{locked.scripts}/work.sh",
                      "client_files:input.txt", cwd=work, timeout=240)
    assert proc.returncode == 1, proc.stderr
    assert "restricted" in proc.stderr and "remote-exec run --site locked" in proc.stderr
    assert "reconnect" not in proc.stderr and "Traceback" not in proc.stderr
    assert set(os.listdir(locked.root)) == before_root
    assert locked.agent_log() == before_log, "the agent was contacted"
    listed = locked.cli("list", "--json", cwd=work).stdout
    assert not [line for line in listed.splitlines() if line.strip()], listed


def test_sftp_refused_by_the_agent_is_a_refusal_not_a_lost_link(locked: Locked,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """The same key on a site not marked restricted: the agent refuses the SFTP session;
    that is final (77) at once, with the fix, not a dropped link to reconnect."""
    config = yaml.safe_load(locked.config.read_text())
    config["sites"]["locked"]["restricted"] = False
    unmarked = tmp_path / "unmarked.yaml"
    unmarked.write_text(yaml.safe_dump(config))
    work = tmp_path / "unmarked"
    work.mkdir()
    (work / "input.txt").write_text("data\n")
    proc = locked.cli("run", "--config", str(unmarked), "--site", "locked", "--cmd", "true",
                      "input.txt", cwd=work, timeout=240)
    assert proc.returncode == 77, proc.stderr
    assert "refused an SFTP session" in proc.stderr and "restricted: true" in proc.stderr
    assert "reconnect" not in proc.stderr and "Traceback" not in proc.stderr
    run = json.loads(locked.cli("list", "--json", "-n", "1", cwd=work).stdout.splitlines()[0])
    assert run["state"] == "failed", run


# -- 2. a lost outcome is resumable, through the journal too --------------------------------

def test_lost_outcome_is_interrupted_and_resume_finishes_it(cli: Cli, workdir: Path,
                                                            remote_root: Path) -> None:
    """remote-exec dies, then the entrypoint's process group is killed (no exit code is
    left): ``resume`` exits 75, the run is recorded *interrupted* (it was *failed*, and a
    second ``resume`` refused it), and ``resume`` finishes once the code is there."""
    (workdir / "a.txt").write_text("a\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "remote_exec", "run", "--site", "loop", "--no-holder",
         "--cmd", "sleep 60", "a.txt"], cwd=workdir, env=cli.env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run = _wait_launched(cli, workdir)
    finally:
        proc.kill()
        proc.wait()
    os.killpg(int(run["job_id"]), signal.SIGKILL)
    lost = cli("resume", run["id"][:8], "--no-holder", cwd=workdir)
    assert lost.returncode == 75, lost.stderr
    assert "gone and left no exit code" in lost.stderr, lost.stderr
    record = runs(cli, workdir)[0]
    assert record["state"] == "interrupted", record
    rundir = Path(record["rundir"])
    (rundir / "late.txt").write_text("written by hand\n")  # the outcome shows up later
    (rundir / ".remote-exec" / "exit_code").write_text("0\n")
    resumed = cli("resume", run["id"][:8], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert (workdir / "late.txt").read_text() == "written by hand\n"
    assert runs(cli, workdir)[0]["state"] == "succeeded"


def _wait_launched(cli: Cli, cwd: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = runs(cli, cwd)
        if found and found[0].get("job_id") and found[0]["phase"] == "launched":
            return found[0]
        time.sleep(0.2)
    raise AssertionError("the run was not launched")


def test_fujitsu_sync_after_the_job_ran_is_resumable(env: Env, sim: FujitsuSim,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """The sync that brings the job's files back fails: exit 75, *interrupted*, and
    ``resume`` syncs again and fetches without a second job."""
    work = tmp_path / "fj"
    work.mkdir()
    (work / "input.dat").write_text("0123456789\n")
    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/sh\nsleep 3\ncat input.dat > copy.dat\n")
    slow.chmod(0o755)
    args = ["run", "--site", "fcs", "-t", "generic", "-p", f"program={slow}", "input.dat"]
    proc = env.spawn(*args, cwd=work)
    try:
        env.wait_job(("RUN",))
        sim.faults.sync_result = "1"  # the to_online sync (after the job) fails
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stderr
    assert "resume" in stderr and "§4.3" in stderr
    run = env.newest()
    assert run["state"] == "interrupted", run
    sim.faults.sync_result = "0"
    jobs_before = len(sim.jobs)
    resumed = env.cli("resume", run["id"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert (work / "copy.dat").read_text() == "0123456789\n"
    assert len(sim.jobs) == jobs_before, "resume submitted a second job"


# -- 3. MaxSessions: a refused channel waits, the shared connection stays ------------------

@pytest.fixture(scope="module")
def few_sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path_factory.mktemp("maxsessions") / "sshd",
                  extra_config=["MaxSessions 3"])
    box.up()
    yield box
    box.down()


def test_maxsessions_refusal_waits_and_keeps_the_shared_connection(
        cli: Cli, tmp_path: Path, few_sessions: Sandbox) -> None:
    """Three runs share the holder's warm connection on an sshd that allows 3 sessions per
    connection, two of which the connection keeps (its SFTP session and its launch
    server): their rsync channels meet the limit; a refused channel is opened again
    later, nobody reconnects, all succeed."""
    root = tmp_path / "few-root"
    root.mkdir()
    config = tmp_path / "few.yaml"
    config.write_text(yaml.safe_dump({"sites": {"few": site_entry(few_sessions, root)}}))
    few_env = dict(cli.env, REMOTE_EXEC_CONFIG=str(config))

    def start(name: str, cmd: str) -> subprocess.Popen:
        work = tmp_path / name
        work.mkdir()
        (work / "a").write_text(name)
        return subprocess.Popen([sys.executable, "-m", "remote_exec", "run", "--site", "few",
                                 "--transfer", "rsync", "--cmd", cmd, "a"], cwd=work,
                                env=few_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    warm = start("warm", "true")  # leaves one pooled connection in the holder
    assert warm.wait(timeout=120) == 0, warm.communicate()[1]
    procs = [start(f"w{i}", "sleep 2; cat a > out") for i in range(3)]
    outputs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    text = "\n".join(outputs)
    assert "refused a new channel" in text, text  # the limit was met...
    assert "lost during" not in text and "reconnect" not in text, text  # ...and no link closed
    for i in range(3):
        assert (tmp_path / f"w{i}" / "out").read_text() == f"w{i}"



def test_a_refused_rsync_channel_is_a_channel_refusal(tmp_path: Path,
                                                      few_sessions: Sandbox) -> None:
    """sshd refuses rsync's channel (the connection's 3 sessions are taken): rsync through
    the tunnel raises ChannelRefusedError, which the engine waits on (staging and
    fetching alike), not an rsync failure; once a session is free the same tunnel works."""
    site = few_sessions.site_definition()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    dest = tmp_path / "dest"

    async def scenario() -> None:
        async with asyncssh.connect("127.0.0.1", port=site["port"], username=site["user"],
                                    client_keys=[site["identity_file"]],
                                    known_hosts=site["known_hosts"]) as conn:
            holders = [await conn.create_process("cat") for _ in range(3)]
            async with rsync_mod.rsync_tunnel(conn) as rsh:
                args = ["-a", str(src) + "/", rsync_mod.rsync_remote(str(dest)) + "/"]
                with pytest.raises(errors.ChannelRefusedError, match="refused a new channel"):
                    await rsync_mod.run_rsync(rsh, args, progress=False)
                assert not dest.exists()
                freed = holders.pop()
                freed.stdin.write_eof()  # its cat ends: sshd frees the session
                await freed.wait()
                code, err = await rsync_mod.run_rsync(rsh, args, progress=False)
                assert code == 0, err
            for process in holders:
                process.stdin.write_eof()

    asyncio.run(scenario())
    assert (dest / "f").read_text() == "x"

# -- 4. local and SFTP failures have their documented codes ----------------------------------

def test_remote_failure_while_staging_is_a_staging_error(cli: Cli, workdir: Path,
                                                         tmp_path: Path, sshd: Sandbox) -> None:
    """A remote root with no free inode left: sftp-server answers a bare "Failure" while
    staging; that is 73 (staging), not 70 (a bug)."""
    with mounted_tmpfs(tmp_path / "inodes", "size=512k,nr_inodes=3,mode=0755") as root:
        config = tmp_path / "inodes.yaml"
        config.write_text(yaml.safe_dump({"sites": {"inodes": site_entry(sshd, root)}}))
        (workdir / "a.txt").write_text("a\n")
        proc = cli("run", "--config", str(config), "--site", "inodes", "--transfer", "sftp",
                   "--no-holder", "--cmd", "cat a.txt > b.txt", "a.txt", cwd=workdir)
    assert proc.returncode == 73, proc.stderr
    assert "staging failed" in proc.stderr and "free" in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


def test_read_only_destination_is_a_fetch_error(cli: Cli, workdir: Path, tmp_path: Path,
                                                remote_root: Path) -> None:
    (workdir / "a.txt").write_text("a\n")
    with mounted_tmpfs(tmp_path / "ro-dest", "size=64k,ro") as dest:
        proc = cli("run", "--site", "loop", "--no-holder", "--into", str(dest),
                   "--cmd", "cat a.txt > b.txt", "a.txt", cwd=workdir)
    assert proc.returncode == 74, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    record = runs(cli, workdir)[0]
    assert record["state"] == "failed" and record["phase"] == "finished", record


@pytest.mark.parametrize("holder", ["1", "0"])
def test_read_only_state_directory_is_a_configuration_error(cli: Cli, workdir: Path,
                                                            tmp_path: Path, remote_root: Path,
                                                            holder: str) -> None:
    (workdir / "a.txt").write_text("a\n")
    with mounted_tmpfs(tmp_path / "ro-state", "size=64k,ro") as state:
        proc = cli("run", "--site", "loop", "--cmd", "cat a.txt > b.txt", "a.txt",
                   cwd=workdir, extra_env={"REMOTE_EXEC_STATE_DIR": str(state),
                                           "REMOTE_EXEC_HOLDER": holder})
        resumed = cli("resume", "0123abcd", cwd=workdir,
                      extra_env={"REMOTE_EXEC_STATE_DIR": str(state)})
    assert proc.returncode == 78, proc.stderr
    assert str(state) in proc.stderr and "REMOTE_EXEC_STATE_DIR" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(remote_root.iterdir()) == [], "something was created remotely"
    assert resumed.returncode == 78 and "Traceback" not in resumed.stderr, resumed.stderr


# -- the model, class by class, against the README ------------------------------------------

def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += [c for c in _subclasses(sub) if c not in found]
    return found


def _readme_exit_rows() -> dict[int, str]:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Exit codes"):]
    table = table[:table.index("\n## ", 1)]
    rows: dict[int, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for code in re.findall(r"\b(\d{2,3})\b", cells[0]) if len(cells) > 1 else []:
            rows[int(code)] = cells[1]
    return rows


#: every class a run can end with, and the phase it typically ends it in
CLASSES: dict[type, str] = {
    errors.ConfigError: "planned", errors.InputError: "planned",
    errors.ConnectError: "planned", errors.ChannelRefusedError: "created",
    errors.AuthError: "planned",
    errors.SftpRefusedError: "planned", AgentRefused: "launched",
    errors.StageError: "created", errors.NoisyShellError: "created", SubmitError: "staged",
    SyncError: "created", errors.FetchError: "finished", localfs.PlacingError: "finished",
    errors.RemoteLostError: "launched", ResultSyncError: "launched",
    errors.LinkLostError: "staged", errors.RunBusyError: "launched",
    SchedulerUnavailable: "launched", ApiError: "launched", RescaleApiError: "launched",
    SiteRefused: "launched", NotClaimed: "launched",
    errors.RemoteExecError: "created",
}


def test_every_error_class_agrees_with_the_readme(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_EXEC_STATE_DIR", str(tmp_path / "state"))
    for entry in backends.BUILT_IN:  # every class is defined, whatever ran before
        entry.load()
    missing = [c for c in _subclasses(errors.RemoteExecError)
               if c not in CLASSES and c is not errors.RunCancelled]
    assert not missing, f"classes the model test does not know: {missing}"
    rows = _readme_exit_rows()
    journal = Journal()
    for number, (cls, phase) in enumerate(CLASSES.items()):
        err = cls("boom")
        run_id = f"00000000-0000-4000-8000-{number:012d}"
        journal.create(run_id=run_id, site="s", host="h", label="l", backend="direct",
                       into_dir=str(tmp_path), request={}, driver_pid=1)
        journal.update(run_id, phase=phase)
        if cls is errors.RunBusyError:  # raised before the record is touched
            assert err.disposition == errors.RESUMABLE and err.exit_code == 75
            continue
        ended = record_error(journal, run_id, err)
        record = journal.get(run_id)
        assert record is not None
        code, state = ended.exit_code, record.state
        where = f"{cls.__name__} in phase {phase}"
        assert code in rows, f"{where}: exit {code} is not in the README's table"
        assert code != errors.EXIT_INTERNAL or cls is errors.RemoteExecError, where
        if err.disposition == errors.FINAL:
            assert state == "failed", where
            assert code != 75, f"{where}: a final error exits 75 ('resumable')"
        else:  # transient (past its retries) or resumable: interrupted, 75, resume
            assert (state, code) == ("interrupted", 75), where
            assert "interrupted" in rows[75] and "resume" in rows[75]
        try:
            _check_resumable(record, journal)
            accepted = True
        except errors.ConfigError:
            accepted = False
        fetch_left = phase == "finished"
        assert accepted == (err.disposition != errors.FINAL or fetch_left), where
        if accepted and code != 75:  # a final error that resume fixes: the README says so
            assert "resume" in rows[code], f"{where}: README row {code} never says resume"
    for refusal in (errors.AuthError, AgentRefused, errors.SftpRefusedError):
        assert refusal("no").exit_code == errors.EXIT_AUTH
        assert refusal("no").disposition == errors.FINAL
    journal.close()
