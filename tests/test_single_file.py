"""The single-file build (``scripts/build_single_file.py``) runs with no Python at all.

The file is built once per source tree (cached under pytest's temporary root, keyed
by a hash of everything that goes into it) and run under ``env -i`` with a PATH that
holds only ``rsync``: ``--version``, ``--help``, and real ``legacy`` runs through the
``.sh`` wrapper beside it against the loopback sshd, by SFTP and by rsync (whose
remote shell is the file itself), through the connection holder the file starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, site_entry

pytest.importorskip("PyInstaller", reason="PyInstaller is not installed (pip install pyinstaller)")

BUILD = REPO / "scripts" / "build_single_file.py"
SOURCES = ("remote_exec", "templates", "remote-side_scripts")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d: (start|normal end|abnormal end): "
                      r"(\S+): unknown$")


def _source_hash() -> str:
    import PyInstaller

    digest = hashlib.sha256(f"{sys.version}\n{PyInstaller.__version__}\n".encode())
    files = [BUILD, *(p for top in SOURCES for p in sorted((REPO / top).rglob("*"))
                      if p.is_file() and "__pycache__" not in p.parts)]
    for path in files:
        digest.update(f"{path.relative_to(REPO)}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def single_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dist/remote-exec`` of this source tree, built at most once per tree."""
    root = tmp_path_factory.getbasetemp()
    if root.name.startswith("popen-gw"):  # an xdist worker's own directory
        root = root.parent
    cache = root.parent / "remote-exec-single-file" / _source_hash()
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / "remote-exec"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.is_file():
            for stale in cache.parent.iterdir():  # builds of other trees
                if stale != cache and time.time() - stale.stat().st_mtime > 3600:
                    shutil.rmtree(stale, ignore_errors=True)
            proc = subprocess.run([sys.executable, str(BUILD), "--dist", str(cache / "new")],
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            os.replace(cache / "new" / "remote-exec", binary)
            shutil.rmtree(cache / "new", ignore_errors=True)
    return binary


@pytest.fixture
def no_python_bin(tmp_path: Path) -> Path:
    """A PATH directory with rsync only: no python, no ssh, no coreutils."""
    directory = tmp_path / "bin"
    directory.mkdir()
    rsync = shutil.which("rsync")
    if rsync:
        (directory / "rsync").symlink_to(rsync)
    assert shutil.which("python3", path=str(directory)) is None
    assert shutil.which("python", path=str(directory)) is None
    return directory


def _bare_env(path: Path, tmp_path: Path, **extra: str) -> list:
    """``env -i`` with only what a MInt module's environment would surely have."""
    values = {"PATH": str(path), "HOME": os.environ.get("HOME", str(tmp_path)),
              "LANG": "C.UTF-8", **extra}
    return ["env", "-i", *(f"{k}={v}" for k, v in values.items())]


def test_version_and_help_without_python(single_file, no_python_bin, tmp_path):
    env = _bare_env(no_python_bin, tmp_path)
    proc = subprocess.run([*env, str(single_file), "--version"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from remote_exec import __version__

    assert proc.stdout == f"remote-exec, version {__version__}\n"
    proc = subprocess.run([*env, str(single_file), "--help"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("legacy", "run", "holder", "templates", "site"):
        assert f"  {command} " in proc.stdout
    # the shipped templates and the backend registry came along
    proc = subprocess.run([*env, str(single_file), "templates"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "generic" in proc.stdout and "abaqus" in proc.stdout


def test_interpreter_forms_are_refused_outside_the_package(single_file, no_python_bin,
                                                          tmp_path):
    """The file runs ``-m remote_exec…`` (its holder) and its own rsync bridge, nothing
    else: any other module or script is a CLI usage error."""
    env = _bare_env(no_python_bin, tmp_path)
    for args in (["-m", "json.tool"], ["-S", "-E", str(tmp_path / "x.py")]):
        proc = subprocess.run([*env, str(single_file), *args], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "No such option" in proc.stderr


@pytest.fixture
def node(tmp_path: Path, single_file: Path, sshd) -> dict:
    """A MInt node: the single file beside the .sh wrapper, a configuration with the
    loopback sshd as ``loop`` (SFTP) and ``loopsync`` (rsync), a state directory."""
    place = tmp_path / "node"
    place.mkdir()
    shutil.copy2(single_file, place / "remote-exec")
    wrapper = place / "execute_remote_command.sample.sh"
    shutil.copy2(REPO / "scripts" / wrapper.name, wrapper)
    remote_root = tmp_path / "remote-root"
    remote_root.mkdir()
    config = tmp_path / "remote-exec.yaml"
    config.write_text(yaml.safe_dump({"sites": {
        "loop": site_entry(sshd, remote_root, transfer="sftp"),
        "loopsync": site_entry(sshd, remote_root, transfer="rsync"),
    }}))
    return {"wrapper": wrapper, "binary": place / "remote-exec", "config": config,
            "state": tmp_path / "state", "remote_root": remote_root}


def _node_env(node: dict, path: Path, tmp_path: Path, **extra: str) -> list:
    return _bare_env(path, tmp_path, REMOTE_EXEC_CONFIG=str(node["config"]),
                     REMOTE_EXEC_STATE_DIR=str(node["state"]),
                     REMOTE_EXEC_HOLDER_IDLE="20", **extra)


def _solver_lines(base: Path, site_id: str) -> list:
    lines = (base / site_id / "solver_logs" / "solver_execute.log").read_text().splitlines()
    found = [LOG_LINE.match(line) for line in lines]
    assert all(found), lines
    return [m.groups() for m in found if m]


def _holder_pid(env: list, node: dict, cwd: Path) -> str:
    status = subprocess.run([*env, str(node["binary"]), "holder", "status"],
                            capture_output=True, text=True, timeout=60, cwd=cwd)
    assert status.returncode == 0, status.stderr
    found = re.match(r"pid (\d+):", status.stdout)
    assert found, status.stdout
    return found.group(1)


@pytest.mark.parametrize("site", ["loop", "loopsync"])
def test_legacy_through_the_wrapper_without_python(node, no_python_bin, tmp_path, site):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.dat").write_text("1\n")
    (work / "b.dat").write_text("2\n")
    base = tmp_path / "assets"
    env = _node_env(node, no_python_bin, tmp_path, MISYSTEM_SITEID="site00001",
                    REMOTE_EXEC_SOLVER_LOG_BASE=str(base))
    try:
        proc = subprocess.run(
            [*env, str(node["wrapper"]), f"client_name:{site}",
             "client_cmd:cat a.dat b.dat > out.dat", "client_files:a.dat,b.dat",
             "solver:abaqus"], cwd=work, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (work / "out.dat").read_text() == "1\n2\n"
        assert (work / "remote_program_exec.log").exists()
        assert _solver_lines(base, "site00001") == [("start", "abaqus"),
                                                    ("normal end", "abaqus")]
        assert list(node["remote_root"].iterdir()) == []  # removed after success
        holder = _holder_pid(env, node, work)

        failed = subprocess.run(
            [*env, str(node["wrapper"]), f"client_name:{site}",
             "client_cmd:echo solver exploded; exit 3", "client_files:a.dat"],
            cwd=work, capture_output=True, text=True, timeout=180)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        marker = "---------- remote side log ----------------"
        assert f"{marker}\nsolver exploded\n{marker}\n" in failed.stdout

        # both runs went through the one holder the file started as `remote-exec -m ...`
        # (a second start of the file runs the same code: the holder was not replaced)
        assert _holder_pid(env, node, work) == holder
        assert "Traceback" not in (node["state"] / "holder" / "holder.log").read_text()
    finally:
        subprocess.run([*env, str(node["binary"]), "holder", "stop"], capture_output=True,
                       timeout=60, cwd=tmp_path)


def test_sigterm_cancels_the_remote_job(node, no_python_bin, tmp_path):
    """MInt stops a module with SIGTERM: the file's launcher passes it on to remote-exec,
    which stops the remote process group; the wrapper exits 1 as the original did."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.dat").write_text("1\n")
    started = tmp_path / "started"
    env = _node_env(node, no_python_bin, tmp_path)
    proc = subprocess.Popen(
        [*env, str(node["wrapper"]), "client_name:loop",
         f"client_cmd:touch {started}; sleep 4321", "client_files:a.dat"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert started.exists(), proc.communicate(timeout=30)
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, out + err
        assert "SIGTERM" in err
        deadline = time.monotonic() + 15
        while _sleeping() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _sleeping(), "the remote job still runs"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        subprocess.run([*env, str(node["binary"]), "holder", "stop"], capture_output=True,
                       timeout=60, cwd=tmp_path)


def _sleeping() -> bool:
    """Whether the remote job's `sleep 4321` (on this same machine) is still running."""
    return subprocess.run(["pgrep", "-f", "sleep 4321"], capture_output=True).returncode == 0


def test_py_wrapper_on_python_3_6_runs_the_single_file_beside_it(node, no_python_bin,
                                                                  tmp_path):
    """The node of issue 18: only /usr/bin/python3.6, and the single file beside the
    .py wrapper."""
    from test_agent_unit import _python36

    python = _python36()
    if python is None:
        pytest.skip("no Python 3.6 on this machine")
    wrapper = node["binary"].parent / "execute_remote_command.sample.py"
    shutil.copy2(REPO / "scripts" / wrapper.name, wrapper)
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.dat").write_text("1\n")
    env = _node_env(node, no_python_bin, tmp_path)
    try:
        proc = subprocess.run([*env, python, str(wrapper), "client_name:loop",
                               "client_cmd:cat a.dat a.dat > out.dat", "client_files:a.dat"],
                              cwd=work, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (work / "out.dat").read_text() == "1\n1\n"
    finally:
        subprocess.run([*env, str(node["binary"]), "holder", "stop"], capture_output=True,
                       timeout=60, cwd=tmp_path)
