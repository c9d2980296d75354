"""The scheduler-neutral pieces of batch backends, without a scheduler: resources,
the job script, the submit guard, Slurm's parsers on real captured output."""

from __future__ import annotations

import shlex
import subprocess
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from remote_exec.backends import make_backend
from remote_exec.backends.batch import SUBMITTER, render_job_script, scheduler_named
from remote_exec.backends.scheduler import (
    CANCELLED,
    COMPLETED,
    QUEUED,
    RUNNING,
    TIMED_OUT,
    JobInfo,
    Resources,
    parse_memory_mb,
    parse_walltime,
    slurm_time,
)
from remote_exec.backends.slurm import SlurmScheduler
from remote_exec.errors import ConfigError

DATA = Path(__file__).parent / "data" / "slurm"


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90 * 60), ("1:30", 90), ("2:00:00", 7200), ("36:00:00", 36 * 3600),
    ("1-12", 36 * 3600), ("1-0:30", 86400 + 1800), ("1-00:00:05", 86405),
    ("30s", 30), ("15m", 900), ("2h", 7200), ("1d", 86400), (45, 45 * 60),
])
def test_walltime_forms(text: object, seconds: int) -> None:
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "0", "1h30", "1:xx"])
def test_walltime_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_walltime(text)


@pytest.mark.parametrize(("text", "mb"), [
    ("4096", 4096), ("512M", 512), ("4G", 4096), ("4GB", 4096), ("4gib", 4096),
    ("1T", 1024 * 1024), ("2048k", 2),
])
def test_memory_forms(text: str, mb: int) -> None:
    assert parse_memory_mb(text) == mb


@pytest.mark.parametrize("text", ["", "4X", "-1G", "0", "1.5G", "4 G B"])
def test_memory_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_memory_mb(text)


def test_resources_parse_merge_and_refusals() -> None:
    site = Resources.parse({"nodes": 2, "walltime": "1:00:00", "queue": "short"}, "site")
    run = Resources.parse({"walltime": "30m", "cpus-per-task": "4", "project": "p.1"}, "-R")
    merged = site.merged(run)
    assert merged == Resources(nodes=2, cpus_per_task=4, walltime_s=1800, queue="short",
                               project="p.1")
    assert merged.walltime_hms == "0:30:00"
    for bad in ({"nodes": "0"}, {"nodes": "two"}, {"gpus": "1"},
                {"queue": "a b"}, {"queue": "$(reboot)"}, {"project": "x;y"}):
        with pytest.raises(ConfigError):
            Resources.parse(bad, "-R")


def test_slurm_time() -> None:
    assert slurm_time(59) == "00:00:59"
    assert slurm_time(3600 * 25 + 61) == "1-01:01:01"


def test_job_script_directives() -> None:
    res = Resources(nodes=2, tasks=8, cpus_per_task=2, memory_mb=4096, walltime_s=5400,
                    queue="debug", project="proj")
    text = render_job_script(SlurmScheduler(), "1a2b3c4d-0000-4000-8000-000000000000", res)
    assert text.startswith("#!/bin/sh\n")
    for line in ("#SBATCH --job-name=re-1a2b3c4d", "#SBATCH --output=.remote-exec/scheduler.out",
                 "#SBATCH --no-requeue", "#SBATCH --nodes=2", "#SBATCH --ntasks=8",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --mem=4096M",
                 "#SBATCH --time=01:30:00", "#SBATCH --partition=debug",
                 "#SBATCH --account=proj", "exec /bin/sh .remote-exec/run.sh"):
        assert line in text.splitlines()
    bare = render_job_script(SlurmScheduler(), "1a2b3c4d", Resources())
    assert "--nodes" not in bare and "--time" not in bare and "--partition" not in bare


def test_every_scheduler_renders_and_backends_build() -> None:
    from remote_exec.backends.batch import SCHEDULERS

    for name in SCHEDULERS:
        text = render_job_script(scheduler_named(name), "abcdef12", Resources(
            nodes=1, walltime_s=60, queue="q", project="p", memory_mb=100, tasks=1,
            cpus_per_task=1))
        assert text.startswith("#!/bin/sh") and ".remote-exec/run.sh" in text
        backend = make_backend(name, SimpleNamespace(name="s"), "r", {"nodes": 1})
        assert backend.job.nodes == 1 and backend.name == name
    with pytest.raises(ConfigError, match="(?s)unknown backend 'lsf'.*known backends: direct"):
        make_backend("lsf", SimpleNamespace(name="s"))


# -- the submit guard (batch.sh), run by a local sh ------------------------------------------

