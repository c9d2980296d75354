"""Hostile input names, bad inputs, unreachable or untrusted hosts, templates, a full disk.

Everything goes through the real ``remote-exec`` CLI against the loopback sshd.
"""
# ruff: noqa: F811  (fixtures imported from helpers_badinput are parameters by name)

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_badinput import (  # fixtures (absent_rsync_sshd, pwned, tmpfs_root) by name
    absent_rsync_sshd,  # noqa: F401
    event,
    free_port,
    new_ed25519_key,
    pwned,  # noqa: F401
    site_entry,
    snapshot,
    tmpfs_root,  # noqa: F401
    tree_bytes,
    write_config,
)

TRANSFERS = ["sftp", "rsync"]
#: runs go through the per-user connection holder by default; REMOTE_EXEC_HOLDER=0 runs
#: them in the CLI process itself
MODES = {"holder": {}, "in-process": {"REMOTE_EXEC_HOLDER": "0"}}


def content_for(name: str) -> bytes:
    """Distinct, binary-ish content per name (NUL, CR, high bytes, no trailing newline)."""
    raw = os.fsencode(name)
    seed = hashlib.sha256(raw).digest()
    return raw + b"\x00\r\n\xff\xfe" + seed * 37 + b"\n\n end-without-newline"


#: climbs to / from any working directory at most this deep, with no '/' in the text
_TO_ROOT = "cd ..;" * 16


def injection_name(marker: Path) -> str:
    """A legal file name (no '/', no backslash) that, if run by a shell, creates ``marker``."""
    assert marker.parent == Path("/tmp")
    return f"$({_TO_ROOT}cd tmp;touch {marker.name})"


def backtick_name(marker: Path) -> str:
    assert marker.parent == Path("/tmp")
    return f"`{_TO_ROOT}cd tmp;touch {marker.name}`"


def _sanity_check_injection(name: str, marker: Path) -> None:
    """Make sure the hostile name really would fire if a shell evaluated it."""
    subprocess.run(["sh", "-c", f"echo {name} >/dev/null"], check=True)
    assert marker.exists(), f"{name!r} does not create {marker} when evaluated"
    marker.unlink()


# -- 1. hostile names are staged byte-exact, and nothing is executed ----------------------

#: remote side: for every top-level regular file, record NUL-separated (name, sha256) and
#: copy it with cat into copies/ (so the copies also come back with the pull).
MANIFEST_CMD = (
    "mkdir report copies && for f in *; do "
    'case "$f" in report|copies|remote_program_exec.log) continue;; esac; '
    '[ -f "$f" ] || continue; '
    "printf '%s\\0%s\\0' \"$f\" \"$(sha256sum < \"$f\" | cut -c1-64)\" >> report/manifest; "
    'cat -- "$f" > "copies/$f" || exit 3; '
    "done; ls -A > report/listing; echo manifest-done"
)


