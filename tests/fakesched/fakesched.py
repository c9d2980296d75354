#!/usr/bin/env python3
"""Stand-ins for ``qsub``/``qstat``/``qdel`` (PBS Professional, or Torque when
``FAKESCHED_FLAVOR=torque``) and ``pjsub``/``pjstat``/``pjdel`` (Fujitsu PJM).

One stdlib script; the command is the name it is run as (``os.path.basename(argv[0])``,
see ``install()`` in ``__init__.py``). State lives in ``$FAKESCHED_DIR`` (required):
``jobs/N.json`` per job (written whole with an atomic rename, changed under the
``lock`` file's flock), ``spool/N.SC`` the job script as submitted, ``log`` what the
supervisors report.

What it does, as the real tools do (formats: ``tests/data/{pbs,torque,pjm}/README.md``):

* submit reads the script's directives (``#PBS``/``#PJM``: name, output file relative
  to the current directory, join, walltime/elapse, queue/resource group, account),
  keeps a copy of the script, assigns the next id, prints what the real tool prints,
  and starts a supervisor in a new session with no stdin/stdout/stderr, so an SSH
  exec returns at once. The supervisor keeps the job queued for
  ``FAKESCHED_START_DELAY`` seconds (0.5 by default), then runs ``/bin/sh`` on the
  copy in its own process group, stdout (and stderr when joined) into the output
  file: PBS and Torque start it in ``$HOME`` with ``PBS_JOBID``, ``PBS_JOBNAME``,
  ``PBS_O_WORKDIR``, ``PBS_O_HOME``, ``PBS_QUEUE``, ... set; PJM in the submission
  directory with ``PJM_JOBID``, ``PJM_JOBNAME``, ``PJM_O_WORKDIR``, ... set.
  Past its walltime the job's group gets SIGTERM, then SIGKILL 2 s later.
* a job submitted to the queue (resource group) ``held`` stays held until deleted.
* delete: a queued job is removed (and kept in history as deleted); a running one
  gets SIGTERM on its group, SIGKILL 2 s later.
* query prints ``qstat -f`` blocks (``-x`` adds finished jobs on PBS; Torque keeps
  them in state ``C``), or ``pjstat [-v]`` / ``pjstat -H [day=N] [-v]`` tables, with
  the exit status in each tool's convention; unknown ids get the tool's error text
  and exit status. ``qstat -Q`` and ``pjstat --rsc`` list the queues (resource
  groups) seen so far, ``held`` among them as not started.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SERVER = "fakeserver"
NODE = "fakenode"
KILL_DELAY = 2.0
TOOLS = ("qsub", "qstat", "qdel", "pjsub", "pjstat", "pjdel")

# Exit statuses of the real commands: pbs_errno modulo 256 (PBSE_UNKJOBID 15001,
# PBSE_HISTJOBID 15139, PBSE_BADSTATE 15018).
EXIT_UNKNOWN, EXIT_HISTORY, EXIT_BADSTATE = 153, 35, 170
PBS_WALLTIME, TORQUE_WALLTIME = -29, -11  # JOB_EXEC_KILL_WALLTIME, JOB_EXEC_OVERLIMIT_WT
# PJM codes: deleted by pjdel, elapse exceeded, current directory or stdout not accessible
PJM_DELETED, PJM_ELAPSE, PJM_NO_FILE = 1, 11, 16


class Fail(Exception):
    """Print ``text`` on stderr and exit ``status``."""

    def __init__(self, text: str, status: int = 1) -> None:
        super().__init__(text)
        self.text, self.status = text, status


# -- state -------------------------------------------------------------------------------
def root() -> Path:
    where = os.environ.get("FAKESCHED_DIR")
    if not where:
        raise Fail("fakesched: set FAKESCHED_DIR to the directory that keeps the fake "
                   "scheduler's jobs", 2)
    path = Path(where)
    (path / "jobs").mkdir(parents=True, exist_ok=True)
    (path / "spool").mkdir(exist_ok=True)
    return path


@contextmanager
def locked(base: Path) -> Iterator[None]:
    with open(base / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load(base: Path, seq: int) -> dict[str, Any] | None:
    try:
        return json.loads((base / "jobs" / f"{seq}.json").read_text())
    except FileNotFoundError:
        return None


def save(base: Path, job: dict[str, Any]) -> None:
    path = base / "jobs" / f"{job['seq']}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(job))
    os.replace(tmp, path)


def log(base: Path, text: str) -> None:
    with open(base / "log", "a") as handle:
        handle.write(f"{time.strftime('%H:%M:%S')} [{os.getpid()}] {text}\n")


def flavor(tool: str) -> str:
    if tool.startswith("pj"):
        return "pjm"
    return "torque" if os.environ.get("FAKESCHED_FLAVOR") == "torque" else "pbspro"


def full_id(job_flavor: str, seq: int) -> str:
    return str(seq) if job_flavor == "pjm" else f"{seq}.{SERVER}"


def find(base: Path, job_flavor: str, text: str) -> dict[str, Any] | None:
    """The job ``text`` names (``12`` or ``12.fakeserver``; ``12`` for PJM)."""
    seq, _, server = text.partition(".")
    if not seq.isdigit() or (server and server != SERVER) or \
            (job_flavor == "pjm" and server):
        return None
    job = load(base, int(seq))
    return job if job and job["flavor"] == job_flavor else None


# -- submit ------------------------------------------------------------------------------
VALUE_OPTIONS = {
    "pbs": {"-N", "-o", "-e", "-j", "-l", "-q", "-A", "-r", "-W", "-m", "-M", "-S", "-v",
            "-a", "-c", "-k", "-p", "-P", "-u", "-J", "-C", "-d", "-D", "-w"},
    "pjm": {"-N", "-o", "-e", "-L", "--mpi", "-g", "-x", "-m", "--mail-list", "-p",
            "--at", "--sparam", "--rsc-list", "--step", "--bulk-param"},
}


def options(kind: str, words: list[str], into: dict[str, Any]) -> list[str]:
    """Read qsub/pjsub options from ``words`` into ``into``; the operands left."""
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in VALUE_OPTIONS[kind]:
            if i + 1 >= len(words):
                raise Fail(f"{'qsub' if kind == 'pbs' else 'pjsub'}: option {word} needs "
                           "a value", 2)
            value = words[i + 1]
            if word in ("-l", "-L"):  # resource lists add up
                for item in value.split(","):
                    key, _, val = item.partition("=")
                    into.setdefault("resources", {})[key.strip()] = val.strip()
            else:
                into[word] = value
            i += 2
        elif word.startswith("-"):
            into[word] = True
            i += 1
        else:
            rest.append(word)
            i += 1
    return rest


def directives(kind: str, script: str, into: dict[str, Any]) -> None:
    """The ``#PBS``/``#PJM`` lines before the first command line."""
    prefix = "#PBS" if kind == "pbs" else "#PJM"
    for number, line in enumerate(script.splitlines()):
        text = line.strip()
        if not text or (number == 0 and text.startswith("#!")):
            continue
        if text.startswith(prefix + " ") or text == prefix:
            options(kind, shlex.split(text[len(prefix):]), into)
        elif not text.startswith("#"):
            break


