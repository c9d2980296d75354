"""PBS Professional, Torque and PJM: parsing every documented sample, rendering the job
script templates, and driving the stand-in commands (``tests/fakesched``) through a
job's life, read back with the scheduler modules as the engine reads them."""

from __future__ import annotations

import importlib.resources
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import jinja2
import pytest
from fakesched import install  # tests/fakesched (tests/ is on sys.path, as for conftest)

from remote_exec.backends.pbs import PbsScheduler, TorqueScheduler, parse_qstat_f
from remote_exec.backends.pjm import PjmScheduler, parse_pjstat
from remote_exec.backends.scheduler import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUN_SCRIPT,
    RUNNING,
    SCHEDULER_OUTPUT,
    TIMED_OUT,
    JobInfo,
    Resources,
    Scheduler,
)

DATA = Path(__file__).resolve().parent / "data"
SCHEDULERS = {"pbs": PbsScheduler(), "torque": TorqueScheduler(), "pjm": PjmScheduler()}
JOB_IDS = {"pbs": "1234.pbs01", "torque": "5678.torque01.cluster", "pjm": "12345"}

# file -> (query index, native, state, exit code, reason contains, queue wait, run time,
#          explain contains)
SAMPLES = {
    "pbs": {
        "qstat_xf_queued.txt": (0, "Q", QUEUED, None, "Insufficient amount", None, None, None),
        "qstat_xf_held.txt": (0, "H", QUEUED, None, "", None, None, "qrls 1234.pbs01"),
        "qstat_xf_never_run.txt": (0, "Q", QUEUED, None, "Can Never Run", None, None,
                                   "never run"),
        "qstat_xf_running.txt": (0, "R", RUNNING, None, "Job run at", 55, None, None),
        "qstat_xf_finished_ok.txt": (0, "F", COMPLETED, 0, "and finished", 55, 135, None),
        "qstat_xf_finished_fail.txt": (0, "F", FAILED, 3, "", 55, 135, None),
        "qstat_xf_deleted_queued.txt": (0, "F", CANCELLED, None, "", None, None, None),
        "qstat_xf_deleted_running.txt": (0, "F", CANCELLED, 143, "terminated", 55, 135, None),
        "qstat_xf_walltime.txt": (0, "F", TIMED_OUT, None, "JOB_EXEC_KILL_WALLTIME", 55, 605,
                                  None),
        "qstat_xf_walltime_signal.txt": (0, "F", TIMED_OUT, 143, "", 55, 605, None),
    },
    "torque": {
        "qstat_f_queued.txt": (0, "Q", QUEUED, None, "", None, None, None),
        "qstat_f_held.txt": (0, "H", QUEUED, None, "", None, None, "qrls 5678"),
        "qstat_f_running.txt": (0, "R", RUNNING, None, "", 55, None, None),
        "qstat_f_completed_ok.txt": (0, "C", COMPLETED, 0, "", 55, 135, None),
        "qstat_f_completed_fail.txt": (0, "C", FAILED, 3, "", 55, 135, None),
        "qstat_f_deleted_queued.txt": (0, "C", CANCELLED, None, "", None, None, None),
        "qstat_f_deleted_running.txt": (0, "C", CANCELLED, 143, "", 55, 135, None),
        "qstat_f_walltime.txt": (0, "C", TIMED_OUT, None, "JOB_EXEC_OVERLIMIT_WT", 55, 605,
                                 None),
        "qstat_f_walltime_signal.txt": (0, "C", TIMED_OUT, 137, "", 55, 470, None),
    },
    "pjm": {
        "pjstat_v_queued.txt": (0, "QUE", QUEUED, None, "", None, None, None),
        "pjstat_v_held.txt": (0, "HLD", QUEUED, None, "", None, None, "pjrls 12345"),
        "pjstat_v_rscgrp_stopped.txt": (0, "QUE", QUEUED, None, "RSCGRP STOP", None, None,
                                        "resource group is stopped"),
        "pjstat_v_running.txt": (0, "RUN", RUNNING, None, "", 55, None, None),
        "pjstat_v_error.txt": (0, "ERR", FAILED, None, "NO CURRENT DIR", None, None, None),
        "pjstat_H_ended_ok.txt": (1, "EXT", COMPLETED, 0, "", 55, 135, None),
        "pjstat_H_ended_fail.txt": (1, "EXT", FAILED, 3, "", 55, 135, None),
        "pjstat_H_deleted_queued.txt": (1, "CCL", CANCELLED, None, "pjdel", None, None, None),
        "pjstat_H_deleted_running.txt": (1, "CCL", CANCELLED, 143, "pjdel", 55, 135, None),
        "pjstat_H_elapse_exceeded.txt": (1, "EXT", TIMED_OUT, 137, "ELAPSE LIMIT", 55, 5402,
                                         None),
    },
}
SUBMIT_OUTPUT = {"pbs": ("qsub.out", "1234.pbs01"),
                 "torque": ("qsub.out", "5678.torque01.cluster"),
                 "pjm": ("pjsub.out", "12345")}


