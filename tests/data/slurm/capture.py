#!/usr/bin/env python3
"""Re-capture the real Slurm outputs in this directory (needs root + slurm-wlm + munge).

    sudo python3 tests/data/slurm/capture.py [--out DIR] [--skip-slow]

Starts a throwaway cluster (tests/slurm_cluster.py) in a temporary directory, submits tiny
``#!/bin/sh`` jobs from ``<tmp>/work`` and writes one ``<case>.txt`` per command (format: see
``Capture`` in tests/slurm_cluster.py) plus ``findings.txt`` (timings and observations).
``--skip-slow`` leaves out the real ``--time=1`` walltime case (60-90 s).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # tests/

from slurm_cluster import Capture, SlurmCluster  # noqa: E402

SQUEUE_FMT = "%i|%T|%r|%V|%S|%e|%M|%l|%N"
SACCT_FIELDS = "JobIDRaw,State,ExitCode,Reason,Submit,Start,End,Elapsed,Timelimit,NodeList"
SINFO_FMT = "%N|%T|%E"
UNKNOWN = "999999"

SCRIPTS = {
    "ok.sh": "#!/bin/sh\necho ok\n",
    "fail3.sh": "#!/bin/sh\necho failing >&2\nexit 3\n",
    "sleep.sh": "#!/bin/sh\nsleep 300\n",
    "selfkill.sh": "#!/bin/sh\nkill -KILL $$\n",
    "env.sh": (
        "#!/bin/sh\n#SBATCH --output=.remote-exec/scheduler.out\n"
        'echo "pwd=$(pwd)"\necho "0=$0"\nenv | grep ^SLURM_ | sort\n'
    ),
    # The batch shell does not trap TERM; its child does and ignores it (logs when it got it).
    "trap_child.sh": (
        "#!/bin/sh\n"
        "sh -c 'echo $$ > child.pid; "
        "trap \"echo TERM \\$(date +%s.%N) >> child.log\" TERM; "
        "echo started $(date +%s.%N) >> child.log; "
        "while :; do sleep 0.2; done' &\n"
        "wait\n"
        "echo parent-after-wait $? $(date +%s.%N) >> child.log\n"
    ),
    # The batch shell (and so its children) ignore TERM: only SIGKILL ends it.
    "ignore_term.sh": "#!/bin/sh\ntrap '' TERM\nsleep 300\n",
    # The batch shell itself traps TERM and exits 7.
    "trap_exit7.sh": (
        "#!/bin/sh\n"
        "trap 'echo got TERM; exit 7' TERM\n"
        "sleep 300 &\nwait\n"
    ),
}

findings: list[str] = []


def note(text: str) -> None:
    print(text, flush=True)
    findings.append(text)


class Capturer:
    def __init__(self, cluster: SlurmCluster, work: Path, out: Path) -> None:
        self.cluster = cluster
        self.work = work
        self.out = out

    def run(self, argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.cluster.env, cwd=cwd or self.work,
                              capture_output=True, text=True, timeout=60)

    def capture(self, name: str, argv: list[str], cwd: Path | None = None) -> Capture:
        proc = self.run(argv, cwd)
        cap = Capture(shlex.join(argv), proc.returncode, proc.stdout, proc.stderr)
        (self.out / f"{name}.txt").write_text(cap.dumps())
        print(f"[{name}] exit={proc.returncode} stdout={proc.stdout!r} stderr={proc.stderr!r}",
              flush=True)
        return cap

    def sbatch(self, *args: str, cwd: Path | None = None) -> str:
        proc = self.run(["sbatch", "--parsable", *args], cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {args}: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, jobid: str) -> dict[str, str]:
        proc = self.run(["scontrol", "show", "job", "-o", jobid])
        fields = {}
        for word in proc.stdout.split():
            key, sep, value = word.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait(self, jobid: str, states: tuple[str, ...], timeout: float = 30,
             reason_not_none: bool = False) -> float:
        t0 = time.monotonic()
        while True:
            info = self.job(jobid)
            state = info.get("JobState", "")
            if state in states and (not reason_not_none or info.get("Reason") != "None"):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"job {jobid} still {state} ({info.get('Reason')}) "
                                   f"after {timeout} s, wanted {states}")
            time.sleep(0.1)

    def scontrol(self, name: str, jobid: str) -> Capture:
        return self.capture(name, ["scontrol", "show", "job", "-o", jobid])

    def squeue(self, name: str, jobid: str, *extra: str) -> Capture:
        return self.capture(name, ["squeue", "-h", *extra, "-j", jobid, "-o", SQUEUE_FMT])

    def sinfo(self, name: str) -> Capture:
        return self.capture(name, ["sinfo", "-h", "-N", "-o", SINFO_FMT])


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "DEADLINE", "PREEMPTED", "BOOT_FAIL")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--skip-slow", action="store_true")
    opts = parser.parse_args()
    reason = SlurmCluster.available()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    out: Path = opts.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slurm-capture-") as tmp:
        base = Path(tmp)
        cluster = SlurmCluster(base / "cluster")
        t0 = time.monotonic()
        cluster.up()
        note(f"cluster up (munge ok, node idle) in {time.monotonic() - t0:.1f} s")
        version = subprocess.run(["sinfo", "--version"], capture_output=True, text=True,
                                 env=cluster.env).stdout.strip()
        note(f"version: {version}; node={cluster.node} cpus={cluster.cpus}")
        (out / "slurm.conf.example").write_text(
            cluster.conf.read_text().replace(str(base), "/TMP"))
        work = base / "work"
        work.mkdir()
        scripts = base / "scripts"
        scripts.mkdir()
        for name, text in SCRIPTS.items():
            (scripts / name).write_text(text)
            (scripts / name).chmod(0o755)
        c = Capturer(cluster, work, out)
        try:
            scenario(c, scripts, work, opts.skip_slow)
        finally:
            cluster.down()
    (out / "findings.txt").write_text("\n".join(findings) + "\n")
    return 0


def scenario(c: Capturer, scripts: Path, work: Path, skip_slow: bool) -> None:
    s = {name: str(scripts / name) for name in SCRIPTS}
    c.sinfo("sinfo_idle")

    # (1) sbatch --parsable, and a rejected submission
    cap = c.capture("sbatch_parsable", ["sbatch", "--parsable", s["ok.sh"]])
    ok = cap.stdout.strip()
    c.capture("sbatch_rejected_partition",
              ["sbatch", "--parsable", "--partition=nosuchpartition", s["ok.sh"]])
    note(f"ok job {ok}: finished in {c.wait(ok, FINAL):.1f} s after sbatch returned")
    c.scontrol("scontrol_completed", ok)
    c.squeue("squeue_finished", ok)
    c.squeue("squeue_finished_all_states", ok, "-t", "all")
    c.capture("sacct_disabled", ["sacct", "-n", "-P", "-X", "-j", ok, "-o", SACCT_FIELDS])

    # exit 3, and a job killed by a signal of its own
    fail = c.sbatch(s["fail3.sh"])
    c.wait(fail, FINAL)
    c.scontrol("scontrol_failed_exit3", fail)
    killed = c.sbatch(s["selfkill.sh"])
    c.wait(killed, FINAL)
    c.scontrol("scontrol_failed_sigkill", killed)

    # environment: submitted from work/run with the script elsewhere; --output relative path
    run = work / "run"
    (run / ".remote-exec").mkdir(parents=True)
    env_job = c.sbatch(s["env.sh"], cwd=run)
    c.wait(env_job, FINAL)
    c.scontrol("scontrol_env_job", env_job)
    c.capture("job_env_output", ["cat", ".remote-exec/scheduler.out"], cwd=run)
    nodir = work / "nodir"
    nodir.mkdir()
    nodir_job = c.sbatch(s["env.sh"], cwd=nodir)
    c.wait(nodir_job, FINAL)
    c.scontrol("scontrol_output_dir_missing", nodir_job)
    note(f"--output=.remote-exec/scheduler.out when {nodir}/.remote-exec is missing: "
         f"{c.job(nodir_job).get('JobState')} Reason={c.job(nodir_job).get('Reason')} "
         f"ExitCode={c.job(nodir_job).get('ExitCode')}; directory created by Slurm: "
         f"{(nodir / '.remote-exec').exists()}")

    # running, then cancelled while running
    running = c.sbatch(s["sleep.sh"])
    note(f"sleep job {running}: RUNNING {c.wait(running, ('RUNNING',)):.1f} s after sbatch")
    c.squeue("squeue_running", running)
    c.scontrol("scontrol_running", running)
    t = time.monotonic()
    c.capture("scancel_running", ["scancel", running])
    c.wait(running, FINAL)
    note(f"scancel of a running plain job: final state after {time.monotonic() - t:.1f} s")
    c.scontrol("scontrol_cancelled_running", running)
    c.squeue("squeue_cancelled", running)

    # scancel of a job whose child traps (ignores) TERM
    trapdir = work / "trap"
    trapdir.mkdir()
    trap = c.sbatch(s["trap_child.sh"], cwd=trapdir)
    c.wait(trap, ("RUNNING",))
    deadline = time.monotonic() + 10
    while not (trapdir / "child.log").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int((trapdir / "child.pid").read_text())
    t_cancel = time.time()
    c.capture("scancel_trap_child", ["scancel", trap])
    while os.path.exists(f"/proc/{child}") and time.time() - t_cancel < 30:
        time.sleep(0.05)
    t_dead = time.time()
    c.wait(trap, FINAL)
    t_final = time.time()
    c.scontrol("scontrol_cancelled_trap_child", trap)
    log = (trapdir / "child.log").read_text()
    c.capture("job_trap_child_log", ["cat", "child.log"], cwd=trapdir)
    term = [float(line.split()[1]) for line in log.splitlines() if line.startswith("TERM")]
    got = f"{term[0] - t_cancel:.2f} s after scancel" if term else "never (killed first)"
    note(f"scancel, child trapping TERM: child's TERM trap ran: {got}; "
         f"child gone {t_dead - t_cancel:.2f} s after scancel; "
         f"final state seen {t_final - t_cancel:.2f} s after scancel; "
         f"parent-after-wait logged: {'parent-after-wait' in log}")

    trap7 = c.sbatch(s["trap_exit7.sh"], cwd=trapdir)
    c.wait(trap7, ("RUNNING",))
    time.sleep(0.5)
    c.capture("scancel_trap_exit7", ["scancel", trap7])
    c.wait(trap7, FINAL)
    c.scontrol("scontrol_cancelled_trap_exit7", trap7)
    c.capture("job_trap_exit7_output", ["cat", f"slurm-{trap7}.out"], cwd=trapdir)

    ignore = c.sbatch(s["ignore_term.sh"])
    c.wait(ignore, ("RUNNING",))
    t = time.monotonic()
    c.capture("scancel_ignore_term", ["scancel", ignore])
    c.wait(ignore, FINAL)
    note(f"scancel of a job ignoring TERM: {c.job(ignore).get('JobState')} "
         f"ExitCode={c.job(ignore).get('ExitCode')} {time.monotonic() - t:.1f} s after scancel "
         f"(KillWait=2, but slurmd waits max(KillWait, 5) s before SIGKILL)")
    c.scontrol("scontrol_cancelled_ignore_term", ignore)

    # walltime, quickly: TimeLimit=0 on a running job
    quick = c.sbatch(s["sleep.sh"])
    c.wait(quick, ("RUNNING",))
    t = time.monotonic()
    c.capture("scontrol_update_timelimit0", ["scontrol", "update", f"JobId={quick}",
                                             "TimeLimit=0"])
    c.wait(quick, FINAL, timeout=60)
    note(f"TimeLimit=0 on a running job: {c.job(quick).get('JobState')} after "
         f"{time.monotonic() - t:.1f} s (time limits are checked every 30 s)")
    c.scontrol("scontrol_timeout_via_update", quick)
    quick7 = c.sbatch(s["trap_exit7.sh"], cwd=trapdir)
    c.wait(quick7, ("RUNNING",))
    time.sleep(0.5)
    c.run(["scontrol", "update", f"JobId={quick7}", "TimeLimit=0"])
    c.wait(quick7, FINAL, timeout=60)
    c.scontrol("scontrol_timeout_trap_exit7", quick7)
    c.capture("job_timeout_trap_exit7_output", ["cat", f"slurm-{quick7}.out"], cwd=trapdir)

    # drained node: a new job pends; its reason; cancelled while pending
    c.run(["scontrol", "update", f"NodeName={c.cluster.node}", "State=DRAIN",
           "Reason=capture drain"])
    c.sinfo("sinfo_drained")
    pending = c.sbatch(s["sleep.sh"])
    c.scontrol("scontrol_pending_fresh", pending)
    waited = c.wait(pending, ("PENDING",), reason_not_none=True)
    note(f"pending job {pending} on a drained node: Reason={c.job(pending).get('Reason')} "
         f"set {waited:.1f} s after sbatch")
    c.squeue("squeue_pending_drained", pending)
    c.scontrol("scontrol_pending_drained", pending)
    c.capture("scancel_pending", ["scancel", pending])
    c.wait(pending, FINAL)
    c.scontrol("scontrol_cancelled_pending", pending)

    # a second pending job, then resume: it runs
    pending2 = c.sbatch(s["ok.sh"])
    c.wait(pending2, ("PENDING",), reason_not_none=True)
    t = time.monotonic()
    c.run(["scontrol", "update", f"NodeName={c.cluster.node}", "State=RESUME"])
    c.wait(pending2, FINAL)
    note(f"after RESUME the pending ok job finished {time.monotonic() - t:.1f} s later: "
         f"{c.job(pending2).get('JobState')}")
    c.sinfo("sinfo_idle_after_resume")

    # drain while a job runs -> draining
    busy = c.sbatch(s["sleep.sh"])
    c.wait(busy, ("RUNNING",))
    c.sinfo("sinfo_mixed")
    c.run(["scontrol", "update", f"NodeName={c.cluster.node}", "State=DRAIN",
           "Reason=drain while busy"])
    c.sinfo("sinfo_draining")
    c.run(["scancel", busy])
    c.wait(busy, FINAL)
    time.sleep(1)
    c.sinfo("sinfo_drained_after_job")
    c.run(["scontrol", "update", f"NodeName={c.cluster.node}", "State=RESUME"])

    # unknown job ids
    c.scontrol("scontrol_unknown", UNKNOWN)
    c.squeue("squeue_unknown", UNKNOWN)
    c.squeue("squeue_unknown_all_states", UNKNOWN, "-t", "all")
    c.capture("sacct_unknown", ["sacct", "-n", "-P", "-X", "-j", UNKNOWN, "-o", SACCT_FIELDS])
    c.capture("scancel_unknown", ["scancel", UNKNOWN])
    c.capture("scancel_finished", ["scancel", ok])

    # a real walltime kill: --time=1 (the minimum: 1 minute)
    if not skip_slow:
        slow = c.sbatch("--time=1", s["sleep.sh"])
        c.wait(slow, ("RUNNING",))
        t = time.monotonic()
        c.wait(slow, FINAL, timeout=150)
        note(f"--time=1: {c.job(slow).get('JobState')} {time.monotonic() - t:.1f} s after "
             f"it started running")
        c.scontrol("scontrol_timeout", slow)
        c.squeue("squeue_timeout_all_states", slow, "-t", "all")


if __name__ == "__main__":
    sys.exit(main())