def seconds(text: str | None) -> int | None:
    """``H:MM:SS``, ``MM:SS`` or ``SS`` as seconds."""
    if not text:
        return None
    total = 0
    for part in text.strip().split(":"):
        if not part.isdigit():
            return None
        total = total * 60 + int(part)
    return total


def submit(tool: str, args: list[str]) -> int:
    base = root()
    kind = "pjm" if tool == "pjsub" else "pbs"
    given: dict[str, Any] = {}
    cmdline: dict[str, Any] = {}
    operands = options(kind, args, cmdline)
    if len(operands) != 1:
        raise Fail(f"usage: {tool} [options] SCRIPT (this stand-in needs a script file)", 2)
    script_path = Path(operands[0])
    try:
        script = script_path.read_text()
    except OSError as exc:
        if kind == "pbs":
            raise Fail(f"qsub: script file:: {exc.strerror}", 1) from None
        raise Fail(f"[ERR.] PJM 0008 pjsub Cannot open the script file ({operands[0]}).",
                   1) from None
    directives(kind, script, given)
    resources = {**given.get("resources", {}), **cmdline.get("resources", {})}
    given.update(cmdline)  # the command line wins over the directives
    given["resources"] = resources
    if "-I" in given or "--interact" in given:
        raise Fail(f"{tool}: interactive jobs are not supported by this stand-in", 2)
    workdir = os.getcwd()
    job_flavor = flavor(tool)
    with locked(base):
        counter = base / "seq"
        seq = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(seq))
        name = given.get("-N") or script_path.name
        queue = (resources.get("rscgrp", "small") if kind == "pjm"
                 else given.get("-q", "batch" if job_flavor == "torque" else "workq"))
        join = bool(given.get("-j")) and given.get("-j") != "n"
        if kind == "pjm":
            out = given.get("-o") or f"{name}.{seq}.out"
            err = None if join else given.get("-e") or f"{name}.{seq}.err"
            walltime_text = resources.get("elapse")
        else:
            out = given.get("-o") or f"{name}.o{seq}"
            err = None if join else given.get("-e") or f"{name}.e{seq}"
            walltime_text = resources.get("walltime")
        spool = base / "spool" / f"{seq}.SC"
        spool.write_text(script)
        job = {
            "seq": seq, "id": full_id(job_flavor, seq), "flavor": job_flavor, "name": name,
            "user": getpass.getuser(), "host": socket.gethostname(), "queue": queue,
            "account": given.get("-A") or given.get("-g") or "",
            "walltime": seconds(walltime_text), "walltime_text": walltime_text or "",
            "resources": resources, "join": join, "workdir": workdir,
            "out": os.path.join(workdir, out), "err": err and os.path.join(workdir, err),
            "script": str(spool), "submit_args": " ".join(args),
            "state": "held" if queue == "held" else "queued", "ctime": time.time(),
            "stime": None, "etime": None, "pid": None, "returncode": None,
            "delete_at": None, "walltime_at": None, "outcome": None,
        }
        save(base, job)
    if job["state"] == "queued":
        with open(base / "log", "ab") as errlog:
            subprocess.Popen([sys.executable, os.path.abspath(__file__), "_supervise",
                              str(seq)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=errlog, start_new_session=True, close_fds=True,
                             cwd=str(base))
    if kind == "pjm":
        print(f"[INFO] PJM 0000 pjsub Job {seq} submitted.")
    else:
        print(job["id"])
    return 0


# -- the supervisor ----------------------------------------------------------------------
def job_environment(job: dict[str, Any]) -> tuple[dict[str, str], str]:
    """The job's environment and the directory it starts in."""
    env = dict(os.environ)
    home = env.get("HOME") or os.path.expanduser("~")
    if job["flavor"] == "pjm":
        env.update(PJM_JOBID=str(job["seq"]), PJM_SUBJOBID=str(job["seq"]),
                   PJM_JOBNAME=job["name"], PJM_O_WORKDIR=job["workdir"], PJM_O_HOME=home,
                   PJM_O_LOGNAME=job["user"], PJM_O_PATH=env.get("PATH", ""))
        return env, job["workdir"]
    nodefile = Path(job["script"]).with_suffix(".nodes")
    nodefile.write_text(NODE + "\n")
    env.update(PBS_JOBID=job["id"], PBS_JOBNAME=job["name"], PBS_O_WORKDIR=job["workdir"],
               PBS_O_HOME=home, PBS_O_LOGNAME=job["user"], PBS_O_PATH=env.get("PATH", ""),
               PBS_O_SHELL=env.get("SHELL", "/bin/sh"), PBS_O_HOST=job["host"],
               PBS_O_QUEUE=job["queue"], PBS_QUEUE=job["queue"], PBS_SERVER=SERVER,
               PBS_ENVIRONMENT="PBS_BATCH", PBS_NODEFILE=str(nodefile))
    if job["flavor"] == "torque":
        env["PBS_NUM_NODES"] = "1"
    return env, home  # PBS and Torque start batch jobs in the user's home directory


def start(job: dict[str, Any]) -> subprocess.Popen[bytes]:
    env, cwd = job_environment(job)
    out = open(job["out"], "wb")
    err = out if job["join"] else open(job["err"], "wb")
    try:
        return subprocess.Popen(["/bin/sh", job["script"]], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True)
    finally:
        out.close()
        err.close()


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def supervise(seq: int) -> int:
    base = root()
    delay = float(os.environ.get("FAKESCHED_START_DELAY", "0.5"))
    due = time.time() + delay
    proc = None
    while proc is None:
        with locked(base):
            job = load(base, seq)
            if job is None or job["state"] != "queued":
                return 0  # deleted while queued
            if time.time() >= due:
                try:
                    proc = start(job)
                except OSError as exc:  # the output file's directory is missing, ...
                    job.update(state="done", outcome="failed_start", etime=time.time(),
                               returncode=None)
                    save(base, job)
                    log(base, f"job {seq} could not start: {exc}")
                    return 1
                job.update(state="running", stime=time.time(), pid=proc.pid)
                save(base, job)
        if proc is None:
            time.sleep(0.05)
    term_at = None
    while proc.poll() is None:
        time.sleep(0.05)
        now = time.time()
        job = load(base, seq) or job
        if term_at is None and job.get("delete_at"):
            term_at = job["delete_at"]  # qdel/pjdel sent SIGTERM
        elif term_at is None and job["walltime"] and now >= job["stime"] + job["walltime"]:
            with locked(base):
                job = load(base, seq) or job
                if not job.get("delete_at"):
                    job["walltime_at"] = now
                    save(base, job)
            kill_group(proc.pid, signal.SIGTERM)
            term_at = now
        if term_at is not None and now >= term_at + KILL_DELAY:
            kill_group(proc.pid, signal.SIGKILL)
    kill_group(proc.pid, signal.SIGKILL)  # what the job left behind goes with it
    with locked(base):
        job = load(base, seq) or job
        outcome = ("walltime" if job.get("walltime_at") else
                   "deleted_running" if job.get("delete_at") else "finished")
        job.update(state="done", etime=time.time(), returncode=proc.returncode,
                   outcome=outcome)
        save(base, job)
    return 0


# -- delete ------------------------------------------------------------------------------
def delete(tool: str, args: list[str]) -> int:
    base = root()
    job_flavor = flavor(tool)
    status = 0
    for text in [a for a in args if not a.startswith("-")]:
        with locked(base):
            job = find(base, job_flavor, text)
            error = delete_error(tool, job_flavor, text, job)
            if error:
                print(error[0], file=sys.stderr)
                status = error[1]
                continue
            assert job is not None
            now = time.time()
            if job["state"] in ("queued", "held"):
                job.update(state="done", outcome="deleted_queued", etime=now)
            elif job["state"] == "running" and not job.get("delete_at"):
                job["delete_at"] = now
                kill_group(job["pid"], signal.SIGTERM)
            save(base, job)
        if tool == "pjdel":
            print(f"[INFO] PJM 0100 pjdel Job {job['seq']} canceled.")
    return status


def delete_error(tool: str, job_flavor: str, text: str,
                 job: dict[str, Any] | None) -> tuple[str, int] | None:
    done = job is not None and job["state"] == "done"
    if tool == "pjdel":
        if job is None or done:
            return f"[ERR.] PJM 0052 pjdel Job {text} does not exist.", 1
        return None
    name = job["id"] if job else text if "." in text else f"{text}.{SERVER}"
    if job is None:
        suffix = " Error" if job_flavor == "torque" else ""
        return f"qdel: Unknown Job Id{suffix} {name}", EXIT_UNKNOWN
    if done and job_flavor == "torque":
        return f"qdel: Invalid state for job - COMPLETE {name}", EXIT_BADSTATE
    if done:
        return f"qdel: Job {name} has finished", EXIT_HISTORY
    return None


# -- qstat -------------------------------------------------------------------------------
def ctime(stamp: float | None) -> str:
    """``Tue Mar  5 10:00:00 2024``, as ctime(3) prints it."""
    return time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(stamp or 0))