@pytest.mark.parametrize("mode", ["holder", "in-process"])
@pytest.mark.parametrize("transfer", TRANSFERS)
def test_hostile_names_are_staged_byte_exact_and_never_executed(
        cli, workdir, remote_root, tmp_path, pwned, transfer, mode):
    markers = [pwned() for _ in range(4)]
    _sanity_check_injection(injection_name(markers[0]), markers[0])
    _sanity_check_injection(backtick_name(markers[1]), markers[1])
    names = [
        "with space.txt",
        "single'quote",
        'double"quote',
        "résumé 日本.dat",
        "new\nline",
        "-rf",
        "--delete",
        "a:b",
        "tab\there",
        "semi;colon & pipe | gt >",
        "*",
        "~tilde",
        injection_name(markers[0]),
        backtick_name(markers[1]),
        os.fsdecode(b"latin1-\xe9t\xe9 not utf-8.dat"),  # not valid UTF-8
    ]
    for name in names:
        (workdir / name).write_bytes(content_for(name))
    # the literal path string from the brief: '$(touch /tmp/pwned-…)' (nested directories);
    # staged under its base name 'pwned-…)'
    literal = f"$(touch {markers[2]})"
    (workdir / literal).parent.mkdir(parents=True)
    (workdir / literal).write_bytes(content_for(literal))
    # a directory input with hostile names inside
    tree = workdir / "dir 'q' $(touch x)"
    (tree / "sub\nline").mkdir(parents=True)
    (tree / "sub\nline" / backtick_name(markers[3])).write_bytes(b"deep\x00")
    (tree / "-n").write_bytes(b"dash\n")
    before = snapshot(workdir)

    into = tmp_path / "results"
    args = [*names, literal, tree.name]
    proc = cli("run", "--site", "loop", "--json", "--transfer", transfer, "--into", str(into),
               "--cmd", MANIFEST_CMD, "--", *args, cwd=workdir,  # '--': '-rf' is a name
               extra_env=MODES[mode])
    assert proc.returncode == 0, proc.stderr
    assert event(proc.stderr, "staged")["method"] == transfer
    assert event(proc.stderr, "fetched")["method"] == transfer

    for marker in markers:
        assert not marker.exists(), f"{marker} was created: a name was executed by a shell"

    staged = {name: content_for(name) for name in names}
    staged[Path(literal).name] = content_for(literal)

    # what the remote side saw: every name exactly, with its exact content
    fields = (into / "report" / "manifest").read_bytes().split(b"\0")
    assert fields[-1] == b""
    seen = dict(zip(fields[0:-1:2], fields[1:-1:2]))
    expected = {os.fsencode(n): hashlib.sha256(c).hexdigest().encode() for n, c in staged.items()}
    assert seen == expected
    assert (into / "remote_program_exec.log").read_text() == "manifest-done\n"

    # what came back: the remote copies, byte for byte (the inputs, unchanged, do not)
    for name, data in staged.items():
        assert (into / "copies" / name).read_bytes() == data, name
    expected_top = {"copies", "report", "remote_program_exec.log"}
    assert set(os.listdir(into)) == expected_top
    assert not (into / ".remote-exec").exists()

    assert snapshot(workdir) == before, "local inputs were modified"
    assert list(remote_root.iterdir()) == [], proc.stderr


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_backslash_names_in_inputs_and_results(cli, workdir, remote_root, tmp_path, transfer):
    r"""A backslash is an ordinary character in a POSIX file name ('back\slash').

    Top level, inside a directory input, and inside a result directory: all must make
    the round trip byte-exact whatever the transfer method.
    """
    (workdir / "back\\slash").write_bytes(b"top\\level\n")
    (workdir / "tree").mkdir()
    (workdir / "tree" / "in\\side").write_bytes(b"inside\n")
    into = tmp_path / "results"
    proc = cli("run", "--site", "loop", "--json", "--transfer", transfer, "--into", str(into),
               "--cmd", "mkdir made && cp 'back\\slash' 'tree/in\\side' made/ && ls made",
               "back\\slash", "tree", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert not (into / "back\\slash").exists()  # unchanged inputs do not come back
    assert not (into / "tree").exists()
    assert (into / "made" / "back\\slash").read_bytes() == b"top\\level\n"
    assert (into / "made" / "in\\side").read_bytes() == b"inside\n"
    assert list(remote_root.iterdir()) == [], proc.stderr


# -- 2. bad inputs: exit 66 before anything happens remotely -------------------------------

def _assert_input_refused(proc, remote_root: Path, *needles: str) -> None:
    assert proc.returncode == 66, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in {proc.stderr!r}"
    assert list(remote_root.iterdir()) == [], "something was created on the remote side"


def test_missing_input(cli, workdir, remote_root):
    (workdir / "present.dat").write_text("here\n")
    before = snapshot(workdir)
    proc = cli("run", "--site", "loop", "--cmd", "true", "present.dat", "missing.dat",
               cwd=workdir)
    _assert_input_refused(proc, remote_root, "missing.dat")
    assert snapshot(workdir) == before


def test_broken_symlink(cli, workdir, remote_root):
    (workdir / "present.dat").write_text("here\n")
    os.symlink("nowhere/at-all.dat", workdir / "dangling.dat")
    before = snapshot(workdir)
    proc = cli("run", "--site", "loop", "--cmd", "true", "present.dat", "dangling.dat",
               cwd=workdir)
    _assert_input_refused(proc, remote_root, "dangling.dat")
    assert "symlink" in proc.stderr
    assert snapshot(workdir) == before


def test_broken_symlink_inside_a_directory_input(cli, workdir, remote_root):
    (workdir / "tree").mkdir()
    (workdir / "tree" / "ok.txt").write_text("ok\n")
    os.symlink("gone", workdir / "tree" / "dangling-inner")
    before = snapshot(workdir)
    proc = cli("run", "--site", "loop", "--cmd", "true", "tree", cwd=workdir)
    _assert_input_refused(proc, remote_root, "dangling-inner")
    assert snapshot(workdir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_unreadable_input(cli, workdir, remote_root, kind):
    if kind == "file":
        target = workdir / "secret.dat"
        target.write_text("no\n")
        os.chmod(target, 0)
        arg, needle = "secret.dat", "secret.dat"
    else:
        (workdir / "tree").mkdir()
        target = workdir / "tree" / "secret.dat"
        target.write_text("no\n")
        os.chmod(target, 0)
        arg, needle = "tree", "secret.dat"
    try:
        before = snapshot(workdir)
        proc = cli("run", "--site", "loop", "--cmd", "true", arg, cwd=workdir)
        _assert_input_refused(proc, remote_root, needle)
        assert snapshot(workdir) == before
    finally:
        os.chmod(target, 0o644)


def test_two_inputs_with_the_same_base_name(cli, workdir, remote_root):
    for sub in ("x", "y"):
        (workdir / sub).mkdir()
        (workdir / sub / "data.txt").write_text(f"from {sub}\n")
    before = snapshot(workdir)
    proc = cli("run", "--site", "loop", "--cmd", "true", "x/data.txt", "y/data.txt",
               cwd=workdir)
    _assert_input_refused(proc, remote_root, "x/data.txt", "y/data.txt")
    assert snapshot(workdir) == before


def test_all_input_problems_are_reported_at_once(cli, workdir, remote_root):
    os.symlink("nowhere", workdir / "dangling")
    proc = cli("run", "--site", "loop", "--cmd", "true", "missing-1", "dangling", cwd=workdir)
    _assert_input_refused(proc, remote_root, "missing-1", "dangling")


# -- 3-5. unreachable and untrusted hosts ------------------------------------------------

@pytest.fixture
def bad_sites(tmp_path, sshd, remote_root):
    """A configuration with sites that cannot be reached or trusted; returns (path, info)."""
    empty_kh = tmp_path / "empty_known_hosts"
    empty_kh.write_text("")
    other_host_key = new_ed25519_key(tmp_path / "other_host_key")
    kind, blob = Path(f"{other_host_key}.pub").read_text().split()[:2]
    changed_kh = tmp_path / "changed_known_hosts"
    changed_kh.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    stranger = new_ed25519_key(tmp_path / "stranger_key")
    sites = {
        "nohost": {"host": "no-such-host.invalid", "root": str(remote_root),
                   "connect_timeout": 15},
        "refused": site_entry(sshd, remote_root, port=free_port(), connect_timeout=15),
        "unknownkey": site_entry(sshd, remote_root, known_hosts=str(empty_kh)),
        "changedkey": site_entry(sshd, remote_root, known_hosts=str(changed_kh)),
        "wronguser": site_entry(sshd, remote_root, identity_file=str(stranger)),
        "loop": site_entry(sshd, remote_root),
    }
    path = write_config(tmp_path / "bad-sites.yaml", sites)
    return path, {"empty_kh": empty_kh, "changed_kh": changed_kh, "stranger": stranger,
                  "port": sshd.port}


def _run_on(cli, config: Path, site: str, workdir: Path, *extra: str):
    (workdir / "in.dat").write_text("input\n")
    return cli("run", "--config", str(config), "--site", site, *extra, "--cmd", "touch ran",
               "in.dat", cwd=workdir, timeout=60)


def test_unknown_host(cli, workdir, remote_root, bad_sites):
    proc = _run_on(cli, bad_sites[0], "nohost", workdir)
    assert proc.returncode == 69, proc.stderr
    assert "no-such-host.invalid" in proc.stderr
    assert "unknown host" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "ran").exists()


def test_connection_refused(cli, workdir, remote_root, bad_sites):
    proc = _run_on(cli, bad_sites[0], "refused", workdir)
    assert proc.returncode == 69, proc.stderr
    assert "refused" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(remote_root.iterdir()) == []


def test_host_key_not_known(cli, workdir, remote_root, bad_sites):
    config, info = bad_sites
    proc = _run_on(cli, config, "unknownkey", workdir)
    assert proc.returncode == 77, proc.stderr
    assert "not known" in proc.stderr
    assert str(info["empty_kh"]) in proc.stderr
    assert "ssh-keyscan" in proc.stderr or "ssh -p" in proc.stderr  # how to add it
    assert str(info["port"]) in proc.stderr
    assert "CHANGED" not in proc.stderr
    assert list(remote_root.iterdir()) == []
    assert info["empty_kh"].read_text() == ""  # never silently recorded


def test_host_key_changed(cli, workdir, remote_root, bad_sites):
    config, info = bad_sites
    recorded = info["changed_kh"].read_text()
    proc = _run_on(cli, config, "changedkey", workdir)
    assert proc.returncode == 77, proc.stderr
    assert "CHANGED" in proc.stderr
    assert "ssh-keygen -R" in proc.stderr
    assert f"[127.0.0.1]:{info['port']}" in proc.stderr
    assert list(remote_root.iterdir()) == []
    assert info["changed_kh"].read_text() == recorded


def test_wrong_user_key(cli, workdir, remote_root, bad_sites):
    config, info = bad_sites
    proc = _run_on(cli, config, "wronguser", workdir)
    assert proc.returncode == 77, proc.stderr
    assert "authentication" in proc.stderr
    assert str(info["stranger"]) in proc.stderr
    assert list(remote_root.iterdir()) == []


def test_bad_sites_config_is_otherwise_sound(cli, workdir, remote_root, bad_sites):
    """Control: the same configuration works with the good site (so the failures are real)."""
    proc = _run_on(cli, bad_sites[0], "loop", workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "ran").exists()


# -- 6. no rsync on the remote side: fall back to SFTP, same results ------------------------

RESULT_CMD = (
    "cat 'sp ace.txt' bin.dat > joined; mkdir -p made/deep; cp -- 'sp ace.txt' made/deep/; "
    "sha256sum -- 'sp ace.txt' bin.dat tree/leaf > sums; ls -A tree > tree.list; "
    "printf 'out\\000put' > made/bin; echo finished"
)


def _compare_rsync_site_with_fallback_site(cli, workdir: Path, tmp_path: Path,
                                           remote_root: Path, fallback_site: str,
                                           config: Path | None = None) -> None:
    (workdir / "sp ace.txt").write_text("spaced\n")
    (workdir / "bin.dat").write_bytes(os.urandom(20_000))
    (workdir / "tree").mkdir()
    (workdir / "tree" / "leaf").write_bytes(b"leaf\x00\n")
    os.chmod(workdir / "tree" / "leaf", 0o640)
    before = snapshot(workdir)
    results = {}
    extra = ["--config", str(config)] if config else []
    for site in ("loop", fallback_site):
        into = tmp_path / f"out-{site}"
        proc = cli("run", *extra, "--site", site, "--json", "--transfer", "rsync",
                   "--into", str(into), "--cmd", RESULT_CMD, "sp ace.txt", "bin.dat", "tree",
                   cwd=workdir)
        assert proc.returncode == 0, f"{site}: {proc.stderr}"
        results[site] = (into, event(proc.stderr, "staged")["method"],
                         event(proc.stderr, "fetched")["method"])
    assert results["loop"][1:] == ("rsync", "rsync")
    assert results[fallback_site][1:] == ("sftp", "sftp")
    a, b = tree_bytes(results["loop"][0]), tree_bytes(results[fallback_site][0])
    assert a == b
    assert a["remote_program_exec.log"] == b"finished\n"
    assert "bin.dat" not in a  # an unchanged input does not come back
    assert a["joined"] == b"spaced\n" + (workdir / "bin.dat").read_bytes()
    assert a["made/bin"] == b"out\x00put"
    for rel in a:
        ma = os.lstat(results["loop"][0] / rel).st_mode
        mb = os.lstat(results[fallback_site][0] / rel).st_mode
        assert ma == mb, rel
    assert snapshot(workdir) == before
    assert list(remote_root.iterdir()) == []


def test_rsync_requested_but_missing_remotely_falls_back_to_sftp(
        cli, workdir, tmp_path, nosync_sshd, remote_root):
    """``nosync_sshd``: rsync is hidden behind a non-executable empty file."""
    _compare_rsync_site_with_fallback_site(cli, workdir, tmp_path, remote_root, "norsync")


def test_rsync_requested_but_not_installed_remotely_falls_back_to_sftp(
        cli, workdir, tmp_path, sshd, absent_rsync_sshd, remote_root):
    """Same, with rsync really absent from the remote side's /usr/bin."""
    config = write_config(tmp_path / "absent.yaml", {
        "loop": site_entry(sshd, remote_root),
        "absent": site_entry(absent_rsync_sshd, remote_root),
    })
    _compare_rsync_site_with_fallback_site(cli, workdir, tmp_path, remote_root, "absent",
                                           config)


def test_rsync_round_trip_of_a_large_payload(cli, workdir, tmp_path, remote_root):
    """rsync through the tunnel must not lose data when the local side is slower."""
    payload = os.urandom(4 * 1024 * 1024)
    (workdir / "big in.bin").write_bytes(payload)
    into = tmp_path / "results"
    copies = 8  # 32 MiB back: enough for the local rsync to fall behind the tunnel
    proc = cli("run", "--site", "loop", "--json", "--transfer", "rsync", "--into", str(into),
               "--cmd", "cat" + " 'big in.bin'" * copies + " > 'big out.bin'",
               "big in.bin", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert event(proc.stderr, "fetched")["method"] == "rsync"
    assert "Traceback" not in proc.stderr
    assert not (into / "big in.bin").exists()  # an unchanged input does not come back
    assert (into / "big out.bin").read_bytes() == payload * copies
    assert (workdir / "big in.bin").read_bytes() == payload
    assert [p.name for p in remote_root.iterdir()] == [".remote-exec-cache"]  # (issue 14)


# -- 8. templates -----------------------------------------------------------------------

def test_template_argument_is_passed_literally(cli, workdir, remote_root, pwned):
    m1, m2, m3 = pwned(), pwned(), pwned()
    args = [f"hello; touch {m1}", f"$(touch {m2})", f"`touch {m3}`", "it's \"quoted\"", "*"]
    proc = cli("run", "--site", "loop", "--template", "generic", "-p", "program=/bin/echo",
               *[x for a in args for x in ("-p", f"args={a}")], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "remote_program_exec.log").read_text() == " ".join(args) + "\n"
    for marker in (m1, m2, m3):
        assert not marker.exists()
    assert list(remote_root.iterdir()) == []


def test_template_single_argument_from_the_brief(cli, workdir, pwned):
    marker = pwned()
    proc = cli("run", "--site", "loop", "--template", "generic", "-p", "program=/bin/echo",
               "-p", f"args=hello; touch {marker}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "remote_program_exec.log").read_text() == f"hello; touch {marker}\n"
    assert not marker.exists()


@pytest.fixture
def template_sites(tmp_path, sshd, remote_root):
    sites = {
        # would fail with 69 if remote-exec tried to connect before refusing the template
        "faraway": {"host": "no-such-host.invalid", "root": str(remote_root),
                    "templates": ["generic", "another-one"]},
        "notemplates": site_entry(sshd, remote_root, templates=[]),
    }
    return write_config(tmp_path / "template-sites.yaml", sites)


def test_template_not_allowed_is_refused_before_connecting(cli, workdir, template_sites):
    proc = cli("run", "--config", str(template_sites), "--site", "faraway",
               "--template", "forbidden", "-p", "x=1", cwd=workdir, timeout=60)
    assert proc.returncode == 78, proc.stderr
    assert "'forbidden'" in proc.stderr and "not allowed" in proc.stderr
    assert "generic" in proc.stderr and "another-one" in proc.stderr  # the allowed ones
    assert "unknown host" not in proc.stderr  # it never tried to connect


def test_existing_template_not_in_the_sites_list_is_refused(cli, workdir, remote_root,
                                                           template_sites):
    proc = cli("run", "--config", str(template_sites), "--site", "notemplates",
               "--template", "generic", "-p", "program=/bin/echo", cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    assert "not allowed" in proc.stderr and "none" in proc.stderr
    assert list(remote_root.iterdir()) == []


@pytest.mark.parametrize("params, needle", [
    (["program=/bin/echo", "nosuch=1"], "nosuch"),
    (["program=/bin/echo", "args=line one\nline two"], "newline"),
    (["program=/bin/echo", "args=carriage\rreturn"], "newline"),
    (["program=/bin/echo\ntouch x"], "newline"),
    (["program=/bin/echo;id"], "pattern"),
    (["program=/bin/echo", "noequals"], "KEY=VALUE"),
    ([], "program"),  # required parameter missing
], ids=["unknown-param", "newline-in-arg", "cr-in-arg", "newline-in-program",
        "program-pattern", "no-equals", "required-missing"])
def test_bad_template_parameters_are_refused(cli, workdir, remote_root, pwned, params, needle):
    proc = cli("run", "--site", "loop", "--template", "generic",
               *[x for p in params for x in ("-p", p)], cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(remote_root.iterdir()) == []
    assert not (workdir / "remote_program_exec.log").exists()


# -- 9. a full remote disk ----------------------------------------------------------------

@pytest.mark.parametrize("transfer", TRANSFERS)
def test_full_remote_disk_is_a_staging_error(cli, workdir, tmp_path, sshd, tmpfs_root,
                                             transfer):
    if transfer == "rsync" and not shutil.which("rsync"):
        pytest.skip("no rsync")
    config = write_config(tmp_path / "tiny.yaml", {"tiny": site_entry(sshd, tmpfs_root)})
    payload = os.urandom(2 * 1024 * 1024)
    (workdir / "big.bin").write_bytes(payload)
    before = snapshot(workdir)
    proc = cli("run", "--config", str(config), "--site", "tiny", "--transfer", transfer,
               "--cmd", "touch ran", "big.bin", cwd=workdir, timeout=60)
    assert proc.returncode == 73, proc.stderr
    assert re.search(r"full|free space|no space left", proc.stderr, re.IGNORECASE), proc.stderr
    assert "Traceback" not in proc.stderr
    assert (workdir / "big.bin").read_bytes() == payload
    assert snapshot(workdir) == before
    assert not (workdir / "ran").exists()
    assert list(tmpfs_root.iterdir()) == [], "the half-staged run directory was left behind"
