"""The site's content cache on a restricted site (issue 14): the remote-exec agent keeps
it, copies and verifies entries itself, and confines it like run directories.

Against a real loopback sshd whose key runs only the agent (``test_restricted``'s
``locked`` site, installed by ``remote-exec site install --apply``), and, without sshd,
against the agent file itself (also under Python 3.6 when one is installed), as
``test_agent_unit`` runs it.
"""
# ruff: noqa: F811  (the fixtures imported from test_restricted are parameters by name)

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import yaml
from test_agent_unit import AGENT_PYTHON, Site, _python36, agent_module
from test_content_cache import sha, staged
from test_restricted import Locked, locked, work  # noqa: F401 - fixtures, by name

pytestmark = pytest.mark.timeout(300)

SIZE = 64 * 1024 + 7
CACHE = ".remote-exec-cache"

#: an entrypoint program: the sha256 of big.bin as it found it; with the argument
#: ``tamper`` it then writes into its input
TAMPER = """#!/bin/sh
sha256sum big.bin | cut -c1-64 > before.sha
if [ "$1" = tamper ]; then printf 'tampered by %s\\n' "$REMOTE_EXEC_RUN_ID" >> big.bin; fi
"""
#: an entrypoint program: a copy of every input as the run found it, in seen/
COPY = """#!/bin/sh
mkdir seen
for f in *; do [ "$f" = seen ] || [ "$f" = remote_program_exec.log ] || cp -R -- "$f" seen/; done
"""


def entry(root: Path, digest: str) -> Path:
    return root / CACHE / digest[:2] / digest


@pytest.fixture(scope="module")
def site(locked: Locked) -> Locked:
    """The locked site with a small cache_min_size, and the same site with ``cache:
    false`` and with a 1-byte cache cap; the tamper program beside the others."""
    config = yaml.safe_load(locked.config.read_text())
    sites = config["sites"]
    sites["locked"]["cache_min_size"] = "1K"
    sites["nocache"] = dict(sites["locked"], cache=False)
    sites["tiny"] = dict(sites["locked"], cache_size=1)
    locked.config.write_text(yaml.safe_dump(config))
    for name, text in (("tamper.sh", TAMPER), ("copy.sh", COPY)):
        (locked.scripts / name).write_text(text)
        (locked.scripts / name).chmod(0o755)
    return locked