def hms(value: float) -> str:
    value = int(value)
    return f"{value // 3600:02d}:{value % 3600 // 60:02d}:{value % 60:02d}"


def prt_attr(name: str, value: str) -> str:
    """One ``qstat -f`` attribute, broken at 78 columns as ``prt_attr()`` in qstat.c does:
    after a comma when the next piece does not fit, inside a piece when it alone is too
    long; every continuation line starts with a tab."""
    out = f"    {name} = "
    column = len(name) + 7
    pieces = [p for p in value.split(",") if p] or [""]
    for index, piece in enumerate(pieces):
        if len(piece) + column < 78:
            out += piece
            column += len(piece)
        else:
            if index:
                out += "\n\t"
                column = 9
            for char in piece:
                out += char
                column += 1
                if column > 78:
                    column = 8
                    out += "\n\t"
        if index < len(pieces) - 1:
            out += ","
    return out


def exit_status(job: dict[str, Any]) -> int | None:
    """The job's exit status in PBS/Torque convention (256 + signal when killed)."""
    if job["outcome"] == "failed_start":  # JOB_EXEC_FAIL1 / JOB_EXEC_STDOUTFAIL
        return -9 if job["flavor"] == "torque" else -1
    if job["outcome"] == "walltime":
        return TORQUE_WALLTIME if job["flavor"] == "torque" else PBS_WALLTIME
    code = job["returncode"]
    if code is None:
        return None
    return 256 - code if code < 0 else code


