"""What the benchmarks share: which remote-exec to time, a throwaway loopback sshd, the
ssh options for a site, the isolated environment and configuration a benchmark runs
remote-exec with."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

#: the workload the single-run and concurrency benchmarks time: MInt's smallest module run
INPUT_NAMES = ("a", "b", "c")
INPUT_SIZE = 1000  # "1 kB"
COMMAND = "cat a b c > out"
LOG_NAME = "remote_program_exec.log"


@contextlib.contextmanager
def loopback_sshd(prefix: str = "remote-exec-bench-") -> Iterator[tuple[Path, dict]]:
    """A temporary directory with a throwaway loopback sshd in it, up for the block:
    ``(directory, the site's definition)``; prints the sshd and the tools' versions."""
    from remote_exec.sandbox import Sandbox

    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        tmp = Path(name)
        box = Sandbox(tmp / "sshd")
        try:
            site = box.up()
            print(f"sshd 127.0.0.1:{site['port']}, remote root {site['root']}; "
                  f"{nproc()} cores")
            print(f"{first_line(['ssh', '-V'])}; {first_line(['rsync', '--version'])}")
            yield tmp, site
        finally:
            box.down()


def remote_exec_command(override: str | None = None) -> list[str]:
    """The console script beside this Python (a pyenv shim would add its own start-up)."""
    if override:
        return shlex.split(override)
    beside = Path(sys.executable).parent / "remote-exec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("remote-exec")
    if found:
        return [found]
    return [sys.executable, "-m", "remote_exec"]


def nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(len(os.sched_getaffinity(0)))


def ssh_options(site: dict) -> list[str]:
    """An OpenSSH command line with the site's port, key and pinned known_hosts."""
    return [
        "ssh", "-p", str(site["port"]), "-i", site["identity_file"],
        "-o", f"UserKnownHostsFile={site['known_hosts']}",
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
    ]


def isolated_setup(tmp: Path, site: dict) -> tuple[Path, dict]:
    """Write a configuration with site ``bench``; return it and an environment whose
    state directory (and so connection holder) belongs to this benchmark alone."""
    config = tmp / "remote-exec.yaml"
    config.write_text(yaml.safe_dump({"sites": {"bench": dict(site)}}, sort_keys=False))
    env = dict(os.environ)
    env.update({
        "REMOTE_EXEC_STATE_DIR": str(tmp / "state"),
        "XDG_CONFIG_HOME": str(tmp / "xdg-config"),
        # bound the holder's life in case we are killed before `holder stop`
        "REMOTE_EXEC_HOLDER_IDLE": "60",
    })
    env.pop("REMOTE_EXEC_CONFIG", None)
    env.pop("MISYSTEM_SITEID", None)
    return config, env


def first_line(cmd: list[str]) -> str:
    """The first line a command prints (its version, say), or ``?``."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError as exc:
        return f"? ({exc})"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "?"


def legacy_steps(ssh: list[str], rsh: str, target: str, rundir: str, inputs: tuple[str, ...],
                 command: str, log_name: str) -> list[list[str]]:
    """MInt's step-by-step flow (execute_remote_command.sample.py), one process per step:
    ssh mkdir, one rsync per input, ssh run (output into the log), rsync the directory back.
    The command is grouped in ``{ ...; }`` so that its own redirections keep their meaning."""
    steps = [[*ssh, target, f"mkdir {rundir}"]]
    for name in inputs:
        steps.append(["rsync", "-av", "-L", "-e", rsh, name, f"{target}:{rundir}"])
    steps.append([*ssh, target, f"cd {rundir}; {{ {command}; }} > {rundir}/{log_name} 2>&1"])
    steps.append(["rsync", "-av", "-e", rsh, f"{target}:{rundir}/", "./"])
    return steps


def run_events(stderr: str, argv: list[str],
                needed: tuple[str, ...] = ("created", "staged", "finished", "fetched"),
                ) -> dict[str, dict]:
    """The last event of each kind in a ``remote-exec run --json`` stderr; ValueError
    naming the command when one of ``needed`` is missing."""
    events: dict[str, dict] = {}
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events[record["event"]] = record
    missing = set(needed) - events.keys()
    if missing:
        raise ValueError(f"{shlex.join(argv)}: no {sorted(missing)} event in --json output")
    return events


def add_remote_exec_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--remote-exec", metavar="CMD",
                        help="the remote-exec command to time, split like a shell would "
                             "(default: the console script beside this Python)")


def parse_args(doc: str, repeat: int, repeat_help: str) -> argparse.Namespace:
    """``--repeat N`` and ``--remote-exec CMD``, the options of the single-run benchmarks."""
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=repeat, help=repeat_help)
    add_remote_exec_option(parser)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args
