#!/usr/bin/env python3
"""Many runs at once: MInt's step-by-step flow vs ``remote-exec run``, N started together.

What is measured, all against one throwaway loopback sshd started here
(``remote_exec.sandbox.Sandbox`` in a temporary directory, left at sshd's defaults:
MaxStartups 10:30:100, MaxSessions 10; stopped at the end). Every run gets its own
fresh local directory holding three 1 kB input files a b c (the same random bytes for
all runs) and runs ``cat a b c > out`` remotely; a run counts as failed if any of its
processes exits non-zero (or is killed after ``--timeout`` seconds, default 300) or the
fetched ``out`` is not the 3 kB concatenation of a b c. The remote root is a fresh
directory of its own (``<tmp>/remote-root``).

  legacy     N threads, each running the documented flow of MInt's
             execute_remote_command.sample.py (the same steps as ``legacy`` in
             single_run.py), one real ssh/rsync process per step, each opening its own
             connection:
               ssh HOST "mkdir ROOT/<uuid>"
               rsync -av -L -e "ssh ..." FILE HOST:ROOT/<uuid>   (once per input)
               ssh HOST "cd DIR; { cat a b c > out; } > DIR/remote_program_exec.log 2>&1"
               rsync -av -e "ssh ..." HOST:ROOT/<uuid>/ ./
             The threads are set up first and released together by a
             ``threading.Barrier``; a run stops at its first failing step. The remote
             directories are removed afterwards, outside the timing.
  holder     N processes ``remote-exec run --config CFG --site bench --cmd 'cat a b c > out'
             a b c``, started with ``subprocess.Popen`` in a tight loop, then waited on.
             remote-exec's default: each process hands its run to the per-user
             connection holder, which bounds SSH handshakes per host and shares
             connections between runs. The state directory is fresh and no holder is
             running before, so this is a cold start: the first run starts the holder.
  no-holder  the same with ``REMOTE_EXEC_HOLDER=0``: every process connects by itself,
             with its own state directory (so no holder is shared with ``holder``).

Wall time is ``time.perf_counter()`` from the release (the barrier, or the first
``Popen``) until the last run has ended. After each remote-exec mode its holder is
stopped (``remote-exec holder stop``, same environment). ``sshd drops`` is how many
connections sshd dropped before authentication during the mode (MaxStartups), summed
from its log lines ``exited MaxStartups throttling after T, N connections dropped``;
sshd writes such a line when it next accepts a connection, so one untimed ``ssh HOST
true`` follows every mode.

For each remote-exec mode the benchmark also reads CPU seconds over the same span: of
its ``remote-exec run`` processes together (``getrusage(RUSAGE_CHILDREN)``: the
holder, a grandchild in its own session, is not in it), of the holder
(``/proc/PID/stat`` of the pid ``holder status`` names) and of the whole machine
(``/proc/stat``), to tell the clients' own start-ups from what the holder and sshd do.

The table shows per mode the runs, the failures, the wall time, the successful runs per
second, the drops, and the
ratio of wall times legacy / remote-exec (a failed legacy run stops at its first failing
step, so with many failures the legacy time covers less work and the ratio flatters
it); then ``nproc`` and, per mode, up to 3
distinct error messages with how many runs failed with each (for the legacy flow the
first stderr line of the failing step, e.g. ``kex_exchange_identification:
Connection closed by remote host``; for remote-exec its ``remote-exec: error:`` line,
else the first stderr line; UUIDs are replaced by ``<uuid>`` so that equal errors
count together).

The ``remote-exec`` used is the console script beside the running Python
(``sys.executable``), so a pyenv/asdf shim's start-up is not counted; it falls back to
``remote-exec`` on PATH. ``--remote-exec CMD`` times another one.

Exit status: 1 if any remote-exec run failed; failures of the legacy flow are
expected (sshd drops handshakes beyond MaxStartups) and reported, not an error.

Run:
    python benchmarks/concurrency.py [--runs N]     # default N = 100
    python benchmarks/concurrency.py --modes holder,no-holder --runs 50
    python benchmarks/concurrency.py --remote-exec "/path/to/venv/bin/remote-exec"
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from common import (
    COMMAND,
    INPUT_NAMES,
    INPUT_SIZE,
    LOG_NAME,
    add_remote_exec_option,
    first_line,
    isolated_setup,
    legacy_steps,
    nproc,
    remote_exec_command,
    ssh_options,
)

from remote_exec.sandbox import Sandbox

TIMEOUT = 300.0  # seconds, per process (and per legacy run as a whole)
MODES = ("legacy", "holder", "no-holder")
SHOWN_ERRORS = 3
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DROPPED_RE = re.compile(r"exited MaxStartups throttling after \S+, (\d+) connections dropped")




def error_line(stderr: str, prefer: str | None = None) -> str:
    """The line of ``stderr`` that names the error, with UUIDs made alike."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    chosen = next((line for line in lines if prefer and prefer in line), None)
    if chosen is None:
        chosen = lines[0] if lines else "(nothing on stderr)"
    return UUID_RE.sub("<uuid>", chosen)[:300]


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_cpu() -> float | None:
    """CPU seconds all cores of this machine spent busy since boot (``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(f) for f in fields]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` so far (``/proc/PID/stat``)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Outcome:
    """What one mode produced: wall time, failures and their messages."""

    def __init__(self, mode: str, runs: int) -> None:
        self.mode = mode
        self.runs = runs
        self.wall: float | None = None
        self.errors: collections.Counter[str] = collections.Counter()
        self.drops = 0
        self.note = ""
        self.client_cpu: float | None = None  # CPU s of the mode's processes (children)
        self.holder_cpu: float | None = None  # CPU s of the holder it started
        self.busy_cpu: float | None = None  # CPU s the whole machine spent meanwhile
        self.lock = threading.Lock()

    @property
    def failures(self) -> int:
        return sum(self.errors.values())

    def fail(self, message: str) -> None:
        with self.lock:
            self.errors[message] += 1


class Bench:
    def __init__(self, tmp: Path, site: dict, runs: int, timeout: float,
                 remote_exec: str | None, sshd_log: Path) -> None:
        self.tmp = tmp
        self.site = site
        self.runs = runs
        self.timeout = timeout
        self.root = site["root"]
        self.target = f"{site['user']}@{site['host']}"
        self.ssh = ssh_options(site)
        self.rsh = " ".join(shlex.quote(w) for w in self.ssh)  # rsync's -e honours quotes
        self.remote_exec = remote_exec_command(remote_exec)
        self.sshd_log = sshd_log
        self.payload = {name: os.urandom(INPUT_SIZE) for name in INPUT_NAMES}
        self.expected = b"".join(self.payload[n] for n in INPUT_NAMES)
        # the legacy flow runs with the environment of the first isolated set-up
        _, self.legacy_env = isolated_setup(self.mode_dir("legacy"), site)

    # -- helpers -----------------------------------------------------------------------
    def mode_dir(self, mode: str) -> Path:
        path = self.tmp / mode
        path.mkdir(exist_ok=True)
        return path

    def fresh_dirs(self, mode: str) -> list[Path]:
        dirs = []
        for i in range(self.runs):
            work = self.mode_dir(mode) / "work" / f"{i:04d}"
            work.mkdir(parents=True)
            for name, data in self.payload.items():
                (work / name).write_bytes(data)
            dirs.append(work)
        return dirs

    def check_out(self, out: Path) -> str | None:
        """None if ``out`` is right, else what is wrong with it."""
        try:
            data = out.read_bytes()
        except OSError as exc:
            return f"no output file: {exc.strerror}"
        if data != self.expected:
            return (f"out is {len(data)} bytes, not the {len(self.expected)}-byte "
                    "concatenation of a b c")
        return None

    def sshd_log_size(self) -> int:
        try:
            return self.sshd_log.stat().st_size
        except OSError:
            return 0

    def count_drops(self, since: int) -> int:
        """Connections sshd dropped past MaxStartups since log offset ``since``."""
        # sshd logs the count when it accepts the next connection after throttling
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*self.ssh, self.target, "true"], capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        try:
            with self.sshd_log.open("rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return 0
        return sum(int(m.group(1)) for m in DROPPED_RE.finditer(text))

    def holder_command(self, env: dict, *words: str) -> str:
        """Run ``remote-exec holder WORDS`` (e.g. ``stop``); its output's first line."""
        try:
            proc = subprocess.run([*self.remote_exec, "holder", *words], cwd=self.tmp, env=env,
                                  capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"? ({exc})"
        text = (proc.stdout + proc.stderr).strip()
        return " / ".join(line.strip() for line in text.splitlines()) if text else "?"

    def holder_cpu(self, env: dict) -> float | None:
        """CPU seconds the running holder of ``env``'s state directory used so far."""
        status = self.holder_command(env, "status")
        match = re.search(r"pid (\d+)", status)
        return process_cpu(int(match.group(1))) if match else None

    # -- legacy: N threads, released together ------------------------------------------
    def legacy_steps(self, rundir: str) -> list[list[str]]:
        return legacy_steps(self.ssh, self.rsh, self.target, rundir, INPUT_NAMES, COMMAND,
                            LOG_NAME)

    def legacy_one(self, work: Path, rundir: str, barrier: threading.Barrier,
                   outcome: Outcome) -> None:
        steps = self.legacy_steps(rundir)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            outcome.fail("not started (barrier broken)")
            return
        deadline = time.monotonic() + self.timeout
        for argv in steps:
            try:
                proc = subprocess.run(argv, cwd=work, env=self.legacy_env, capture_output=True,
                                      text=True, stdin=subprocess.DEVNULL,
                                      timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                outcome.fail(f"{argv[0]}: killed after the {self.timeout:g} s timeout")
                return
            except OSError as exc:
                outcome.fail(f"{argv[0]}: {exc}")
                return
            if proc.returncode != 0:
                outcome.fail(error_line(proc.stderr or proc.stdout))
                return
        wrong = self.check_out(work / "out")
        if wrong:
            outcome.fail(wrong)

    def legacy(self) -> Outcome:
        outcome = Outcome("legacy", self.runs)
        dirs = self.fresh_dirs("legacy")
        rundirs = [f"{self.root}/{uuid.uuid4()}" for _ in dirs]
        barrier = threading.Barrier(self.runs + 1)
        threads = [threading.Thread(target=self.legacy_one, args=(work, rundir, barrier, outcome),
                                    daemon=True)
                   for work, rundir in zip(dirs, rundirs)]
        for t in threads:
            t.start()
        log_at = self.sshd_log_size()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        outcome.wall = time.perf_counter() - start
        outcome.drops = self.count_drops(log_at)
        for rundir in rundirs:  # loopback: the remote root is local
            shutil.rmtree(rundir, ignore_errors=True)
        return outcome

    # -- remote-exec: N processes, started in a tight loop -----------------------------
    def remote_exec_mode(self, mode: str) -> Outcome:
        outcome = Outcome(mode, self.runs)
        base = self.mode_dir(mode)
        config, env = isolated_setup(base, self.site)
        env["REMOTE_EXEC_HOLDER"] = "0" if mode == "no-holder" else "1"
        dirs = self.fresh_dirs(mode)
        logs = base / "stderr"
        logs.mkdir()
        argv = [*self.remote_exec, "run", "--config", str(config), "--site", "bench",
                "--cmd", COMMAND, *INPUT_NAMES]
        procs: list[tuple[subprocess.Popen | None, Path, Path]] = []
        log_at = self.sshd_log_size()
        cpu_at = children_cpu()
        busy_at = machine_busy_cpu()
        try:
            start = time.perf_counter()
            for i, work in enumerate(dirs):
                err_path = logs / f"{i:04d}.err"
                with err_path.open("wb") as err:  # the child keeps its own descriptor
                    try:
                        proc: subprocess.Popen | None = subprocess.Popen(
                            argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err)
                    except OSError as exc:
                        outcome.fail(f"could not start: {exc}")
                        proc = None
                procs.append((proc, work, err_path))
            deadline = time.monotonic() + self.timeout
            killed: set[int] = set()
            for i, (proc, _, _) in enumerate(procs):
                if proc is None:
                    continue
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    killed.add(i)
            outcome.wall = time.perf_counter() - start
            busy_now = machine_busy_cpu()
            if busy_at is not None and busy_now is not None:
                outcome.busy_cpu = busy_now - busy_at
            outcome.client_cpu = children_cpu() - cpu_at
            if mode == "holder":
                outcome.holder_cpu = self.holder_cpu(env)
            outcome.drops = self.count_drops(log_at)
            for i, (proc, work, err_path) in enumerate(procs):
                if proc is None:
                    continue
                if i in killed:
                    outcome.fail(f"killed after the {self.timeout:g} s timeout")
                    continue
                if proc.returncode != 0:
                    stderr = err_path.read_text(errors="replace")
                    outcome.fail(f"exit {proc.returncode}: "
                                 + error_line(stderr, prefer="remote-exec: error:"))
                    continue
                wrong = self.check_out(work / "out")
                if wrong:
                    outcome.fail(wrong)
            if mode == "holder":
                outcome.note = self.holder_command(env, "status")
        finally:
            for proc, _, _ in procs:
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self.holder_command(env, "stop")
        return outcome


def report(outcomes: list[Outcome], runs: int) -> None:
    legacy = next((o for o in outcomes if o.mode == "legacy"), None)
    print()
    print(f"{'mode':<11} {'runs':>5} {'failures':>9} {'wall':>9} {'runs/s':>7} "
          f"{'sshd drops':>11} {'legacy/this':>12}")
    for o in outcomes:
        wall = f"{o.wall:8.2f}s" if o.wall is not None else f"{'-':>9}"
        rate = f"{(o.runs - o.failures) / o.wall:7.2f}" if o.wall else f"{'-':>7}"
        ratio = "-"
        if legacy is not None and legacy.wall and o.wall and o is not legacy:
            ratio = f"{legacy.wall / o.wall:.2f}x"
        print(f"{o.mode:<11} {o.runs:>5} {o.failures:>9} {wall} {rate} {o.drops:>11} "
              f"{ratio:>12}")
    print()
    print("CPU seconds during each remote-exec mode: its `remote-exec run` processes "
          "(all of them), the holder, and the whole machine (sshd, sftp-server, the remote "
          "shells, anything else running)")
    for o in outcomes:
        if o.client_cpu is None:
            continue
        cores = f"{o.busy_cpu / o.wall:.2f} cores busy" if o.busy_cpu and o.wall else "-"
        holder = f"{o.holder_cpu:.1f} s" if o.holder_cpu is not None else "-"
        busy = f"{o.busy_cpu:.1f} s" if o.busy_cpu is not None else "-"
        print(f"  {o.mode:<10} clients {o.client_cpu:6.1f} s ({o.client_cpu / o.runs:.3f} s "
              f"per run), holder {holder}, machine {busy} ({cores})")
    print()
    print(f"nproc: {nproc()}; {runs} runs per mode started together; sshd at its defaults "
          "(MaxStartups 10:30:100, MaxSessions 10)")
    if legacy is not None and legacy.failures:
        print(f"legacy/this: {legacy.failures} legacy run(s) stopped at their first failing "
              "step, so the legacy wall time covers less work than the others")
    for o in outcomes:
        if o.note:
            print(f"{o.mode}: holder status after the runs: {o.note}")
    for o in outcomes:
        if not o.errors:
            continue
        shown = o.errors.most_common(SHOWN_ERRORS)
        more = len(o.errors) - len(shown)
        print(f"\n{o.mode}: {o.failures} of {o.runs} run(s) failed"
              + (" (expected: sshd drops handshakes beyond MaxStartups)"
                 if o.mode == "legacy" else "") + ":")
        for message, count in shown:
            print(f"  {count:>4} x {message}")
        if more:
            print(f"       ... and {more} other distinct message(s)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=100,
                        help="simultaneous runs per mode (default 100)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes to run, in this order (default "
                             f"{','.join(MODES)})")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help=f"seconds a process (a legacy run as a whole) may take before it "
                             f"is killed and counted as failed (default {TIMEOUT:g})")
    add_remote_exec_option(parser)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes or len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes: a comma-separated list of distinct modes from {', '.join(MODES)}")
    return args


def main() -> int:
    args = parse_args()

    with tempfile.TemporaryDirectory(prefix="remote-exec-bench-") as tmpname:
        tmp = Path(tmpname)
        box = Sandbox(tmp / "sshd")
        outcomes: list[Outcome] = []
        try:
            site = box.up()
            remote_root = tmp / "remote-root"
            remote_root.mkdir(mode=0o700)
            site["root"] = str(remote_root)
            bench = Bench(tmp, site, args.runs, args.timeout, args.remote_exec, box.log_file)
            print(f"sshd 127.0.0.1:{site['port']}, remote root {site['root']}")
            print(f"{first_line(['ssh', '-V'])}; {first_line(['rsync', '--version'])}")
            print(f"remote-exec: {shlex.join(bench.remote_exec)}; python {sys.version.split()[0]}")
            print(f"{args.runs} simultaneous runs per mode; modes: {', '.join(args.modes)}",
                  flush=True)
            for mode in args.modes:
                outcome = bench.legacy() if mode == "legacy" else bench.remote_exec_mode(mode)
                outcomes.append(outcome)
                wall = f"{outcome.wall:.2f}s" if outcome.wall is not None else "-"
                print(f"  {mode:<10} {outcome.failures:>4} of {outcome.runs} failed, "
                      f"wall {wall}", flush=True)
        finally:
            box.down()
        report(outcomes, args.runs)
        failed = sum(o.failures for o in outcomes if o.mode != "legacy")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