def pbs_block(job: dict[str, Any]) -> str:
    torque = job["flavor"] == "torque"
    state, now = job["state"], time.time()
    started = job["stime"] is not None
    letter = {"queued": "Q", "held": "H", "running": "R"}.get(state, "C" if torque else "F")
    host = job["host"]
    attrs: list[tuple[str, str]] = [("Job_Name", job["name"]),
                                    ("Job_Owner", f"{job['user']}@{host}")]
    if started:
        end = job["etime"] or now
        attrs += [("resources_used.cput", "00:00:00"), ("resources_used.mem", "1024kb"),
                  ("resources_used.walltime", hms(end - job["stime"]))]
    attrs += [("job_state", letter), ("queue", job["queue"]), ("server", SERVER),
              ("Checkpoint", "u"), ("ctime", ctime(job["ctime"])),
              ("Error_Path", f"{host}:{job['err'] or job['out']}")]
    if started:
        attrs.append(("exec_host", f"{NODE}/0"))
    attrs += [("Hold_Types", "s" if state == "held" else "n"),
              ("Join_Path", "oe" if job["join"] else "n"), ("Keep_Files", "n"),
              ("Mail_Points", "a"), ("mtime", ctime(job["etime"] or job["stime"] or
                                                     job["ctime"])),
              ("Output_Path", f"{host}:{job['out']}"), ("Priority", "0"),
              ("qtime", ctime(job["ctime"])), ("Rerunable", "False")]
    for key, value in sorted(job["resources"].items()):
        if key == "walltime" and job["walltime"] is not None:
            value = hms(job["walltime"])
        attrs.append((f"Resource_List.{key}", value))
    if not torque and started:
        attrs.append(("stime", ctime(job["stime"])))
    if started:
        attrs.append(("session_id", str(job["pid"])))
    if not torque:
        substate = {"queued": "10", "held": "20", "running": "42"}.get(state) or (
            "91" if str(job["outcome"]).startswith("deleted") else "92")
        attrs.append(("substate", substate))
    variables = [("PBS_O_HOME", os.environ.get("HOME", "")), ("PBS_O_LOGNAME", job["user"]),
                 ("PBS_O_PATH", os.environ.get("PATH", "")),
                 ("PBS_O_WORKDIR", job["workdir"]), ("PBS_O_QUEUE", job["queue"]),
                 ("PBS_O_HOST", host)]
    attrs.append(("Variable_List", ",".join(f"{k}={v}" for k, v in variables)))
    comment = pbs_comment(job)
    if comment:
        attrs.append(("comment", comment))
    attrs.append(("etime", ctime(job["ctime"])))
    status = exit_status(job) if state == "done" else None
    if torque:
        if status is not None:
            attrs.append(("exit_status", str(status)))
        attrs.append(("submit_args", job["submit_args"]))
        if started:
            attrs += [("start_time", ctime(job["stime"])), ("start_count", "1")]
        if state == "done":
            attrs.append(("comp_time", ctime(job["etime"])))
        attrs += [("submit_host", host), ("init_work_dir", job["workdir"])]
    else:
        if started:
            attrs.append(("run_count", "1"))
        if status is not None:
            attrs.append(("Exit_status", str(status)))
        attrs.append(("Submit_arguments", job["submit_args"]))
        if state == "done":
            attrs += [("obittime", ctime(job["etime"])),
                      ("history_timestamp", str(int(job["etime"])))]
        if job["account"]:
            attrs.append(("Account_Name", job["account"]))
        attrs += [("project", "_pbs_project_default"), ("Submit_Host", host)]
    lines = [f"Job Id: {job['id']}"] + [prt_attr(k, v) for k, v in attrs]
    return "\n".join(lines) + "\n\n"


