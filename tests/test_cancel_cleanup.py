"""Nothing lost, nothing planted, nothing run twice (issue 13, findings 5 and 6).

5. A cancel stops everything local: SIGTERM during a large rsync stage or fetch leaves no
   local rsync or bridge of the run, the remote side stops writing, and the only local
   partial directory left is one that ``resume`` will use, named in the message.
6. ``cleanup`` never removes a run directory whose results were never fetched (unless
   ``--force``, which says what it destroys), and ``resume`` fetches the results of a
   run that failed or was cancelled after its entrypoint finished, without running the
   entrypoint again.

The real CLI against the real loopback sshd, with the harness of ``test_resilience``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers_badinput import mounted_tmpfs, remount
from test_resilience import MODES, Env, live, proc_table, wait_until

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="the tests find processes in /proc")

#: big enough that rsync through the tunnel takes several seconds on loopback
BIG_MIB = 256
#: the local rsync's pace during a stage or fetch test (MiB/s): a transfer of BIG_MIB lasts
#: about 8 s, so a stop started by a new process (`remote-exec cancel`) or a 3 s timeout
#: lands while it is under way, on a fast machine as on a loaded one
FETCH_PACE_MIB = 32


@pytest.fixture
def env(cli, tmp_path: Path, workdir: Path, remote_root: Path) -> Iterator[Env]:
    """``test_resilience``'s harness; what is left running is stopped at the end."""
    harness = Env(cli, tmp_path, workdir, remote_root)
    try:
        yield harness
    finally:
        harness.close()


def pace_local_rsync(env: Env, tmp_path: Path, mib_per_s: int) -> None:
    """Put an ``rsync`` first on the PATH of the runs (and of the holder they start) that
    runs the real one with ``--bwlimit``: a transfer of known length."""
    real = shutil.which("rsync")
    assert real, "rsync is not installed"
    paced = tmp_path / "paced-bin"
    paced.mkdir()
    wrapper = paced / "rsync"
    wrapper.write_text(f'#!/bin/sh\nexec {real} --bwlimit={mib_per_s}m "$@"\n')
    wrapper.chmod(0o755)
    path = f"{paced}:{env.cli.env.get('PATH', os.defpath)}"
    env.cli = replace(env.cli, env={**env.cli.env, "PATH": path})


def make_big_file(path: Path, mib: int = BIG_MIB) -> None:
    """``mib`` MiB of real (not sparse) data."""
    block = b"\x5a" * (1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)


