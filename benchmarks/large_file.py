#!/usr/bin/env python3
"""One large input in and one as large out, side by side: MInt's step-by-step flow
and ``remote-exec run`` with the site's content cache.

The workload: one file of random bytes (``--size``, default 1G; sizes as in the
configuration, e.g. ``200M``), and the entrypoint ``sha256sum big.bin > sum; cp
big.bin out.bin``: ``sum`` comes back and is checked against the local digest, and
``out.bin`` (as large as the input) comes back and its size is checked.

Against one throwaway loopback sshd (``remote_exec.sandbox.Sandbox``, stock
configuration), in this order:

  flow 1, flow 2   ``ssh mkdir``, ``rsync -a -L big.bin``, ``ssh 'cd DIR; sha256sum
                   big.bin > sum; cp big.bin out.bin'``, ``rsync -a`` of the directory
                   back (big.bin unchanged: its quick check leaves it)
                   (``common.legacy_steps``), each into a fresh remote directory (so
                   rsync has nothing to reuse; removed outside the timing);
  re 1 (cold)      ``remote-exec run --json`` with the site's default cache: the file
                   is sent, hashed locally (and remembered) and inserted into the cache;
  re 2 (cached)    the same again: the site copies the file from its cache and checks
                   it, nothing is sent;
  re 3 (no cache)  the same with ``--no-cache``: sent again, for comparison;
  re 4 (rsync)     cached again, with ``--transfer rsync``: the copy placed from the
                   cache has the input's size and time, so rsync's quick check leaves it
                   (the staging time shows whether it did).

With ``--restricted`` the same sshd serves a restricted site instead: a key of its own
locked to the remote-exec agent (``remote-exec site install --apply``), the generic
template approved, and a site program of the same command. MInt's flow needs
an open shell, so its rows are left out; the runs are re 1 (cold), re 2 (cached: the
agent copies the file from its cache and checks it, rsync's quick check leaves the
copy) and re 3 (``--no-cache``).

One unrecorded warm-up run (a tiny file) starts remote-exec's connection holder
first; the holder is stopped at the end. Printed per run: wall seconds, MB/s (input
plus output size / wall time), each step's seconds and MB/s (the flow's push, run and
pull; remote-exec's staging, run and fetch, from its ``--json`` events), for
remote-exec the bytes sent and taken from the cache (its
``staged`` event) as a % of the input and the staging time, and the peak memory
(VmHWM, from ``wait4``'s ru_maxrss) of the client process, and the bytes that went
over the loopback interface during the run (measured, in /proc/net/dev: all of the
run's traffic, both ways), and what of it was not ``out.bin`` coming back, as a % of
the input (the input's bytes moved, plus the protocols' own); at the end the holder's
peak memory (it runs the engine: hashing, SFTP, rsync's relay).

Exit status 1 if any run failed or a ``sum`` was wrong.

Run:
    python benchmarks/large_file.py [--size 1G] [--restricted]
    python benchmarks/large_file.py --size 200M \
        --remote-exec "env PYTHONPATH=$PWD python3 -m remote_exec"
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml
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

from remote_exec.sandbox import Sandbox
from remote_exec.sizes import parse_size, size_text

COMMAND = "sha256sum big.bin > sum; cp big.bin out.bin"
CHUNK = 16 * 1024 * 1024
TIMEOUT = 1800


def popen_wait4(argv: list[str], cwd: Path, env: dict) -> tuple[float, int, int, str, str]:
    """Run ``argv`` in ``cwd``, reaping it with ``wait4``: wall seconds, its peak RSS in
    KiB (ru_maxrss, the kernel's VmHWM at exit), exit code, stdout, stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        pid = _spawn(argv, cwd, env, out.fileno(), err.fileno())
        _pid, status, usage = os.wait4(pid, 0)
        wall = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return (wall, usage.ru_maxrss, os.waitstatus_to_exitcode(status),
                out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))


def _spawn(argv: list[str], cwd: Path, env: dict, out: int, err: int) -> int:
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.chdir(cwd)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid


def loopback_bytes() -> int:
    """Bytes received on the loopback interface so far (-1 if unknown): what a run
    moved through the loopback sshd, measured rather than reported by remote-exec
    (anything else using loopback meanwhile counts too)."""
    try:
        text = Path("/proc/net/dev").read_text()
    except OSError:
        return -1
    found = re.search(r"^\s*lo:\s*(\d+)", text, re.M)
    return int(found.group(1)) if found else -1