def pbs_comment(job: dict[str, Any]) -> str:
    if job["state"] == "held":
        return "Job held by fakesched: the queue held never runs jobs"
    if job["stime"] is None:
        return ""
    text = time.strftime("Job run at %a %b %d at %H:%M", time.localtime(job["stime"]))
    text += f" on ({NODE}:ncpus=1)"
    if job["state"] == "done":
        text += " and terminated" if job["outcome"] == "deleted_running" else " and finished"
    return text


def queues(base: Path, job_flavor: str) -> dict[str, list[dict[str, Any]]]:
    """The queues (resource groups) seen so far, with their jobs; ``held`` never starts."""
    default = {"pbspro": "workq", "torque": "batch", "pjm": "small"}[job_flavor]
    found: dict[str, list[dict[str, Any]]] = {default: [], "held": []}
    for path in (base / "jobs").glob("*.json"):
        job = json.loads(path.read_text())
        if job["flavor"] == job_flavor:
            found.setdefault(job["queue"], []).append(job)
    return found


def qstat_queues(base: Path, job_flavor: str) -> int:
    """``qstat -Q``: one line per queue (Reference Guide, qstat "Queue status")."""
    print("Queue              Max   Tot Ena Str   Que   Run   Hld   Wat   Trn   Ext Type")
    print("---------------- ----- ----- --- --- ----- ----- ----- ----- ----- ----- ----")
    for name, jobs in sorted(queues(base, job_flavor).items()):
        count = {s: sum(j["state"] == s for j in jobs) for s in ("queued", "running", "held")}
        total = sum(count.values())
        started = "no" if name == "held" else "yes"
        print(f"{name:<16} {0:>5} {total:>5} yes {started:>3} {count['queued']:>5} "
              f"{count['running']:>5} {count['held']:>5} {0:>5} {0:>5} {0:>5} Exec")
    return 0