def tree_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path`` (0 if it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = Path(dirpath, name)
            if full.is_file() and not full.is_symlink():
                total += full.stat().st_size
    return total


def local_transfer_processes(run_id: str) -> list[str]:
    """Command lines of this machine's rsync client and bridge working for ``run_id``."""
    return [row[4] for row in _rows(run_id)
            if "rsh_bridge" in row[4] or "--blocking-io" in row[4]]


def any_process_of(run_id: str) -> list[str]:
    """Command lines of every live process that names ``run_id`` (the remote rsync too)."""
    return [row[4] for row in _rows(run_id)]


def _rows(run_id: str) -> list[tuple[int, int, int, str, str]]:
    pids = set(live(lambda row: run_id in row[4]))
    return [row for row in proc_table() if row[0] in pids]


def assert_stopped_growing(measure: Callable[[], int], what: str) -> None:
    """``measure()`` gives the same answer twice, a second apart."""
    import time

    before = measure()
    time.sleep(1.0)
    assert measure() == before, f"{what} still grows after the run ended"


def partials(directory: Path) -> list[Path]:
    return sorted(directory.glob(".remote-exec-*.partial")) if directory.exists() else []


# -- 5. a cancel stops everything local --------------------------------------------------------

#: (mode, transfer, how the run is stopped)
STAGES = [("holder", "rsync", "SIGTERM"), ("no-holder", "rsync", "SIGTERM"),
          ("holder", "sftp", "SIGTERM"), ("holder", "rsync", "timeout")]
#: (mode, how the run is stopped)
FETCHES = [("holder", "SIGTERM"), ("no-holder", "SIGTERM"), ("holder", "cancel")]
#: the exit code and journal state each way of stopping ends with
ENDS = {"SIGTERM": (143, "cancelled"), "cancel": (143, "cancelled"),
        "timeout": (124, "timed_out")}


def stop(env: Env, run_id: str, how: str) -> None:
    """Stop the newest run the way ``how`` says (``timeout``: it stops itself)."""
    if how == "SIGTERM":
        env.bg[-1].signal(signal.SIGTERM)
    elif how == "cancel":
        cancelled = env("cancel", run_id[:8])
        assert cancelled.returncode == 0, cancelled.stderr


@pytest.mark.parametrize(("mode", "transfer", "how"), STAGES, ids=lambda v: v)
def test_cancel_during_stage_stops_the_transfer(env: Env, mode: str, transfer: str,
                                                how: str, tmp_path: Path) -> None:
    make_big_file(env.work / "big.bin")
    if transfer == "rsync":
        # a fast machine stages BIG_MIB through the tunnel within the timeout; the
        # timeout's run is paced at half speed (16 s), its clock starts with the process,
        # and it skips the cache (hashing 256 MiB first): a loaded machine still reaches
        # the stage well within it
        pace_local_rsync(env, tmp_path, FETCH_PACE_MIB // (2 if how == "timeout" else 1))
    limit = ["--timeout", "8s", "--no-cache"] if how == "timeout" else []
    run = env.start("run", "--site", "loop", *MODES[mode], *limit, "--transfer", transfer,
                    "--into", str(env.dest), "--cmd", env.count(), "big.bin")
    rundir = env.rundir()
    wait_until(lambda: tree_bytes(rundir) > 4 << 20, 60, "the stage to be under way")
    assert bool(local_transfer_processes(rundir.name)) == (transfer == "rsync")
    stop(env, rundir.name, how)
    code, state = ENDS[how]
    assert run.wait(30) == code, run.stderr
    assert local_transfer_processes(rundir.name) == [], "rsync or its bridge outlived the run"
    wait_until(lambda: not any_process_of(rundir.name), 10, "the remote rsync to end")
    assert_stopped_growing(lambda: tree_bytes(rundir), "the remote staged file")
    assert tree_bytes(rundir) < (BIG_MIB << 20)
    record = env.record()
    assert (record.state, record.phase) == (state, "created"), record
    assert partials(env.dest) == []
    assert env.runs_of_entrypoint() == 0


@pytest.mark.parametrize(("mode", "how"), FETCHES, ids=lambda v: v)
def test_cancel_during_rsync_fetch_stops_it_and_resume_fetches(env: Env, mode: str, how: str,
                                                               tmp_path: Path) -> None:
    pace_local_rsync(env, tmp_path, FETCH_PACE_MIB)
    run = env.start("run", "--site", "loop", *MODES[mode], "--transfer", "rsync",
                    "--into", str(env.dest), "--cmd",
                    f"{env.count()}; head -c {BIG_MIB}M /dev/zero | tr '\\0' Z > out.bin")
    record = env.wait_phase("finished", timeout=60)
    wait_until(lambda: partials(env.dest) and tree_bytes(partials(env.dest)[0]) > 16 << 20,
               60, "rsync to be fetching")
    stop(env, record.id, how)
    assert run.wait(30) == 143, run.stderr
    assert local_transfer_processes(record.id) == [], "rsync or its bridge outlived the run"
    wait_until(lambda: not any_process_of(record.id), 10, "the remote rsync to end")
    kept = partials(env.dest)
    assert [p.name for p in kept] == [f".remote-exec-{record.id}.partial"]
    assert str(kept[0]) in run.stderr  # kept for `resume`, and said so
    assert f"remote-exec resume {record.id[:8]}" in run.stderr
    assert_stopped_growing(lambda: tree_bytes(kept[0]), "the local partial directory")
    assert not (env.dest / "out.bin").exists()
    record = env.record()
    assert (record.state, record.phase, record.exit_code) == ("cancelled", "finished", 0)

    kept_by_cleanup = env("cleanup", "loop", "--older-than", "0s")
    assert kept_by_cleanup.returncode == 0, kept_by_cleanup.stderr
    assert (env.root / record.id).is_dir(), kept_by_cleanup.stdout

    resumed = env("resume", record.id[:8], *MODES[mode])
    assert resumed.returncode == 0, resumed.stderr
    assert (env.dest / "out.bin").stat().st_size == BIG_MIB << 20
    assert partials(env.dest) == []
    assert env.runs_of_entrypoint() == 1
    record = env.record()
    assert (record.state, record.phase) == ("succeeded", "cleaned"), record


# -- 6. nothing unfetched is removed -----------------------------------------------------------

@pytest.fixture
def tiny_dirs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Makes 1 MiB tmpfs mounts to fetch into (root only; skipped if mount fails)."""
    with contextlib.ExitStack() as mounts:
        yield lambda name: mounts.enter_context(mounted_tmpfs(tmp_path / name,
                                                              "size=1m,mode=0755"))


def grow(path: Path) -> None:
    remount(path, "size=16m")


def verdict(stdout: str, run_id: str) -> str:
    match = re.search(rf"^(.+?)\s{{2,}}\S*{run_id}\s", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(1).strip()


def test_cleanup_keeps_unfetched_results_force_removes_them_resume_fetches(
        env: Env, tiny_dirs: Callable[[str], Path]) -> None:
    command = f"{env.count()}; head -c 3000000 /dev/zero > out.bin; echo done > small.txt"
    ids = []
    for name in ("a", "b"):
        proc = env("run", "--site", "loop", "--no-holder", "--into", str(tiny_dirs(name)),
                   "--cmd", command)
        assert proc.returncode == 74, proc.stderr  # the local disk is full
        assert "remote-exec resume" in proc.stderr
        ids.append(env.records()[0].id)
    a, b = ids
    for run_id in ids:
        record = env.record(run_id)
        assert (record.state, record.phase, record.exit_code) == ("failed", "finished", 0)

    cleanup = env("cleanup", "loop", "--older-than", "0s")
    assert cleanup.returncode == 0, cleanup.stderr
    assert verdict(cleanup.stdout, a) == verdict(cleanup.stdout, b) == "kept (unfetched)"
    assert "--force" in cleanup.stdout
    assert (env.root / a).is_dir() and (env.root / b).is_dir()

    grow(env.tmp / "a")  # the cause fixed: resume fetches, the entrypoint does not run again
    resumed = env("resume", a[:8], "--no-holder")
    assert resumed.returncode == 0, resumed.stderr
    assert (env.tmp / "a" / "out.bin").stat().st_size == 3000000
    assert (env.tmp / "a" / "small.txt").read_text() == "done\n"
    assert partials(env.tmp / "a") == []
    assert env.record(a).state == "succeeded"

    forced = env("cleanup", "loop", "--older-than", "0s", "--force")
    assert forced.returncode == 0, forced.stderr
    assert verdict(forced.stdout, b) == "removed"
    assert re.search(rf"run {b[:8]}\S*: its results were never fetched", forced.stdout), \
        forced.stdout
    assert not (env.root / b).exists()
    refused = env("resume", b[:8], "--no-holder")
    assert refused.returncode == 78, refused.stderr
    assert "cleanup --force" in refused.stderr
    assert env.runs_of_entrypoint() == 2


def test_cancel_of_an_undriven_run_that_had_finished_keeps_its_results(env: Env) -> None:
    """Its remote-exec died while waiting; the entrypoint then finished on its own; a late
    `remote-exec cancel` stops nothing, and the results stay for `resume`, not for
    `cleanup`."""
    run = env.start("run", "--site", "loop", "--no-holder", "--into", str(env.dest),
                    "--cmd", f"{env.count()}; sleep 1; echo precious > precious.txt")
    record = env.wait_phase("launched")
    run.signal(signal.SIGKILL)
    run.wait()
    wait_until((env.root / record.id / ".remote-exec" / "exit_code").exists, 30,
               "the entrypoint to finish")
    cancelled = env("cancel", record.id[:8])
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"`remote-exec resume {record.id[:8]}` fetches them" in cancelled.stdout
    record = env.record()
    assert (record.state, record.phase, record.exit_code) == ("cancelled", "finished", 0)
    cleanup = env("cleanup", "loop", "--older-than", "0s")
    assert verdict(cleanup.stdout, record.id) == "kept (unfetched)"
    resumed = env("resume", record.id[:8], "--no-holder")
    assert resumed.returncode == 0, resumed.stderr
    assert (env.dest / "precious.txt").read_text() == "precious\n"
    assert env.runs_of_entrypoint() == 1
