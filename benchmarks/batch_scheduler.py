#!/usr/bin/env python3
"""A run through a real Slurm, side by side with the step-by-step flow and a direct run.

Against one throwaway loopback sshd and one real one-node Slurm (``munged``,
``slurmctld``, ``slurmd`` from Debian's ``slurm-wlm``; ``tests/slurm_cluster.py``),
both started here and stopped at the end, three kinds are interleaved per repetition
(after one unrecorded warm-up), each on three 1 kB inputs, checking the fetched ``out``:

  a  legacy+sbatch   MInt's step-by-step flow (ssh mkdir, one rsync per input, ssh run,
                     rsync back), its run step submitting the command with
                     ``sbatch --wait --wrap 'cat a b c > out'`` in the run directory;
  b  direct          ``remote-exec run --backend direct --cmd 'cat a b c > out' a b c``;
  c  slurm           ``remote-exec run --backend slurm --cmd 'cat a b c > out' a b c``;
  d  slurmrest       the same through slurmrestd (JWT from ``scontrol token`` over the
                     site's SSH), when ``slurmrestd`` and ``slurm-wlm-jwt-plugin`` are
                     installed: submit, ask and cancel over HTTP, files over SSH.

Printed: median, min, max per kind; a/c (what remote-exec saves over doing the same by
hand), c/b (what going through the scheduler costs over a direct run) and d/c (the REST
path against sbatch over SSH). Needs root
and ``slurm-wlm`` + ``munge``; says why and exits 0 if they are missing.

Run:
    python benchmarks/batch_scheduler.py [--repeat N]    # default N = 5
"""

from __future__ import annotations

import shlex
import statistics
import subprocess
import sys
import tempfile
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
    nproc,
    parse_args,
    remote_exec_command,
    ssh_options,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from slurm_cluster import SlurmCluster  # noqa: E402

from remote_exec.sandbox import Sandbox  # noqa: E402

TIMEOUT = 180


def main() -> int:
    args = parse_args(__doc__ or "", 5, "recorded repetitions per kind")
    why = SlurmCluster.available()
    if why:
        print(f"skipped: {why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="re-bench-batch-") as name:
        tmp = Path(name)
        rest = SlurmCluster.rest_available() is None
        if not rest:
            print(f"(no REST path: {SlurmCluster.rest_available()})")
        cluster = SlurmCluster(tmp / "slurm", rest=rest)
        cluster.up()
        box = Sandbox(tmp / "sshd", extra_config=[f"SetEnv SLURM_CONF={cluster.conf}"])
        box.up()
        try:
            return Bench(tmp, box, args, cluster.rest_url if rest else "").main()
        finally:
            box.down()
            cluster.down()


class Bench:
    def __init__(self, tmp: Path, box: Sandbox, args: object, rest_url: str) -> None:
        self.tmp, self.repeat = tmp, int(args.repeat)
        root = tmp / "runs"
        root.mkdir()
        self.site = dict(box.site_definition(), root=str(root))
        self.rest = bool(rest_url)
        if rest_url:
            self.site["slurmrest"] = {"url": rest_url,
                                      "token_command": ["scontrol", "token", "lifespan=3600"]}
        self.config, self.env = isolated_setup(tmp, self.site)
        self.remote_exec = remote_exec_command(args.remote_exec)
        self.ssh = ssh_options(self.site)
        self.rsh = shlex.join(self.ssh)
        self.target = f"{self.site['user']}@{self.site['host']}"
        self.expected = b"".join(bytes([65 + i]) * INPUT_SIZE for i in range(len(INPUT_NAMES)))
        self.count = 0
        self.failures: list[str] = []

    def work(self) -> Path:
        self.count += 1
        work = self.tmp / "work" / str(self.count)
        work.mkdir(parents=True)
        for i, name in enumerate(INPUT_NAMES):
            (work / name).write_bytes(bytes([65 + i]) * INPUT_SIZE)
        return work

    def timed(self, kind: str, steps: list[list[str]], work: Path) -> float | None:
        start = time.perf_counter()
        for argv in steps:
            proc = subprocess.run(argv, cwd=work, env=self.env, capture_output=True, text=True,
                                  timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                self.failures.append(f"{kind}: {shlex.join(argv)}: {proc.stderr[-500:]}")
                return None
        elapsed = time.perf_counter() - start
        out = work / "out"
        if not out.is_file() or out.read_bytes() != self.expected:
            self.failures.append(f"{kind}: wrong or missing out")
            return None
        return elapsed

    def legacy(self) -> float | None:
        rundir = f"{self.site['root']}/{uuid.uuid4()}"
        command = f"sbatch --wait -Q -o /dev/null --wrap {shlex.quote(COMMAND)}"
        steps = legacy_steps(self.ssh, self.rsh, self.target, rundir, INPUT_NAMES, command,
                             LOG_NAME)
        return self.timed("a legacy+sbatch", steps, self.work())

    def remote_exec_run(self, backend: str) -> float | None:
        argv = [*self.remote_exec, "run", "--config", str(self.config), "--site", "bench",
                "--backend", backend, "--cmd", COMMAND, *INPUT_NAMES]
        return self.timed(backend, [argv], self.work())

    def main(self) -> int:
        kinds = {"a legacy+sbatch": self.legacy,
                 "b direct": lambda: self.remote_exec_run("direct"),
                 "c slurm": lambda: self.remote_exec_run("slurm")}
        if self.rest:
            kinds["d slurmrest"] = lambda: self.remote_exec_run("slurmrest")
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for rep in range(-1, self.repeat):
            for kind, fn in kinds.items():
                t = fn()
                if t is not None and rep >= 0:
                    times[kind].append(t)
        subprocess.run([*self.remote_exec, "holder", "stop"], env=self.env,
                       capture_output=True, check=False)
        print(f"batch scheduler benchmark: {self.repeat} repetitions, nproc {nproc()}")
        print(f"{'kind':18} {'median':>8} {'min':>8} {'max':>8}  (seconds)")
        med = {}
        for kind, values in times.items():
            if values:
                med[kind] = statistics.median(values)
                print(f"{kind:18} {med[kind]:8.3f} {min(values):8.3f} {max(values):8.3f}")
        if len(med) >= 3:
            speedup = med["a legacy+sbatch"] / med["c slurm"]
            print(f"a/c legacy+sbatch / remote-exec slurm: {speedup:.2f}x")
            print(f"c/b remote-exec slurm / direct:        {med['c slurm'] / med['b direct']:.2f}x")
        if "d slurmrest" in med and "c slurm" in med:
            print(f"d/c slurmrest / slurm (sbatch over SSH): "
                  f"{med['d slurmrest'] / med['c slurm']:.2f}x")
        for failure in self.failures:
            print(f"FAILED {failure}")
        return 1 if self.failures else 0


if __name__ == "__main__":
    sys.exit(main())