def qstat(tool: str, args: list[str]) -> int:
    base = root()
    job_flavor = flavor(tool)
    flags = "".join(a[1:] for a in args if a.startswith("-"))
    if "Q" in flags:
        return qstat_queues(base, job_flavor)
    if job_flavor == "torque" and "x" in flags:
        raise Fail("qstat: -x (XML output) is not supported by this stand-in", 2)
    history, full = "x" in flags or "H" in flags, "f" in flags
    ids = [a for a in args if not a.startswith("-")]
    jobs: list[dict[str, Any]] = []
    status = 0
    if not ids:
        for path in sorted((base / "jobs").glob("*.json"), key=lambda p: int(p.stem)):
            job = json.loads(path.read_text())
            if job["flavor"] == job_flavor and (job["state"] != "done" or history or
                                                job_flavor == "torque"):
                jobs.append(job)
    for text in ids:
        job = find(base, job_flavor, text)
        name = job["id"] if job else text if "." in text else f"{text}.{SERVER}"
        if job is None:
            suffix = " Error" if job_flavor == "torque" else ""
            print(f"qstat: Unknown Job Id{suffix} {name}", file=sys.stderr)
            status = EXIT_UNKNOWN
        elif job["state"] == "done" and job_flavor == "pbspro" and not history:
            print(f"qstat: {name} Job has finished, use -x or -H to obtain historical job "
                  "information", file=sys.stderr)
            status = EXIT_HISTORY
        else:
            jobs.append(job)
    if full:
        sys.stdout.write("".join(pbs_block(job) for job in jobs))
    elif jobs:
        print("Job id            Name             User              Time Use S Queue")
        print("----------------  ---------------- ----------------  -------- - -----")
        for job in jobs:
            letter = pbs_block(job).split("job_state = ")[1][0]
            print(f"{job['id']:<17} {job['name'][:16]:<16} {job['user'][:16]:<16}  "
                  f"00:00:00 {letter} {job['queue']}")
    return status