def _batch_dir(tmp_path: Path) -> Path:
    rundir = tmp_path / "run"
    (rundir / ".remote-exec").mkdir(parents=True)
    (rundir / ".remote-exec" / "batch.sh").write_text(SUBMITTER)
    return rundir


def _sh(rundir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", str(rundir / ".remote-exec" / "batch.sh"), *args],
                          capture_output=True, text=True, cwd="/", check=False)


def test_submit_once_then_report_the_first(tmp_path: Path) -> None:
    rundir = _batch_dir(tmp_path)
    first = _sh(rundir, "submit", "sh", "-c", "pwd; echo 'it is 42'")
    assert first.returncode == 0
    assert first.stdout.splitlines() == [str(rundir), "it is 42"]  # ran in the run dir
    again = _sh(rundir, "submit", "sh", "-c", "echo 43")
    assert again.returncode == 96 and "already submitted" in again.stderr
    assert (rundir / ".remote-exec" / "submit.out").read_text().endswith("it is 42\n")
    assert (rundir / ".remote-exec" / "submit.rc").read_text() == "0\n"
    assert _sh(rundir, "cancel").stdout.strip() == "submitted"


def test_submit_failure_is_kept(tmp_path: Path) -> None:
    rundir = _batch_dir(tmp_path)
    res = _sh(rundir, "submit", "sh", "-c", "echo 'sbatch: error: Invalid partition' >&2; "
              "exit 1")
    assert res.returncode == 1 and "Invalid partition" in res.stderr
    assert (rundir / ".remote-exec" / "submit.rc").read_text() == "1\n"
    assert "Invalid partition" in (rundir / ".remote-exec" / "submit.err").read_text()


def test_cancel_before_submit_prevents_it(tmp_path: Path) -> None:
    rundir = _batch_dir(tmp_path)
    assert _sh(rundir, "cancel").stdout.strip() == "not submitted"
    assert (rundir / ".remote-exec" / "exit_code").read_text() == "143\n"
    late = _sh(rundir, "submit", "sh", "-c", "touch submitted")
    assert late.returncode == 96 and not (rundir / "submitted").exists()


def test_job_arguments_are_not_shell_text(tmp_path: Path) -> None:
    rundir = _batch_dir(tmp_path)
    res = _sh(rundir, "submit", "printf", "%s\\n", "$(touch pwned)", "a b")
    assert res.stdout.splitlines() == ["$(touch pwned)", "a b"]
    assert not (rundir / "pwned").exists()


# -- Slurm's formats ----------------------------------------------------------------------

def _sample(name: str) -> str:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"sample {name} not captured")
    return path.read_text()


def test_slurm_submit_ids() -> None:
    s = SlurmScheduler()
    assert s.parse_submit("12\n") == "12"
    assert s.parse_submit("12;cluster\n") == "12"
    with pytest.raises(ValueError):
        s.parse_submit("sbatch: error: something\n")


def test_slurm_squeue_lines() -> None:
    s = SlurmScheduler()
    line = "7|PENDING|ReqNodeNotAvail, UnavailableNodes:n1|2026-11-22T10:00:00|N/A|N/A|" \
           "0:00|1:00|\n"
    info = s.parse_query(0, line, "7")
    assert info is not None and info.state == QUEUED and info.native == "PENDING"
    assert "drained" in (s.explain(info) or "")
    running = s.parse_query(0, "7|RUNNING|None|2026-11-22T10:00:00|2026-11-22T10:00:03|"
                            "2026-11-22T11:00:03|0:05|1:00:00|n1\n", "7")
    assert running is not None and running.state == RUNNING and running.nodes == "n1"
    assert running.queue_wait == 3 and s.explain(running) is None
    assert s.parse_query(0, "7|COMPLETED|None|x|x|x|0:01|1:00|n1\n", "7") is None
    assert s.parse_query(0, "", "7") is None
    assert s.parse_query(0, "8|RUNNING|None|a|b|c|d|e|n1\n", "7") is None


def test_slurm_sacct_lines() -> None:
    s = SlurmScheduler()
    info = s.parse_query(1, "9|CANCELLED by 0|0:15|None|2026-11-22T10:00:00|"
                         "2026-11-22T10:00:01|2026-11-22T10:00:11|00:00:10|01:00:00|n1\n", "9")
    assert info is not None and info.state == CANCELLED and info.native == "CANCELLED"
    assert info.exit_code == 143 and info.run_time == 10
    timeout = s.parse_query(1, "9|TIMEOUT|0:0|TimeLimit|2026-11-22T10:00:00|"
                            "2026-11-22T10:00:00|2026-11-22T10:01:00|00:01:00|00:01:00|n1", "9")
    assert timeout is not None and timeout.state == TIMED_OUT


