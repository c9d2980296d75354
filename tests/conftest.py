"""Real parts on loopback: an OpenSSH server with throwaway keys, real rsync, the real CLI.

Fixtures:
  sshd          a running loopback sshd (session-wide), a ``remote_exec.sandbox.Sandbox``
  nosync_sshd   the same, but the remote side has no rsync (a mount namespace hides it)
  site_config   writes a configuration with site ``loop`` (and ``norsync``) and returns its path
  cli           runs the installed ``remote-exec`` command in a subprocess
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from remote_exec.sandbox import Sandbox

REPO = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (``-n 3 --dist loadgroup``, see pyproject.toml) a test file runs
    whole on one worker, as with ``--dist loadfile``: its module fixtures (an sshd, remote
    accounts, a Slurm cluster) are made once. Files that share one machine-wide resource
    name a group of their own (the Slurm files: ``xdist_group("slurm")``)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def _start(directory: Path, wrapper: list[str] | None = None) -> Sandbox:
    box = Sandbox(directory, wrapper=wrapper)
    box.up()
    return box


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    box = _start(tmp_path_factory.mktemp("sshd"))
    yield box
    box.down()


def _without(program: str, tmp_path_factory: pytest.TempPathFactory):
    """A loopback sshd whose sessions cannot run ``program`` (an empty file bind-mounted
    over it, in a mount namespace of the sshd's own)."""
    unshare = shutil.which("unshare")
    path = shutil.which(program)
    if os.geteuid() != 0 or not unshare or not path:
        pytest.skip(f"hiding {program} needs root and unshare(1)")
    directory = tmp_path_factory.mktemp(f"no-{program}")
    empty = directory / f"not-{program}"
    empty.write_text("")
    script = f'mount --bind {empty} {os.path.realpath(path)} && exec "$@"'
    return _start(directory, wrapper=[unshare, "-m", "sh", "-c", script, "sh"])


@pytest.fixture(scope="session")
def nosync_sshd(tmp_path_factory: pytest.TempPathFactory):
    """A loopback sshd whose sessions cannot find rsync."""
    box = _without("rsync", tmp_path_factory)
    yield box
    box.down()


@pytest.fixture(scope="session")
def notar_sshd(tmp_path_factory: pytest.TempPathFactory):
    """A loopback sshd whose sessions cannot run tar."""
    box = _without("tar", tmp_path_factory)
    yield box
    box.down()


def site_entry(box: Sandbox, root: Path, **extra: object) -> dict:
    entry = box.site_definition()
    entry["root"] = str(root)
    entry.update(extra)
    return entry


@pytest.fixture
def remote_root(tmp_path: Path) -> Path:
    root = tmp_path / "remote-root"
    root.mkdir()
    return root


@pytest.fixture
def site_config(tmp_path: Path, sshd: Sandbox, remote_root: Path, request: pytest.FixtureRequest):
    sites = {"loop": site_entry(sshd, remote_root)}
    if "nosync_sshd" in request.fixturenames:
        sites["norsync"] = site_entry(request.getfixturevalue("nosync_sshd"), remote_root)
    if "notar_sshd" in request.fixturenames:
        sites["notar"] = site_entry(request.getfixturevalue("notar_sshd"), remote_root)
    path = tmp_path / "remote-exec.yaml"
    path.write_text(yaml.safe_dump({"sites": sites}))
    return path


@dataclass
class Cli:
    config: Path
    state: Path
    env: dict

    def __call__(self, *args: str, cwd: Path, input: str | None = None,
                 extra_env: dict | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**self.env, **(extra_env or {})}
        return subprocess.run(
            [sys.executable, "-m", "remote_exec", *args], cwd=cwd, env=env, input=input,
            capture_output=True, text=True, timeout=timeout,
        )


@pytest.fixture
def cli(tmp_path: Path, site_config: Path) -> Cli:
    state = tmp_path / "state"
    env = dict(os.environ)
    env.update({
        "REMOTE_EXEC_CONFIG": str(site_config),
        "REMOTE_EXEC_STATE_DIR": str(state),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "REMOTE_EXEC_HOLDER_IDLE": "30",
    })
    env.pop("MISYSTEM_SITEID", None)
    env.pop("REMOTE_EXEC_HOLDER", None)
    cli = Cli(config=site_config, state=state, env=env)
    yield cli
    cli("holder", "stop", cwd=tmp_path)  # each test's state directory has its own holder


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work