# -- the documented samples ----------------------------------------------------------------
@pytest.mark.parametrize("kind,name", [(k, n) for k, files in SAMPLES.items() for n in files])
def test_sample_parses(kind: str, name: str) -> None:
    index, native, state, exit_code, reason, wait, ran, why = SAMPLES[kind][name]
    scheduler = SCHEDULERS[kind]
    info = scheduler.parse_query(index, (DATA / kind / name).read_text(), JOB_IDS[kind])
    assert info is not None
    assert (info.job_id, info.native, info.state, info.exit_code) == \
        (JOB_IDS[kind], native, state, exit_code)
    assert reason in info.reason
    assert info.queue_wait == wait and info.run_time == ran
    if state in (RUNNING, COMPLETED, FAILED) and ran is not None:
        assert info.submitted and info.started and info.ended
    explained = scheduler.explain(info)
    assert (explained is None) if why is None else (why in explained)
    assert info.terminal == (state not in (QUEUED, RUNNING))
    assert JobInfo.from_dict(info.to_dict()) == info


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_every_sample_is_checked_and_documented(kind: str) -> None:
    folder = DATA / kind
    samples = {p.name for p in folder.glob("*.txt")}
    assert samples == set(SAMPLES[kind])
    readme = (folder / "README.md").read_text()
    for path in folder.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, f"{path.name} is not described in README.md"


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_samples_answer_only_for_their_job(kind: str) -> None:
    scheduler = SCHEDULERS[kind]
    for name, (index, *_rest) in SAMPLES[kind].items():
        text = (DATA / kind / name).read_text()
        assert scheduler.parse_query(index, text, "4321") is None
        assert scheduler.parse_query(index, "", JOB_IDS[kind]) is None
    for err in folder_errors(kind):
        assert scheduler.parse_query(0, err, JOB_IDS[kind]) is None


def folder_errors(kind: str) -> list[str]:
    return [p.read_text() for p in (DATA / kind).glob("*.stderr")]


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_parse_submit(kind: str) -> None:
    scheduler = SCHEDULERS[kind]
    name, job_id = SUBMIT_OUTPUT[kind]
    assert scheduler.parse_submit((DATA / kind / name).read_text()) == job_id
    with pytest.raises(ValueError):
        scheduler.parse_submit("")
    with pytest.raises(ValueError):
        scheduler.parse_submit(folder_errors(kind)[0])


def test_parse_submit_variants() -> None:
    assert PbsScheduler().parse_submit("warning: something\n12[].pbs01\n") == "12[].pbs01"
    assert PbsScheduler().parse_submit("77\n") == "77"
    assert PjmScheduler().parse_submit("[INFO] PJM 0000 pjsub Job 9714 submitted.\n") == "9714"
    with pytest.raises(ValueError):
        PjmScheduler().parse_submit("[ERR.] PJM 0057 pjsub node=32 is greater than the "
                                    "upper limit (24).")


def test_commands() -> None:
    pbs, torque, pjm = SCHEDULERS["pbs"], SCHEDULERS["torque"], SCHEDULERS["pjm"]
    assert pbs.submit_argv("j.sh") == ["qsub", "j.sh"] == torque.submit_argv("j.sh")
    assert pbs.queries("7.s") == [["qstat", "-x", "-f", "7.s"], ["qstat", "-f", "7.s"]]
    assert torque.queries("7.s") == [["qstat", "-f", "7.s"]]
    assert pbs.cancel_argv("7.s") == ["qdel", "7.s"] == torque.cancel_argv("7.s")
    assert pjm.submit_argv("j.sh") == ["pjsub", "j.sh"]
    assert pjm.queries("7") == [["pjstat", "-v", "7"], ["pjstat", "-H", "day=3", "-v", "7"]]
    assert pjm.cancel_argv("7") == ["pjdel", "7"]
    assert pbs.probe_argv() == ["qstat", "-Q"] == torque.probe_argv()
    assert pjm.probe_argv() == ["pjstat", "--rsc"]
    assert {s.name for s in SCHEDULERS.values()} == set(SCHEDULERS)
    for scheduler in SCHEDULERS.values():
        assert set(scheduler.STATES.values()) <= {QUEUED, RUNNING, COMPLETED, FAILED,
                                                  CANCELLED, TIMED_OUT}
        assert scheduler.map_state("no-such-state") == FAILED