def test_slurm_scontrol_line() -> None:
    s = SlurmScheduler()
    line = ("JobId=5 JobName=re-1 UserId=root(0) JobState=FAILED Reason=NonZeroExitCode "
            "Dependency=(null) ExitCode=3:0 RunTime=00:00:02 TimeLimit=UNLIMITED "
            "SubmitTime=2026-11-22T10:00:00 StartTime=2026-11-22T10:00:01 "
            "EndTime=2026-11-22T10:00:03 NodeList=node one WorkDir=/tmp/a b\n")
    info = s.parse_query(2, line, "5")
    assert info is not None and info.state == "failed" and info.exit_code == 3
    assert info.reason == "NonZeroExitCode" and info.nodes == "node one"
    assert info.queue_wait == 1 and info.run_time == 2
    assert s.parse_query(2, line, "6") is None


def test_jobinfo_roundtrip() -> None:
    info = JobInfo(job_id="1", native="COMPLETED", state=COMPLETED, exit_code=0,
                   submitted=datetime(2026, 1, 1, 0, 0, 0), started=datetime(2026, 1, 1, 0, 0, 5),
                   ended=datetime(2026, 1, 1, 0, 1, 5))
    data = info.to_dict()
    assert data["queue_wait"] == 5 and data["run_time"] == 60
    assert JobInfo.from_dict(data) == info
    with pytest.raises(ValueError):
        JobInfo(job_id="1", native="X", state="weird")