def run(site: Locked, work: Path, *inputs: str, name: str = "locked", extra: tuple = (),
        into: str = "out", tamper: bool = False, program: str = "tamper.sh"):
    args = ["-p", "args=tamper"] if tamper else []
    proc = site.cli("run", "--site", name, "--json", "--template", "generic", "--into",
                    str(work / into), "-p", f"program={site.scripts / program}", *args,
                    *extra, *inputs, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def kept_dirs(site: Locked) -> set[Path]:
    return {p for p in site.root.iterdir() if not p.name.startswith(".")}


def test_a_second_run_sends_under_one_percent(site: Locked, work: Path):
    payload = os.urandom(SIZE)
    (work / "big.bin").write_bytes(payload)
    (work / "small.txt").write_text("under cache_min_size\n")
    first = staged(run(site, work, "big.bin", "small.txt", into="one").stderr)
    assert (first["cached_bytes"], first["sent_bytes"]) == (0, SIZE + 21)
    cached = entry(site.root, sha(payload))
    assert cached.read_bytes() == payload
    assert stat.S_IMODE(cached.stat().st_mode) == 0o444
    assert stat.S_IMODE((site.root / CACHE).stat().st_mode) == 0o700
    assert not list(cached.parent.glob(".tmp-*"))
    os.utime(cached, (1, 1))  # so the use shows
    second = staged(run(site, work, "big.bin", "small.txt", into="two").stderr)
    assert (second["cached_bytes"], second["sent_bytes"]) == (SIZE, 21)
    assert second["sent_bytes"] < 0.01 * SIZE
    assert (work / "two" / "before.sha").read_text().strip() == sha(payload)
    assert cached.stat().st_mtime > time.time() - 300  # used: last in line for eviction
    assert "cache-place: 1 of 1 files placed" in site.agent_log()
    # nor do the inputs, unchanged, come back
    fetch = [line for line in site.agent_log().splitlines() if "rsync sender" in line][-1]
    assert ", 2 unchanged inputs)" in fetch


def test_rsync_leaves_a_placed_copy_alone(site: Locked, work: Path):
    """The placed copy has the input's size and time, so rsync's quick check sends none of
    it: shown by changing the local file's bytes behind its back (same inode, size and
    time, so the digest memo and rsync both take it as unchanged): the run sees the
    cached bytes, which only a transfer that did not happen could have replaced."""
    payload = os.urandom(SIZE)
    big = work / "big.bin"
    big.write_bytes(payload)
    run(site, work, "big.bin", into="one")
    before = big.stat()
    with open(big, "r+b") as f:
        f.write(b"X" * 64)
    os.utime(big, ns=(before.st_atime_ns, before.st_mtime_ns))
    proc = run(site, work, "big.bin", into="two")
    assert staged(proc.stderr)["cached_bytes"] == SIZE
    assert (work / "two" / "before.sha").read_text().strip() == sha(payload)


def test_an_entrypoint_writing_into_its_input_changes_only_its_own_copy(site: Locked,
                                                                         work: Path):
    payload = os.urandom(SIZE)
    (work / "big.bin").write_bytes(payload)
    before = kept_dirs(site)
    run(site, work, "big.bin", into="one", tamper=True, extra=("--keep",))
    first = (kept_dirs(site) - before).pop()
    cached = entry(site.root, sha(payload))
    assert sha(cached.read_bytes()) == sha(payload)  # inserted before the launch
    second = run(site, work, "big.bin", into="two", tamper=True, extra=("--keep",))
    assert staged(second.stderr)["cached_bytes"] == SIZE
    # the second run got the cache's bytes, not the first run's changed ones
    assert (work / "two" / "before.sha").read_text().strip() == sha(payload)
    # each run changed its own copy once; the cache is untouched
    mine = (first / "big.bin").read_bytes()
    assert mine.startswith(payload) and mine.count(b"tampered by") == 1
    assert cached.read_bytes() == payload
    assert cached.stat().st_nlink == 1


def test_a_changed_entry_is_never_used(site: Locked, work: Path):
    payload = os.urandom(SIZE)
    (work / "big.bin").write_bytes(payload)
    run(site, work, "big.bin", into="one")
    cached = entry(site.root, sha(payload))
    cached.chmod(0o644)
    cached.write_bytes(os.urandom(SIZE))  # same size, other bytes
    cached.chmod(0o444)
    proc = run(site, work, "big.bin", into="two")
    moved = staged(proc.stderr)
    assert (moved["cached_bytes"], moved["sent_bytes"]) == (0, SIZE)
    assert "no longer held what its name says" in proc.stderr
    assert (work / "two" / "before.sha").read_text().strip() == sha(payload)
    assert cached.read_bytes() == payload  # removed, then the sent file went in again


def test_no_cache_and_cache_false_send_everything(site: Locked, work: Path):
    payload, other = os.urandom(SIZE), os.urandom(SIZE)
    (work / "big.bin").write_bytes(payload)
    run(site, work, "big.bin", into="one")
    assert entry(site.root, sha(payload)).exists()
    proc = run(site, work, "big.bin", into="two", extra=("--no-cache",))
    assert staged(proc.stderr)["cached_bytes"] == 0
    proc = run(site, work, "big.bin", into="three", name="nocache")
    assert staged(proc.stderr)["cached_bytes"] == 0
    assert (work / "three" / "before.sha").read_text().strip() == sha(payload)
    (work / "big.bin").write_bytes(other)
    run(site, work, "big.bin", into="four", extra=("--no-cache",))
    run(site, work, "big.bin", into="five", name="nocache")
    assert not entry(site.root, sha(other)).exists()  # nothing went in either


def test_an_agent_older_than_the_cache_costs_a_warning(site: Locked, work: Path):
    installed = site.agent_dir / "remote_exec_agent.py"
    current = installed.read_text()
    older = current
    for command in ("cache-place", "cache-insert", "cache-trim"):
        line = f'    "{command}": cmd_{command.replace("-", "_")},\n'
        assert line in older
        older = older.replace(line, "")
    payload = os.urandom(SIZE)
    (work / "big.bin").write_bytes(payload)
    installed.write_text(older)
    try:
        proc = run(site, work, "big.bin")
        done = site.cli("cleanup", "locked", "--dry-run", cwd=work)
    finally:
        installed.write_text(current)
    assert staged(proc.stderr)["cached_bytes"] == 0
    assert "the site's content cache is not used" in proc.stderr
    assert "could not update" not in proc.stderr  # (not asked again in the same run)
    assert (work / "out" / "before.sha").read_text().strip() == sha(payload)
    assert done.returncode == 0, done.stderr
    assert "the site's content cache is left alone" in done.stderr


HOSTILE = ["with space.bin", "it's \"quoted\".bin", "$(touch pwned).bin", "new\nline.bin",
           "-dash.bin", "back\\slash `tick`.bin"]


def test_hostile_names_work_with_the_cache(site: Locked, work: Path):
    tree = work / "tree $(id)"
    (tree / "sub 'q'").mkdir(parents=True)
    blobs = {}
    for i, name in enumerate(HOSTILE):
        blobs[name] = os.urandom(2048 + i)
        (tree / "sub 'q'" / name).write_bytes(blobs[name])
    (work / "big.bin").write_bytes(os.urandom(1500))
    total = sum(len(b) for b in blobs.values()) + 1500
    first = staged(run(site, work, "big.bin", tree.name, into="one").stderr)
    assert first["cached_bytes"] == 0
    second = staged(run(site, work, "big.bin", tree.name, into="two",
                        program="copy.sh").stderr)
    assert (second["cached_bytes"], second["sent_bytes"]) == (total, 0)
    for name, data in blobs.items():
        assert (work / "two" / "seen" / tree.name / "sub 'q'" / name).read_bytes() == data
        assert entry(site.root, sha(data)).read_bytes() == data
    assert not list(Path("/").glob("pwned")) and not (work / "pwned").exists()
    assert not any(p.name == "pwned" for p in site.root.rglob("*"))


def test_cleanup_trims_and_names_the_entries(site: Locked, work: Path):
    old, fresh = os.urandom(SIZE), os.urandom(SIZE)
    for name, data in (("old.bin", old), ("fresh.bin", fresh)):
        (work / "big.bin").write_bytes(data)
        run(site, work, "big.bin", into=name)
    forty_days = time.time() - 40 * 86400
    os.utime(entry(site.root, sha(old)), (forty_days, forty_days))
    debris = entry(site.root, sha(fresh)).parent / ".tmp-dead-run"
    debris.write_bytes(b"x")
    os.utime(debris, (forty_days, forty_days))
    dry = site.cli("cleanup", "locked", "--dry-run", cwd=work)
    assert dry.returncode == 0, dry.stderr
    assert f"would remove      {entry(site.root, sha(old))}  (unused for 40.0 days" in dry.stdout
    assert "unfinished insertion" in dry.stdout
    assert "0 of 2 cache entries removed" in dry.stdout
    assert entry(site.root, sha(old)).exists() and debris.exists()
    done = site.cli("cleanup", "locked", cwd=work)
    assert done.returncode == 0, done.stderr
    assert f"removed           {entry(site.root, sha(old))}" in done.stdout
    assert "2 of 2 cache entries removed" in done.stdout
    assert not entry(site.root, sha(old)).exists() and not debris.exists()
    assert entry(site.root, sha(fresh)).exists()
    # the site's cap applies after a run that used the cache (1 byte: all of it goes)
    run(site, work, "big.bin", into="capped", name="tiny")
    assert not entry(site.root, sha(fresh)).exists()
    last = [line for line in site.agent_log().splitlines() if "cache-insert:" in line][-1]
    assert "cache-insert: no files; " in last and " 0 entries trimmed" not in last


# -- the agent itself, without sshd (and under Python 3.6 when there is one) -------------------

def _pythons() -> list:
    python36 = _python36()
    return [pytest.param(AGENT_PYTHON, id="this-python"),
            pytest.param(python36, id="python-3.6",
                         marks=pytest.mark.skipif(python36 is None,
                                                  reason="no Python 3.6 on this machine"))]


@pytest.fixture(params=_pythons())
def agent(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return Site(tmp_path, python=request.param)


def call(agent: Site, command: str, request: dict) -> dict:
    return agent.ok(command, json.dumps(request).encode())


def test_the_agent_places_only_what_verifies(agent: Site):
    data = os.urandom(5000)
    digest = sha(data)
    one = agent.new_run()
    (agent.root / one / "dir").mkdir()
    (agent.root / one / "dir" / "a b\n$(x)").write_bytes(data)
    item = {"name": "dir/a b\n$(x)", "size": len(data), "sha256": digest,
            "mtime_ns": 1_500_000_000_123_456_789}
    assert call(agent, "cache-place " + one, {"files": [item]}) == {
        "enabled": True, "placed": [], "changed": []}  # no cache yet
    answer = call(agent, "cache-insert " + one, {"files": [item], "max_size": 10**9,
                                                 "max_age": 86400})
    assert answer == {"enabled": True, "inserted": 1, "trimmed": []}
    cached = entry(agent.root, digest)
    assert cached.read_bytes() == data and stat.S_IMODE(cached.stat().st_mode) == 0o444
    assert stat.S_IMODE((agent.root / CACHE).stat().st_mode) == 0o700
    two = agent.new_run()
    answer = call(agent, "cache-place " + two, {"files": [item]})
    assert answer == {"enabled": True, "placed": [item["name"]], "changed": []}
    placed = agent.root / two / "dir" / "a b\n$(x)"
    assert placed.read_bytes() == data
    assert placed.stat().st_mtime_ns == item["mtime_ns"]
    assert placed.stat().st_ino != cached.stat().st_ino and cached.stat().st_nlink == 1
    placed.write_bytes(b"changed by the run")
    assert cached.read_bytes() == data
    # an entry whose bytes changed is removed, never placed
    cached.chmod(0o644)
    cached.write_bytes(os.urandom(5000))
    three = agent.new_run()
    answer = call(agent, "cache-place " + three, {"files": [item]})
    assert answer == {"enabled": True, "placed": [], "changed": [str(cached)]}
    assert not cached.exists() and not (agent.root / three / "dir" / "a b\n$(x)").exists()
    assert not [p for p in (agent.root / three).rglob("*") if p.is_file()]
    # a file whose bytes are not its claimed digest never goes in
    other = dict(item, sha256=sha(b"something else"))
    answer = call(agent, "cache-insert " + one, {"files": [other]})
    assert answer["inserted"] == 0 and not entry(agent.root, other["sha256"]).exists()
    assert not list((agent.root / CACHE).rglob(".tmp-*"))


@pytest.mark.parametrize("bad", [
    {"sha256": "A" * 64}, {"sha256": "../../etc/passwd"}, {"sha256": "0" * 63},
    {"name": "../outside"}, {"name": "/etc/passwd"}, {"name": "a//b"}, {"name": ""},
    {"size": -1}, {"size": "1"}, {"mtime_ns": 1.5},
])
def test_the_agent_refuses_malformed_cache_requests(agent: Site, bad: dict):
    run_id = agent.new_run()
    item = dict({"name": "x", "size": 1, "sha256": "0" * 64}, **bad)
    for command in ("cache-place", "cache-insert"):
        agent.refused(f"{command} {run_id}", json.dumps({"files": [item]}).encode())
    assert not (agent.root / CACHE).exists()


def staged_file(agent: Site) -> tuple[str, dict]:
    """A new run with one file ``f`` in it (as if rsync had staged it), and the file's
    item for a cache request."""
    data = os.urandom(3000)
    run_id = agent.new_run()
    (agent.root / run_id / "f").write_bytes(data)
    return run_id, {"name": "f", "size": len(data), "sha256": sha(data)}


def test_the_agent_never_writes_through_a_link_in_the_run(agent: Site):
    one, item = staged_file(agent)
    call(agent, "cache-insert " + one, {"files": [item]})
    two = agent.new_run()
    (agent.root / two / "d").symlink_to(agent.home)
    answer = call(agent, "cache-place " + two, {"files": [dict(item, name="d/f")]})
    assert answer["placed"] == []
    assert not (agent.home / "f").exists()


def test_the_sites_allowlist_turns_the_cache_off_or_caps_it(agent: Site):
    run_id, item = staged_file(agent)
    agent.spec["cache"] = False
    agent.save()
    off = call(agent, "cache-insert " + run_id, {"files": [item]})
    assert off["enabled"] is False and "allowlist" in off["why"]
    assert not (agent.root / CACHE).exists()
    agent.spec["cache"] = {"max_size": 10}
    agent.save()
    answer = call(agent, "cache-insert " + run_id, {"files": [item], "max_size": 10**9,
                                                     "max_age": 86400})
    assert answer["inserted"] == 1
    assert [t["why"] for t in answer["trimmed"]] == ["over the cache's size cap"]
    agent.spec["cache"] = {"max_size": "10G"}
    agent.save()
    assert "max_size" in agent.run("hello").stderr.decode()


def test_cache_trim_dry_run_and_limits(agent: Site):
    run_id = agent.new_run()
    items = []
    for i in range(3):
        data = os.urandom(2000 + i)
        (agent.root / run_id / f"f{i}").write_bytes(data)
        items.append({"name": f"f{i}", "size": len(data), "sha256": sha(data)})
    call(agent, "cache-insert " + run_id, {"files": items})
    for i, item in enumerate(items):  # f0 least recently used
        os.utime(entry(agent.root, item["sha256"]), (1000 + i, 1000 + i))
    dry = call(agent, "cache-trim", {"max_size": 4500, "max_age": 10**12, "dry_run": True})
    assert [(t["path"], t["verdict"]) for t in dry["trimmed"]] == [
        (str(entry(agent.root, items[0]["sha256"])), "would remove")]
    assert all(entry(agent.root, i["sha256"]).exists() for i in items)
    done = call(agent, "cache-trim", {"max_size": 10**9, "max_age": 0})
    assert {t["verdict"] for t in done["trimmed"]} == {"removed"} and len(done["trimmed"]) == 3
    assert not any(entry(agent.root, i["sha256"]).exists() for i in items)
    agent.refused("cache-trim", json.dumps({"files": items}).encode())


def test_inputs_the_run_left_unchanged_do_not_go_back(agent: Site):
    """What the agent fetches: not the inputs as staged (the client has them, and would
    drop them), but every input the run wrote to, replaced or touched."""
    run_id = agent.new_run()
    rundir = agent.root / run_id
    for name in ("kept.bin", "written.bin", "replaced.bin", "touched.bin"):
        (rundir / name).write_bytes(os.urandom(100))
    proc = agent.launch(run_id, "generic", {"program": "/bin/true"})
    assert proc.returncode == 0, proc.stderr.decode()
    with open(rundir / "written.bin", "r+b") as f:  # same size, other bytes
        f.write(b"x")
    (rundir / "new.bin").write_bytes(b"y" * 100)
    os.replace(rundir / "new.bin", rundir / "replaced.bin")
    os.utime(rundir / "touched.bin")
    cfg = agent_module.Config(str(agent.allowlist))
    cfg.load()
    outbox, report = agent_module.build_run_outbox(cfg, agent_module.Run(cfg, run_id))
    back = {p.name for p in Path(outbox).iterdir()}
    assert {"written.bin", "replaced.bin", "touched.bin", "result.txt"} <= back
    assert "kept.bin" not in back and report["unchanged"] == 1
    # a run the agent did not launch (or an older agent's) sends all back
    (agent.state / run_id / "staged.json").unlink()
    outbox, report = agent_module.build_run_outbox(cfg, agent_module.Run(cfg, run_id))
    assert "kept.bin" in {p.name for p in Path(outbox).iterdir()} and "unchanged" not in report
