"""The wrappers under MInt's old names find remote-exec without PATH changes.

``scripts/execute_remote_command.sample.py`` and ``.sh`` look, in this order, for a
``remote-exec`` executable beside them, ``remote-exec`` on PATH, then
``python -m remote_exec``; otherwise they print one line on stderr saying how to
install it and exit 1 (the original's code for any failure). Each case is a real
``legacy`` run against the loopback sshd (or, when nothing is found, that line).
The ``.py`` wrapper also runs under Python 3.6, MInt nodes' ``/usr/bin/python3``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_agent_unit import _python36

WRAPPERS = {name: REPO / "scripts" / f"execute_remote_command.sample.{name}"
            for name in ("py", "sh")}
#: what the message names and the code the original used for any failure
NOT_FOUND = "remote-exec not found"


def _pythons() -> list:
    """The interpreters the .py wrapper runs under: this one, and a 3.6 if installed."""
    return [pytest.param(sys.executable, id="py-current"),
            pytest.param("3.6", id="py-3.6")]


def _interpreter(which: str) -> str:
    if which != "3.6":
        return which
    found = _python36()
    if found is None:
        pytest.skip("no Python 3.6 on this machine")
    return found


def _launcher(path: Path, mark: Path, label: str) -> Path:
    """A ``remote-exec`` executable that notes which one ran, then runs this checkout."""
    path.write_text(
        "#!/bin/sh\n"
        f"echo {label} >> '{mark}'\n"
        f"PYTHONPATH='{REPO}' exec '{sys.executable}' -m remote_exec \"$@\"\n")
    path.chmod(0o755)
    return path


def _place(wrapper: str, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    copy = where / WRAPPERS[wrapper].name
    shutil.copy2(WRAPPERS[wrapper], copy)
    return copy


def _bin_dir(tmp_path: Path, *tools: str, python3: str | None = None) -> Path:
    """A PATH directory holding only ``tools`` (and ``python3`` when given)."""
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        if found:
            (directory / tool).symlink_to(found)
    if python3:
        (directory / "python3").symlink_to(python3)
    return directory


def _env(cli, path: Path, *, pythonpath: bool) -> dict:
    env = dict(cli.env, PATH=str(path))
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(REPO)
    return env


def _run(command: list, workdir: Path, env: dict) -> subprocess.CompletedProcess:
    (workdir / "a").write_text("x\n")
    return subprocess.run([*command, "client_name:loop", "client_cmd:cat a a > aa",
                           "client_files:a"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=120)


def _command(wrapper: str, path: Path, python: str | None) -> list:
    return [python, str(path)] if wrapper == "py" else ["/bin/sh", str(path)]


def _cases() -> list:
    return [*(pytest.param("py", p.values[0], id=p.id) for p in _pythons()),
            pytest.param("sh", None, id="sh")]


@pytest.mark.parametrize(("wrapper", "python"), _cases())
def test_beside_the_wrapper(cli, workdir, tmp_path, wrapper, python):
    python = python and _interpreter(python)
    node = tmp_path / "node"
    copy = _place(wrapper, node)
    mark = tmp_path / "mark"
    _launcher(node / "remote-exec", mark, "beside")
    _launcher(_bin_dir(tmp_path, "rsync") / "remote-exec", mark, "path")
    proc = _run(_command(wrapper, copy, python), workdir,
                _env(cli, tmp_path / "bin", pythonpath=False))
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "aa").read_text() == "x\nx\n"
    assert mark.read_text() == "beside\n"


@pytest.mark.parametrize(("wrapper", "python"), _cases())
def test_beside_a_symlinked_wrapper(cli, workdir, tmp_path, wrapper, python):
    """A module that links to the wrapper: the file's own directory is looked in too."""
    python = python and _interpreter(python)
    node = tmp_path / "node"
    real = _place(wrapper, node)
    mark = tmp_path / "mark"
    _launcher(node / "remote-exec", mark, "beside")
    link_dir = tmp_path / "module"
    link_dir.mkdir()
    link = link_dir / real.name
    link.symlink_to(real)
    # readlink resolves the .sh wrapper's link: on PATH, as on any node
    proc = _run(_command(wrapper, link, python), workdir,
                _env(cli, _bin_dir(tmp_path, "rsync", "readlink"), pythonpath=False))
    assert proc.returncode == 0, proc.stderr
    assert mark.read_text() == "beside\n"