REAL = {  # captured file -> (query index, common state or None, exit code, needs action)
    "squeue_pending_drained": (0, QUEUED, None, True),
    "squeue_running": (0, RUNNING, None, False),
    "squeue_finished": (0, None, None, False),  # ended: prints nothing, exit 0
    "squeue_unknown": (0, None, None, False),
    "sacct_disabled": (1, None, None, False),
    "scontrol_completed": (2, COMPLETED, 0, False),
    "scontrol_failed_exit3": (2, "failed", 3, False),
    "scontrol_failed_sigkill": (2, "failed", 137, False),
    "scontrol_cancelled_pending": (2, CANCELLED, 0, False),
    "scontrol_cancelled_running": (2, CANCELLED, 143, False),
    "scontrol_cancelled_trap_exit7": (2, CANCELLED, 7, False),
    "scontrol_timeout": (2, TIMED_OUT, 143, False),
    "scontrol_timeout_trap_exit7": (2, TIMED_OUT, 7, False),
    "scontrol_pending_drained": (2, QUEUED, None, True),
    "scontrol_running": (2, RUNNING, None, False),
    "scontrol_unknown": (2, None, None, False),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_slurm_real_samples(name: str) -> None:
    """Outputs captured from a real Slurm 22.05 (tests/data/slurm, see its README)."""
    from slurm_cluster import read_capture

    if not (DATA / f"{name}.txt").exists():
        pytest.skip(f"sample {name} not captured")
    capture = read_capture(name)
    index, state, code, stuck = REAL[name]
    words = capture.command.split()
    job_id = words[words.index("-j") + 1] if "-j" in words else words[-1]
    s = SlurmScheduler()
    info = s.parse_query(index, capture.stdout, job_id) if capture.returncode == 0 else None
    if state is None:
        assert info is None
        return
    assert info is not None and info.state == state, info
    assert info.exit_code == code
    assert bool(s.explain(info)) == stuck


def test_readme_configuration_example_loads(tmp_path: Path) -> None:
    """The README's configuration example is valid, batch and fujitsu sites included."""
    from remote_exec.backends.fujitsu.settings import FujitsuSettings
    from remote_exec.config import load_config

    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text[text.index("```yaml") + len("```yaml"):]
    path = tmp_path / "sites.yaml"
    path.write_text(block[:block.index("```")])
    config = load_config(path)
    for name in config.sites:
        site = config.site(name)
        if site.backend == "fujitsu":
            settings = FujitsuSettings.from_site(site.settings.get("fujitsu"), name)
            assert settings.paths["job"] == "/jobs/{job_id}"
        else:
            Resources.parse(site.resources, name)


class _Answer:
    def __init__(self, status: int, stdout: str = "", stderr: str = "") -> None:
        self.exit_status, self.stdout, self.stderr = status, stdout, stderr


class _Conn:
    """Answers each command by its program name, like a login node would."""

    def __init__(self, answers: dict[str, _Answer]) -> None:
        self.answers, self.asked = answers, []

    async def run(self, command: str, check: bool = False, input: str | None = None
                  ) -> _Answer:
        words = shlex.split(command)  # exec /bin/sh -c SCRIPT sh PROGRAM ARG...
        assert words[:3] == ["exec", "/bin/sh", "-c"] and words[4] == "sh", command
        self.asked.append(shlex.join(words[5:]))
        return self.answers[words[5]]

    def is_closed(self) -> bool:
        return False


def test_query_tells_unknown_from_unavailable() -> None:
    import asyncio

    from remote_exec.backends.batch import BatchBackend, SchedulerUnavailable

    backend = BatchBackend(SimpleNamespace(name="s"), "run", scheduler="slurm")
    down = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
    unavailable = _Conn({"squeue": _Answer(1, stderr=down),
                         "sacct": _Answer(1, stderr="sacct: error: Problem talking to the "
                                          "database: Connection refused"),
                         "scontrol": _Answer(1, stderr=down)})
    with pytest.raises(SchedulerUnavailable, match="did not answer"):
        asyncio.run(backend.query(unavailable, "7"))
    gone = _Conn({"squeue": _Answer(1, stderr="slurm_load_jobs error: Invalid job id "
                                    "specified"),
                  "sacct": _Answer(1, stderr="Slurm accounting storage is disabled"),
                  "scontrol": _Answer(1, stderr="slurm_load_jobs error: Invalid job id "
                                      "specified")})
    assert asyncio.run(backend.query(gone, "7")) is None
    running = _Conn({"squeue": _Answer(0, "7|RUNNING|None|2026-01-01T00:00:00|"
                                       "2026-01-01T00:00:02|N/A|1:05|10:00|n1\n")})
    info = asyncio.run(backend.query(running, "7"))
    assert info is not None and info.state == RUNNING and info.run_time == 65
    assert len(running.asked) == 1 and "'%i|%T|%r|%V|%S|%e|%M|%l|%N'" in running.asked[0]


@pytest.mark.parametrize(("state", "native", "code", "expected"), [
    ("failed", "NODE_FAIL", 0, 1),          # Slurm says 0:0: still a failure
    ("failed", "FAILED", 3, 3),
    ("cancelled", "CANCELLED", 0, 143),
    ("cancelled", "CANCELLED", 7, 7),
    ("timed_out", "TIMEOUT", None, 137),
    ("completed", "COMPLETED", 0, 0),
    ("failed", "BOOT_FAIL", None, 1),
])
def test_an_ended_job_without_exit_file(state: str, native: str, code: int | None,
                                        expected: int) -> None:
    """The wrapper left no exit code: the scheduler's, but never 0 for a failed job."""
    import asyncio

    from remote_exec.backends.batch import BatchBackend

    async def nothing(*_: object) -> None:
        return None

    backend = BatchBackend(SimpleNamespace(name="s"), "run", scheduler="slurm")
    backend.poll = nothing  # type: ignore[method-assign]  # the wrapper wrote nothing
    backend.wrapper_started = nothing  # type: ignore[method-assign]  # (it never started)
    info = JobInfo(job_id="7", native=native, state=state, exit_code=code)  # never started
    run = SimpleNamespace(rundir="/r", job_id="7")
    assert asyncio.run(backend.exit_of_ended_job(run, info)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("late", [4, None])
def test_a_started_wrappers_own_code_beats_the_schedulers_word(
        late: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a controller crash Slurm may call a job that runs on CANCELLED: a wrapper
    that started is given time to record its code, which wins; none in time: Slurm's."""
    import asyncio

    from remote_exec.backends import batch
    from remote_exec.backends.batch import BatchBackend

    monkeypatch.setattr(batch, "WRAPPER_WORD_WAIT", 2.5)
    polls: list[int] = []

    async def poll(*_: object) -> int | None:
        polls.append(1)
        return late if len(polls) >= 3 else None

    async def started(*_: object) -> bool:
        return True

    backend = BatchBackend(SimpleNamespace(name="s"), "run", scheduler="slurm")
    backend.poll = poll  # type: ignore[method-assign]
    backend.wrapper_started = started  # type: ignore[method-assign]
    warned: list[str] = []
    run = SimpleNamespace(rundir="/r", job_id="7", ui=SimpleNamespace(warn=warned.append),
                          exit_code=None, job_info=None)
    info = JobInfo(job_id="7", native="CANCELLED", state="cancelled", exit_code=0)
    code = asyncio.run(backend.exit_of_ended_job(run, info))  # type: ignore[arg-type]
    assert code == (143 if late is None else late)
    assert "recorded no exit code" in warned[0]
    run.job_info, run.exit_code = info, code
    assert batch.cancelled_by_scheduler(run) is (late is None)  # type: ignore[arg-type]
