#!/usr/bin/env python3
"""Moving data over one SSH connection: SFTP vs tunnelled rsync vs rsync over a ControlMaster.

Purpose: pick remote-exec's ``rsync_threshold`` (the payload size from which
``transfer: auto`` uses rsync instead of SFTP), and see whether rsync tunnelled
through remote-exec's own asyncssh connection keeps up with plain rsync over an
OpenSSH ControlMaster connection.

Payloads (random bytes, generated once): 3 x 1 KiB, 1 x 1 MiB, 1 x 16 MiB, 1 x 128 MiB.
Each payload makes a round trip: staged into a fresh remote directory and the
directory pulled back into a fresh local one. Methods, against one throwaway
loopback sshd (``remote_exec.sandbox.Sandbox`` in a temporary directory, stopped
at the end):

  re-sftp    ``remote-exec run --site bench --cmd true --transfer sftp --json --into OUT FILES``
  re-rsync   the same with ``--transfer rsync`` (rsync tunnelled through remote-exec's
             asyncssh connection)
  cm-rsync   plain rsync over an OpenSSH ControlMaster: ``ssh -M -N -f -o ControlPath=SOCK
             -o ControlPersist=60 ...`` is started once (not timed), then per run
             ``rsync -a -L -e "ssh -o ControlPath=SOCK ..." FILES host:DIR/`` and
             ``rsync -a -e "ssh -o ControlPath=SOCK ..." host:DIR/ OUT/`` (the remote
             directory is removed afterwards, outside the timing); the master is
             stopped with ``ssh -O exit``.

Two numbers per run:
  whole     wall time of the whole process(es) (``time.perf_counter()`` around
            ``subprocess.run``). For remote-exec this includes Python start-up, the SSH
            handshake (unless kept warm, below), running ``true`` and the remote
            cleanup; for cm-rsync it is the
            push plus the pull over the already-open master.
  transfer  data movement over an already-open connection: for remote-exec, from its
            ``created`` to its ``staged`` event plus from ``finished`` to ``fetched``
            (``--json`` event times); for cm-rsync, the same as ``whole``.
If remote-exec hands runs to its per-user connection holder (warm SSH connections
kept between runs), ``whole`` for remote-exec runs over a warm connection too, like
cm-rsync; ``REMOTE_EXEC_HOLDER=0`` makes every run connect by itself. The holder is
stopped at the end (``remote-exec holder stop``).
The sftp/rsync crossover is judged on ``whole`` (what a user of remote-exec waits
for); tunnelled vs ControlMaster rsync is judged on ``transfer``.

Every method runs 3 times per size (``--repeat``), interleaved (rep 1: every size
x every method, then rep 2, ...), after an unrecorded warm-up on the smallest
payload; medians are printed. Fetched files are compared with the originals.
Exit status 1 if any run failed.

The ``remote-exec`` timed is the console script beside the running Python (so a
pyenv/asdf shim's start-up is not counted); ``--remote-exec CMD`` times another one.

Run:
    python benchmarks/rsync_transport.py [--repeat N]     # default N = 3
    python benchmarks/rsync_transport.py --remote-exec "/path/to/venv/bin/remote-exec"
"""

from __future__ import annotations

import filecmp
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import (
    isolated_setup,
    nproc,
    parse_args,
    remote_exec_command,
    run_events,
    ssh_options,
)

from remote_exec.config import Site
from remote_exec.sandbox import Sandbox

KiB = 1024
MiB = 1024 * KiB
#: (label, [(file name, size)])
PAYLOADS = [
    ("3 x 1 KiB", [("a", KiB), ("b", KiB), ("c", KiB)]),
    ("1 x 1 MiB", [("one.bin", MiB)]),
    ("1 x 16 MiB", [("sixteen.bin", 16 * MiB)]),
    ("1 x 128 MiB", [("big.bin", 128 * MiB)]),
]
METHODS = ("re-sftp", "re-rsync", "cm-rsync")
DEFAULT_THRESHOLD = Site.rsync_threshold  # the default, for the verdict
TIMEOUT = 300