@pytest.mark.parametrize(("wrapper", "python"), _cases())
def test_on_path(cli, workdir, tmp_path, wrapper, python):
    python = python and _interpreter(python)
    copy = _place(wrapper, tmp_path / "node")
    mark = tmp_path / "mark"
    _launcher(_bin_dir(tmp_path, "rsync") / "remote-exec", mark, "path")
    proc = _run(_command(wrapper, copy, python), workdir,
                _env(cli, tmp_path / "bin", pythonpath=False))
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "aa").read_text() == "x\nx\n"
    assert mark.read_text() == "path\n"


@pytest.mark.parametrize("wrapper", ["py", "sh"])
def test_python_m(cli, workdir, tmp_path, wrapper):
    """Nothing beside, nothing on PATH: the Python that has remote-exec runs it."""
    copy = _place(wrapper, tmp_path / "node")
    path = _bin_dir(tmp_path, "rsync", python3=sys.executable)
    proc = _run(_command(wrapper, copy, sys.executable), workdir,
                _env(cli, path, pythonpath=True))
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "aa").read_text() == "x\nx\n"


def _assert_not_found(proc: subprocess.CompletedProcess, wrapper: str) -> None:
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"execute_remote_command.sample.{wrapper}: {NOT_FOUND}")
    assert "single-file build dist/remote-exec beside this script" in lines[0]
    assert "pip install" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("python", [pytest.param(p.values[0], id=p.id) for p in _pythons()])
def test_py_wrapper_finds_nothing(cli, workdir, tmp_path, python):
    python = _interpreter(python)
    copy = _place("py", tmp_path / "node")
    # -S: no site-packages, where an installed remote-exec (an editable one) is found
    command = [python, str(copy)] if python != sys.executable else [python, "-S", str(copy)]
    proc = _run(command, workdir, _env(cli, _bin_dir(tmp_path, "rsync"), pythonpath=False))
    _assert_not_found(proc, "py")
    assert not (workdir / "aa").exists()


def test_py_wrapper_on_python_3_6_without_remote_exec_importable(cli, workdir, tmp_path):
    """Python 3.6 cannot run remote-exec even when the package is on its path: the
    wrapper says how to install it instead of failing inside remote-exec."""
    python = _interpreter("3.6")
    copy = _place("py", tmp_path / "node")
    proc = _run([python, str(copy)], workdir,
                _env(cli, _bin_dir(tmp_path, "rsync"), pythonpath=True))
    _assert_not_found(proc, "py")


def test_sh_wrapper_finds_nothing(cli, workdir, tmp_path):
    copy = _place("sh", tmp_path / "node")
    # a python3 without remote-exec (no site-packages, no PYTHONPATH)
    fake = tmp_path / "python3-bare"
    fake.write_text(f"#!/bin/sh\nexec '{sys.executable}' -S \"$@\"\n")
    fake.chmod(0o755)
    proc = _run(["/bin/sh", str(copy)], workdir,
                _env(cli, _bin_dir(tmp_path, "rsync", python3=str(fake)), pythonpath=False))
    _assert_not_found(proc, "sh")


def test_sh_wrapper_with_no_tools_at_all(cli, workdir, tmp_path):
    """An empty PATH (no python3, no readlink, no dirname): still the one line and 1,
    never the shell's 127."""
    copy = _place("sh", tmp_path / "node")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run(["/bin/sh", str(copy)], workdir, _env(cli, empty, pythonpath=False))
    _assert_not_found(proc, "sh")


def test_the_py_wrapper_stays_python_3_6():
    vermin = shutil.which("vermin")
    if not vermin:
        pytest.skip("vermin is not installed")
    proc = subprocess.run([vermin, "-t=3.6-", "--no-tips", "--violations",
                           str(WRAPPERS["py"])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_sh_wrapper_is_posix_sh():
    dash = shutil.which("dash") or "/bin/sh"
    proc = subprocess.run([dash, "-n", str(WRAPPERS["sh"])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(WRAPPERS["sh"], os.X_OK) and os.access(WRAPPERS["py"], os.X_OK)
