"""``transfer: auto`` chooses by the work (entries and bytes); explicit choices are honoured,
and SFTP is what remains when either end has no rsync."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from remote_exec.inputs import check_inputs
from remote_exec.ssh import transfer
from remote_exec.ssh.transfer import (
    AUTO_RSYNC_FILES,
    auto_wants_rsync,
    auto_wants_tar,
    choose_method,
)

MiB = 1024 * 1024
THRESHOLD = 256 * MiB


@pytest.mark.parametrize(("size", "files", "wanted"), [
    (0, 0, False),  # nothing to move
    (3000, 3, False),  # a few small files: rsync's start-up would dominate
    (100 * MiB, 1, False),  # one large file below the byte threshold
    (20 * AUTO_RSYNC_FILES, AUTO_RSYNC_FILES, False),  # just at the count
    (101 * (AUTO_RSYNC_FILES + 1), AUTO_RSYNC_FILES + 1, True),  # one entry more
    (2_000_000, 20_000, True),  # many small files
    (THRESHOLD, 1, True),  # the byte threshold, one file
    (THRESHOLD - 1, AUTO_RSYNC_FILES, False),
])
def test_auto_rule_takes_files_and_bytes(size: int, files: int, wanted: bool) -> None:
    assert auto_wants_rsync(size, files, THRESHOLD) is wanted
    # staging: many entries under the byte threshold go as one tar stream instead
    assert auto_wants_tar(size, files, THRESHOLD) is (files > AUTO_RSYNC_FILES
                                                      and size < THRESHOLD)


class Ends:
    """Which ends have rsync, and how often the remote was asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, local: bool, remote: bool) -> None:
        self.asked = 0
        self.remote = remote
        monkeypatch.setattr(transfer.rsync_mod, "local_rsync",
                            lambda: "/usr/bin/rsync" if local else None)
        monkeypatch.setattr(transfer.rsync_mod, "remote_has_rsync", self.remote_has_rsync)

    async def remote_has_rsync(self, conn: object) -> bool:
        self.asked += 1
        return self.remote


def choose(policy: str, size: int, files: int, cache: dict[str, bool] | None = None) -> str:
    return asyncio.run(choose_method(None, policy, size, THRESHOLD,  # type: ignore[arg-type]
                                     {} if cache is None else cache, files=files))


@pytest.mark.parametrize(("policy", "size", "files", "method"), [
    ("auto", 3000, 3, "sftp"),
    ("auto", 2_000_000, 20_000, "rsync"),
    ("auto", THRESHOLD, 1, "rsync"),
    ("rsync", 3000, 3, "rsync"),  # an explicit choice is honoured, small or not
    ("sftp", 2_000_000, 20_000, "sftp"),
    ("sftp", THRESHOLD, 1, "sftp"),
])
def test_both_ends_have_rsync(monkeypatch: pytest.MonkeyPatch, policy: str, size: int,
                              files: int, method: str) -> None:
    Ends(monkeypatch, local=True, remote=True)
    assert choose(policy, size, files) == method


@pytest.mark.parametrize(("local", "remote"), [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("policy", ["auto", "rsync", "sftp"])
def test_no_rsync_at_one_end_means_sftp(monkeypatch: pytest.MonkeyPatch, local: bool,
                                        remote: bool, policy: str) -> None:
    Ends(monkeypatch, local=local, remote=remote)
    assert choose(policy, 2_000_000, 20_000) == "sftp"
    assert choose(policy, THRESHOLD, 1) == "sftp"


def test_the_remote_is_asked_once_and_only_when_rsync_would_be_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ends = Ends(monkeypatch, local=True, remote=True)
    cache: dict[str, bool] = {}
    assert choose("auto", 3000, 3, cache) == "sftp"
    assert ends.asked == 0  # a small transfer costs no remote exec
    assert choose("auto", 2_000_000, 20_000, cache) == "rsync"
    assert choose("rsync", 10, 1, cache) == "rsync"
    assert ends.asked == 1


def test_staging_counts_files_directories_and_followed_links(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    for i in range(5):
        (tree / "a" / "b" / f"f{i}").write_text("x")
    (tmp_path / "one").write_text("1")
    (tree / "link").symlink_to(tmp_path / "one")
    inputs = check_inputs([str(tree), str(tmp_path / "one")])
    # tree, a, b, f0..f4, link; and the file input
    assert transfer.count_entries(inputs, 1000) == 10


def test_counting_stops_past_the_limit(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in range(10):
        (tree / f"d{d}").mkdir(parents=True)
        for i in range(10):
            (tree / f"d{d}" / f"f{i}").write_text("x")
    inputs = check_inputs([str(tree)])
    assert transfer.count_entries(inputs, 10_000) == 111
    counted = transfer.count_entries(inputs, 20)
    assert 20 < counted < 111


def methods(stderr: str) -> dict[str, str]:
    """The method of the ``staged`` and ``fetched`` events of a ``--json`` run."""
    found = {}
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") in ("staged", "fetched"):
            found[record["event"]] = record["method"]
    return found


def test_a_run_stages_and_fetches_by_the_count(cli, workdir: Path) -> None:
    many = AUTO_RSYNC_FILES + 10
    tree = workdir / "tree"
    tree.mkdir()
    for i in range(many):
        (tree / f"f{i}").write_text(f"{i}\n")
    # many small in (unchanged: not brought back), one out: one tar stream in, SFTP out
    proc = cli("run", "--site", "loop", "--json", "--cmd", "ls tree | wc -l > count", "tree",
               cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert methods(proc.stderr) == {"staged": "tar", "fetched": "sftp"}
    assert (workdir / "count").read_text().strip() == str(many)
    # one in, many small out: SFTP in, one tar stream out (rsync at both ends or not)
    (workdir / "n").write_text(f"{many}\n")
    into = workdir / "back"
    proc = cli("run", "--site", "loop", "--json", "--into", str(into), "--cmd",
               'mkdir out; i=0; while [ $i -lt $(cat n) ]; do echo $i > out/f$i; '
               'i=$((i+1)); done', "n", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert methods(proc.stderr) == {"staged": "sftp", "fetched": "tar"}
    assert len(list((into / "out").iterdir())) == many
    assert (into / "out" / "f7").read_text() == "7\n"
    # an explicit --transfer sftp is honoured however many files
    proc = cli("run", "--site", "loop", "--json", "--transfer", "sftp", "--into",
               str(workdir / "again"), "--cmd", "cp -r tree copy", "tree", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert methods(proc.stderr) == {"staged": "sftp", "fetched": "sftp"}
    assert len(list((workdir / "again" / "copy").iterdir())) == many