def test_continuation_lines_join_back() -> None:
    (job_id, attrs), = parse_qstat_f((DATA / "pbs" / "qstat_xf_running.txt").read_text())
    assert job_id == "1234.pbs01"
    assert attrs["Output_Path"].endswith("/scratch/alice/runs/r1/.remote-exec/scheduler.out")
    assert "PBS_O_WORKDIR=/scratch/alice/runs/r1," in attrs["Variable_List"]
    assert attrs["comment"].endswith("+(cn002:ncpus=8:mem=4194304kb)")
    # the documentation's rendering: continuation lines indented with spaces
    doc = "Job Id: 179.host\n    job_state = C\n    Variable_List = A=1,\n  B=2\n" \
          "    exit_status = -1\n"
    assert parse_qstat_f(doc) == [("179.host", {"job_state": "C", "Variable_List": "A=1,B=2",
                                                "exit_status": "-1"})]


def test_pjstat_columns_with_spaces() -> None:
    (row,) = parse_pjstat((DATA / "pjm" / "pjstat_H_elapse_exceeded.txt").read_text())
    assert row["START_DATE"] == "03/05 10:00:55"
    assert row["ACCEPT"] == "03/05 10:00:00"
    assert (row["EC"], row["PC"], row["SN"]) == ("-", "11", "9")
    assert row["REASON"] == "ELAPSE LIMIT EXCEEDED"
    (row,) = parse_pjstat((DATA / "pjm" / "pjstat_v_queued.txt").read_text())
    assert row["START_DATE"] == "(03/05 10:30)" and row["ELAPSE_TIM"] == "0000:00:00"


# -- the job script templates ------------------------------------------------------------------
def render(kind: str, resources: Resources) -> str:
    text = (importlib.resources.files("remote_exec.backends") / "batch_scripts"
            / SCHEDULERS[kind].template).read_text(encoding="utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    return env.from_string(text).render(job_name="re-1a2b3c4d", output=SCHEDULER_OUTPUT,
                                        run_script=RUN_SCRIPT, r=resources)


def directives(script: str, prefix: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(prefix + " ")]


FULL = Resources(nodes=2, tasks=8, cpus_per_task=2, memory_mb=4096, walltime_s=93784,
                 queue="q1", project="p1")