def vm_hwm(pid: int) -> int:
    """A live process's VmHWM in KiB (-1 if unknown)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return -1
    found = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) if found else -1


class Bench:
    def __init__(self, tmp: Path, site: dict, size: int, remote_exec: str | None,
                 restricted: bool = False) -> None:
        self.tmp, self.site, self.size = tmp, site, size
        self.root = site["root"]
        self.target = f"{site['user']}@{site['host']}"
        self.ssh = ssh_options(site)
        self.rsh = " ".join(shlex.quote(w) for w in self.ssh)
        self.config, self.env = isolated_setup(tmp, site)
        self.remote_exec = remote_exec_command(remote_exec)
        self.restricted = restricted
        #: what a run of the workload adds to ``remote-exec run``
        self.workload = ["--cmd", COMMAND]
        if restricted:
            self.workload = self._restrict()
        self.work = tmp / "work"
        self.work.mkdir()
        self.digest = self._payload(self.work / "big.bin")
        self.failures: list[str] = []
        self.rows: list[tuple[str, float, str]] = []

    def _restrict(self) -> list[str]:
        """Make site ``bench`` restricted: a key of its own, locked to the agent by
        ``remote-exec site install --apply``; the workload as an approved site program
        run by the generic template (the words for ``remote-exec run``)."""
        key = self.tmp / "locked_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "locked key",
                        "-f", str(key)], check=True, timeout=60)
        program = self.tmp / "site-scripts" / "sum.sh"
        program.parent.mkdir()
        program.write_text(f"#!/bin/sh\n{COMMAND}\n")
        program.chmod(0o755)
        config = yaml.safe_load(self.config.read_text())
        config["sites"]["bench"].update(identity_file=str(key), restricted=True,
                                        agent_dir=str(self.tmp / "agent"),
                                        templates=["generic"])
        config["sites"]["bench"].pop("entrypoint", None)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = subprocess.run(
            [*self.remote_exec, "site", "install", "bench", "--apply", "--config",
             str(self.config), "--admin-identity", self.site["identity_file"],
             "--authorized-keys", str(Sandbox(self.tmp / "sshd").authorized_keys)],
            env=self.env, capture_output=True, text=True, timeout=TIMEOUT, cwd=self.tmp)
        if proc.returncode != 0:
            raise SystemExit(f"site install failed: {proc.stdout}{proc.stderr}")
        return ["--template", "generic", "-p", f"program={program}"]

    def _payload(self, path: Path) -> str:
        digest = hashlib.sha256()
        left = self.size
        with open(path, "wb") as f:
            while left:
                chunk = os.urandom(min(CHUNK, left))
                digest.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        return digest.hexdigest()

    def check_sum(self, kind: str, where: Path) -> None:
        """The run's ``sum`` is the input's digest and its ``out.bin`` came back whole
        (then removed: the disk holds one at a time)."""
        try:
            got = (where / "sum").read_text().split()[0]
        except (OSError, IndexError):
            got = "(none)"
        if got != self.digest:
            self.failures.append(f"{kind}: sum {got} != {self.digest}")
        out = where / "out.bin"
        size = out.stat().st_size if out.exists() else -1
        if size != self.size:
            self.failures.append(f"{kind}: out.bin has {size} bytes, not {self.size}")
        out.unlink(missing_ok=True)

    def rate(self, what: str, seconds: float, size: int | None = None) -> str:
        """``what 1.23 s (456.7 MB/s)``; no rate for a step that moves no bytes."""
        if size is None or seconds <= 0:
            return f"{what} {seconds:.2f} s"
        return f"{what} {seconds:.2f} s ({size / 1e6 / seconds:.0f} MB/s)"

    def flow(self, kind: str) -> None:
        work = self.tmp / f"flow-{kind}"
        work.mkdir()
        os.link(self.work / "big.bin", work / "big.bin")  # (same times: the pull skips it)
        rundir = f"{self.root}/flow-{uuid.uuid4()}"
        start = time.monotonic()
        times = []
        for step in legacy_steps(self.ssh, self.rsh, self.target, rundir, ("big.bin",),
                                 COMMAND, LOG_NAME):
            step = [("-a" if w == "-av" else w) for w in step]
            began = time.monotonic()
            proc = subprocess.run(step, cwd=work, capture_output=True, text=True,
                                  timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            times.append(time.monotonic() - began)
            if proc.returncode != 0:
                self.failures.append(f"{kind}: {shlex.join(step)} exit {proc.returncode}: "
                                     f"{proc.stderr.strip()[-400:]}")
                break
        wall = time.monotonic() - start
        subprocess.run([*self.ssh, self.target, f"rm -rf {rundir}"], capture_output=True,
                       timeout=TIMEOUT)
        self.check_sum(kind, work)
        if len(times) == 4:  # mkdir, push, run, pull
            steps = (f"{self.rate('mkdir', times[0])}, {self.rate('push', times[1], self.size)}"
                     f", {self.rate('run', times[2])}, {self.rate('pull', times[3], self.size)}")
        else:
            steps = "(failed)"
        self.rows.append((kind, wall, f"{steps}; client: ssh/rsync processes"))

    def remote_exec_run(self, kind: str, *extra: str, record: bool = True) -> None:
        into = self.tmp / f"into-{kind.replace(' ', '-')}"
        argv = [*self.remote_exec, "run", "--config", str(self.config), "--site", "bench",
                "--json", "--into", str(into), *extra, *self.workload, "big.bin"]
        before = loopback_bytes()
        wall, peak, code, _out, err = popen_wait4(argv, self.work, self.env)
        moved = loopback_bytes() - before if before >= 0 else -1
        if code != 0:
            self.failures.append(f"{kind}: exit {code}: {err.strip()[-800:]}")
            return
        if not record:
            return
        events = run_events(err, argv)
        staged = events["staged"]
        sent, cached = staged["sent_bytes"], staged["cached_bytes"]
        self.check_sum(kind, into)
        at = {name: event["elapsed"] for name, event in events.items()}
        self.rows.append((kind, wall, (
            f"{self.rate('stage', at['staged'] - at['created'], self.size)} by "
            f"{staged['method']}, {self.rate('run', at['finished'] - at['staged'])}, "
            f"{self.rate('fetch', at['fetched'] - at['finished'], self.size)}; "
            f"sent {size_text(sent)} ({100 * sent / self.size:.1f} %), from the cache "
            f"{size_text(cached)} ({100 * cached / self.size:.1f} %); "
            f"loopback traffic {self.traffic(moved)}; "
            f"client VmHWM {peak / 1024:.0f} MiB, {self.holder_peak()} so far")))

    def traffic(self, moved: int) -> str:
        """The loopback bytes of a run, and those beyond out.bin's as a % of the input."""
        if moved < 0:
            return "?"
        beyond = 100 * (moved - self.size) / self.size
        return f"{size_text(moved)} (beyond out.bin: {beyond:.1f} % of the input)"

    def holder_peak(self) -> str:
        proc = subprocess.run([*self.remote_exec, "holder", "status"], env=self.env,
                              capture_output=True, text=True, timeout=60, cwd=self.tmp)
        found = re.match(r"pid (\d+)", proc.stdout)
        if not found:
            return "no holder"
        return f"holder (pid {found.group(1)}) VmHWM {vm_hwm(int(found.group(1))) / 1024:.0f} MiB"

    def stop_holder(self) -> None:
        subprocess.run([*self.remote_exec, "holder", "stop"], env=self.env,
                       capture_output=True, timeout=60, cwd=self.tmp)

    def main(self) -> None:
        warm = self.tmp / "warm"
        warm.mkdir()
        (warm / "big.bin").write_text("warm-up\n")
        wall, _peak, code, _out, err = popen_wait4(
            [*self.remote_exec, "run", "--config", str(self.config), "--site", "bench",
             *self.workload, "big.bin"], warm, self.env)
        if code != 0:
            self.failures.append(f"warm-up: exit {code}: {err.strip()[-800:]}")
        if self.restricted:
            self.remote_exec_run("re 1 (cold)")
            self.remote_exec_run("re 2 (cached)")
            self.remote_exec_run("re 3 (--no-cache)", "--no-cache")
            return
        self.flow("flow 1")
        self.flow("flow 2")
        self.remote_exec_run("re 1 (cold)")
        self.remote_exec_run("re 2 (cached)")
        self.remote_exec_run("re 3 (--no-cache)", "--no-cache")
        self.remote_exec_run("re 4 (cached, rsync)", "--transfer", "rsync")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="1G", help="the input's size (default 1G)")
    parser.add_argument("--restricted", action="store_true",
                        help="remote-exec's runs on a restricted site (the key locked to "
                        "the agent); MInt's flow is left out")
    add_remote_exec_option(parser)
    args = parser.parse_args()
    size = parse_size(args.size, "--size")
    if size < 1:
        parser.error("--size must be at least 1 byte")
    with loopback_sshd() as (tmp, site):
        bench: Bench | None = None
        try:
            bench = Bench(tmp, site, size, args.remote_exec, args.restricted)
            print(f"remote-exec: {shlex.join(bench.remote_exec)}; python "
                  f"{sys.version.split()[0]}; input {size_text(size)}"
                  f"{'; a restricted site' if args.restricted else ''}", flush=True)
            bench.main()
            holder = bench.holder_peak()
        finally:
            if bench is not None:
                bench.stop_holder()
    print(f"\n{'run':20} {'seconds':>8} {'MB/s':>8}")
    for kind, wall, note in bench.rows:
        print(f"{kind:20} {wall:8.2f} {2 * size / 1e6 / wall:8.1f}  {note}")
    print(holder)
    for failure in bench.failures:
        print(f"FAILED: {failure}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    if shutil.which("rsync") is None:
        sys.exit("rsync is needed")
    sys.exit(main())