def human(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = min(left, 4 * MiB)
            f.write(os.urandom(chunk))
            left -= chunk


class Failed(Exception):
    pass


def summarize(stderr: str) -> str:
    """The gist of a failed process's stderr: remote-exec's error message (from its --json
    ``error`` event) cut to its first line and any exception lines, else the last lines."""
    text = stderr.strip()
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "error":
            text = str(record.get("message", line))
            break
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "(no stderr)"
    keep = [lines[0]] + [ln for ln in lines[1:]
                         if ln.split(":", 1)[0].endswith(("Error", "Exception"))
                         or ln.startswith("rsync error")]
    if len(keep) == 1:
        keep += lines[-3:]
    return " | ".join(dict.fromkeys(keep))[:700]


class Bench:
    def __init__(self, tmp: Path, site: dict, remote_exec: str | None = None) -> None:
        self.tmp = tmp
        self.site = site
        self.root = site["root"]
        self.target = f"{site['user']}@{site['host']}"
        self.ssh = ssh_options(site)
        self.sock = str(tmp / "cm.sock")
        # ControlMaster=no: a client of the master, never a master itself.
        self.cm_ssh = [*self.ssh, "-o", f"ControlPath={self.sock}", "-o", "ControlMaster=no"]
        self.cm_rsh = " ".join(shlex.quote(w) for w in self.cm_ssh)
        self.config, self.env = isolated_setup(tmp, site)
        self.remote_exec = remote_exec_command(remote_exec)
        self.payload_dirs: dict[str, Path] = {}
        self.counter = 0
        self.failures: list[tuple[str, str, str]] = []  # (method, payload, what)
        self.master_starts = 0

    # -- setup -------------------------------------------------------------------------
    def make_payloads(self) -> None:
        for i, (label, files) in enumerate(PAYLOADS):
            d = self.tmp / "payloads" / str(i)
            d.mkdir(parents=True)
            for name, size in files:
                write_random(d / name, size)
            self.payload_dirs[label] = d

    def run(self, argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT, stdin=subprocess.DEVNULL)

    def stop_holder(self) -> None:
        """Stop remote-exec's connection holder for our state directory, if it has one."""
        try:
            self.run([*self.remote_exec, "holder", "stop"], cwd=self.tmp)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def master_alive(self) -> bool:
        proc = self.run([*self.ssh, "-o", f"ControlPath={self.sock}", "-O", "check", self.target])
        return proc.returncode == 0

    def start_master(self) -> None:
        log = self.tmp / "cm-master.log"
        with open(log, "ab") as err:
            # -f: ssh forks after authentication; its output must not be a pipe we wait on.
            proc = subprocess.run(
                [*self.ssh, "-M", "-N", "-f", "-o", f"ControlPath={self.sock}",
                 "-o", "ControlPersist=60", self.target],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env=self.env, timeout=60,
            )
        if proc.returncode != 0 or not self.master_alive():
            raise Failed(f"could not start the ControlMaster: {log.read_text().strip()}")
        self.master_starts += 1

    def stop_master(self) -> None:
        if os.path.exists(self.sock):
            self.run([*self.ssh, "-o", f"ControlPath={self.sock}", "-O", "exit", self.target])

    def fresh_out(self) -> Path:
        self.counter += 1
        out = self.tmp / "out" / f"{self.counter:03d}"
        out.mkdir(parents=True)
        return out

    def verify(self, label: str, out: Path) -> None:
        src = self.payload_dirs[label]
        for name, size in dict(PAYLOADS)[label]:
            got = out / name
            if not got.is_file() or got.stat().st_size != size:
                raise Failed(f"{got} missing or not {size} bytes after the round trip")
            if not filecmp.cmp(src / name, got, shallow=False):
                raise Failed(f"{got} differs from {src / name} after the round trip")

    # -- methods: each returns (whole, transfer) seconds -------------------------------
    def remote_exec_run(self, label: str, method: str) -> tuple[float, float]:
        out = self.fresh_out()
        names = [n for n, _ in dict(PAYLOADS)[label]]
        argv = [*self.remote_exec, "run", "--config", str(self.config), "--site", "bench",
                # an input the entrypoint leaves unchanged does not travel back: it moves
                # them (a rename, no copy) so that the same bytes come back as results
                "--json", "--cmd", "mkdir r && " + shlex.join(["mv", *names, "r/"]),
                "--transfer", method, "--into", str(out), *names]
        try:
            start = time.perf_counter()
            proc = self.run(argv, cwd=self.payload_dirs[label])
            whole = time.perf_counter() - start
            if proc.returncode != 0:
                raise Failed(f"{shlex.join(argv)} exited {proc.returncode}: "
                             f"{summarize(proc.stderr)}")
            try:
                events = run_events(proc.stderr, argv)
            except ValueError as exc:
                raise Failed(str(exc)) from None
            for step in ("staged", "fetched"):
                if events[step].get("method") != method:
                    raise Failed(f"{shlex.join(argv)}: {step} by {events[step].get('method')!r}, "
                                 f"not {method!r}")
            transfer = ((events["staged"]["elapsed"] - events["created"]["elapsed"])
                        + (events["fetched"]["elapsed"] - events["finished"]["elapsed"]))
            self.verify(label, out / "r")
            return whole, transfer
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def cm_rsync(self, label: str) -> tuple[float, float]:
        if not self.master_alive():
            self.start_master()  # only if ControlPersist let it go; counted and reported
        out = self.fresh_out()
        rundir = f"{self.root}/{uuid.uuid4()}"
        names = [n for n, _ in dict(PAYLOADS)[label]]
        push = ["rsync", "-a", "-L", "-e", self.cm_rsh, *names, f"{self.target}:{rundir}/"]
        pull = ["rsync", "-a", "-e", self.cm_rsh, f"{self.target}:{rundir}/", f"{out}/"]
        try:
            start = time.perf_counter()
            for argv in (push, pull):
                proc = self.run(argv, cwd=self.payload_dirs[label])
                if proc.returncode != 0:
                    raise Failed(f"{shlex.join(argv)} exited {proc.returncode}: "
                                 f"{summarize(proc.stderr)}")
            whole = time.perf_counter() - start
            self.verify(label, out)
            return whole, whole
        finally:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(rundir, ignore_errors=True)  # loopback: the remote root is local

    def one(self, label: str, method: str) -> tuple[float, float] | None:
        try:
            if method == "cm-rsync":
                return self.cm_rsync(label)
            return self.remote_exec_run(label, method.removeprefix("re-"))
        except (Failed, subprocess.TimeoutExpired) as exc:
            self.failures.append((method, label, str(exc)))
            return None

    # -- driver ------------------------------------------------------------------------
    def main(self, repeat: int) -> dict[tuple[str, str], list[tuple[float, float]]]:
        results: dict[tuple[str, str], list[tuple[float, float]]] = {
            (label, m): [] for label, _ in PAYLOADS for m in METHODS
        }
        self.start_master()
        warm = PAYLOADS[0][0]
        print(f"  warm-up ({warm}): " + "  ".join(
            f"{m}={r[0]:.3f}s" if (r := self.one(warm, m)) else f"{m}=FAIL" for m in METHODS),
            flush=True)
        for rep in range(repeat):
            for label, _ in PAYLOADS:
                line = []
                for m in METHODS:
                    r = self.one(label, m)
                    if r is not None:
                        results[(label, m)].append(r)
                        line.append(f"{m}={r[0]:.3f}s/{r[1]:.3f}s")
                    else:
                        line.append(f"{m}=FAIL")
                print(f"  rep {rep + 1}/{repeat} {label:<12} " + "  ".join(line), flush=True)
        return results


def report(results: dict[tuple[str, str], list[tuple[float, float]]], bench: Bench,
           repeat: int) -> None:
    def med(label: str, m: str, i: int) -> float | None:
        values = [r[i] for r in results[(label, m)]]
        return statistics.median(values) if values else None

    def cell(label: str, m: str, i: int) -> str:
        v, n = med(label, m, i), len(results[(label, m)])
        if v is None:
            return "FAILED"
        return f"{v:.3f}s" + ("" if n == repeat else f"({n}/{repeat})")

    print()
    print("medians, seconds: whole = whole process(es); xfer = stage + fetch over an open "
          "connection; (k/n) = only k of n runs succeeded")
    head = "".join(f" {m + ' whole':>15} {m + ' xfer':>14}" for m in METHODS)
    print(f"{'payload':<12}{head}")
    for label, _ in PAYLOADS:
        row = "".join(f" {cell(label, m, 0):>15} {cell(label, m, 1):>14}" for m in METHODS)
        print(f"{label:<12}{row}")
    print()

    # Crossover between sftp and rsync inside remote-exec, on whole-process medians.
    sizes = {label: sum(s for _, s in files) for label, files in PAYLOADS}
    winners = []
    for label, _ in PAYLOADS:
        s, r = med(label, "re-sftp", 0), med(label, "re-rsync", 0)
        if s is not None and r is not None:
            winners.append((label, "rsync" if r < s else "sftp", s, r))
    detail = ", ".join(f"{label}: {w} ({s:.2f}s sftp vs {r:.2f}s rsync)"
                       for label, w, s, r in winners)
    first_rsync = next((i for i, w in enumerate(winners) if w[1] == "rsync"), None)
    if not winners:
        crossover = "no complete pair of measurements"
    elif first_rsync is None:
        crossover = (f"sftp is faster at every size up to {winners[-1][0]}; the crossover is "
                     f"above {human(sizes[winners[-1][0]])}")
    elif first_rsync == 0:
        crossover = "rsync is faster at every size measured, even the smallest"
    else:
        below, above = winners[first_rsync - 1][0], winners[first_rsync][0]
        monotone = all(w[1] == "rsync" for w in winners[first_rsync:])
        crossover = (f"sftp wins up to {below}, rsync from {above}: crossover between "
                     f"{human(sizes[below])} and {human(sizes[above])}"
                     + ("" if monotone else " (not monotone: noisy, rerun with more --repeat)"))
    lost = [label for label, _ in PAYLOADS
            if any(len(results[(label, m)]) < repeat for m in ("re-sftp", "re-rsync"))]
    if lost:
        crossover += f" [INCOMPLETE: remote-exec runs failed at {', '.join(lost)}]"
    print(f"verdict, sftp vs rsync inside remote-exec: {crossover} "
          f"(current default rsync_threshold {human(DEFAULT_THRESHOLD)}) -- {detail}")

    # Tunnelled rsync vs ControlMaster rsync, on transfer medians.
    parts = []
    faster = {"tunnel": 0, "cm": 0}
    for label, _ in PAYLOADS:
        t, c = med(label, "re-rsync", 1), med(label, "cm-rsync", 1)
        if t is None or c is None:
            continue
        key = "tunnel" if t < c else "cm"
        faster[key] += 1
        parts.append(f"{label}: {t:.2f}s vs {c:.2f}s")
    if parts:
        if faster["tunnel"] and faster["cm"]:
            who = (f"neither is faster throughout (tunnel faster at {faster['tunnel']} size(s), "
                   f"ControlMaster at {faster['cm']})")
        elif faster["tunnel"]:
            who = "rsync tunnelled through remote-exec's connection is faster at every size"
        else:
            who = "rsync over the OpenSSH ControlMaster is faster at every size"
        lost = [label for label, _ in PAYLOADS
                if any(len(results[(label, m)]) < repeat for m in ("re-rsync", "cm-rsync"))]
        if lost:
            who += f" [INCOMPLETE: runs failed at {', '.join(lost)}]"
        print(f"verdict, tunnelled vs ControlMaster rsync (transfer): {who} -- "
              f"tunnel vs ControlMaster: {'; '.join(parts)}")
    print(f"ControlMaster started {bench.master_starts} time(s); nproc {nproc()}")
    if bench.failures:
        print(f"\n{len(bench.failures)} run(s) FAILED (first failure of each kind shown):")
        groups: dict[tuple[str, str], list[str]] = {}
        for method, label, what in bench.failures:
            groups.setdefault((method, label), []).append(what)
        for (method, label), whats in groups.items():
            print(f"  - {method} {label}, {len(whats)} time(s): {whats[0]}")


def main() -> int:
    args = parse_args(__doc__, 3, "repetitions per size and method (default 3)")

    with tempfile.TemporaryDirectory(prefix="re-rsync-bench-") as tmpname:
        tmp = Path(tmpname)
        box = Sandbox(tmp / "sshd")
        bench: Bench | None = None
        try:
            site = box.up()
            bench = Bench(tmp, site, args.remote_exec)
            print(f"sshd 127.0.0.1:{site['port']}, remote root {site['root']}")
            print(f"remote-exec: {shlex.join(bench.remote_exec)}; python {sys.version.split()[0]}"
                  + "".join(f"; {k}={os.environ[k]}" for k in ("REMOTE_EXEC_HOLDER",)
                            if k in os.environ))
            print("generating payloads ...", flush=True)
            bench.make_payloads()
            print(f"{args.repeat} repetition(s) of {len(PAYLOADS)} sizes x {len(METHODS)} methods "
                  "(each run: whole/transfer seconds):", flush=True)
            results = bench.main(args.repeat)
        except Failed as exc:
            print(f"benchmark aborted: {exc}", file=sys.stderr)
            return 1
        finally:
            if bench is not None:
                bench.stop_master()
                bench.stop_holder()
            box.down()
        report(results, bench, args.repeat)
        return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
