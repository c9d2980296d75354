#!/usr/bin/env python3
"""Many small files, side by side: MInt's step-by-step flow and ``remote-exec run`` with
``transfer: auto``, ``rsync`` and ``sftp``.

The workload (built once, locally, in a temporary directory):

  tree/       N small files (``--files``, default 20,000; about 100 bytes each) in
              10 x 10 nested directories (``tree/dNN/eNN/fNNNNNN.txt``), staged as one
              directory input;
  make_out.py a small script, staged as a second input: the entrypoint
              ``python3 make_out.py N`` writes another N such files under ``out/`` (same
              layout), which come back.

Against one throwaway loopback sshd (``remote_exec.sandbox.Sandbox``, stock
configuration: SFTP is the external ``sftp-server`` started through the login shell),
each repetition runs, interleaved (each repetition starting one kind further on, and
each kind after an untimed ``sync``: on a disk mounted with ``discard``, what one kind
deleted otherwise slows the next one down):

  legacy      the documented flow of MInt's execute_remote_command.sample.py
              (``common.legacy_steps``): ``ssh mkdir``, one ``rsync -av -L`` per input,
              ``ssh 'cd DIR; { python3 make_out.py N; } > LOG 2>&1'``, ``rsync -av``
              of the directory back into the work directory (where the staged tree is
              already, so rsync's quick check sends none of it again). The remote
              directory is removed afterwards, outside the timing.
  re-auto     ``remote-exec run --config CFG --site bench --json --cmd 'python3 make_out.py
              N' tree make_out.py``: the site's default ``transfer: auto``;
  re-rsync    the same with ``--transfer rsync``;
  re-sftp     the same with ``--transfer sftp``;
  before      with ``--before CMD``: ``re-auto`` run by another remote-exec (a checkout of
              the code before a change, say), with a state directory and so a connection
              holder of its own.

Each remote-exec run is a fresh process in a fresh work directory (its wall time
includes its own removal of the remote directory); its ``--json`` events give the
staging time (``created`` to ``staged``), the fetching and placing time (``finished``
to ``fetched``), the removal of the remote directory (``fetched`` to ``cleaned``) and
the method each transfer used. Every run's ``out/`` is checked file by file.
One unrecorded warm-up run (one small file) starts remote-exec's connection holder
first, as in single_run.py; the holder is stopped at the end.

Printed: per run the wall times (and for remote-exec the client's peak memory, from
wait4; the connection holder's, VmHWM, once at the end), then medians per kind, the
ratio of each to the legacy flow (goal: remote-exec <= 1.0x), files moved per second
(2N / wall time), and for remote-exec the staging and fetching times and methods.

Exit status 1 if any run failed; a missed goal is reported, not a failure.

Run:
    python benchmarks/many_files.py [--files N] [--repeat R]    # defaults 20000, 1
    python benchmarks/many_files.py --files 5000 --kinds re-auto,re-rsync   # (and legacy)
    python benchmarks/many_files.py --remote-exec "env PYTHONPATH=$PWD python3 -m remote_exec"
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from common import (
    LOG_NAME,
    add_remote_exec_option,
    isolated_setup,
    legacy_steps,
    loopback_sshd,
    remote_exec_command,
    run_events,
    ssh_options,
)

KINDS = ("legacy", "re-auto", "re-rsync", "re-sftp")
GOAL = 1.0  # remote-exec / legacy at most
FANOUT = 10  # directories per level, two levels
TIMEOUT = 900

MAKE_OUT = '''\
import os, sys
n = int(sys.argv[1])
for i in range(n):
    d = os.path.join("out", "d%02d" % (i % 10), "e%02d" % (i // 10 % 10))
    if i < 100:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d.txt" % i), "w") as f:
        f.write(("out %06d " % i).ljust(99, "x") + "\\n")
'''


def content(prefix: str, i: int) -> bytes:
    return (f"{prefix} {i:06d} ".ljust(99, "x") + "\n").encode()


def rel(i: int) -> str:
    return f"d{i % FANOUT:02d}/e{i // FANOUT % FANOUT:02d}/f{i:06d}.txt"


class Failed(Exception):
    pass


class Bench:
    def __init__(self, tmp: Path, site: dict, files: int, remote_exec: str | None,
                 before: str | None = None) -> None:
        self.tmp = tmp
        self.files = files
        self.root = site["root"]
        self.target = f"{site['user']}@{site['host']}"
        self.ssh = ssh_options(site)
        self.rsh = " ".join(shlex.quote(w) for w in self.ssh)
        self.config, self.env = isolated_setup(tmp, site)
        self.remote_exec = remote_exec_command(remote_exec)
        self.before = shlex.split(before) if before else None
        self.before_env = {**self.env, "REMOTE_EXEC_STATE_DIR": str(tmp / "state-before")}
        self.command = f"python3 make_out.py {files}"
        self.source = tmp / "source"
        self.counter = 0
        self.holder_peaks: dict[bool, int] = {}
        self.failures: list[str] = []

    def make_source(self) -> None:
        for i in range(self.files):
            path = self.source / "tree" / rel(i)
            if i < FANOUT * FANOUT:
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content("in", i))
        (self.source / "make_out.py").write_text(MAKE_OUT)

    def fresh_work(self) -> Path:
        """A work directory holding the inputs (hard links: building is not timed)."""
        self.counter += 1
        work = self.tmp / "work" / f"{self.counter:03d}"
        shutil.copytree(self.source, work, copy_function=os.link)
        return work

    def run(self, argv: list[str], cwd: Path,
            env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd, env=env or self.env, capture_output=True,
                              text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)

    def verify(self, out: Path) -> None:
        found = sum(len(names) for _d, _s, names in os.walk(out))
        if found != self.files:
            raise Failed(f"{out}: {found} files, not {self.files}")
        for i in range(self.files):
            if (out / rel(i)).read_bytes() != content("out", i):
                raise Failed(f"{out / rel(i)} is not what the entrypoint wrote")

    def run_measured(self, argv: list[str], cwd: Path,
                     env: dict | None) -> tuple[subprocess.CompletedProcess, int]:
        """:meth:`run`, and the process's peak resident memory (kB, from wait4)."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(argv, cwd=cwd, env=env or self.env, stdout=out,
                                    stderr=err, stdin=subprocess.DEVNULL, text=True)
            timer = threading.Timer(TIMEOUT, proc.kill)
            timer.start()
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            return (subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read()),
                    usage.ru_maxrss)

    def note_holder_peak(self, before: bool = False) -> None:
        """Keep the connection holder's peak resident memory (VmHWM, kB) so far (read
        after each run, untimed: an idle holder ends before the benchmark does)."""
        words = self.before if before and self.before else self.remote_exec
        proc = self.run([*words, "holder", "status"], self.tmp,
                        self.before_env if before else None)
        try:
            pid = int(proc.stdout.split()[1].rstrip(":"))
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        self.holder_peaks[before] = max(self.holder_peaks.get(before, 0),
                                                        int(line.split()[1]))
        except (IndexError, ValueError, OSError):
            pass

    def holder_peak(self, before: bool = False) -> str:
        peak = self.holder_peaks.get(before)
        return "?" if peak is None else f"{peak / 1024:.0f} MB"

    def stop_holder(self) -> None:
        try:
            self.run([*self.remote_exec, "holder", "stop"], cwd=self.tmp)
            if self.before:
                self.run([*self.before, "holder", "stop"], cwd=self.tmp, env=self.before_env)
        except (OSError, subprocess.TimeoutExpired):
            pass

    # -- the kinds: each returns (wall seconds, details) -------------------------------
    def legacy(self) -> tuple[float, str]:
        work = self.fresh_work()
        rundir = f"{self.root}/{uuid.uuid4()}"
        steps = legacy_steps(self.ssh, self.rsh, self.target, rundir, ("tree", "make_out.py"),
                             self.command, LOG_NAME)
        times = []
        try:
            start = time.perf_counter()
            for argv in steps:
                step = time.perf_counter()
                proc = self.run(argv, cwd=work)
                times.append(time.perf_counter() - step)
                if proc.returncode != 0:
                    raise Failed(f"{shlex.join(argv)} exited {proc.returncode}: "
                                 f"{proc.stderr.strip()[-600:]}")
            wall = time.perf_counter() - start
        finally:
            shutil.rmtree(rundir, ignore_errors=True)  # loopback: the remote root is local
        self.verify(work / "out")
        shutil.rmtree(work)
        push = sum(times[1:-2])
        return wall, f"push {push:.2f}s, run {times[-2]:.2f}s, pull {times[-1]:.2f}s"

    def remote_exec_run(self, method: str | None, work: Path | None = None,
                        names: tuple[str, ...] = ("tree", "make_out.py"),
                        command: str | None = None, before: bool = False,
                        ) -> tuple[float, str]:
        work = work or self.fresh_work()
        command_words = self.before if before and self.before else self.remote_exec
        argv = [*command_words, "run", "--config", str(self.config), "--site", "bench",
                "--json", *(["--transfer", method] if method else []),
                "--cmd", command or self.command, *names]
        start = time.perf_counter()
        proc, peak = self.run_measured(argv, work, self.before_env if before else None)
        wall = time.perf_counter() - start
        self.note_holder_peak(before)
        if proc.returncode != 0:
            raise Failed(f"{shlex.join(argv)} exited {proc.returncode}: "
                         f"{proc.stderr.strip()[-800:]}")
        try:
            events = run_events(proc.stderr, argv)
        except ValueError as exc:
            raise Failed(str(exc)) from None
        stage = events["staged"]["elapsed"] - events["created"]["elapsed"]
        fetch = events["fetched"]["elapsed"] - events["finished"]["elapsed"]
        run = events["finished"]["elapsed"] - events["staged"]["elapsed"]
        clean = (events["cleaned"]["elapsed"] - events["fetched"]["elapsed"]
                 if "cleaned" in events else float("nan"))
        if command is None:
            self.verify(work / "out")
        shutil.rmtree(work)
        return wall, (f"stage {stage:.2f}s ({events['staged'].get('method')}), run {run:.2f}s, "
                      f"fetch+place {fetch:.2f}s ({events['fetched'].get('method')}), "
                      f"remove {clean:.2f}s, client peak {peak / 1024:.0f} MB")

    def one(self, kind: str) -> tuple[float, str] | None:
        try:
            if kind == "legacy":
                return self.legacy()
            if kind == "before":
                return self.remote_exec_run(None, before=True)
            method = kind.removeprefix("re-")
            return self.remote_exec_run(None if method == "auto" else method)
        except (Failed, subprocess.TimeoutExpired, OSError) as exc:
            self.failures.append(f"{kind}: {exc}")
            return None

    def warm_up(self, before: bool = False) -> str:
        work = self.tmp / ("warm-before" if before else "warm")
        work.mkdir()
        (work / "one").write_text("1\n")
        try:
            wall, _ = self.remote_exec_run(None, work, ("one",), "true", before=before)
        except (Failed, subprocess.TimeoutExpired) as exc:
            return f"FAILED: {exc}"
        return f"{wall:.2f}s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--files", type=int, default=20000,
                        help="small files staged, and as many fetched back (default 20000)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="repetitions of every kind, interleaved (default 1)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"the kinds to run, comma-separated (default {','.join(KINDS)}; "
                        "legacy always runs: the ratios are against it)")
    parser.add_argument("--before", metavar="CMD",
                        help="another remote-exec command (split like a shell would) timed "
                        "as kind 'before', with transfer: auto")
    add_remote_exec_option(parser)
    args = parser.parse_args()
    if args.repeat < 1 or args.files < 1:
        parser.error("--repeat and --files must be at least 1")
    chosen = set(args.kinds.split(",")) - {""}
    if chosen - set(KINDS):
        parser.error(f"--kinds: choose among {', '.join(KINDS)}")
    kinds = ["legacy", *(k for k in KINDS[1:] if k in chosen)]
    if args.before:
        kinds.append("before")

    times: dict[str, list[float]] = {k: [] for k in kinds}
    details: dict[str, list[str]] = {k: [] for k in kinds}
    with loopback_sshd("re-many-files-") as (tmp, site):
        bench: Bench | None = None
        try:
            bench = Bench(tmp, site, args.files, args.remote_exec, args.before)
            print(f"remote-exec: {shlex.join(bench.remote_exec)}; "
                  f"python {sys.version.split()[0]}")
            print(f"{args.files} files in, {args.files} out (~100 bytes each, "
                  f"{FANOUT * FANOUT} directories); {args.repeat} repetition(s) of "
                  f"{', '.join(kinds)}, interleaved; load average "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
            bench.make_source()
            print(f"  warm-up (starts the holder): {bench.warm_up()}", flush=True)
            if args.before:
                print(f"  warm-up of 'before': {bench.warm_up(before=True)}", flush=True)
            for rep in range(args.repeat):
                for kind in kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]:
                    os.sync()  # (what the last kind deleted is settled before, untimed)
                    result = bench.one(kind)
                    if result is None:
                        print(f"  rep {rep + 1}/{args.repeat} {kind:<9} FAILED", flush=True)
                        continue
                    times[kind].append(result[0])
                    details[kind].append(result[1])
                    print(f"  rep {rep + 1}/{args.repeat} {kind:<9} {result[0]:7.2f}s  "
                          f"{result[1]}", flush=True)
            print(f"  connection holder's peak memory (VmHWM): {bench.holder_peak()}"
                  + (f"; of 'before': {bench.holder_peak(before=True)}" if args.before
                     else ""), flush=True)
        finally:
            if bench is not None:
                bench.stop_holder()

    print()
    print(f"{'kind':<10} {'n':>2} {'median':>9} {'vs legacy':>10} {'files/s':>9}  last run")
    legacy = statistics.median(times["legacy"]) if times["legacy"] else None
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for kind in kinds:
        if not times[kind]:
            print(f"{kind:<10} {0:>2} {'-':>9}")
            continue
        med = statistics.median(times[kind])
        ratio = f"{med / legacy:.2f}x" if legacy else "-"
        print(f"{kind:<10} {len(times[kind]):>2} {med:>8.2f}s {ratio:>10} "
              f"{2 * args.files / med:>9.0f}  {details[kind][-1]}")
    if legacy:
        for kind in kinds[1:]:
            if times[kind]:
                ratio = statistics.median(times[kind]) / legacy
                print(f"{kind} / legacy: {ratio:.2f}x (goal <= {GOAL:g}x: "
                      f"{'met' if ratio <= GOAL else 'MISSED'})")
    if bench is not None and bench.failures:
        print(f"\n{len(bench.failures)} run(s) FAILED:")
        for what in bench.failures:
            print(f"  - {what}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
