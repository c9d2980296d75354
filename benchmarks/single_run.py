#!/usr/bin/env python3
"""One run, side by side: a bare ssh, MInt's step-by-step flow, and ``remote-exec run``.

What is measured (wall time of whole processes, ``time.perf_counter()`` around
``subprocess.run``), all against one throwaway loopback sshd started here
(``remote_exec.sandbox.Sandbox`` in a temporary directory, stopped at the end):

  a  ssh-floor   one ``ssh -p PORT -i KEY -o UserKnownHostsFile=KH -o BatchMode=yes
                 -o StrictHostKeyChecking=yes USER@127.0.0.1 true``: the floor for
                 anything that opens a connection.
  b  legacy      the documented flow of MInt's execute_remote_command.sample.py, with
                 real ssh/rsync processes, each opening its own connection:
                   ssh HOST "mkdir ROOT/<uuid>"
                   rsync -av -L -e "ssh ..." FILE HOST:ROOT/<uuid>   (once per input)
                   ssh HOST "cd DIR; { cat a b c > out; } > DIR/remote_program_exec.log 2>&1"
                   rsync -av -e "ssh ..." HOST:ROOT/<uuid>/ ./localdir/
                 (DIR = ROOT/<uuid>). The command is grouped in ``{ ...; }`` so that
                 ``out`` gets the data as meant: pasted literally in front of the log
                 redirection (``cat a b c > out > LOG 2>&1``) the later redirection
                 wins and ``out`` stays empty (the cost is the same either way).
                 The remote directory is removed afterwards, outside the timing.
  c  remote-exec ``remote-exec run --config CFG --site bench --cmd 'cat a b c > out' a b c``,
                 a fresh process each time, cwd = a fresh local directory holding three
                 1 kB input files a b c; the fetched ``out`` is checked to be the
                 3 kB concatenation (remote-exec removes its remote directory itself).

The three kinds are interleaved in every repetition (a, b, c, a, b, c, ...) so that
they share the machine's noise; one unrecorded warm-up repetition comes first.
remote-exec may hand runs to its per-user connection holder (a background process
in the state directory that keeps SSH connections warm): the warm-up run then
starts it and the recorded runs reuse it, so the warm-up's ``c`` time is printed as
the cold start. ``REMOTE_EXEC_HOLDER=0`` in the environment times every run
connecting by itself. The holder is stopped at the end (``remote-exec holder stop``).
The table shows median, min and max per kind, then the ratios of the medians
b/c (speedup over the legacy flow, goal >= 6x) and c/a (cost over one bare ssh,
goal <= 1.3x), and the machine's ``nproc``.

The ``remote-exec`` used is the console script beside the running Python
(``sys.executable``), so a pyenv/asdf shim's start-up cost is not counted; it
falls back to ``remote-exec`` on PATH. ``--remote-exec CMD`` times another one.

Exit status: 1 if any run failed (a process exited non-zero, or ``out`` was wrong);
missing a goal is reported but is not a failure.

Run:
    python benchmarks/single_run.py [--repeat N]     # default N = 10
    python benchmarks/single_run.py --remote-exec "/path/to/venv/bin/remote-exec"
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from common import (
    COMMAND,
    INPUT_NAMES,
    INPUT_SIZE,
    LOG_NAME,
    isolated_setup,
    legacy_steps,
    loopback_sshd,
    nproc,
    parse_args,
    remote_exec_command,
    ssh_options,
)

GOAL_SPEEDUP = 6.0  # b / c at least (issue 14)
GOAL_OVERHEAD = 1.3  # c / a at most (issue 14)
TIMEOUT = 120








class Bench:
    def __init__(self, tmp: Path, site: dict, repeat: int, remote_exec: str | None = None) -> None:
        self.tmp = tmp
        self.site = site
        self.repeat = repeat
        self.root = site["root"]
        self.target = f"{site['user']}@{site['host']}"
        self.ssh = ssh_options(site)
        self.rsh = " ".join(shlex.quote(w) for w in self.ssh)  # rsync's -e honours quotes
        self.config, self.env = isolated_setup(tmp, site)
        self.remote_exec = remote_exec_command(remote_exec)
        self.payload = {name: os.urandom(INPUT_SIZE) for name in INPUT_NAMES}
        self.expected = b"".join(self.payload[n] for n in INPUT_NAMES)
        self.counter = 0
        self.failures: list[str] = []
        self.cold: dict[str, float] = {}  # the warm-up repetition's times

    # -- helpers -----------------------------------------------------------------------
    def fresh_dir(self, kind: str) -> Path:
        self.counter += 1
        work = self.tmp / "work" / f"{self.counter:03d}-{kind}"
        work.mkdir(parents=True)
        for name, data in self.payload.items():
            (work / name).write_bytes(data)
        return work

    def run(self, argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT, stdin=subprocess.DEVNULL)

    def stop_holder(self) -> None:
        """Stop remote-exec's connection holder for our state directory, if it has one."""
        try:
            self.run([*self.remote_exec, "holder", "stop"], cwd=self.tmp)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def fail(self, kind: str, what: str, proc: subprocess.CompletedProcess | None = None) -> None:
        detail = ""
        if proc is not None:
            detail = f" (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}"
        self.failures.append(f"{kind}: {what}{detail}")

    def check_out(self, kind: str, out: Path) -> bool:
        try:
            data = out.read_bytes()
        except OSError as exc:
            self.fail(kind, f"no output file {out}: {exc}")
            return False
        if data != self.expected:
            self.fail(kind, f"{out} is {len(data)} bytes, not the {len(self.expected)}-byte "
                            "concatenation of a b c")
            return False
        return True

    # -- the three kinds ---------------------------------------------------------------
    def ssh_floor(self) -> float | None:
        argv = [*self.ssh, self.target, "true"]
        start = time.perf_counter()
        proc = self.run(argv)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            self.fail("a ssh-floor", shlex.join(argv), proc)
            return None
        return elapsed

    def legacy(self) -> float | None:
        work = self.fresh_dir("legacy")
        rundir = f"{self.root}/{uuid.uuid4()}"
        steps = legacy_steps(self.ssh, self.rsh, self.target, rundir, INPUT_NAMES, COMMAND,
                             LOG_NAME)
        ok = True
        start = time.perf_counter()
        for argv in steps:
            proc = self.run(argv, cwd=work)
            if proc.returncode != 0:
                self.fail("b legacy", shlex.join(argv), proc)
                ok = False
                break
        elapsed = time.perf_counter() - start
        shutil.rmtree(rundir, ignore_errors=True)  # loopback: the remote root is local
        if ok and self.check_out("b legacy", work / "out"):
            return elapsed
        return None

    def remote_exec_run(self) -> float | None:
        work = self.fresh_dir("remote-exec")
        argv = [*self.remote_exec, "run", "--config", str(self.config), "--site", "bench",
                "--cmd", COMMAND, *INPUT_NAMES]
        start = time.perf_counter()
        proc = self.run(argv, cwd=work)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            self.fail("c remote-exec", shlex.join(argv), proc)
            return None
        if self.check_out("c remote-exec", work / "out"):
            return elapsed
        return None

    # -- driver ------------------------------------------------------------------------
    def main(self) -> dict[str, list[float]]:
        kinds = [("a ssh-floor", self.ssh_floor), ("b legacy flow", self.legacy),
                 ("c remote-exec", self.remote_exec_run)]
        times: dict[str, list[float]] = {name: [] for name, _ in kinds}
        for rep in range(-1, self.repeat):  # rep -1: warm-up, not recorded
            line = []
            for name, fn in kinds:
                t = fn()
                if t is not None and rep >= 0:
                    times[name].append(t)
                elif t is not None:
                    self.cold[name] = t
                short = name.split()[0]
                line.append(f"{short}={t:.3f}s" if t is not None else f"{short}=FAIL")
            label = "warm-up" if rep < 0 else f"rep {rep + 1:2d}/{self.repeat}"
            print(f"  {label}: {'  '.join(line)}", flush=True)
        return times


