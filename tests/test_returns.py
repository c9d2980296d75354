"""The return filter on an open site: the template's ``returns`` and the site's
``never_return`` / ``only_return`` decide what comes back, over SFTP and rsync alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from remote_exec import returns

PRODUCE = ("mkdir -p res/deep scratch; echo r > res/a.dat; echo d > res/deep/b.dat; "
           "echo k > id.key; echo s > scratch/s.tmp; echo t > top.txt; "
           "ln -s top.txt top.link; ln -s /etc/passwd out.link")


@pytest.mark.parametrize("pattern, path, hit", [
    ("*.dat", "a.dat", True),
    ("*.dat", "res/a.dat", False),
    ("**/*.dat", "res/deep/a.dat", True),
    ("**/*.dat", "a.dat", True),
    ("**", "any/thing", True),
    ("res", "res/deep/b.dat", True),
    ("res/", "res/a.dat", True),
    ("scratch/**", "scratch/s.tmp", True),
    ("r?s/*.dat", "res/a.dat", True),
    ("res/*", "res/deep/b.dat", True),  # the directory res/deep matches: all of it
])
def test_patterns(pattern, path, hit):
    assert returns.agent_module().match_pattern(pattern, path) is hit


def test_never_wins_and_only_narrows():
    keep = returns.predicate(["**"], ["*.key", "scratch"], [])
    assert keep("top.txt") and keep("res/a.dat")
    assert not keep("id.key") and not keep("scratch/s.tmp")
    only = returns.predicate(["**"], [], ["res/**"])
    assert only("res/deep/b.dat") and not only("top.txt")
    assert returns.is_trivial(["**"], [], []) and not returns.is_trivial(["*.dat"], [], [])


@pytest.mark.parametrize("transfer", ["sftp", "rsync"])
def test_an_open_site_fetches_only_what_is_returned(cli, workdir, tmp_path, transfer):
    conf = yaml.safe_load(cli.config.read_text())
    loop = dict(conf["sites"]["loop"], never_return=["*.key", "scratch"],
                only_return=["res", "top.*", "*.link", "remote_program_exec.log"])
    config = tmp_path / "filtered.yaml"
    config.write_text(yaml.safe_dump({"sites": {"loop": loop}}))
    proc = cli("run", "--config", str(config), "--site", "loop", "--transfer", transfer,
               "--cmd", PRODUCE, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    got = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert got == ["remote_program_exec.log", "res", "res/a.dat", "res/deep", "res/deep/b.dat",
                   "top.link", "top.txt"]
    assert Path(workdir / "top.link").is_symlink()