# -- pjstat ------------------------------------------------------------------------------
PJSTAT_COLUMNS = ("JOB_ID", "JOB_NAME", "MD", "ST", "USER", "START_DATE", "ELAPSE_LIM",
                  "NODE_REQUIRE", "VNODE", "CORE", "V_MEM")
PJSTAT_V_COLUMNS = ("JOB_ID", "JOB_NAME", "MD", "ST", "USER", "GROUP", "START_DATE",
                    "ELAPSE_TIM", "ELAPSE_LIM", "NODE_REQUIRE", "VNODE", "CORE", "V_MEM",
                    "V_POL", "E_POL", "RANK", "LST", "EC", "PC", "SN", "PRI", "ACCEPT",
                    "RSC_GRP", "REASON")


def pj_date(stamp: float) -> str:
    return time.strftime("%m/%d %H:%M:%S", time.localtime(stamp))


def pj_elapse(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    return f"{value // 3600:04d}:{value % 3600 // 60:02d}:{value % 60:02d}"


def pjstat_row(job: dict[str, Any]) -> dict[str, str]:
    state, now = job["state"], time.time()
    code, outcome = job["returncode"], job["outcome"]
    exit_code, sig, pjm_code, reason = "0", "0", "0", "-"
    if state == "queued":
        st, last = "QUE", "ACC"
        start = time.strftime("(%m/%d %H:%M)", time.localtime(job["ctime"] + 1))
    elif state == "held":
        st, last, start = "HLD", "QUE", "-"
    elif state == "running":
        st, last, start = "RUN", "RNP", pj_date(job["stime"])
    else:
        st, last = "EXT", "RNO"
        start = pj_date(job["stime"]) if job["stime"] else "-"
        if code is not None and code < 0:
            exit_code, sig = "-", str(-code)
        elif code is not None:
            exit_code = str(code)
        if outcome == "walltime":
            last, pjm_code, reason = "RUN", str(PJM_ELAPSE), "ELAPSE LIMIT EXCEEDED"
        elif outcome == "deleted_running":
            st, last, pjm_code = "CCL", "RUN", str(PJM_DELETED)
        elif outcome == "deleted_queued":
            st, last, pjm_code, exit_code, sig = "CCL", "QUE", str(PJM_DELETED), "-", "-"
        elif outcome == "failed_start":  # the standard output file could not be opened
            last, pjm_code, exit_code, sig = "RUN", str(PJM_NO_FILE), "-", "-"
    used = None
    if job["stime"]:
        used = (job["etime"] or now) - job["stime"]
    return {"JOB_ID": str(job["seq"]), "JOB_NAME": job["name"], "MD": "NM", "ST": st,
            "USER": job["user"], "GROUP": job["account"] or "-", "START_DATE": start,
            "ELAPSE_TIM": pj_elapse(used or 0), "ELAPSE_LIM": pj_elapse(job["walltime"]),
            "NODE_REQUIRE": job["resources"].get("node", "1"), "VNODE": "-", "CORE": "-",
            "V_MEM": "-", "V_POL": "-", "E_POL": "-", "RANK": "bychip", "LST": last,
            "EC": exit_code, "PC": pjm_code, "SN": sig, "PRI": "127",
            "ACCEPT": pj_date(job["ctime"]), "RSC_GRP": job["queue"], "REASON": reason}


def table(columns: tuple[str, ...], rows: list[dict[str, str]]) -> str:
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns}
    lines = [" ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += [" ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def pjstat(args: list[str]) -> int:
    base = root()
    history = verbose = False
    ids: list[str] = []
    for word in args:
        if word in ("-H", "--history"):
            history = True
        elif word == "-v":
            verbose = True
        elif word.startswith("day=") and history:
            continue
        elif word == "--rsc":
            groups = sorted(queues(base, "pjm"))
            sys.stdout.write(table(("RSCUNIT", "RSCUNIT_SIZE", "RSCGRP", "RSCGRP_SIZE"), [
                {"RSCUNIT": "rscunit_ft01 [ENABLE,START]", "RSCUNIT_SIZE": "1",
                 "RSCGRP": f"{g} [ENABLE,{'STOP' if g == 'held' else 'START'}]",
                 "RSCGRP_SIZE": "1"} for g in groups]))
            return 0
        elif word.startswith("-"):
            raise Fail(f"[ERR.] PJM 0006 pjstat option {word} is not supported by this "
                       "stand-in.", 2)
        else:
            ids.append(word)
    jobs = []
    for path in sorted((base / "jobs").glob("*.json"), key=lambda p: int(p.stem)):
        job = json.loads(path.read_text())
        if job["flavor"] == "pjm" and (job["state"] == "done") == history:
            jobs.append(job)
    if ids:
        known = {str(job["seq"]): job for job in jobs}
        for text in ids:
            if text not in known:
                print(f"[ERR.] PJM 0052 pjstat Job {text} does not exist.", file=sys.stderr)
                return 1
        jobs = [known[text] for text in ids]
    sys.stdout.write(table(PJSTAT_V_COLUMNS if verbose else PJSTAT_COLUMNS,
                           [pjstat_row(job) for job in jobs]))
    return 0


# -- entry -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    tool = os.path.basename(argv[0])
    try:
        if len(argv) > 2 and argv[1] == "_supervise":
            return supervise(int(argv[2]))
        if tool in ("qsub", "pjsub"):
            return submit(tool, argv[1:])
        if tool in ("qdel", "pjdel"):
            return delete(tool, argv[1:])
        if tool == "qstat":
            return qstat(tool, argv[1:])
        if tool == "pjstat":
            return pjstat(argv[1:])
        raise Fail(f"fakesched: run me as one of {', '.join(TOOLS)} (see install())", 2)
    except Fail as exc:
        print(exc.text, file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