def report(times: dict[str, list[float]], failures: list[str], cold: dict[str, float]) -> None:
    print()
    print(f"{'what':<16} {'n':>3} {'median':>9} {'min':>9} {'max':>9}")
    medians: dict[str, float] = {}
    for name, values in times.items():
        if values:
            medians[name] = statistics.median(values)
            print(f"{name:<16} {len(values):>3} {medians[name]:>8.3f}s {min(values):>8.3f}s "
                  f"{max(values):>8.3f}s")
        else:
            print(f"{name:<16} {0:>3} {'-':>9} {'-':>9} {'-':>9}")
    print()
    a, b, c = (medians.get(k) for k in ("a ssh-floor", "b legacy flow", "c remote-exec"))
    if b and c:
        verdict = "met" if b / c >= GOAL_SPEEDUP else "MISSED"
        print(f"b/c speedup over the legacy flow : {b / c:5.2f}x   "
              f"(goal >= {GOAL_SPEEDUP:g}x: {verdict})")
    if a and c:
        verdict = "met" if c / a <= GOAL_OVERHEAD else "MISSED"
        print(f"c/a cost over one bare ssh       : {c / a:5.2f}x   "
              f"(goal <= {GOAL_OVERHEAD:g}x: {verdict})")
    if "c remote-exec" in cold:
        print(f"c first run (warm-up, not above) : {cold['c remote-exec']:.3f}s   "
              "(cold: starts remote-exec's connection holder, if it has one)")
    print(f"nproc                            : {nproc()}")
    if failures:
        print(f"\n{len(failures)} run(s) FAILED:")
        for f in failures:
            print(f"  - {f}")


def main() -> int:
    args = parse_args(__doc__, 10, "repetitions of a, b, c (default 10)")

    with loopback_sshd() as (tmp, site):
        bench: Bench | None = None
        try:
            bench = Bench(tmp, site, args.repeat, args.remote_exec)
            print(f"remote-exec: {shlex.join(bench.remote_exec)}; python {sys.version.split()[0]}"
                  + "".join(f"; {k}={os.environ[k]}" for k in ("REMOTE_EXEC_HOLDER",)
                            if k in os.environ))
            print(f"{args.repeat} repetitions of a, b, c (interleaved), after one warm-up:",
                  flush=True)
            times = bench.main()
        finally:
            if bench is not None:
                bench.stop_holder()
        report(times, bench.failures, bench.cold)
        return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