EXPECTED = {
    "pbs": (["#PBS -N re-1a2b3c4d", "#PBS -o .remote-exec/scheduler.out", "#PBS -j oe",
             "#PBS -r n"],
            ["#PBS -l select=2:ncpus=8:mpiprocs=4:mem=4096mb", "#PBS -l place=scatter",
             "#PBS -l walltime=26:03:04", "#PBS -q q1", "#PBS -A p1"],
            'cd "$PBS_O_WORKDIR" || exit 97'),
    "torque": (["#PBS -N re-1a2b3c4d", "#PBS -o .remote-exec/scheduler.out", "#PBS -j oe",
                "#PBS -r n"],
               ["#PBS -l nodes=2:ppn=8", "#PBS -l mem=8192mb", "#PBS -l walltime=26:03:04",
                "#PBS -q q1", "#PBS -A p1"],
               'cd "$PBS_O_WORKDIR" || exit 97'),
    "pjm": (["#PJM -N re-1a2b3c4d", "#PJM -o .remote-exec/scheduler.out", "#PJM -j",
             "#PJM --norestart"],
            ['#PJM -L "node=2"', '#PJM --mpi "proc=8"', '#PJM -L "node-mem=4096Mi"',
             '#PJM -L "elapse=26:03:04"', '#PJM -L "rscgrp=q1"', "#PJM -g p1"],
            'cd "${PJM_O_WORKDIR:-.}" || exit 97'),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_templates(kind: str) -> None:
    fixed, resources, cd = EXPECTED[kind]
    prefix = fixed[0].split()[0]
    for given, wanted in ((Resources(), fixed), (FULL, fixed + resources)):
        script = render(kind, given)
        assert script.startswith("#!/bin/sh\n")
        assert directives(script, prefix) == wanted
        lines = script.splitlines()
        assert lines[-1] == f"exec /bin/sh {RUN_SCRIPT}"
        assert cd in lines and lines.index(cd) > max(lines.index(d) for d in wanted)
        assert not any(word.strip('"').startswith("/") for d in wanted for word in d.split())


def test_template_partial_resources() -> None:
    assert directives(render("pbs", Resources(memory_mb=512)), "#PBS")[-1] == \
        "#PBS -l select=1:mem=512mb"
    assert directives(render("pbs", Resources(cpus_per_task=4)), "#PBS")[-1] == \
        "#PBS -l select=1:ncpus=4"
    assert directives(render("torque", Resources(tasks=3)), "#PBS")[-1] == \
        "#PBS -l nodes=1:ppn=3"
    assert "OMP_NUM_THREADS=4" in render("pjm", Resources(cpus_per_task=4))
    assert directives(render("pjm", Resources(walltime_s=59)), "#PJM")[-1] == \
        '#PJM -L "elapse=0:00:59"'


# -- the stand-in commands ---------------------------------------------------------------------
FLAVORS = {"pbs": {}, "torque": {"FAKESCHED_FLAVOR": "torque"}, "pjm": {}}


class Site:
    """A run directory, the stand-in commands on PATH and their state directory."""

    def __init__(self, tmp_path: Path, kind: str) -> None:
        self.kind, self.scheduler = kind, SCHEDULERS[kind]
        self.state = tmp_path / "state"
        install(tmp_path / "bin")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FAKESCHED_")}
        self.env.update(FAKESCHED_DIR=str(self.state), FAKESCHED_START_DELAY="0.5",
                        PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                        **FLAVORS[kind])
        self.rundir = tmp_path / "run"
        (self.rundir / ".remote-exec").mkdir(parents=True)

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.rundir, env=self.env, capture_output=True,
                              text=True, timeout=20)

    def submit(self, body: str, resources: Resources | None = None) -> str:
        """Write run.sh (``body``) and the rendered job script; submit it; the job id."""
        (self.rundir / RUN_SCRIPT).write_text(
            '#!/bin/sh\ncd "$(dirname "$0")/.." || exit 97\n' + body)
        (self.rundir / ".remote-exec" / "job.sh").write_text(
            render(self.kind, resources or Resources()))
        done = self.run(self.scheduler.submit_argv(".remote-exec/job.sh"))
        assert done.returncode == 0, done.stderr
        return self.scheduler.parse_submit(done.stdout)

    def query(self, job_id: str) -> JobInfo | None:
        """As the engine asks: each query in turn until one knows the job."""
        for index, argv in enumerate(self.scheduler.queries(job_id)):
            done = self.run(argv)
            if done.returncode == 0:
                info = self.scheduler.parse_query(index, done.stdout, job_id)
                if info is not None:
                    return info
        return None

    def wait(self, job_id: str, until: tuple[str, ...], timeout: float = 10) -> JobInfo:
        deadline = time.monotonic() + timeout
        while True:
            info = self.query(job_id)
            if info is not None and info.state in until:
                return info
            assert time.monotonic() < deadline, f"job {job_id} stuck at {info}"
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Kill what a failed test may have left running (only our own jobs)."""
        for path in (self.state / "jobs").glob("*.json"):
            text = path.read_text()
            match = re.search(r'"pid": (\d+)', text)
            if '"state": "running"' in text and match:
                try:
                    os.killpg(int(match.group(1)), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture(params=list(FLAVORS))
def site(request: pytest.FixtureRequest, tmp_path: Path):
    place = Site(tmp_path, request.param)
    yield place
    place.cleanup()


def test_a_job_life(site: Site) -> None:
    site.env["FAKESCHED_START_DELAY"] = "1.0"  # room to see it queued on a busy machine
    job_id = site.submit('echo "job in $(pwd)"\nsleep 1\necho 3 > .remote-exec/exit_code\n'
                         'exit 3\n', Resources(walltime_s=60, queue="debug"))
    first = site.query(job_id)
    assert first is not None and first.state == QUEUED and first.submitted
    running = site.wait(job_id, (RUNNING,))
    assert running.started is not None and running.time_limit
    ended = site.wait(job_id, (COMPLETED, FAILED, CANCELLED, TIMED_OUT))
    assert (ended.state, ended.exit_code) == (FAILED, 3)
    assert ended.queue_wait is not None and ended.run_time is not None
    assert ended.native in ("F", "C", "EXT")
    output = (site.rundir / SCHEDULER_OUTPUT).read_text()
    assert output == f"job in {site.rundir}\n"  # the job script went to the run directory
    assert (site.rundir / ".remote-exec" / "exit_code").read_text() == "3\n"
    if site.kind == "pbs":  # without -x a finished job is refused, as PBS does
        done = site.run(["qstat", "-f", job_id])
        assert done.returncode == 35 and "Job has finished, use -x" in done.stderr


def test_a_good_job_completes(site: Site) -> None:
    job_id = site.submit("exit 0\n")
    ended = site.wait(job_id, (COMPLETED, FAILED))
    assert (ended.state, ended.exit_code) == (COMPLETED, 0)


def test_held_job_deleted(site: Site) -> None:
    job_id = site.submit("echo never\n", Resources(queue="held"))
    time.sleep(0.7)  # past the start delay: still held
    held = site.query(job_id)
    assert held is not None and held.state == QUEUED and held.native in ("H", "HLD")
    assert site.scheduler.explain(held)
    done = site.run(site.scheduler.cancel_argv(job_id))
    assert done.returncode == 0, done.stderr
    gone = site.wait(job_id, (CANCELLED,), timeout=3)
    assert gone.exit_code is None and gone.started is None
    assert not (site.rundir / SCHEDULER_OUTPUT).exists()


def test_running_job_deleted(site: Site) -> None:
    job_id = site.submit("sleep 30\n")
    site.wait(job_id, (RUNNING,))
    done = site.run(site.scheduler.cancel_argv(job_id))
    assert done.returncode == 0, done.stderr
    gone = site.wait(job_id, (CANCELLED, FAILED, COMPLETED, TIMED_OUT), timeout=5)
    assert (gone.state, gone.exit_code) == (CANCELLED, 143)


def test_walltime_kill(site: Site) -> None:
    job_id = site.submit("echo started\nsleep 30\necho never\n", Resources(walltime_s=1))
    ended = site.wait(job_id, (COMPLETED, FAILED, CANCELLED, TIMED_OUT), timeout=8)
    assert ended.state == TIMED_OUT
    assert ended.run_time is not None and ended.run_time < 5
    assert (site.rundir / SCHEDULER_OUTPUT).read_text() == "started\n"


def test_unknown_job(site: Site) -> None:
    argv = site.scheduler.queries("99999")[-1]
    done = site.run(argv)
    assert done.returncode != 0 and done.stdout == ""
    sample = folder_errors(site.kind)
    shape = {"pbs": r"qstat: Unknown Job Id 99999\.\S+\n",
             "torque": r"qstat: Unknown Job Id Error 99999\.\S+\n",
             "pjm": r"\[ERR\.\] PJM \d{4} pjstat Job 99999 does not exist\.\n"}[site.kind]
    assert re.fullmatch(shape, done.stderr)
    assert any(re.fullmatch(shape.replace("99999", r"\d+"), text) for text in sample)
    assert site.query("99999") is None
    cancel = site.run(site.scheduler.cancel_argv("99999"))
    assert cancel.returncode != 0 and "99999" in cancel.stderr


def test_probe(site: Site) -> None:
    argv = site.scheduler.probe_argv()
    assert argv is not None
    done = site.run(argv)
    assert done.returncode == 0, done.stderr
    assert {"pbs": "workq", "torque": "batch", "pjm": "small"}[site.kind] in done.stdout


def test_state_directory_is_required(tmp_path: Path) -> None:
    install(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if k != "FAKESCHED_DIR"}
    done = subprocess.run([str(tmp_path / "bin" / "qstat"), "-f", "1"], env=env,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "FAKESCHED_DIR" in done.stderr


def test_scheduler_type() -> None:
    assert all(isinstance(s, Scheduler) for s in SCHEDULERS.values())
